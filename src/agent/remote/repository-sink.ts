// The repository agent's end of a backup task: a TransferSink that writes what a source agent
// sends into a restore point of a repository on this host. BEGIN_POINT starts the point, each
// OPEN_DISK..END_DISK runs the writer's writeDisk over the blocks as they come (the receiver
// delivers them in sequence order, so block indexes increase), COMMIT commits it. Until the commit
// nothing is visible; abort (or a lost source) removes the temporary file.
import { uncompressSync as lz4Uncompress } from 'lz4-napi';
import { createRequire } from 'node:module';
import { BulwarkError, describeError } from '../../common/errors.js';
import type { DiskBlock } from '../../disk/types.js';
import type { DiskWriteStats, Repository, RestorePointInfo, StartRestorePointOptions } from '../../repository/index.js';
import type { BeginPointMessage, EndDiskMessage, OpenDiskMessage, ReceivedBlockMessage, ZeroRunMessage } from '../../transport/frame.js';
import type { TransferSink } from '../../transport/index.js';

interface ZstdModule {
  decompress(data: Buffer): Buffer;
}
let zstd: ZstdModule | undefined;
function zstdDecompress(data: Buffer): Buffer {
  zstd ??= createRequire(import.meta.url)('zstd-napi') as ZstdModule;
  return zstd.decompress(data);
}

/** A hand-over point between the receiver (producer) and writeDisk (consumer): one item at a time. */
class BlockChannel implements AsyncIterable<DiskBlock> {
  #items: DiskBlock[] = [];
  #taken: Array<() => void> = [];
  #wake: (() => void) | undefined;
  #ended = false;
  #failed: Error | undefined;

