// A libvirt VM's stored domain XML read and rewritten for a restore as a new domain: its disks
// (target dev -> source file and driver type), and the XML of a new domain with a new name and
// UUID, new disk paths and formats, new MAC addresses, no libvirt-generated runtime paths
// (agent channel sockets), and every other path under the original's disk folder moved to the new
// VM's folder. Pure: no I/O, no XML library (libvirt writes regular, quoted XML). docs/restore-vm.md.
import { BulwarkError } from '../../common/errors.js';

export interface DomainDisk {
  /** Target dev ('vda'): the disk's name in the backup. */
  readonly name: string;
  readonly imagePath: string;
  readonly format: string;
}

/** The value of attribute `name` in a start tag (unescaped). */
export function attr(tag: string, name: string): string | undefined {
  const m = tag.match(new RegExp(`\\s${name}=(?:'([^']*)'|"([^"]*)")`));
  const v = m ? (m[1] ?? m[2]) : undefined;
  return v === undefined ? undefined : unescapeXml(v);
}

function setAttr(tag: string, name: string, value: string): string {
  const re = new RegExp(`(\\s${name}=)(?:'[^']*'|"[^"]*")`);
  if (re.test(tag)) return tag.replace(re, `$1'${escapeXml(value)}'`);
  return tag.replace(/\s*(\/?)>$/, ` ${name}='${escapeXml(value)}'$1>`);
}

/** The first start tag `<tag …>` in `xml`. */
export function startTag(xml: string, tag: string): string | undefined {
  return xml.match(new RegExp(`<${tag}(\\s[^>]*)?/?>`))?.[0];
}

export function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

function unescapeXml(s: string): string {
  return s.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&apos;/g, "'").replace(/&quot;/g, '"').replace(/&amp;/g, '&');
}

const DISK_RE = /<disk(\s[^>]*)?>[\s\S]*?<\/disk>/g;

/** The file-backed disks (device='disk') of a domain XML. */
export function domainDisks(xml: string): DomainDisk[] {
  const out: DomainDisk[] = [];
  for (const m of xml.matchAll(DISK_RE)) {
    const d = m[0];
    const open = startTag(d, 'disk') ?? '';
    if ((attr(open, 'device') ?? 'disk') !== 'disk') continue;
    const target = attr(startTag(d, 'target') ?? '', 'dev');
    const source = startTag(d, 'source');
    const file = source ? (attr(source, 'file') ?? attr(source, 'dev')) : undefined;
    if (!target || !file) continue;
    out.push({ name: target, imagePath: file, format: attr(startTag(d, 'driver') ?? '', 'type') ?? 'raw' });
  }
  return out;
}

/** The `<name>` of a domain XML. */
export function domainName(xml: string): string | undefined {
  const m = xml.match(/<name>([^<]*)<\/name>/);
  return m?.[1] === undefined ? undefined : unescapeXml(m[1]);
}

export interface RewriteDomainOptions {
  readonly name: string;
  readonly uuid: string;
  /** New path and format of each disk, by target dev. */
  readonly disks: ReadonlyMap<string, { readonly path: string; readonly format: string }>;
  /** Other paths under `fromDir` (serial logs, kernels copied next to the disks) move to `toDir`. */
  readonly fromDir: string;
  readonly toDir: string;
  readonly newMac: () => string;
  /** A UEFI domain's variable store: the new VM's copy (`<nvram>` then names it). */
  readonly nvram?: string;
}

/**
 * The domain XML with `<nvram>` naming `file`: the path of libvirt 9's `<nvram …>PATH</nvram>`
 * (attributes such as `template` kept), the `<source file>` of newer libvirt's form, or a new
 * `<nvram>` after `<loader>` when the XML has none (libvirt chose it when the domain started).
 * Fails when the XML has no `<os>`.
 */
export function setDomainNvram(xml: string, file: string): string {
  const os = xml.match(/<os(?:\s[^>]*)?>[\s\S]*?<\/os>/)?.[0];
  if (!os) throw new BulwarkError('the stored domain XML has no <os> element for the UEFI variable store', { kind: 'corrupt' });
  const path = escapeXml(file);
  let next: string;
  const full = os.match(/<nvram(\s[^>]*)?>([\s\S]*?)<\/nvram>/);
  const empty = os.match(/<nvram(\s[^>]*)?\/>/);
  if (full) {
    const inner = full[2] ?? '';
    const source = startTag(inner, 'source');
    const replaced = source ? `<nvram${full[1] ?? ''}>${inner.replace(source, setAttr(source, 'file', file))}</nvram>` : `<nvram${full[1] ?? ''}>${path}</nvram>`;
    next = os.replace(full[0], replaced);
  } else if (empty) {
    next = os.replace(empty[0], `<nvram${empty[1] ?? ''}>${path}</nvram>`);
  } else if (/<\/loader>|<loader(\s[^>]*)?\/>/.test(os)) {
    next = os.replace(/(<\/loader>|<loader(?:\s[^>]*)?\/>)/, `$1\n    <nvram>${path}</nvram>`);
  } else {
    next = os.replace(/<\/os>$/, `  <nvram>${path}</nvram>\n  </os>`);
  }
  return xml.replace(os, next);
}

