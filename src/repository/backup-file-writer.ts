// Writes one backup file (.vbk/.vib/.vrb) append-only: header page, then block and table-page
// records as blocks stream in (encoded on worker threads), then the index, then commit slot A,
// then fsync. docs/formats/backup-files.md section 3. The caller publishes the file (rename)
// and the .vbm; this module never makes anything visible.
//
// Several disks may be written at once (several writeDisk calls in flight): each has its own
// lane (blocks in flight, block table, counters); they share the encoder slots, the write
// batches, the in-file dedup map and the file's end. Records of different disks interleave in
// the file; a block table addresses its records by offset, so no order is implied.
//
// Pipeline (docs/decisions/0004): the calling thread only detects zero blocks, copies each data
// block once into an encoder slot, and keeps the tables. A lane retires its blocks in block order
// as soon as each is encoded (not when its source yields the next block, so a slow source holds
// no slots): the record is appended to the current batch, which is written with one pwritev
// straight from the encoder slots, up to WRITES_IN_FLIGHT batches at once, while the encoders keep
// working; a slot is released once its batch is on disk. Writeback is started every SYNC_EVERY
// bytes so the final fsync is short.
import { open, rm, type FileHandle } from 'node:fs/promises';
import { BulwarkError, describeError } from '../common/errors.js';
import type { DiskBlock } from '../disk/types.js';
import {
  blockCountOf,
  checkDiskName,
  COMMIT_SLOT_OFFSETS,
  ENTRIES_PER_PAGE,
  encodeCommitSlot,
  encodeHeader,
  encodeIndex,
  encodeRecordHeader,
  encodeRecordHeaderInto,
  encodeTablePage,
  HEADER_PAGE_SIZE,
  HOLE,
  INHERIT,
  ZERO,
  type BlockEntry,
  type DiskDescriptor,
  type DiskStats,
  type FileHeader,
  type TablePageRef,
} from '../format/index.js';
import { crc32c } from '@node-rs/crc32';
import { writevAll } from '../storage/writev.js';
import type { EncodedSlot, EncodePool } from './encode-pool.js';

/**
 * Checks a block a source hands to a writer: its index follows `last` and lies on the disk, its
 * data (if any) is as long as the block. Returns that length.
 */
export function checkIncomingBlock(name: string, b: DiskBlock, last: number, blockCount: number, blockSize: number, lastLength: number): number {
  if (!Number.isSafeInteger(b.index) || b.index <= last || b.index >= blockCount) {
    throw new BulwarkError(`disk ${name}: block index ${b.index} out of order or beyond the disk (${blockCount} blocks, previous ${last})`, {
      kind: 'invalid',
      context: { disk: name, block: b.index },
    });
  }
  const length = b.index === blockCount - 1 ? lastLength : blockSize;
  if (b.data !== null && b.data.length !== length) {
    throw new BulwarkError(`disk ${name}: block ${b.index} has ${b.data.length} bytes, expected ${length}`, { kind: 'invalid', context: { disk: name, block: b.index } });
  }
  return length;
}

/**
 * A block that crossed the network carries the SHA-256 its source computed over the data it read
 * (DiskBlock.sha256); the writer's encoder computes the digest again from the block it was handed,
 * after the wire, the decompression and the copies on both hosts. They must agree, or the block
 * changed on its way and is not stored: the backup fails naming it (a resend of the same bytes
 * would repeat a fault that arose at the source). Encrypted chains keep a keyed digest (HMAC),
 * which cannot be compared with the source's plain one: not checked there.
 */
export function checkSourceDigest(disk: string, index: number, expected: Buffer | undefined, digest: Uint8Array, encrypted: boolean): void {
  if (expected === undefined || encrypted || Buffer.compare(expected, digest) === 0) return;
  throw new BulwarkError(
    `disk ${disk}: block ${index} changed between the source's read and this repository's writer (SHA-256 ${Buffer.from(digest).toString('hex')} here, ${expected.toString('hex')} at the source); it was not stored`,
    { kind: 'corrupt', context: { disk, block: index }, hint: 'run the backup again; if it repeats, check the memory of both hosts (the source agent\'s and the repository agent\'s)' },
  );
}