  /** Resolves when the consumer has taken the block (back-pressure: the writer's pace). */
  async push(block: DiskBlock): Promise<void> {
    if (this.#failed) throw this.#failed;
    this.#items.push(block);
    const taken = new Promise<void>((resolve) => this.#taken.push(resolve));
    this.#wake?.();
    await taken;
  }

  end(): void {
    this.#ended = true;
    this.#wake?.();
  }

  fail(err: Error): void {
    this.#failed = err;
    for (const t of this.#taken.splice(0)) t();
    this.#wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<DiskBlock> {
    for (;;) {
      if (this.#failed) throw this.#failed;
      const item = this.#items.shift();
      if (item) {
        this.#taken.shift()?.();
        yield item;
        continue;
      }
      if (this.#ended) return;
      await new Promise<void>((resolve) => (this.#wake = resolve));
      this.#wake = undefined;
    }
  }
}

interface OpenDisk {
  readonly message: OpenDiskMessage;
  readonly channel: BlockChannel;
  readonly done: Promise<Pick<DiskWriteStats, 'storedBytes' | 'storedBlocks' | 'unchangedBlocks'>>;
}

/** The committed point as sent back in COMMITTED (dates as ISO strings). */
export function pointToWire(p: RestorePointInfo): Record<string, unknown> {
  return { ...p, time: p.time.toISOString(), disks: p.disks.map((d) => ({ name: d.name, size: d.size })) };
}

/** The inverse of pointToWire; throws when a field is missing. */
export function pointFromWire(o: Record<string, unknown>): RestorePointInfo {
  const s = (k: string): string => {
    const v = o[k];
    if (typeof v !== 'string') throw new BulwarkError(`the committed restore point has no ${k}`, { kind: 'invalid' });
    return v;
  };
  const n = (k: string): number => {
    const v = o[k];
    if (typeof v !== 'number') throw new BulwarkError(`the committed restore point has no ${k}`, { kind: 'invalid' });
    return v;
  };
  return {
    id: s('id'),
    job: s('job'),
    vm: s('vm'),
    chainId: s('chainId'),
    method: o.method === 'reverse' ? 'reverse' : 'forward',
    kind: s('kind') as RestorePointInfo['kind'],
    time: new Date(s('time')),
    file: s('file'),
    fileBytes: n('fileBytes'),
    base: typeof o.base === 'string' ? o.base : null,
    disks: Array.isArray(o.disks) ? (o.disks as Array<{ name: string; size: number }>).map((d) => ({ name: String(d.name), size: Number(d.size) })) : [],
    blockSize: n('blockSize'),
    compression: s('compression') as RestorePointInfo['compression'],
    encrypted: o.encrypted === true,
    ...damageFromWire(o.damage),
  };
}

/** A point's health-check damage (RestorePointInfo.damage) as the agent sent it; absent when none or malformed. */
function damageFromWire(v: unknown): Pick<RestorePointInfo, 'damage'> {
  if (typeof v !== 'object' || v === null) return {};
  const d = v as { metadata?: unknown; disks?: unknown };
  const disks = Array.isArray(d.disks) ? d.disks.filter((x): x is string => typeof x === 'string') : [];
  return { damage: { metadata: d.metadata === true, disks } };
}

export interface RepositorySinkOptions {
  readonly repository: Repository;
  readonly job: string;
  readonly vm: string;
  /** A full's (a new chain's) password. */
  readonly password?: string | undefined;
  /** An increment's or reverse injection's: the password of the chain it continues (default `password`). */
  readonly chainPassword?: string | undefined;
  /** The point's time (default: now). */
  readonly time?: Date | undefined;
  /** Called with each disk's result as it ends. */
  readonly onDisk?: (stats: SinkDiskStats) => void;
  /**
   * Opens the point BEGIN_POINT names (default: a restore point of `vm` in `repository`). A
   * per-job point gives each VM's part of the one writer (job-target-task.ts).
   */
  readonly open?: ((p: BeginPointMessage) => Promise<PointSink>) | undefined;
  /** A reverse injection's commit step (`inject`): its live progress (StartRestorePointOptions.onTransformProgress). */
  readonly onTransformProgress?: StartRestorePointOptions['onTransformProgress'];
}

/** What a sink writes a point through: a RestorePointWriter, or a VM's part of a per-job point. */
export interface PointSink {
  writeDisk(name: string, blocks: AsyncIterable<DiskBlock>, opts?: { compareWithParent?: boolean }): Promise<Pick<DiskWriteStats, 'storedBytes' | 'storedBlocks' | 'unchangedBlocks'>>;
  commit(): Promise<RestorePointInfo>;
  abort(): Promise<void>;
}

/** A disk's result as the sink reports it. */
export type SinkDiskStats = { readonly name: string } & Pick<DiskWriteStats, 'storedBytes' | 'storedBlocks' | 'unchangedBlocks'>;

/** Writes one backup task into a repository on this host. */
export class RepositorySink implements TransferSink {
  readonly #o: RepositorySinkOptions;
  #writer: PointSink | undefined;
  readonly #disks = new Map<number, OpenDisk>();
  point: RestorePointInfo | undefined;

  constructor(options: RepositorySinkOptions) {
    this.#o = options;
  }

  async beginPoint(p: BeginPointMessage): Promise<void> {
    if (this.#writer) throw new BulwarkError('BEGIN_POINT sent twice', { kind: 'invalid' });
    const o = this.#o;
    if (o.open) {
      this.#writer = await o.open(p);
      return;
    }
    // An increment or a reverse injection continues its chain (block size, compression, keys).
    const incremental = p.kind !== 'full';
    this.#writer = await o.repository.startRestorePoint({
      job: o.job,
      vm: o.vm,
      kind: p.kind,
      ...(p.parent !== undefined ? { parent: p.parent } : {}),
      ...(!incremental && p.chainMethod !== undefined ? { chainMethod: p.chainMethod } : {}),
      ...(o.time !== undefined ? { time: o.time } : {}),
      ...(!incremental && p.blockSize !== undefined ? { blockSize: p.blockSize } : {}),
      ...(!incremental && p.compression !== undefined ? { compression: p.compression } : {}),
      ...(!incremental && o.password !== undefined ? { encryption: { password: o.password } } : {}),
      ...(incremental && (o.chainPassword ?? o.password) !== undefined ? { password: o.chainPassword ?? o.password } : {}),
      vmConfig: Buffer.from(p.vmConfig, 'base64'),
      disks: p.disks,
      ...(o.onTransformProgress ? { onTransformProgress: o.onTransformProgress } : {}),
    });
  }

  async openDisk(d: OpenDiskMessage): Promise<void> {
    const writer = this.#writer;
    if (!writer) throw new BulwarkError('OPEN_DISK before BEGIN_POINT', { kind: 'invalid' });
    const channel = new BlockChannel();
    const done = writer.writeDisk(d.name, channel, d.compareWithParent ? { compareWithParent: true } : {});
    done.catch((err: unknown) => channel.fail(err instanceof Error ? err : new Error(describeError(err))));
    this.#disks.set(d.disk, { message: d, channel, done });
  }

  #disk(no: number): OpenDisk {
    const d = this.#disks.get(no);
    if (!d) throw new BulwarkError(`data for disk ${no}, which was not opened`, { kind: 'invalid' });
    return d;
  }

  async writeBlock(b: ReceivedBlockMessage): Promise<void> {
    const d = this.#disk(b.disk);
    let plain: Buffer;
    switch (b.compression) {
      case 'none':
        plain = b.data;
        break;
      case 'lz4':
        plain = lz4Uncompress(b.data);
        break;
      case 'zstd':
        plain = zstdDecompress(b.data);
        break;
    }
    if (plain.length !== b.plainLength) {
      throw new BulwarkError(`block ${b.index} of disk ${d.message.name} decompressed to ${plain.length} bytes, not ${b.plainLength}`, { kind: 'corrupt', context: { disk: d.message.name, block: b.index } });
    }
    // The source's digest goes along: the writer checks it against its own (checkSourceDigest).
    await d.channel.push({ index: b.index, data: plain, sha256: Buffer.from(b.sha256) });
  }

  async writeZeroRun(run: ZeroRunMessage): Promise<void> {
    const d = this.#disk(run.disk);
    for (let i = 0; i < run.count; i++) await d.channel.push({ index: run.start + i, data: null });
  }

  async endDisk(summary: EndDiskMessage): Promise<void> {
    const d = this.#disk(summary.disk);
    d.channel.end();
    const stats = await d.done;
    this.#o.onDisk?.({ name: d.message.name, storedBytes: stats.storedBytes, storedBlocks: stats.storedBlocks, unchangedBlocks: stats.unchangedBlocks });
  }

  async commit(): Promise<Record<string, unknown>> {
    if (!this.#writer) throw new BulwarkError('COMMIT before BEGIN_POINT', { kind: 'invalid' });
    this.point = await this.#writer.commit();
    return pointToWire(this.point);
  }

  async abort(reason: string): Promise<void> {
    const err = new BulwarkError(`backup task aborted: ${reason}`, { kind: 'internal' });
    for (const d of this.#disks.values()) d.channel.fail(err);
    await Promise.allSettled([...this.#disks.values()].map((d) => d.done));
    await this.#writer?.abort();
  }
}
