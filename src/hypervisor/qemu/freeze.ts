// Guest processing around a snapshot, shared by both adapters: freeze the guest's file systems,
// run the snapshot, thaw at once, and measure the window. A failed or timed-out freeze falls back
// to crash-consistent with a warning, or fails the backup when guest processing is required. A VM
// whose vCPUs are stopped (paused) is not asked at all: its agent cannot answer.
import { BulwarkError, describeError } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import type { Consistency } from '../types.js';

/** Freezes and thaws a guest's file systems (the guest agent, directly or through libvirt). */
export interface FileSystemFreezer {
  /** Freezes; resolves with the number of file systems frozen. */
  freeze(timeoutMs: number): Promise<number>;
  /** Thaws; resolves with the number thawed. */
  thaw(timeoutMs: number): Promise<number>;
  close(): Promise<void>;
}

export interface FrozenSnapshotResult<T> {
  readonly value: T;
  readonly consistency: Consistency;
  /** ms from the freeze request to the thaw reply; null when nothing was frozen. */
  readonly freezeWindowMs: number | null;
  readonly warnings: string[];
}

/**
 * Runs `snapshot` with the guest frozen. `openFreezer` failing or the freeze failing gives a
 * crash-consistent snapshot with a warning, or a BulwarkError when `require` is set (then
 * `snapshot` does not run). The thaw is always attempted, right after `snapshot`, even when it fails.
 *
 * `stopped`: the VM's run state when its vCPUs do not run (QEMU's query-status `paused`,
 * `suspended`, `prelaunch`, …; libvirt's `paused`). Then no freeze is tried (the guest agent
 * cannot answer; asking would only wait out the timeout): the snapshot is crash-consistent with
 * a warning that says why, or, with `require`, the backup fails naming the VM and its state.
 */
export async function withFrozenGuest<T>(
  vmName: string,
  openFreezer: () => Promise<FileSystemFreezer>,
  snapshot: () => Promise<T>,
  opts: { require: boolean; freezeTimeoutMs: number; log: Logger; stopped?: string | undefined },
): Promise<FrozenSnapshotResult<T>> {
  const warnings: string[] = [];
  if (opts.stopped !== undefined) {
    const state = opts.stopped;
    // prelaunch: started with -S and not yet continued; to its user a paused VM too.
    const paused = state === 'paused' || state === 'prelaunch';
    const what = paused ? `VM ${vmName} is paused${state === 'paused' ? '' : ` (run state ${state})`}` : `VM ${vmName} is not running (run state ${state})`;
    if (opts.require) {
      throw new BulwarkError(`${what}: its file systems cannot be frozen (a guest whose vCPUs are stopped cannot answer its agent), and this backup requires guest processing`, {
        kind: 'conflict',
        context: { vm: vmName, state },
        hint: 'resume the VM (QMP cont, virsh resume) and run the backup again, or allow crash-consistent backups for this job',
      });
    }
    // Pausing drains the block layer (QEMU's vm_stop completes the requests in flight): the disks
    // hold what the guest had written when it paused, not what it still kept in its memory (page
    // cache). Other stopped states (io-error, guest-panicked, …) may hold a request to retry.
    warnings.push(
      paused
        ? `${what}: file systems not frozen (a paused guest's agent cannot answer); the backup is crash-consistent with no guest writes in flight: the disks as the guest left them when it was paused, without what it still held in memory`
        : `${what}: file systems not frozen (its guest agent cannot answer); the backup is crash-consistent: the disks as the guest left them when it stopped`,
    );
    opts.log.info({ vm: vmName, state }, 'VM not running: guest freeze skipped; crash-consistent');
    const value = await snapshot();
    return { value, consistency: 'crash', freezeWindowMs: null, warnings };
  }
  let freezer: FileSystemFreezer | undefined;
  let frozenAt: number | undefined;
  let freezeError: unknown;
  try {
    freezer = await openFreezer();
    const asked = performance.now();
    await freezer.freeze(opts.freezeTimeoutMs);
    frozenAt = asked;
  } catch (err) {
    freezeError = err;
  }
  if (freezeError !== undefined) {
    // A freeze that timed out may still happen in the guest later: always ask for a thaw too.
    if (freezer) await freezer.thaw(opts.freezeTimeoutMs).catch(() => undefined);
    await freezer?.close().catch(() => undefined);
    const why = `guest file systems of VM ${vmName} could not be frozen: ${describeError(freezeError)}`;
    if (opts.require) {
      throw new BulwarkError(why, {
        kind: 'unavailable',
        context: { vm: vmName },
        cause: freezeError,
        hint: 'check that qemu-guest-agent runs in the guest, or allow crash-consistent backups for this job',
      });
    }
    warnings.push(`${why}; the backup is crash-consistent`);
    opts.log.warn({ vm: vmName, err: describeError(freezeError) }, 'guest freeze failed; falling back to crash-consistent');
    const value = await snapshot();
    return { value, consistency: 'crash', freezeWindowMs: null, warnings };
  }
  let value: T;
  try {
    value = await snapshot();
  } finally {
    let thawError: unknown;
    try {
      await freezer!.thaw(opts.freezeTimeoutMs);
    } catch (err) {
      thawError = err;
    }
    await freezer!.close().catch(() => undefined);
    if (thawError !== undefined) {
      opts.log.error({ vm: vmName, err: describeError(thawError) }, 'guest thaw failed');
      warnings.push(`thawing the guest file systems of VM ${vmName} failed: ${describeError(thawError)} (the agent thaws by itself after its timeout)`);
    }
  }
  const freezeWindowMs = Math.round((performance.now() - frozenAt!) * 10) / 10;
  opts.log.info({ vm: vmName, freezeWindowMs }, 'guest file systems frozen for the snapshot');
  return { value, consistency: 'application', freezeWindowMs, warnings };
}
