// Changed-block reader: turns one disk's point-in-time view (an NBD export) into the fixed-size
// `DiskBlock`s a backup stores. Incremental: only blocks the dirty bitmap marks AND that hold data
// are read; dirty blocks that now read as zeroes are yielded as `data: null` so the target records
// zeroes. Full: every block holding data is read; blocks not yielded read as zeroes. Zero and
// unallocated extents (base:allocation) are never read. Reads run in parallel over the export's
// connections, in order, with at most `concurrency` blocks in memory.
import { createHash } from 'node:crypto';
import type { DiskBlock, Extent } from '../../disk/types.js';
import { BulwarkError } from '../../common/errors.js';
import { NbdExport, type DirtyExtent } from '../nbd/client.js';
import type { BackupDiskView, DiskChanges } from '../types.js';

/** What the reader needs from a disk view: `NbdExport` is one. */
export interface BlockSource {
  readonly size: number;
  readInto(offset: number, target: Buffer): Promise<Buffer>;
  extents(offset: number, length: number): Promise<Extent[]>;
  dirtyExtents(context: string, offset: number, length: number): Promise<DirtyExtent[]>;
}

export interface ChangedBlockReaderOptions {
  /** Block size in bytes: a positive multiple of 512 (Bulwark uses 1 MiB or 4 MiB). */
  readonly blockSize: number;
  /**
   * Blocks being read at once (= blocks held in memory). Default: 4 MiB of blocks, at least 8
   * (8 of 1 MiB or 4 MiB, 16 of 256 KiB): scattered reads of an increment wait for the server's
   * latency, so the bytes in flight, not the block count, keep it busy (docs/decisions/0008);
   * 16 of 256 KiB read an increment as fast as 32 and hold 4 MiB less (docs/decisions/0010).
   */
  readonly concurrency?: number;
  /** Bytes of the disk mapped per round of block-status queries. Default 1 GiB. */
  readonly mapWindow?: number;
  readonly signal?: AbortSignal;
  /**
   * Attach the SHA-256 of each data block (`ChangedBlock.digest`). Default: on exactly when the
   * changes say the target should compare digests with the previous restore point.
   */
  readonly digests?: boolean;
  /**
   * Incremental reads: blocks (by index) to read even when the bitmap does not mark them, e.g.
   * blocks a health check found damaged in the repository (a repair re-reads them from the source).
   */
  readonly extraBlocks?: ReadonlySet<number>;
  /**
   * Read into a bounded ring of `concurrency` reusable buffers instead of a new buffer per
   * block. A yielded block's data is then valid only until the consumer asks for the next block
   * (when the buffer goes back to the ring): for consumers that copy each block before they pull
   * the next one (the repository writer does). Default false.
   */
  readonly reuseBuffers?: boolean;
  /**
   * Read straight into buffers the consumer lends (the repository writer's encoder slots,
   * `RestorePointWriter.lendBuffer()`), at least blockSize bytes each: a yielded block's data is a
   * view from the start of a lent buffer and belongs to the consumer from then on; buffers not
   * yielded (a failed read, an early stop) go back through `giveBack`. Every block in flight holds
   * one, so `concurrency` must stay below what the consumer can lend. Takes precedence over
   * `reuseBuffers`.
   */
  readonly lend?: BufferLender;
}

/** Lends block buffers to the reader (see `ChangedBlockReaderOptions.lend`). */
export interface BufferLender {
  take(): Promise<Buffer>;
  giveBack(buffer: Buffer): void;
}

/**
 * A block being read, in the reader's queue; or (`read` null) a mark that the plans up to `end`
 * are all queued (the rest of a map window holds nothing to read).
 */
interface Queued {
  readonly read: Promise<ChangedBlock> | null;
  readonly buffer: Buffer | null;
  /** The disk offset the reader has passed once this entry is handed on. */
  readonly end: number;
}

const STOP = Symbol('stop');

/** A block as the reader yields it: with its SHA-256 when digests are on (data blocks only). */
export type ChangedBlock = DiskBlock & { readonly digest?: Buffer };

