// Runs `virsh` (child_process, no shell) against one libvirt connection URI, with a deadline, and
// turns failures into errors that carry virsh's own message. Also small readers for the bits of
// libvirt XML the adapter needs (no XML library: libvirt's output is regular and attribute-quoted).
import { execFile } from 'node:child_process';
import { BulwarkError } from '../../common/errors.js';

export class VirshError extends BulwarkError {
  /** virsh's stderr, trimmed (e.g. "error: Requested operation is not valid: no job is active on the domain"). */
  readonly stderr: string;
  constructor(message: string, stderr: string, cause: unknown, context: Record<string, string>) {
    super(message, { kind: /not found|no domain|failed to get domain/i.test(stderr) ? 'not-found' : 'unavailable', context, cause });
    this.name = 'VirshError';
    this.stderr = stderr;
  }
}

export class Virsh {
  readonly uri: string;
  constructor(uri: string) {
    this.uri = uri;
  }

  /** Runs `virsh -c URI ARGS…` and resolves with stdout. */
  async run(args: readonly string[], timeoutMs = 60_000): Promise<string> {
    return new Promise((resolve, reject) => {
      execFile('virsh', ['-q', '-c', this.uri, ...args], { timeout: timeoutMs, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
        if (!err) return resolve(stdout);
        const msg = stderr.trim() || (err.killed ? `no answer within ${timeoutMs} ms` : err.message);
        reject(new VirshError(`virsh ${args[0]} ${args[1] ?? ''} failed: ${msg}`.replace(/ +/g, ' '), msg, err, { uri: this.uri, command: args[0] ?? '' }));
      });
    });
  }
}

/** The value of attribute `name` in an XML start tag (single or double quotes), unescaped. */
export function attr(tag: string, name: string): string | undefined {
  const m = tag.match(new RegExp(`\\s${name}=(?:'([^']*)'|"([^"]*)")`));
  const v = m ? (m[1] ?? m[2]) : undefined;
  return v === undefined ? undefined : unescapeXml(v);
}

/** Every `<tag …>…</tag>` (or self-closed) element of `xml`, as text. Not for nested same-name tags. */
export function elements(xml: string, tag: string): string[] {
  const re = new RegExp(`<${tag}(\\s[^>]*)?(/>|>[\\s\\S]*?</${tag}>)`, 'g');
  return [...xml.matchAll(re)].map((m) => m[0]);
}

/** The start tag of the first `<tag …>` in `xml`. */
export function startTag(xml: string, tag: string): string | undefined {
  return xml.match(new RegExp(`<${tag}(\\s[^>]*)?/?>`))?.[0];
}

/** Text content of the first `<tag>text</tag>`. */
export function text(xml: string, tag: string): string | undefined {
  const m = xml.match(new RegExp(`<${tag}(?:\\s[^>]*)?>([^<]*)</${tag}>`));
  return m?.[1] === undefined ? undefined : unescapeXml(m[1]);
}

export function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

function unescapeXml(s: string): string {
  return s.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&apos;/g, "'").replace(/&quot;/g, '"').replace(/&amp;/g, '&');
}
