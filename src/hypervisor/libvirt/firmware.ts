// A libvirt domain's UEFI firmware from its XML: `<os><loader type='pflash'>CODE</loader>` (the
// host's firmware, never backed up) and `<nvram template='…'>FILE</nvram>` (the VM's variable
// store, saved with the point's configuration). libvirt 9 writes the store's path as text; newer
// versions may write `<nvram type='file'><source file='…'/></nvram>` and `format='qcow2'`.
import type { VmFirmware } from '../types.js';
import { attr, startTag, text } from './virsh.js';

/** The `<os>` element of a domain XML. */
function osElement(xml: string): string | undefined {
  return xml.match(/<os(?:\s[^>]*)?>[\s\S]*?<\/os>/)?.[0];
}

/**
 * The firmware of a domain whose `<loader>` is a flash image (`type='pflash'`); undefined for a
 * BIOS domain, a ROM loader (`type='rom'`, nothing VM-specific) or a domain without `<loader>`.
 */
export function domainFirmware(xml: string): VmFirmware | undefined {
  const os = osElement(xml);
  if (!os) return undefined;
  const code = text(os, 'loader');
  const loader = startTag(os, 'loader') ?? '';
  if (!code || attr(loader, 'type') !== 'pflash') return undefined;
  const nvramTag = startTag(os, 'nvram');
  let nvramPath: string | undefined;
  let nvramFormat = 'raw';
  if (nvramTag) {
    nvramPath = text(os, 'nvram')?.trim() || undefined;
    if (!nvramPath) {
      const inner = os.match(/<nvram(?:\s[^>]*)?>([\s\S]*?)<\/nvram>/)?.[1] ?? '';
      nvramPath = attr(startTag(inner, 'source') ?? '', 'file');
    }
    nvramFormat = attr(nvramTag, 'format') ?? 'raw';
  }
  const template = nvramTag ? attr(nvramTag, 'template') : undefined;
  return {
    code: code.trim(),
    codeFormat: attr(loader, 'format') ?? 'raw',
    ...(nvramPath ? { nvram: { path: nvramPath, format: nvramFormat } } : {}),
    ...(template ? { nvramTemplate: template } : {}),
  };
}
