// Writes one backup file (.vbk/.vib/.vrb) append-only: header page, then block and table-page
// records as blocks stream in (in block order, encoded on worker threads), then the index, then
// commit slot A, then fsync. docs/formats/backup-files.md section 3. The caller publishes the
// file (rename) and the .vbm; this module never makes anything visible.
//
// Pipeline (docs/decisions/0004): the calling thread only detects zero blocks, copies each data
// block once into an encoder slot, and keeps the tables; records are gathered in file order and
// written with one pwritev per batch (straight from the encoder slots), up to two batches in
// flight, while the encoders keep working; writeback is started every SYNC_EVERY bytes so the
// final fsync is short.
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
import type { EncodedSlot, EncodePool } from './encode-pool.js';

/** What the parent point holds at a block, for `compareWithParent`. */
export type ParentBlock = { readonly kind: 'zero' | 'hole' } | { readonly kind: 'stored'; readonly digest: Buffer };

export interface WriteDiskOptions {
  /**
   * Incremental from a source without changed-block tracking: blocks whose digest equals the
   * parent point's block are not stored (the entry inherits). Needs `parentBlock`.
   */
  readonly compareWithParent?: boolean;
  /** Called after each block is retired, with input bytes so far (for progress). */
  readonly onProgress?: (bytesDone: number) => void;
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
const SYNC_EVERY = 256 * 1024 * 1024;
/** A write batch is issued when it reaches this many bytes (or holds a quarter of the slots). */
const BATCH_BYTES = 4 * 1024 * 1024;
/** pwritev takes at most IOV_MAX (1024) buffers. */
const BATCH_BUFFERS = 512;
const WRITES_IN_FLIGHT = 2;

type Pending =
  | { readonly index: number; readonly kind: 'hole' | 'zero'; readonly length: number }
  | { readonly index: number; readonly kind: 'data'; readonly length: number; readonly encoded: Promise<EncodedSlot> };

interface DedupTarget {
  readonly recordOffset: number;
  readonly storedLength: number;
  readonly plainLength: number;
  readonly crc: number;
}

export class BackupFileWriter {
  readonly path: string;
  readonly header: FileHeader;
  readonly #fh: FileHandle;
  readonly #pool: EncodePool;
  readonly #gapEntry: BlockEntry;
  readonly #disks = new Map<string, { size: number; descriptor: DiskDescriptor | null; busy: boolean }>();
  readonly #dedup = new Map<string, DedupTarget>();
  readonly #inflightLimit: number;
  #end = HEADER_PAGE_SIZE;
  #sinceSync = 0;
  #syncing: Promise<void> | null = null;
  #syncError: BulwarkError | null = null;
  #done = false;
  // The batch being gathered: contiguous bytes from #batchAt, and the slots to release once written.
  #batch: Buffer[] = [];
  #batchAt = HEADER_PAGE_SIZE;
  #batchBytes = 0;
  #batchSlots: number[] = [];
  readonly #writes: Promise<void>[] = [];

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
    this.#syncError ??= new BulwarkError(`cannot write backup file ${this.path}: ${describeError(err)}`, { kind: 'unavailable', cause: err });
  }

  /**
   * Reserves the next bytes of the file for `bufs` and adds them to the write batch; returns the
   * offset. `slot` is released once they are written. Await the result of flushIfFull() after.
   */
  #append(bufs: readonly Buffer[], slot?: number): number {
    if (this.#syncError) throw this.#syncError;
    const pos = this.#end;
    for (const b of bufs) {
      this.#batch.push(b);
      this.#end += b.length;
      this.#batchBytes += b.length;
    }
    if (slot !== undefined) this.#batchSlots.push(slot);
    return pos;
  }

  async #flushIfFull(): Promise<void> {
    if (this.#batchBytes >= BATCH_BYTES || this.#batch.length >= BATCH_BUFFERS || this.#batchSlots.length * 4 >= this.#pool.slots) await this.#flush();
  }

