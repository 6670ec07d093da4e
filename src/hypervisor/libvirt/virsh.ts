// Runs `virsh` (child_process, no shell) against one libvirt connection URI, with a deadline, and
// turns failures into errors that carry virsh's own message. Also small readers for the bits of
// libvirt XML the adapter needs (no XML library: libvirt's output is regular and attribute-quoted).
import { runTool, ToolError } from '../../common/process.js';

export class Virsh {
  readonly uri: string;
  constructor(uri: string) {
    this.uri = uri;
  }

  /**
   * Runs `virsh -c URI ARGS…` and resolves with stdout. Fails with a ToolError whose `stderr` holds
   * virsh's own words ("error: Requested operation is not valid: no job is active on the domain").
   */
  async run(args: readonly string[], timeoutMs = 60_000): Promise<string> {
    try {
      return await runTool('virsh', ['-q', '-c', this.uri, ...args], `virsh ${args[0] ?? ''} ${args[1] ?? ''}`.trim(), {
        timeoutMs,
        context: { uri: this.uri },
      });
    } catch (err) {
      if (!(err instanceof ToolError)) throw err;
      // A missing domain is "not found"; anything else from libvirt means it cannot do it now.
      const kind = /not found|no domain|failed to get domain/i.test(err.stderr) ? 'not-found' : 'unavailable';
      throw new ToolError(err.message, { stderr: err.stderr, exitCode: err.exitCode, timedOut: err.timedOut, kind, context: { ...err.context }, cause: err.cause });
    }
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
