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
import { prepareBlocks, TransferSender, type TransferSenderOptions } from '../../transport/index.js';
import type { RestorePointSink, RestorePointTarget } from '../backup/disk-backup.js';
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
        async function* counted(): AsyncGenerator<DiskBlock> {
          for await (const b of blocks) {
            yield b;
            done += b.data?.length ?? blockSize;
            wo.onProgress?.(done);
          }
        }
        const items = prepareBlocks(counted(), {
          ...(stageTimes ? { stageTimes } : {}),
          ...(compress === 'lz4' ? { compress: (plain: Buffer) => smaller(plain, lz4Compress(plain)) } : {}),
        });
        const sent = await sender.sendDisk({ name, size, blockSize, ...(wo.compareWithParent ? { compareWithParent: true } : {}) }, items);
        wo.onProgress?.(size);
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

function smaller(plain: Buffer, compressed: Buffer): { compression: 'lz4' | 'none'; data: Buffer } {
  return compressed.length < plain.length ? { compression: 'lz4', data: compressed } : { compression: 'none', data: plain };
}