/** What was read, for progress and the session log. */
export interface ChangedBlockStats {
  /**
   * The reader's position: bytes of the disk from its start up to the end of the block yielded
   * last (blocks skipped before it, unchanged or without data, count as passed). It reaches the
   * disk's size when the iteration ends. Not how far block status was queried: the reader maps a
   * whole window (1 GiB) ahead of its reads.
   */
  bytesMapped: number;
  /** Bytes actually read from the export (data extents only). */
  bytesRead: number;
  /** Blocks yielded with data. */
  dataBlocks: number;
  /** Blocks yielded as zeroes (dirty, but now zero or unallocated). */
  zeroBlocks: number;
  /** Bytes the bitmap marked dirty (incremental only). */
  bytesDirty: number;
  /**
   * Milliseconds the consumer waited for a block while the reader itself waited for a lent buffer
   * (`lend`): the consumer's own back-pressure (its encoders or writes), not the source's speed.
   */
  bufferWaitMs: number;
}

/** Blocks in flight by default for a block size: 4 MiB of them, at least 8. */
export function defaultConcurrency(blockSize: number): number {
  return Math.max(8, Math.floor((4 * 1024 * 1024) / blockSize));
}

/** One planned block: read its data ranges (offsets relative to the block), or yield zeroes. */
export interface BlockPlan {
  readonly index: number;
  readonly offset: number;
  readonly length: number;
  /** Ranges holding data, relative to the block; empty: the block reads as zeroes. */
  readonly data: ReadonlyArray<readonly [start: number, length: number]>;
}

/**
 * Plans the blocks of [start, end) (start a multiple of blockSize). `dirty` null: a full read
 * (blocks with data only). Otherwise an incremental: blocks touching a dirty extent, each with its
 * data ranges (none: yield zeroes).
 */
export function planBlocks(
  blockSize: number,
  start: number,
  end: number,
  allocation: readonly Extent[],
  dirty: readonly DirtyExtent[] | null,
  extra?: ReadonlySet<number>,
): BlockPlan[] {
  const out: BlockPlan[] = [];
  let ai = 0;
  let di = 0;
  for (let off = start; off < end; off += blockSize) {
    const blockEnd = Math.min(off + blockSize, end);
    if (dirty) {
      while (di < dirty.length && dirty[di]!.offset + dirty[di]!.length <= off) di++;
      let touched = false;
      for (let j = di; j < dirty.length && dirty[j]!.offset < blockEnd; j++) {
        if (dirty[j]!.dirty) {
          touched = true;
          break;
        }
      }
      if (!touched && !extra?.has(off / blockSize)) continue;
    }
    while (ai < allocation.length && allocation[ai]!.offset + allocation[ai]!.length <= off) ai++;
    const data: Array<readonly [number, number]> = [];
    for (let j = ai; j < allocation.length && allocation[j]!.offset < blockEnd; j++) {
      const e = allocation[j]!;
      if (e.kind !== 'data') continue;
      const s = Math.max(e.offset, off);
      const t = Math.min(e.offset + e.length, blockEnd);
      if (t <= s) continue;
      const last = data[data.length - 1];
      if (last && last[0] + last[1] === s - off) data[data.length - 1] = [last[0], last[1] + (t - s)];
      else data.push([s - off, t - s]);
    }
    if (!dirty && data.length === 0) continue;
    out.push({ index: off / blockSize, offset: off, length: blockEnd - off, data });
  }
  return out;
}

/**
 * Reads the changed blocks of one disk view.
 *
 * @example
 * const disk = await NbdExport.open({ endpoint: { socketPath }, exportName, metaContexts: contextsFor(view.changes), connections: 4 });
 * try {
 *   const reader = new ChangedBlockReader(disk, view.changes, { blockSize: 1 << 20 });
 *   for await (const block of reader.blocks()) await target.write(block);
 * } finally { await disk.close(); }
 */