/** What the parent point holds at a block, for `compareWithParent`. */
export type ParentBlock = { readonly kind: 'zero' | 'hole' } | { readonly kind: 'stored'; readonly digest: Buffer };

export interface WriteDiskOptions {
  /**
   * Incremental from a source without changed-block tracking: blocks whose digest equals the
   * parent point's block are not stored (the entry inherits). Needs `parentBlock`.
   */
  readonly compareWithParent?: boolean;
  /**
   * Called after each block is taken from the source, with input bytes so far and the bytes
   * stored for this disk so far (encoded records written or queued; a sink across the network:
   * the bytes handed to the network): for live progress.
   */
  readonly onProgress?: (bytesDone: number, storedBytes: number) => void;
  /**
   * Called with the milliseconds writeDisk waited before it could take the next block (bottleneck
   * statistics): 'target' when file writes were backed up at the start of the wait, else 'proxy'
   * (the encoders).
   */
  readonly onWait?: (stage: 'proxy' | 'target', ms: number) => void;
}

/** Counters of one disk, returned by writeDisk. */
export interface DiskWriteStats extends DiskStats {
  readonly name: string;
  readonly size: number;
  /** Input bytes seen (data and zero blocks; holes count their length too). */
  readonly bytesRead: number;
  /** Blocks found equal to the parent and not stored (compareWithParent). */
  readonly unchangedBlocks: number;
}

const DEDUP_LIMIT = 131072;
/**
 * Writeback (fdatasync, not awaited) is started every SYNC_EVERY bytes written, so the fsync at
 * commit waits for at most this much plus the sync in flight. 32 MiB (was 256): an increment of
 * ~230 MiB never reached 256 MiB, so its commit waited for all of it (0.6-0.8 s on /dev/vda);
 * docs/decisions/0008.
 */
const SYNC_EVERY = 32 * 1024 * 1024;
/** A write batch is issued when it reaches this many bytes (or holds a quarter of the slots). */
const BATCH_BYTES = 4 * 1024 * 1024;
/** pwritev takes at most IOV_MAX (1024) buffers. */
const BATCH_BUFFERS = 512;
const WRITES_IN_FLIGHT = 2;

interface DedupTarget {
  readonly recordOffset: number;
  readonly storedLength: number;
  readonly plainLength: number;
  readonly crc: number;
}

interface Batch {
  readonly bufs: Buffer[];
  readonly at: number;
  readonly bytes: number;
  readonly slots: number[];
}

/** A block taken from the source and not yet given its table entry. */
interface InFlight {
  readonly index: number;
  readonly kind: 'hole' | 'zero' | 'data';
  readonly length: number;
  /** Data blocks: the encoded slot once the encoder is done. */
  enc: EncodedSlot | null;
  /** compareWithParent: what the parent holds, once looked up. */
  parent: ParentBlock | null;
  /** The source's SHA-256 of the data (a block that crossed the network): checkSourceDigest. */
  readonly sourceDigest?: Buffer | undefined;
}

type DiskState = { size: number; descriptor: DiskDescriptor | null; busy: boolean };

export class BackupFileWriter {
  readonly path: string;
  readonly header: FileHeader;
  readonly #fh: FileHandle;
  readonly #pool: EncodePool;
  readonly #gapEntry: BlockEntry;
  readonly #disks = new Map<string, DiskState>();
  readonly #dedup = new Map<string, DedupTarget>();
  readonly #inflightLimit: number;
  #end = HEADER_PAGE_SIZE;
  #sinceSync = 0;
  #syncing: Promise<void> | null = null;
  /** The first failure (a write, a disk, abort): every later step throws it; nothing commits. */
  #failure: BulwarkError | null = null;
  #done = false;
  /** writeDisk calls in flight. */
  readonly #active = new Set<Promise<unknown>>();
  // The batch being gathered: contiguous bytes from #batchAt, and the slots to release once written.
  #batch: Buffer[] = [];
  #batchAt = HEADER_PAGE_SIZE;
  #batchBytes = 0;
  #batchSlots: number[] = [];
  /** Batches issued but waiting for a write to finish; #running are being written. */
  readonly #queued: Batch[] = [];
  #running = 0;
  #idle: Array<() => void> = [];