/** The `<nvram>` path of a domain XML (libvirt 9 text or `<source file>`), if any. */
export function domainNvramPath(xml: string): string | undefined {
  const os = xml.match(/<os(?:\s[^>]*)?>[\s\S]*?<\/os>/)?.[0] ?? '';
  const full = os.match(/<nvram(?:\s[^>]*)?>([\s\S]*?)<\/nvram>/);
  if (!full) return undefined;
  const inner = full[1] ?? '';
  const source = startTag(inner, 'source');
  const p = source ? attr(source, 'file') : unescapeXml(inner.trim());
  return p || undefined;
}

/** The domain XML of a new VM restored from `xml` (see the file comment). */
export function rewriteDomainXml(xml: string, o: RewriteDomainOptions): string {
  let out = xml;
  if (!/<name>[^<]*<\/name>/.test(out)) throw new BulwarkError('the stored domain XML has no <name>', { kind: 'corrupt' });
  out = out.replace(/<name>[^<]*<\/name>/, `<name>${escapeXml(o.name)}</name>`);
  out = /<uuid>[^<]*<\/uuid>/.test(out)
    ? out.replace(/<uuid>[^<]*<\/uuid>/, `<uuid>${o.uuid}</uuid>`)
    : out.replace(/(<name>[^<]*<\/name>)/, `$1\n  <uuid>${o.uuid}</uuid>`);
  // Disks: new source file and driver type; a backing chain recorded with the disk no longer applies.
  const seen = new Set<string>();
  out = out.replace(DISK_RE, (d) => {
    const target = attr(startTag(d, 'target') ?? '', 'dev');
    const n = target ? o.disks.get(target) : undefined;
    const open = startTag(d, 'disk') ?? '';
    if (!n || (attr(open, 'device') ?? 'disk') !== 'disk') return d;
    seen.add(target!);
    let r = d.replace(/<backingStore[\s\S]*?<\/backingStore>|<backingStore\s*\/>/g, '');
    r = r.replace(open, setAttr(open, 'type', 'file'));
    const src = startTag(r, 'source');
    r = src ? r.replace(src, `<source file='${escapeXml(n.path)}'/>`) : r.replace(/(<disk[^>]*>)/, `$1\n      <source file='${escapeXml(n.path)}'/>`);
    const drv = startTag(r, 'driver');
    r = drv ? r.replace(drv, setAttr(drv, 'type', n.format)) : r.replace(/(<disk[^>]*>)/, `$1\n      <driver name='qemu' type='${n.format}'/>`);
    return r;
  });
  for (const name of o.disks.keys()) {
    if (!seen.has(name)) throw new BulwarkError(`the stored domain XML has no disk ${name}`, { kind: 'corrupt', context: { disk: name } });
  }
  // NICs: a new MAC each (the original may still run on the same network).
  out = out.replace(/<interface(\s[^>]*)?>[\s\S]*?<\/interface>/g, (nic) => {
    const mac = startTag(nic, 'mac');
    const tag = `<mac address='${o.newMac()}'/>`;
    return mac ? nic.replace(mac, tag) : nic.replace(/(<interface[^>]*>)/, `$1\n      ${tag}`);
  });
  // Agent and other unix channels: libvirt makes a per-domain socket when no path is given.
  out = out.replace(/<channel type='unix'>[\s\S]*?<\/channel>/g, (ch) => ch.replace(/\s*<source\s[^>]*\/>/, ''));
  // Paths under the original's folder.
  const fromDir = escapeXml(o.fromDir.replace(/\/+$/, ''));
  out = out.split(`'${fromDir}/`).join(`'${escapeXml(o.toDir.replace(/\/+$/, ''))}/`);
  out = out.split(`>${fromDir}/`).join(`>${escapeXml(o.toDir.replace(/\/+$/, ''))}/`);
  if (o.nvram !== undefined) out = setDomainNvram(out, o.nvram);
  return out;
}