  /** Issues the batch as one positioned gather write; waits while WRITES_IN_FLIGHT are running. */
  async #flush(): Promise<void> {
    if (this.#batch.length === 0) return;
    const bufs = this.#batch;
    const at = this.#batchAt;
    const bytes = this.#batchBytes;
    const slots = this.#batchSlots;
    this.#batch = [];
    this.#batchSlots = [];
    this.#batchAt += bytes;
    this.#batchBytes = 0;
    while (this.#writes.length >= WRITES_IN_FLIGHT) await this.#writes[0];
    const w = this.#writeAll(bufs, at, bytes)
      .catch((err: unknown) => this.#fail(err))
      .finally(() => {
        for (const s of slots) this.#pool.release(s);
        void this.#writes.splice(this.#writes.indexOf(w), 1);
      });
    this.#writes.push(w);
    this.#sinceSync += bytes;
    // Start writeback early so the final fsync does not wait for gigabytes of dirty pages.
    if (this.#sinceSync >= SYNC_EVERY && !this.#syncing) {
      this.#sinceSync = 0;
      // A failed early writeback (ENOSPC, EIO) is kept and thrown by the next append or commit;
      // left unawaited it would be an unhandled rejection that ends the whole process.
      this.#syncing = this.#fh
        .datasync()
        .catch((err: unknown) => this.#fail(err))
        .finally(() => (this.#syncing = null));
    }
    if (this.#syncError) throw this.#syncError;
  }

  async #writeAll(bufs: Buffer[], at: number, bytes: number): Promise<void> {
    let done = 0;
    let rest = bufs;
    for (;;) {
      const { bytesWritten } = await this.#fh.writev(rest, at + done);
      done += bytesWritten;
      if (done >= bytes) return;
      if (bytesWritten === 0) throw new Error(`short write at offset ${at + done}`);
      // Partial write: drop what was written and continue with the rest.
      let skip = bytesWritten;
      const next: Buffer[] = [];
      for (const b of rest) {
        if (skip >= b.length) skip -= b.length;
        else {
          next.push(skip > 0 ? b.subarray(skip) : b);
          skip = 0;
        }
      }
      rest = next;
    }
  }

  /** Writes everything gathered and waits for it. */
  async #drain(): Promise<void> {
    await this.#flush();
    while (this.#writes.length > 0) await this.#writes[0];
    if (this.#syncError) throw this.#syncError;
  }

  async writeDisk(name: string, blocks: AsyncIterable<DiskBlock>, opts: WriteDiskOptions & { parentBlock?: (index: number) => Promise<ParentBlock> } = {}): Promise<DiskWriteStats> {
    if (this.#done) throw new BulwarkError('the restore point is already committed or aborted', { kind: 'invalid' });
    const disk = this.#disks.get(name);
    if (!disk) throw new BulwarkError(`disk ${name} was not declared for this restore point`, { kind: 'invalid', context: { disk: name } });
    if (disk.busy || disk.descriptor) throw new BulwarkError(`disk ${name} is already written`, { kind: 'invalid', context: { disk: name } });
    if (opts.compareWithParent && !opts.parentBlock) throw new BulwarkError('compareWithParent needs a parent restore point', { kind: 'invalid' });
    disk.busy = true;
    const blockSize = this.header.blockSize;
    const blockCount = blockCountOf(disk.size, blockSize);
    const lastLength = disk.size - (blockCount - 1) * blockSize;
    const stats = { storedBytes: 0, plainBytes: 0, storedBlocks: 0, dedupBlocks: 0, zeroBlocks: 0, holeBlocks: 0, inheritBlocks: 0 };
    let unchangedBlocks = 0;
    let bytesRead = 0;
    const pages: TablePageRef[] = [];
    let page: BlockEntry[] = [];
    let next = 0; // next block index to be given an entry
    const zero = Buffer.alloc(blockSize);
    const count = (e: BlockEntry) => {
      switch (e.kind) {
        case 'hole':
          stats.holeBlocks++;
          break;
        case 'zero':
          stats.zeroBlocks++;
          break;
        case 'inherit':
          stats.inheritBlocks++;
          break;
        case 'stored':
          stats.storedBlocks++;
          break;
      }
    };
    const flushPage = async () => {
      const payload = encodeTablePage(page);
      const crc = crc32c(payload);
      const head = encodeRecordHeader({ type: 'table-page', compression: 'none', encrypted: false, storedLength: payload.length, plainLength: payload.length, payloadCrc: crc });
      const offset = this.#append([head, payload]);
      pages.push({ offset, entryCount: page.length, crc });
      page = [];
      await this.#flushIfFull();
    };
    const setEntry = async (index: number, e: BlockEntry) => {
      while (next < index) {
        page.push(this.#gapEntry);
        count(this.#gapEntry);
        next++;
        if (page.length === ENTRIES_PER_PAGE) await flushPage();
      }
      page.push(e);
      count(e);
      next++;
      if (page.length === ENTRIES_PER_PAGE) await flushPage();
    };
    const retire = async (p: Pending) => {
      bytesRead += p.length;
      if (p.kind !== 'data') {
        let e: BlockEntry = p.kind === 'zero' ? ZERO : HOLE;
        if (opts.compareWithParent) {
          const parent = await opts.parentBlock!(p.index);
          if (parent.kind === p.kind) {
            e = INHERIT;
            unchangedBlocks++;
          }
        }
        await setEntry(p.index, e);
        return;
      }
      const enc = await p.encoded;
      let written = false;
      try {
        if (opts.compareWithParent) {
          const parent = await opts.parentBlock!(p.index);
          if (parent.kind === 'stored' && parent.digest.equals(enc.digest)) {
            unchangedBlocks++;
            await setEntry(p.index, INHERIT);
            return;
          }
        }
        const key = enc.digest.toString('latin1');
        const dup = this.#dedup.get(key);
        if (dup && dup.plainLength === p.length) {
          stats.dedupBlocks++;
          await setEntry(p.index, { kind: 'stored', digest: enc.digest, ...dup });
          return;
        }
        encodeRecordHeaderInto(
          { type: 'block', compression: enc.compression, encrypted: this.header.encryption !== null, storedLength: enc.storedLength, plainLength: p.length, payloadCrc: enc.crc },
          enc.header,
          0,
        );
        // The slot is released once the batch holding the record is written.
        const recordOffset = this.#append([enc.header, enc.payload], enc.slot);
        written = true;
        stats.storedBytes += enc.storedLength;
        stats.plainBytes += p.length;
        const target = { recordOffset, storedLength: enc.storedLength, plainLength: p.length, crc: enc.crc };
        if (this.#dedup.size >= DEDUP_LIMIT) this.#dedup.delete(this.#dedup.keys().next().value!);
        this.#dedup.set(key, target);
        await setEntry(p.index, { kind: 'stored', digest: enc.digest, ...target });
        await this.#flushIfFull();
      } finally {
        if (!written) this.#pool.release(enc.slot);
      }
    };

    const queue: Pending[] = [];
    try {
      let last = -1;
      for await (const b of blocks) {
        if (!Number.isSafeInteger(b.index) || b.index <= last || b.index >= blockCount) {
          throw new BulwarkError(`disk ${name}: block index ${b.index} out of order or beyond the disk (${blockCount} blocks, previous ${last})`, {
            kind: 'invalid',
            context: { disk: name, block: b.index },
          });
        }
        last = b.index;
        const length = b.index === blockCount - 1 ? lastLength : blockSize;
        if (b.data !== null && b.data.length !== length) {
          throw new BulwarkError(`disk ${name}: block ${b.index} has ${b.data.length} bytes, expected ${length}`, { kind: 'invalid', context: { disk: name, block: b.index } });
        }
        while (queue.length >= this.#inflightLimit) await retire(queue.shift()!);
        if (b.data === null) queue.push({ index: b.index, kind: 'hole', length });
        else if (b.data.equals(length === blockSize ? zero : zero.subarray(0, length))) queue.push({ index: b.index, kind: 'zero', length });
        else {
          // Wait for a slot, retiring finished blocks meanwhile, so `b.data` is copied before the
          // source is asked for the next block (sources may reuse their buffers).
          let slot: number | null = null;
          const acquiring = this.#pool.acquire().then((s) => (slot = s));
          while (slot === null && queue.length > 0) {
            await Promise.race([acquiring, queue[0]!.kind === 'data' ? queue[0]!.encoded : Promise.resolve()]);
            if (slot === null) await retire(queue.shift()!);
          }
          // Every slot may sit in the gathered batch: write it, or nothing would free one.
          if (slot === null) await this.#flush();
          await acquiring;
          const encoded = this.#pool.submit(slot!, b.data);
          encoded.catch(() => undefined); // observed when retired; avoid an unhandled rejection meanwhile
          queue.push({ index: b.index, kind: 'data', length, encoded });
        }
        opts.onProgress?.(bytesRead);
      }
      while (queue.length > 0) await retire(queue.shift()!);
      if (next < blockCount) {
        // Fill the tail without a per-entry await.
        await setEntry(blockCount - 1, this.#gapEntry);
      }
      if (page.length > 0) await flushPage();
      await this.#flush();
    } catch (err) {
      // Release every slot still held so the pool stays usable for abort().
      for (const p of queue) if (p.kind === 'data') await p.encoded.then((e) => this.#pool.release(e.slot), () => undefined);
      disk.busy = false;
      throw err;
    }
    opts.onProgress?.(disk.size);
    disk.descriptor = { name, size: disk.size, blockCount, entriesPerPage: ENTRIES_PER_PAGE, stats, pages };
    disk.busy = false;
    return { name, size: disk.size, bytesRead: disk.size, unchangedBlocks, ...stats };
  }

  /** Writes the index and commit slot A, fsyncs and closes. `config` is in stored form. */
  async commit(config: Buffer): Promise<{ fileLength: number }> {
    for (const [name, d] of this.#disks) {
      if (!d.descriptor) throw new BulwarkError(`disk ${name} was declared but not written`, { kind: 'invalid', context: { disk: name } });
    }
    this.#done = true;
    try {
      const index = encodeIndex({ config, disks: [...this.#disks.values()].map((d) => d.descriptor!) });
      const indexOffset = this.#append([index]);
      await this.#drain();
      const slot = encodeCommitSlot({ generation: 1, indexOffset, indexLength: index.length, fileLength: this.#end, indexCrc: crc32c(index) });
      await this.#fh.write(slot, 0, slot.length, COMMIT_SLOT_OFFSETS[0]);
      await this.#syncing;
      if (this.#syncError) throw this.#syncError;
      await this.#fh.sync();
      return { fileLength: this.#end };
    } finally {
      await this.#settle();
      await this.#fh.close();
    }
  }

  /** Waits for every write and writeback started (their errors are kept, not thrown). */
  async #settle(): Promise<void> {
    while (this.#writes.length > 0) await this.#writes[0];
    await this.#syncing;
    for (const s of this.#batchSlots) this.#pool.release(s);
    this.#batch = [];
    this.#batchSlots = [];
  }

  /** Stops writing and removes the file. */
  async abort(): Promise<void> {
    if (!this.#done) {
      this.#done = true;
      await this.#settle();
      await this.#fh.close().catch(() => undefined);
    }
    await rm(this.path, { force: true });
  }
}
