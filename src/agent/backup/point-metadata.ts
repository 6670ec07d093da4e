// What a backup stores in a restore point's "VM configuration" field (docs/data-path.md, "Point
// metadata"): the VM's configuration as the adapter reported it, plus the hypervisor checkpoint
// the next backup of the chain continues from. Plain JSON, UTF-8.
import { createHash } from 'node:crypto';
import { gunzipSync } from 'node:zlib';
import { BulwarkError } from '../../common/errors.js';
import type { Checkpoint, Consistency, HypervisorKind, VmConfiguration } from '../../hypervisor/types.js';

export const POINT_METADATA_FORMAT = 'bulwark-vm-point/1';

export interface PointMetadata {
  readonly format: typeof POINT_METADATA_FORMAT;
  readonly hypervisor: HypervisorKind;
  readonly vm: { readonly name: string; readonly id: string; readonly uuid?: string | undefined };
  readonly configuration: VmConfiguration;
  /** The checkpoint this point's backup created: the next incremental's `previous`. */
  readonly checkpoint: Checkpoint;
  readonly consistency: Consistency;
  readonly freezeWindowMs: number | null;
  readonly warnings: readonly string[];
}

export function encodePointMetadata(m: PointMetadata): Buffer {
  return Buffer.from(JSON.stringify(m), 'utf8');
}

/** Parses the field; null when it is empty or not Bulwark point metadata (e.g. written by a tool). */
export function decodePointMetadata(raw: Buffer): PointMetadata | null {
  if (raw.length === 0) return null;
  let v: unknown;
  try {
    v = JSON.parse(raw.toString('utf8'));
  } catch {
    return null;
  }
  if (typeof v !== 'object' || v === null || (v as { format?: unknown }).format !== POINT_METADATA_FORMAT) return null;
  const cp = (v as { checkpoint?: unknown }).checkpoint;
  if (typeof cp !== 'object' || cp === null || typeof (cp as Checkpoint).chainId !== 'string' || typeof (cp as Checkpoint).name !== 'string') {
    throw new BulwarkError('restore point metadata has no valid checkpoint', { kind: 'corrupt' });
  }
  return v as PointMetadata;
}

/**
 * The UEFI variable store saved with a point (configuration.firmware.nvram.contents), checked
 * against its recorded size and SHA-256; undefined when the VM has none saved (a BIOS VM, or a
 * point written before stores were saved). A mismatch fails, naming the point and the file.
 */
export function savedNvram(meta: PointMetadata, pointId: string): Buffer | undefined {
  const nvram = meta.configuration.firmware?.nvram;
  const c = nvram?.contents;
  if (!nvram || !c) return undefined;
  let data: Buffer;
  try {
    data = gunzipSync(Buffer.from(c.gzip, 'base64'), { maxOutputLength: Math.max(1, c.size + 1) });
  } catch (err) {
    throw new BulwarkError(`the UEFI variable store (${nvram.path}) saved with restore point ${pointId} of VM ${meta.vm.name} is damaged: ${(err as Error).message}`, {
      kind: 'corrupt',
      context: { point: pointId, vm: meta.vm.name, file: nvram.path },
      hint: 'restore from another restore point of this VM',
      cause: err,
    });
  }
  const sha256 = createHash('sha256').update(data).digest('hex');
  if (data.length !== c.size || sha256 !== c.sha256) {
    throw new BulwarkError(`the UEFI variable store (${nvram.path}) saved with restore point ${pointId} of VM ${meta.vm.name} is damaged: ${data.length} bytes, SHA-256 ${sha256}; recorded ${c.size} bytes, ${c.sha256}`, {
      kind: 'corrupt',
      context: { point: pointId, vm: meta.vm.name, file: nvram.path },
      hint: 'restore from another restore point of this VM',
    });
  }
  return data;
}