export class ChangedBlockReader {
  readonly #source: BlockSource;
  readonly #changes: DiskChanges;
  readonly #blockSize: number;
  readonly #concurrency: number;
  readonly #window: number;
  readonly #signal: AbortSignal | undefined;
  readonly #digests: boolean;
  readonly #extra: ReadonlySet<number> | undefined;
  readonly #reuse: boolean;
  readonly #lend: BufferLender | undefined;
  /** Buffers of the ring not in use (reuseBuffers): at most concurrency are ever allocated. */
  readonly #free: Buffer[] = [];
  readonly stats: ChangedBlockStats = { bytesMapped: 0, bytesRead: 0, dataBlocks: 0, zeroBlocks: 0, bytesDirty: 0, bufferWaitMs: 0 };

  constructor(source: BlockSource, changes: DiskChanges, options: ChangedBlockReaderOptions) {
    const bs = options.blockSize;
    if (!Number.isInteger(bs) || bs <= 0 || bs % 512 !== 0) {
      throw new BulwarkError(`block size ${bs} is not a positive multiple of 512`, { kind: 'invalid' });
    }
    this.#source = source;
    this.#changes = changes;
    this.#blockSize = bs;
    this.#concurrency = Math.max(1, options.concurrency ?? defaultConcurrency(bs));
    const window = options.mapWindow ?? 1024 * 1024 * 1024;
    this.#window = Math.max(bs, Math.floor(window / bs) * bs);
    this.#signal = options.signal;
    this.#digests = options.digests ?? (changes.kind === 'full' && changes.compareDigests);
    this.#extra = options.extraBlocks && options.extraBlocks.size > 0 ? options.extraBlocks : undefined;
    this.#reuse = options.reuseBuffers === true;
    this.#lend = options.lend;
  }

  /** Whether blocks that are not yielded read as zeroes (full) or are unchanged (incremental). */
  get incremental(): boolean {
    return this.#changes.kind === 'bitmap';
  }