  private constructor(path: string, header: FileHeader, fh: FileHandle, pool: EncodePool, disks: readonly { name: string; size: number }[], inflightLimit: number) {
    this.path = path;
    this.header = header;
    this.#fh = fh;
    this.#pool = pool;
    this.#gapEntry = header.kind === 'full' ? HOLE : INHERIT;
    this.#inflightLimit = inflightLimit;
    for (const d of disks) {
      checkDiskName(d.name, 'disk');
      if (!Number.isSafeInteger(d.size) || d.size < 0) throw new BulwarkError(`disk ${d.name}: bad size ${d.size}`, { kind: 'invalid' });
      if (this.#disks.has(d.name)) throw new BulwarkError(`disk ${d.name} listed twice`, { kind: 'invalid' });
      this.#disks.set(d.name, { size: d.size, descriptor: null, busy: false });
    }
  }

  /** Creates the file (exclusively) at `path` and writes its header page. */
  static async create(path: string, header: FileHeader, pool: EncodePool, disks: readonly { name: string; size: number }[], inflightLimit?: number): Promise<BackupFileWriter> {
    const fh = await open(path, 'wx', 0o640);
    try {
      await fh.write(encodeHeader(header), 0, HEADER_PAGE_SIZE, 0);
      return new BackupFileWriter(path, header, fh, pool, disks, inflightLimit ?? pool.slots + 2);
    } catch (err) {
      await fh.close();
      await rm(path, { force: true });
      throw err;
    }
  }

  #fail(err: unknown): void {
    this.#failure ??= err instanceof BulwarkError ? err : new BulwarkError(`cannot write backup file ${this.path}: ${describeError(err)}`, { kind: 'unavailable', cause: err });
  }

  #check(): void {
    if (this.#failure) throw this.#failure;
  }

  /**
   * Reserves the next bytes of the file for `bufs` and adds them to the write batch; returns the
   * offset. `slot` is released once they are written.
   */
  #append(bufs: readonly Buffer[], slot?: number): number {
    this.#check();
    const pos = this.#end;
    for (const b of bufs) {
      this.#batch.push(b);
      this.#end += b.length;
      this.#batchBytes += b.length;
    }
    if (slot !== undefined) this.#batchSlots.push(slot);
    // A batch holds at most a quarter of the slots, so slots held elsewhere (encoding, being
    // written) always bring it to this size: no slot waits for a flush that never comes.
    if (this.#batchBytes >= BATCH_BYTES || this.#batch.length >= BATCH_BUFFERS || this.#batchSlots.length * 4 >= this.#pool.slots) this.#flush();
    return pos;
  }

  /** Issues the gathered batch: written at once if fewer than WRITES_IN_FLIGHT run, else queued. */
  #flush(): void {
    if (this.#batch.length === 0) return;
    this.#queued.push({ bufs: this.#batch, at: this.#batchAt, bytes: this.#batchBytes, slots: this.#batchSlots });
    this.#batchAt += this.#batchBytes;
    this.#batch = [];
    this.#batchSlots = [];
    this.#batchBytes = 0;
    this.#pump();
  }

