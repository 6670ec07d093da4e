// The source agent's view of a repository on another host: a RestorePointTarget (what backupVm
// writes through) over the data-mover transport. The previous point comes from the server's task
// (the repository agent looked it up); blocks are hashed, zero runs coalesced and compressed with
// lz4 for the wire, then sent over N TLS streams; the repository agent commits the point and
// describes it in COMMITTED. Spec: docs/formats/data-mover-protocol.md.
import { compressSync as lz4Compress } from 'lz4-napi';
import { BulwarkError } from '../../common/errors.js';
import type { DiskBlock } from '../../disk/types.js';
import type { Checkpoint } from '../../hypervisor/types.js';
import type { RestorePointInfo, StartRestorePointOptions, WriteDiskOptions } from '../../repository/index.js';
import { prepareBlocks, TransferSender, type OutgoingItem, type TransferSenderOptions } from '../../transport/index.js';
import { startVmBackup, type BackupVmOptions, type BackupVmSummary, type RestorePointSink, type RestorePointTarget } from '../backup/disk-backup.js';
import { pointFromWire } from './repository-sink.js';

export interface RemoteTargetOptions {
  readonly sender: TransferSenderOptions;
  /** The previous point of the chain and its checkpoint, as the repository agent found them. */
  readonly previous: { readonly point: RestorePointInfo; readonly checkpoint: Checkpoint } | null;
  /** Wire compression of data blocks (default lz4: fast, and the repository recompresses anyway). */
  readonly compression?: 'lz4' | 'none';
  /** Called with the sender once it is connected (statistics, tests). */
  readonly onSender?: (sender: TransferSender) => void;
}

const DEFAULT_BLOCK_SIZE = 1048576;

export class RemoteRestorePointTarget implements RestorePointTarget {
  readonly #o: RemoteTargetOptions;
  sender: TransferSender | undefined;
  /** Milliseconds from opening the streams to the target's COMMITTED. */
  transferMs = 0;

  constructor(options: RemoteTargetOptions) {
    this.#o = options;
  }

  async previousCheckpoint(_job: string, _vm: string, chainId: string): Promise<{ point: RestorePointInfo; checkpoint: Checkpoint } | null> {
    const prev = this.#o.previous;
    if (!prev || prev.checkpoint.chainId !== chainId) return null;
    return prev;
  }