  /**
   * The blocks, in order of index. Throws (after pending reads settle) on the first failed read.
   * Reads are issued ahead of the consumer (up to `concurrency` blocks read or being read, the
   * one the consumer holds included when buffers are reused) by a
   * producer of their own, so a block that is ready is yielded even while the next one waits for a
   * buffer (with `lend`, for a free slot of the consumer's).
   */
  async *blocks(): AsyncGenerator<ChangedBlock> {
    const queue: Queued[] = [];
    let producing = true;
    /** A ring buffer the consumer holds (the block yielded last): it counts against concurrency. */
    let held = 0;
    /** The producer waits in #takeBuffer (for the consumer's lent buffer). */
    let waitingForBuffer = false;
    const produced: { error: Error | null } = { error: null };
    let stopped = false;
    let wakeConsumer: (() => void) | null = null;
    let wakeProducer: (() => void) | null = null;
    let onStop: (() => void) | null = null;
    const stop = new Promise<typeof STOP>((resolve) => (onStop = () => resolve(STOP)));
    const wake = (w: (() => void) | null) => w?.();
    const producer = (async () => {
      try {
        for await (const plan of this.#plans()) {
          if (!('index' in plan)) {
            // The end of a map window: passed once the blocks queued before it are handed on.
            queue.push({ read: null, buffer: null, end: plan.passed });
            wake(wakeConsumer);
            continue;
          }
          while (queue.length + held >= this.#concurrency && !stopped) {
            await new Promise<void>((r) => (wakeProducer = r));
            wakeProducer = null;
          }
          if (stopped) break;
          let buffer: Buffer | null = null;
          if (plan.data.length > 0) {
            const taking = this.#takeBuffer();
            waitingForBuffer = true;
            const got = await Promise.race([taking, stop]).finally(() => (waitingForBuffer = false));
            if (got === STOP) {
              // The consumer is gone: a buffer lent later goes straight back.
              void taking.then((b) => this.#dropBuffer(b), () => undefined);
              break;
            }
            buffer = got;
          }
          const read = this.#read(plan, buffer);
          read.catch(() => undefined); // handled when its turn comes; avoids an unhandled rejection meanwhile
          queue.push({ read, buffer, end: plan.offset + plan.length });
          wake(wakeConsumer);
        }
      } catch (err) {
        produced.error = err instanceof Error ? err : new Error(String(err));
      } finally {
        producing = false;
        wake(wakeConsumer);
      }
    })();
    try {
      for (;;) {
        if (queue.length === 0) {
          if (!producing) break;
          const t0 = waitingForBuffer ? performance.now() : 0;
          await new Promise<void>((r) => (wakeConsumer = r));
          wakeConsumer = null;
          if (t0 > 0) this.stats.bufferWaitMs += performance.now() - t0;
          continue;
        }
        const q = queue.shift()!;
        if (q.read === null) {
          this.stats.bytesMapped = q.end;
          wake(wakeProducer);
          continue;
        }
        held = q.buffer && !this.#lend ? 1 : 0;
        wake(wakeProducer);
        let block: ChangedBlock;
        try {
          block = await q.read;
        } catch (err) {
          if (q.buffer) this.#dropBuffer(q.buffer);
          throw err;
        }
        // Counted before the consumer gets the block: its progress report for it includes it.
        this.stats.bytesMapped = q.end;
        yield block;
        // The consumer asked for the next block: a ring buffer is free again (a lent one is the consumer's now).
        if (held) {
          this.#free.push(q.buffer!);
          held = 0;
          wake(wakeProducer);
        }
      }
      if (produced.error) throw produced.error;
    } finally {
      // A consumer that stops early or a failed read: stop the producer, let the other reads
      // finish so no buffer is still being written into, swallow their errors (the first one was
      // thrown) and give back the buffers they hold.
      stopped = true;
      wake(onStop);
      wake(wakeProducer);
      await producer;
      const rest = queue.splice(0);
      await Promise.allSettled(rest.flatMap((q) => (q.read ? [q.read] : [])));
      for (const q of rest) if (q.buffer) this.#dropBuffer(q.buffer);
    }
  }

  /** A block-size buffer to read the next block into: lent by the consumer, from the ring, or new. */
  async #takeBuffer(): Promise<Buffer | null> {
    if (this.#lend) return this.#lend.take();
    if (this.#reuse) return this.#free.pop() ?? Buffer.allocUnsafe(this.#blockSize);
    return null;
  }

  /** A buffer from #takeBuffer that will not be yielded. */
  #dropBuffer(buffer: Buffer | null): void {
    if (!buffer) return;
    if (this.#lend) this.#lend.giveBack(buffer);
    else if (this.#reuse) this.#free.push(buffer);
  }

  /**
   * The planned blocks of the whole disk, window by window, each window followed by a mark of its
   * end (`passed`); the block-status queries of the next window run while the blocks of this one
   * are read.
   */
  async *#plans(): AsyncGenerator<BlockPlan | { readonly passed: number }> {
    const size = this.#source.size;
    const starts: number[] = [];
    for (let start = 0; start < size; start += this.#window) starts.push(start);
    // The first window's queries are the only ones the first read waits for: both at once.
    let next = starts.length > 0 ? this.#mapWindow(starts[0]!, true) : null;
    for (let i = 0; i < starts.length; i++) {
      this.#signal?.throwIfAborted();
      const current = next!;
      next = i + 1 < starts.length ? this.#mapWindow(starts[i + 1]!) : null;
      next?.catch(() => undefined); // awaited in its turn
      const plans = await current;
      yield* plans;
      yield { passed: Math.min(starts[i]! + this.#window, size) };
    }
  }

  /**
   * Block-status queries of one window and its planned blocks. The allocation query waits for the
   * dirty one (a window with nothing dirty needs none) unless `eager`: then both run at once.
   */
  async #mapWindow(start: number, eager = false): Promise<BlockPlan[]> {
    const end = Math.min(start + this.#window, this.#source.size);
    const context = this.#changes.kind === 'bitmap' ? this.#changes.context : null;
    let allocating: Promise<Extent[]> | null = null;
    if (eager) {
      allocating = this.#source.extents(start, end - start);
      allocating.catch(() => undefined); // awaited below, unless the window turns out clean
    }
    let dirty: DirtyExtent[] | null = null;
    if (context) {
      dirty = await this.#source.dirtyExtents(context, start, end - start);
      for (const d of dirty) if (d.dirty) this.stats.bytesDirty += d.length;
      if (!dirty.some((d) => d.dirty) && !this.#extraIn(start, end)) return [];
    }
    const allocation = await (allocating ?? this.#source.extents(start, end - start));
    return planBlocks(this.#blockSize, start, end, allocation, dirty, this.#extra);
  }

  #extraIn(start: number, end: number): boolean {
    if (!this.#extra) return false;
    for (const i of this.#extra) if (i * this.#blockSize >= start && i * this.#blockSize < end) return true;
    return false;
  }

  /** Reads a planned block into `ring` (a lent or reusable buffer of blockSize bytes) or a new buffer. */
  async #read(plan: BlockPlan, ring: Buffer | null): Promise<ChangedBlock> {
    if (plan.data.length === 0) {
      this.stats.zeroBlocks++;
      return { index: plan.index, data: null };
    }
    const single = plan.data.length === 1 && plan.data[0]![0] === 0 && plan.data[0]![1] === plan.length;
    let buf: Buffer;
    if (ring) {
      buf = ring.subarray(0, plan.length);
      // Zero only what the reads do not cover (a reused buffer holds an older block).
      if (!single) {
        let at = 0;
        for (const [s, len] of plan.data) {
          if (s > at) buf.fill(0, at, s);
          at = s + len;
        }
        if (at < plan.length) buf.fill(0, at, plan.length);
      }
    } else {
      buf = single ? Buffer.allocUnsafe(plan.length) : Buffer.alloc(plan.length);
    }
    await Promise.all(plan.data.map(([s, len]) => this.#source.readInto(plan.offset + s, buf.subarray(s, s + len))));
    for (const [, len] of plan.data) this.stats.bytesRead += len;
    this.stats.dataBlocks++;
    return this.#digests ? { index: plan.index, data: buf, digest: createHash('sha256').update(buf).digest() } : { index: plan.index, data: buf };
  }
}

/** The NBD meta contexts to negotiate for a disk view: allocation, plus the bitmap if any. */
export function contextsFor(changes: DiskChanges): string[] {
  return changes.kind === 'bitmap' ? ['base:allocation', changes.context] : ['base:allocation'];
}

export interface ReadBackupDiskOptions extends ChangedBlockReaderOptions {
  /** NBD connections to open to the export (parallel reads). Default 4. */
  readonly connections?: number;
  /** Receives the reader's running statistics (the same object, updated as blocks are read). */
  readonly onStats?: (stats: ChangedBlockStats) => void;
  /**
   * The export opened earlier by `prepareBackupDisk` (its first window already being mapped):
   * read through it instead of opening the export now; it is closed when the iteration ends.
   */
  readonly prepared?: PreparedBackupDisk;
}

/** The end of the reader's first map window (see `ChangedBlockReaderOptions.mapWindow`). */
function firstWindowEnd(size: number, blockSize: number, mapWindow: number | undefined): number {
  const window = Math.max(blockSize, Math.floor((mapWindow ?? 1024 * 1024 * 1024) / blockSize) * blockSize);
  return Math.min(window, size);
}

/**
 * A `BlockSource` over an open export whose first window's block-status answers were asked for
 * in advance: the reader's first `extents` / `dirtyExtents` calls with the same range take them.
 */
class PrefetchedSource implements BlockSource {
  readonly #disk: NbdExport;
  #extents: { readonly length: number; readonly answer: Promise<Extent[]> } | null;
  #dirty: { readonly context: string; readonly length: number; readonly answer: Promise<DirtyExtent[]> } | null;

  constructor(disk: NbdExport, length: number, context: string | null) {
    this.#disk = disk;
    this.#extents = length > 0 ? { length, answer: disk.extents(0, length) } : null;
    this.#dirty = length > 0 && context !== null ? { context, length, answer: disk.dirtyExtents(context, 0, length) } : null;
    // Awaited when the reader asks; a reader that never asks must not see an unhandled rejection.
    this.#extents?.answer.catch(() => undefined);
    this.#dirty?.answer.catch(() => undefined);
  }

  get size(): number {
    return this.#disk.size;
  }

  readInto(offset: number, target: Buffer): Promise<Buffer> {
    return this.#disk.readInto(offset, target);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    const p = this.#extents;
    this.#extents = null;
    return p !== null && offset === 0 && length === p.length ? p.answer : this.#disk.extents(offset, length);
  }

  dirtyExtents(context: string, offset: number, length: number): Promise<DirtyExtent[]> {
    const p = this.#dirty;
    this.#dirty = null;
    return p !== null && offset === 0 && length === p.length && context === p.context ? p.answer : this.#disk.dirtyExtents(context, offset, length);
  }

  close(): Promise<void> {
    return this.#disk.close();
  }
}

/**
 * A disk view's export being opened ahead of its reads (`prepareBackupDisk`). Hand it to
 * `readBackupDisk` (`prepared`), or `close()` it when it will not be read; both are safe after a
 * failed open.
 */
export interface PreparedBackupDisk {
  readonly view: BackupDiskView;
  /** @internal the open export, for readBackupDisk */
  readonly source: Promise<BlockSource & { close(): Promise<void> }>;
  close(): Promise<void>;
}

export interface PrepareBackupDiskOptions {
  /** The block size the reader will use (it decides the first map window). */
  readonly blockSize: number;
  readonly mapWindow?: number;
  /** NBD connections to open. Default 4. */
  readonly connections?: number;
}

/**
 * Starts opening a disk view's export and asking for its first map window's block status (the
 * allocation map and, for an incremental, the dirty bitmap) now, so that this latency (several
 * handshake round trips per connection, two queries) overlaps other work, e.g. starting the
 * restore point, instead of delaying the first read (bench/backup/README.md).
 */
export function prepareBackupDisk(view: BackupDiskView, options: PrepareBackupDiskOptions): PreparedBackupDisk {
  const source = openExport(view, options.connections).then((disk) => {
    const context = view.changes.kind === 'bitmap' ? view.changes.context : null;
    return new PrefetchedSource(disk, firstWindowEnd(disk.size, options.blockSize, options.mapWindow), context);
  });
  source.catch(() => undefined); // reported by readBackupDisk
  let closed: Promise<void> | null = null;
  return {
    view,
    source,
    close: () => (closed ??= source.then((s) => s.close(), () => undefined)),
  };
}

async function openExport(view: BackupDiskView, connections: number | undefined): Promise<NbdExport> {
  const disk = await NbdExport.open({
    endpoint: { socketPath: view.nbd.socketPath },
    exportName: view.nbd.exportName,
    metaContexts: contextsFor(view.changes),
    connections: connections ?? 4,
    // Only extents base:allocation reports as data are read: ask for each read in one piece, which
    // spares the server a block-status lookup per read.
    noFragment: true,
  });
  if (disk.size !== view.size) {
    await disk.close();
    throw new BulwarkError(`NBD export ${view.nbd.exportName} of disk ${view.disk.name} is ${disk.size} bytes, expected ${view.size}`, {
      kind: 'internal',
      context: { disk: view.disk.name, export: view.nbd.exportName },
    });
  }
  return disk;
}

/**
 * Opens a disk view's NBD export and yields its changed blocks (see `ChangedBlockReader`); the
 * connections are closed when the iteration ends, fails or is abandoned.
 */
export async function* readBackupDisk(view: BackupDiskView, options: ReadBackupDiskOptions): AsyncGenerator<ChangedBlock> {
  const prepared = options.prepared;
  if (prepared && prepared.view !== view) throw new BulwarkError(`the prepared export of disk ${prepared.view.disk.name} is not the one of disk ${view.disk.name}`, { kind: 'internal' });
  const disk: BlockSource & { close(): Promise<void> } = prepared ? await prepared.source : await openExport(view, options.connections);
  try {
    const reader = new ChangedBlockReader(disk, view.changes, options);
    options.onStats?.(reader.stats);
    yield* reader.blocks();
  } finally {
    await (prepared ? prepared.close() : disk.close());
  }
}