  #pump(): void {
    while (this.#running < WRITES_IN_FLIGHT && this.#queued.length > 0) {
      const b = this.#queued.shift()!;
      this.#running++;
      const written = this.#failure ? Promise.resolve() : writevAll(this.#fh, b.bufs, b.at, b.bytes);
      void written
        .catch((err: unknown) => this.#fail(err))
        .finally(() => {
          for (const s of b.slots) this.#pool.release(s);
          this.#running--;
          this.#sinceSync += b.bytes;
          // Start writeback early so the final fsync does not wait for gigabytes of dirty pages.
          if (this.#sinceSync >= SYNC_EVERY && !this.#syncing && !this.#failure) {
            this.#sinceSync = 0;
            // A failed early writeback (ENOSPC, EIO) is kept and thrown by the next append or
            // commit; left unawaited it would be an unhandled rejection that ends the process.
            this.#syncing = this.#fh
              .datasync()
              .catch((err: unknown) => this.#fail(err))
              .finally(() => (this.#syncing = null));
          }
          this.#pump();
          if (this.#running === 0 && this.#queued.length === 0) for (const w of this.#idle.splice(0)) w();
        });
    }
  }

  /** Waits until every issued batch is written (errors are kept in #failure). */
  async #writesDone(): Promise<void> {
    if (this.#running === 0 && this.#queued.length === 0) return;
    await new Promise<void>((resolve) => this.#idle.push(resolve));
  }

  /** Writes everything gathered and waits for it. */
  async #drain(): Promise<void> {
    this.#flush();
    await this.#writesDone();
    this.#check();
  }

  /**
   * Writes the blocks of disk `name` (in increasing index order). Several disks may be written
   * concurrently; a failing one fails the whole file (commit throws, abort removes it).
   */
  writeDisk(name: string, blocks: AsyncIterable<DiskBlock>, opts: WriteDiskOptions & { parentBlock?: (index: number) => Promise<ParentBlock> } = {}): Promise<DiskWriteStats> {
    const run = this.#writeDisk(name, blocks, opts);
    this.#active.add(run);
    const forget = () => void this.#active.delete(run);
    run.then(forget, forget);
    return run;
  }

  async #writeDisk(name: string, blocks: AsyncIterable<DiskBlock>, opts: WriteDiskOptions & { parentBlock?: (index: number) => Promise<ParentBlock> }): Promise<DiskWriteStats> {
    if (this.#done) throw new BulwarkError('the restore point is already committed or aborted', { kind: 'invalid' });
    const disk = this.#disks.get(name);
    if (!disk) throw new BulwarkError(`disk ${name} was not declared for this restore point`, { kind: 'invalid', context: { disk: name } });
    if (disk.busy || disk.descriptor) throw new BulwarkError(`disk ${name} is already written`, { kind: 'invalid', context: { disk: name } });
    if (opts.compareWithParent && !opts.parentBlock) throw new BulwarkError('compareWithParent needs a parent restore point', { kind: 'invalid' });
    this.#check();
    disk.busy = true;
    const lane = new DiskLane(this, name, disk.size, opts);
    try {
      const stats = await lane.run(blocks);
      disk.descriptor = lane.descriptor();
      return stats;
    } catch (err) {
      lane.releaseSlots();
      // One failed disk fails the file: the other disks stop, commit refuses.
      this.#fail(err instanceof BulwarkError ? err : new BulwarkError(`disk ${name}: ${describeError(err)}`, { kind: 'unavailable', cause: err, context: { disk: name } }));
      throw err;
    } finally {
      disk.busy = false;
    }
  }

  /** @internal for DiskLane: the entry of a block the source did not give (hole or inherit). */
  get gapEntry(): BlockEntry {
    return this.#gapEntry;
  }
  /** @internal for DiskLane */
  get pool(): EncodePool {
    return this.#pool;
  }
  /** @internal for DiskLane */
  get inflightLimit(): number {
    return this.#inflightLimit;
  }
  /** @internal for DiskLane: file writes are backed up (issued batches wait for a write). */
  get writesBacklogged(): boolean {
    return this.#queued.length > 0;
  }
  /** @internal for DiskLane: the first failure of the file, if any. */
  get failure(): BulwarkError | null {
    return this.#failure;
  }
  /**
   * A block-size buffer inside a free encoder slot, for a source to read its next block into and
   * yield (a view from its start) to writeDisk: the block is encoded in place, not copied. Waits
   * for a free slot. A buffer not yielded goes back with giveBackBuffer(). Lend a few at most
   * (they hold slots): e.g. one being read, one read ahead.
   */
  async lendBuffer(): Promise<Buffer> {
    this.#check();
    // Every slot may sit in the gathered batch: write it, or nothing would free one.
    if (this.#pool.freeSlots === 0) this.#flush();
    return this.#pool.lend();
  }

  /** Gives back a buffer from lendBuffer() that was not yielded to writeDisk. */
  giveBackBuffer(buf: Buffer): void {
    this.#pool.giveBack(buf);
  }

  /** @internal for DiskLane: a free slot; issues the gathered batch first if none is free. */
  async slot(): Promise<number> {
    const s = this.#pool.tryAcquire();
    if (s !== undefined) return s;
    // Every slot may sit in the gathered batch: write it, or nothing would free one.
    this.#flush();
    return this.#pool.acquire();
  }
  /** @internal for DiskLane: appends a table page; returns its offset. */
  appendTablePage(head: Buffer, payload: Buffer): number {
    return this.#append([head, payload]);
  }
  /**
   * @internal for DiskLane: stores an encoded block (or finds it already stored in this file);
   * the slot is released by this call or once the record is written. Returns the record and
   * whether it was a duplicate.
   */
  storeBlock(enc: EncodedSlot, plainLength: number): { target: DedupTarget; dup: boolean } {
    let written = false;
    try {
      const key = enc.digest.toString('latin1');
      const dup = this.#dedup.get(key);
      if (dup && dup.plainLength === plainLength) return { target: dup, dup: true };
      encodeRecordHeaderInto(
        { type: 'block', compression: enc.compression, encrypted: this.header.encryption !== null, storedLength: enc.storedLength, plainLength, payloadCrc: enc.crc },
        enc.header,
        0,
      );
      const recordOffset = this.#append([enc.header, enc.payload], enc.slot);
      written = true;
      const target = { recordOffset, storedLength: enc.storedLength, plainLength, crc: enc.crc };
      if (this.#dedup.size >= DEDUP_LIMIT) this.#dedup.delete(this.#dedup.keys().next().value!);
      this.#dedup.set(key, target);
      return { target, dup: false };
    } finally {
      if (!written) this.#pool.release(enc.slot);
    }
  }

  /**
   * Writes the index and commit slot A, fsyncs and closes. `config` is in stored form. Waits for
   * every writeDisk in flight first; throws if any failed.
   */
  async commit(config: Buffer): Promise<{ fileLength: number }> {
    if (this.#done) throw new BulwarkError('the restore point is already committed or aborted', { kind: 'invalid' });
    this.#done = true;
    try {
      await Promise.allSettled([...this.#active]);
      this.#check();
      for (const [name, d] of this.#disks) {
        if (!d.descriptor) throw new BulwarkError(`disk ${name} was declared but not written`, { kind: 'invalid', context: { disk: name } });
      }
      const index = encodeIndex({ config, disks: [...this.#disks.values()].map((d) => d.descriptor!) });
      const indexOffset = this.#append([index]);
      await this.#drain();
      const slot = encodeCommitSlot({ generation: 1, indexOffset, indexLength: index.length, fileLength: this.#end, indexCrc: crc32c(index) });
      await this.#fh.write(slot, 0, slot.length, COMMIT_SLOT_OFFSETS[0]);
      await this.#syncing;
      this.#check();
      await this.#fh.sync();
      return { fileLength: this.#end };
    } catch (err) {
      this.#fail(err);
      throw err;
    } finally {
      await this.#settle();
      await this.#fh.close();
    }
  }

  /** Waits for every write and writeback started (their errors are kept, not thrown). */
  async #settle(): Promise<void> {
    await this.#writesDone();
    await this.#syncing;
    for (const s of this.#batchSlots) this.#pool.release(s);
    this.#batch = [];
    this.#batchSlots = [];
  }

  /**
   * Stops writing and removes the file. writeDisk calls still in flight fail at their next block
   * (their slots are released then); abort does not wait for their sources.
   */
  async abort(): Promise<void> {
    this.#fail(new BulwarkError(`restore point file ${this.path} was aborted`, { kind: 'invalid' }));
    if (!this.#done) {
      this.#done = true;
      await this.#settle();
      await this.#fh.close().catch(() => undefined);
    }
    await rm(this.path, { force: true });
  }
}

/**
 * One disk being written: its blocks in flight (a ring, retired in block order as soon as the
 * head is ready), its current table page and its counters.
 */
class DiskLane {
  readonly #w: BackupFileWriter;
  readonly #name: string;
  readonly #size: number;
  readonly #blockSize: number;
  readonly #blockCount: number;
  readonly #opts: WriteDiskOptions & { parentBlock?: (index: number) => Promise<ParentBlock> };
  readonly #stats = { storedBytes: 0, plainBytes: 0, storedBlocks: 0, dedupBlocks: 0, zeroBlocks: 0, holeBlocks: 0, inheritBlocks: 0 };
  #unchanged = 0;
  readonly #pages: TablePageRef[] = [];
  #page: BlockEntry[] = [];
  /** Next block index to be given an entry. */
  #next = 0;
  readonly #queue: InFlight[] = [];
  #head = 0;
  #error: Error | null = null;
  #wake: (() => void) | null = null;

  constructor(w: BackupFileWriter, name: string, size: number, opts: WriteDiskOptions & { parentBlock?: (index: number) => Promise<ParentBlock> }) {
    this.#w = w;
    this.#name = name;
    this.#size = size;
    this.#blockSize = w.header.blockSize;
    this.#blockCount = blockCountOf(size, this.#blockSize);
    this.#opts = opts;
  }

  get #pending(): number {
    return this.#queue.length - this.#head;
  }

  async run(blocks: AsyncIterable<DiskBlock>): Promise<DiskWriteStats> {
    const name = this.#name;
    const blockSize = this.#blockSize;
    const blockCount = this.#blockCount;
    const lastLength = this.#size - (blockCount - 1) * blockSize;
    const zero = Buffer.alloc(blockSize);
    const limit = this.#w.inflightLimit;
    const pool = this.#w.pool;
    let bytesRead = 0;
    let last = -1;
    for await (const b of blocks) {
      this.#check();
      const length = checkIncomingBlock(name, b, last, blockCount, blockSize, lastLength);
      last = b.index;
      while (this.#pending >= limit) {
        const wait = this.#waitStart();
        await this.#changed();
        wait();
      }
      bytesRead += length;
      const kind = b.data === null ? 'hole' : b.data.equals(length === blockSize ? zero : zero.subarray(0, length)) ? 'zero' : 'data';
      const f: InFlight = { index: b.index, kind, length, enc: null, parent: null, ...(kind === 'data' && b.sha256 !== undefined ? { sourceDigest: b.sha256 } : {}) };
      // A block read straight into a lent slot (RestorePointWriter.lendBuffer) is encoded in
      // place; any other is copied into a slot before the source is asked for the next one
      // (sources may reuse their buffers).
      let slot = b.data === null ? undefined : pool.takeLent(b.data);
      if (slot !== undefined && kind !== 'data') pool.release(slot);
      else if (kind === 'data') {
        if (slot === undefined) {
          const wait = this.#waitStart();
          slot = await this.#w.slot();
          wait();
        }
        if (this.#error !== null || this.#w.failure) {
          pool.release(slot);
          this.#check();
        }
        pool.submit(slot, b.data!).then(
          (e) => {
            if (this.#error !== null) return pool.release(e.slot);
            f.enc = e;
            this.#advance();
          },
          (err: unknown) => this.#setError(err),
        );
      }
      if (this.#opts.compareWithParent) {
        this.#opts.parentBlock!(b.index).then(
          (p) => {
            f.parent = p;
            this.#advance();
          },
          (err: unknown) => this.#setError(err),
        );
      }
      this.#queue.push(f);
      this.#advance();
      this.#check();
      this.#opts.onProgress?.(bytesRead, this.#stats.storedBytes);
    }
    while (this.#pending > 0) await this.#changed();
    this.#check();
    // Fill the tail with gap entries.
    if (this.#next < blockCount) this.#setEntry(blockCount - 1, this.#w.gapEntry);
    if (this.#page.length > 0) this.#flushPage();
    this.#opts.onProgress?.(this.#size, this.#stats.storedBytes);
    return { name, size: this.#size, bytesRead: this.#size, unchangedBlocks: this.#unchanged, ...this.#stats };
  }

  descriptor(): DiskDescriptor {
    return { name: this.#name, size: this.#size, blockCount: this.#blockCount, entriesPerPage: ENTRIES_PER_PAGE, stats: this.#stats, pages: this.#pages };
  }

  /** Starts timing a wait for the onWait hook; call the result when the wait ends. */
  #waitStart(): () => void {
    const onWait = this.#opts.onWait;
    if (!onWait) return () => undefined;
    const stage = this.#w.writesBacklogged ? 'target' : 'proxy';
    const t0 = performance.now();
    return () => onWait(stage, performance.now() - t0);
  }

  #check(): void {
    if (this.#error !== null) throw this.#error;
    if (this.#w.failure) throw this.#w.failure;
  }

  #setError(err: unknown): void {
    this.#error ??= err instanceof Error ? err : new Error(String(err));
    this.#notify();
  }

  #notify(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  /** Resolves at the next retirement or failure. */
  #changed(): Promise<void> {
    this.#check();
    return new Promise<void>((resolve) => (this.#wake = resolve));
  }

  /** Releases the slots of encoded blocks not retired (after a failure). */
  releaseSlots(): void {
    this.#error ??= new Error('disk failed');
    for (let i = this.#head; i < this.#queue.length; i++) {
      const f = this.#queue[i]!;
      if (f.enc) this.#w.pool.release(f.enc.slot);
      f.enc = null;
    }
    this.#head = this.#queue.length;
  }

  /** Retires ready blocks from the head, in block order. */
  #advance(): void {
    if (this.#error !== null) return;
    let moved = false;
    try {
      while (this.#head < this.#queue.length) {
        const f = this.#queue[this.#head]!;
        if ((f.kind === 'data' && f.enc === null) || (this.#opts.compareWithParent && f.parent === null)) break;
        this.#head++;
        moved = true;
        this.#retire(f);
      }
    } catch (err) {
      this.#setError(err);
      return;
    }
    if (this.#head > 1024 && this.#head * 2 > this.#queue.length) {
      this.#queue.splice(0, this.#head);
      this.#head = 0;
    }
    if (moved || this.#error !== null) this.#notify();
  }

  #retire(f: InFlight): void {
    const parent = f.parent;
    if (f.kind !== 'data') {
      if (parent?.kind === f.kind) {
        this.#unchanged++;
        return this.#setEntry(f.index, INHERIT);
      }
      return this.#setEntry(f.index, f.kind === 'zero' ? ZERO : HOLE);
    }
    const enc = f.enc!;
    f.enc = null;
    try {
      checkSourceDigest(this.#name, f.index, f.sourceDigest, enc.digest, this.#w.header.encryption !== null);
    } catch (err) {
      this.#w.pool.release(enc.slot);
      throw err;
    }
    if (parent?.kind === 'stored' && parent.digest.equals(enc.digest)) {
      this.#w.pool.release(enc.slot);
      this.#unchanged++;
      return this.#setEntry(f.index, INHERIT);
    }
    const { target, dup } = this.#w.storeBlock(enc, f.length);
    if (dup) this.#stats.dedupBlocks++;
    else {
      this.#stats.storedBytes += target.storedLength;
      this.#stats.plainBytes += f.length;
    }
    this.#setEntry(f.index, { kind: 'stored', digest: enc.digest, ...target });
  }

  #count(e: BlockEntry): void {
    switch (e.kind) {
      case 'hole':
        this.#stats.holeBlocks++;
        break;
      case 'zero':
        this.#stats.zeroBlocks++;
        break;
      case 'inherit':
        this.#stats.inheritBlocks++;
        break;
      case 'stored':
        this.#stats.storedBlocks++;
        break;
    }
  }

  #setEntry(index: number, e: BlockEntry): void {
    const gap = this.#w.gapEntry;
    while (this.#next < index) {
      this.#page.push(gap);
      this.#count(gap);
      this.#next++;
      if (this.#page.length === ENTRIES_PER_PAGE) this.#flushPage();
    }
    this.#page.push(e);
    this.#count(e);
    this.#next++;
    if (this.#page.length === ENTRIES_PER_PAGE) this.#flushPage();
  }

  #flushPage(): void {
    const payload = encodeTablePage(this.#page);
    const crc = crc32c(payload);
    const head = encodeRecordHeader({ type: 'table-page', compression: 'none', encrypted: false, storedLength: payload.length, plainLength: payload.length, payloadCrc: crc });
    const offset = this.#w.appendTablePage(head, payload);
    this.#pages.push({ offset, entryCount: this.#page.length, crc });
    this.#page = [];
  }
}