  async startRestorePoint(opts: StartRestorePointOptions): Promise<RestorePointSink> {
    const opened = performance.now();
    const sender = await TransferSender.open(this.#o.sender);
    this.sender = sender;
    this.#o.onSender?.(sender);
    const blockSize = opts.kind !== 'full' ? (this.#o.previous?.point.blockSize ?? DEFAULT_BLOCK_SIZE) : (opts.blockSize ?? DEFAULT_BLOCK_SIZE);
    const sizes = new Map(opts.disks.map((d) => [d.name, d.size]));
    const stageTimes = this.#o.sender.stageTimes;
    const compress = this.#o.compression ?? 'lz4';
    try {
      await sender.beginPoint({
        kind: opts.kind,
        ...(opts.parent !== undefined ? { parent: opts.parent } : {}),
        ...(opts.kind === 'full' && opts.chainMethod !== undefined ? { chainMethod: opts.chainMethod } : {}),
        ...(opts.blockSize !== undefined ? { blockSize: opts.blockSize } : {}),
        ...(opts.compression !== undefined ? { compression: opts.compression } : {}),
        vmConfig: (opts.vmConfig ?? Buffer.alloc(0)).toString('base64'),
        disks: opts.disks.map((d) => ({ name: d.name, size: d.size })),
      });
    } catch (err) {
      sender.close();
      throw err;
    }
    let finished = false;
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- the sink object below reports back to its target
    const self = this;
    return {
      async writeDisk(name: string, blocks: AsyncIterable<DiskBlock>, wo: WriteDiskOptions = {}) {
        const size = sizes.get(name);
        if (size === undefined) throw new BulwarkError(`disk ${name} was not declared for this restore point`, { kind: 'invalid', context: { disk: name } });
        let done = 0;
        /** Block bytes handed to the network so far (after compression): this disk's "transferred". */
        let handed = 0;
        async function* counted(): AsyncGenerator<DiskBlock> {
          for await (const b of blocks) {
            yield b;
            done += b.data?.length ?? blockSize;
            wo.onProgress?.(done, handed);
          }
        }
        async function* measured(items: AsyncIterable<OutgoingItem>): AsyncGenerator<OutgoingItem> {
          for await (const item of items) {
            if ('data' in item) handed += item.data.length;
            yield item;
          }
        }
        const items = prepareBlocks(counted(), {
          ...(stageTimes ? { stageTimes } : {}),
          ...(compress === 'lz4' ? { compress: (plain: Buffer) => smaller(plain, lz4Compress(plain)) } : {}),
        });
        const sent = await sender.sendDisk({ name, size, blockSize, ...(wo.compareWithParent ? { compareWithParent: true } : {}) }, measured(items));
        wo.onProgress?.(size, sent.bytes);
        return { storedBytes: sent.bytes, storedBlocks: sent.blocks, unchangedBlocks: 0 };
      },
      async commit() {
        finished = true;
        try {
          const point = await sender.commit();
          self.transferMs = performance.now() - opened;
          if (!point) throw new BulwarkError('the repository agent committed but did not describe the restore point', { kind: 'internal' });
          return pointFromWire(point);
        } finally {
          sender.close();
        }
      },
      async abort() {
        if (finished) return;
        finished = true;
        await sender.abort('the backup failed on the source agent').catch(() => undefined);
        sender.close();
      },
    };
  }
}

/** How the server paces the disks of a backup-source task with `diskTasks` (agent-link.md). */
export interface DiskPacing {
  /** The disks that have a task of their own on the server: each waits for its go. */
  readonly diskTasks: readonly string[];
  /** The disks the server has said go for so far (its latest events reply). */
  go(): readonly string[];
  /** Called while disks wait for their go, every `pollMs`: the agent sends an event, whose reply brings news. */
  waiting(): void;
  readonly pollMs?: number;
}

/**
 * One VM backed up disk by disk as the server's disk tasks get their slots: the view and the
 * restore point are taken once; each disk starts when the server names it (the disks without a task
 * of their own start at once) and runs beside the others on the same transfer; the point is
 * committed when every disk is done. On any failure the point and the view are aborted.
 */
export async function backupVmByDisks(o: BackupVmOptions, pacing: DiskPacing): Promise<BackupVmSummary> {
  const b = await startVmBackup(o);
  const running = new Map<string, Promise<unknown>>();
  let finished = 0;
  let failed: { error: unknown } | null = null;
  let wake: (() => void) | null = null;
  const start = (name: string): void => {
    const done = b.backupDisk(name).then(
      () => {
        finished++;
        wake?.();
      },
      (err: unknown) => {
        failed ??= { error: err };
        wake?.();
      },
    );
    running.set(name, done);
  };
  const sleep = (ms: number) =>
    new Promise<void>((resolve) => {
      const t = setTimeout(resolve, ms);
      wake = () => {
        clearTimeout(t);
        resolve();
      };
    }).finally(() => (wake = null));
  try {
    const own = new Set(pacing.diskTasks);
    const orphans = b.disks.filter((d) => !own.has(d));
    if (orphans.length > 0) o.onLog?.('info', `disk(s) ${orphans.join(', ')} of VM ${b.vm} have no task of their own in this round: backed up at once`);
    for (const d of orphans) start(d);
    // Until every disk is done or one failed: start the disks the server lets go.
    while (finished < b.disks.length) {
      const f = failed as { error: unknown } | null;
      if (f) throw f.error;
      o.signal?.throwIfAborted();
      for (const d of pacing.go()) if (b.disks.includes(d) && !running.has(d)) start(d);
      await sleep(pacing.pollMs ?? 200);
      if (running.size < b.disks.length) pacing.waiting();
    }
    return await b.commit();
  } catch (err) {
    // Abort first (the disks still running then fail fast), then let them settle.
    await b.abort(err);
    await Promise.allSettled(running.values());
    throw err;
  }
}

function smaller(plain: Buffer, compressed: Buffer): { compression: 'lz4' | 'none'; data: Buffer } {
  return compressed.length < plain.length ? { compression: 'lz4', data: compressed } : { compression: 'none', data: plain };
}
