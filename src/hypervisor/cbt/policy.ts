// Changed-block-tracking policy: given the previous checkpoint of a chain and what the hypervisor
// reports about its bitmap now, decide per disk whether the changes come from the bitmap or the
// disk must be read in full (and why). Pure: the adapters gather the facts, this decides.
import { dirtyBitmapContext } from '../nbd/protocol.js';
import type { Checkpoint, DiskChanges } from '../types.js';

/** What the hypervisor reports about the previous checkpoint's bitmap on one disk. */
export type BitmapState =
  | { readonly present: false }
  | { readonly present: true; readonly inconsistent: boolean };

export interface DiskChangeFacts {
  readonly diskName: string;
  readonly virtualSize: number;
  readonly previous: Checkpoint | null;
  /** The caller asked for an active full. */
  readonly fullRequested: boolean;
  /**
   * Why it was asked, for the session log (the run plan's reason: "a full backup was asked for",
   * "active full scheduled on sun", …). Default: "an active full backup was requested".
   */
  readonly fullReason?: string | undefined;
  /** The hypervisor process now (compared with `previous.instance`). */
  readonly instance: string;
  readonly bitmap: BitmapState;
}

/** Decides where the changes of one disk come from. */
export function planDiskChanges(f: DiskChangeFacts): DiskChanges {
  const prev = f.previous;
  // The chain's first backup is a full whether asked for or not: say the real reason.
  if (!prev) {
    return { kind: 'full', reason: 'no-checkpoint', detail: 'first backup of the chain', compareDigests: false };
  }
  if (f.fullRequested) {
    return { kind: 'full', reason: 'full-requested', detail: f.fullReason ?? 'an active full backup was requested', compareDigests: false };
  }
  const before = prev.disks[f.diskName];
  if (!before) {
    return { kind: 'full', reason: 'disk-new', detail: `disk ${f.diskName} was not in the previous backup`, compareDigests: false };
  }
  if (before.size !== f.virtualSize) {
    return {
      kind: 'full',
      reason: 'disk-resized',
      detail: `disk ${f.diskName} was resized from ${before.size} to ${f.virtualSize} bytes since the previous backup`,
      compareDigests: true,
    };
  }
  const restarted = prev.instance !== f.instance;
  if (!f.bitmap.present) {
    return restarted
      ? {
          kind: 'full',
          reason: 'hypervisor-restarted',
          detail: `QEMU was restarted since the previous backup and bitmap ${prev.name} on disk ${f.diskName} did not survive it`,
          compareDigests: true,
        }
      : {
          kind: 'full',
          reason: 'bitmap-missing',
          detail: `bitmap ${prev.name} of the previous backup is missing on disk ${f.diskName} (deleted outside Bulwark?)`,
          compareDigests: true,
        };
  }
  if (f.bitmap.inconsistent) {
    return {
      kind: 'full',
      reason: 'bitmap-inconsistent',
      detail:
        `bitmap ${prev.name} on disk ${f.diskName} is marked inconsistent` +
        (restarted ? ' (QEMU stopped without saving it, then was restarted)' : ''),
      compareDigests: true,
    };
  }
  return { kind: 'bitmap', bitmap: prev.name, context: dirtyBitmapContext(prev.name) };
}

/** One line for logs and warnings: "vda: incremental from bitmap X" / "vda: full read (reason: …)". */
export function describeChanges(diskName: string, changes: DiskChanges): string {
  return changes.kind === 'bitmap'
    ? `${diskName}: changes from dirty bitmap ${changes.bitmap}`
    : `${diskName}: full read${changes.compareDigests ? ' with digest comparison' : ''} (${changes.reason}: ${changes.detail})`;
}
