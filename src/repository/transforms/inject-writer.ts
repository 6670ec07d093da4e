// Reverse injection written straight into the full (docs/formats/backup-files.md section 5,
// "Reverse injection"): the new point's block records are encoded (EncodePool, as for any file)
// and appended beyond the full's committed length while the backup runs; each table page, once
// complete, is merged with the full's page and appended too. At commit the .vrb of the point the
// full held is built from the full's old entries of the blocks the new point replaced, then the
// journal, the full's new index and the slot flip, then the .vbm. Repository I/O: the new
// records written once, the replaced records read once and written once (3x the increment).
import { randomUUID } from 'node:crypto';
import { open, rm, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { BulwarkError, describeError } from '../../common/errors.js';
import type { DiskBlock } from '../../disk/types.js';
import {
  blockCountOf,
  checkDiskName,
  COMMIT_SLOT_OFFSETS,
  encodeCommitSlot,
  encodeIndex,
  encodeRecordHeader,
  encodeRecordHeaderInto,
  encodeTablePage,
  ENTRIES_PER_PAGE,
  HOLE,
  INHERIT,
  ZERO,
  type BlockEntry,
  type DiskDescriptor,
  type DiskStats,
  type FileHeader,
  type PendingRepairRecord,
  type PointRecord,
  type StoredBlockEntry,
  type TablePageRef,
} from '../../format/index.js';
import { publish, temporaryNameFor, trackTemporary } from '../../storage/local-fs.js';
import { writevAll } from '../../storage/writev.js';
import { BackupFile } from '../backup-file.js';
import { checkIncomingBlock, checkSourceDigest, type DiskWriteStats, type ParentBlock, type WriteDiskOptions } from '../backup-file-writer.js';
import type { ChainKeys } from '../chain-keys.js';
import type { EncodedSlot, EncodePool } from '../encode-pool.js';
import type { VmFolder } from '../folders.js';
import { backupFileName } from '../layout.js';
import { crashPoint } from './crash-points.js';
import { otherSlot, RecordSink } from './file-ops.js';
import { commitInjection, type TransformIo } from './inplace.js';
import { readBody, removeFiles, updateBody } from './metadata.js';
import { pageSpan, StepProgress, type TransformProgressOptions } from './progress.js';
import { highestSlot } from './recover.js';

const DEDUP_LIMIT = 131072;
const BATCH_BYTES = 4 * 1024 * 1024;
const BATCH_BUFFERS = 512;

type Pending =
  | { readonly index: number; readonly kind: 'hole' | 'zero'; readonly length: number }
  | { readonly index: number; readonly kind: 'data'; readonly length: number; readonly encoded: Promise<EncodedSlot>; readonly sourceDigest: Buffer | undefined };

interface DiskState {
  readonly size: number;
  readonly blockCount: number;
  /** Bit i set: the new point does not inherit block i (it stores, zeroes or holes it). */
  readonly changed: Uint8Array;
  busy: boolean;
  descriptor: DiskDescriptor | null;
}

/** Block-table stats over a disk's live entries (each record once). */
class StatsCounter {
  readonly stats: DiskStats = { storedBytes: 0, plainBytes: 0, storedBlocks: 0, dedupBlocks: 0, zeroBlocks: 0, holeBlocks: 0, inheritBlocks: 0 };
  readonly #seen = new Set<number>();
  add(e: BlockEntry): void {
    const s = this.stats;
    switch (e.kind) {
      case 'hole':
        s.holeBlocks++;
        break;
      case 'zero':
        s.zeroBlocks++;
        break;
      case 'inherit':
        s.inheritBlocks++;
        break;
      case 'stored':
        s.storedBlocks++;
        if (this.#seen.has(e.recordOffset)) s.dedupBlocks++;
        else {
          this.#seen.add(e.recordOffset);
          s.storedBytes += e.storedLength;
          s.plainBytes += e.plainLength;
        }
        break;
    }
  }
}

/**
 * Writes a new point P into the full of a reverse chain. Same writeDisk contract as
 * BackupFileWriter (several disks may be written concurrently); commit() does steps (1)-(4).
 */
export class InjectWriter {
  /** The full being injected into. */
  readonly path: string;
  /** The header of P as a forward file would have it (file id, point, chain, block size). */
  readonly header: FileHeader;
  readonly io: TransformIo = { bytesRead: 0, bytesWritten: 0 };
  readonly #full: BackupFile;
  readonly #fh: FileHandle;
  readonly #pool: EncodePool;
  readonly #keys: ChainKeys | null;
  readonly #disks = new Map<string, DiskState>();
  readonly #dedup = new Map<string, { recordOffset: number; storedLength: number; plainLength: number; crc: number }>();
  #end: number;
  #batch: Buffer[] = [];
  #batchAt: number;
  #batchBytes = 0;
  #batchSlots: number[] = [];
  #writing: Promise<void> = Promise.resolve();
  #error: BulwarkError | null = null;
  #done = false;

  private constructor(full: BackupFile, fh: FileHandle, header: FileHeader, pool: EncodePool, keys: ChainKeys | null, disks: readonly { name: string; size: number }[]) {
    this.#full = full;
    this.#keys = keys;
    this.#fh = fh;
    this.path = full.path;
    this.header = header;
    this.#pool = pool;
    this.#end = full.slot.fileLength;
    this.#batchAt = this.#end;
    for (const d of disks) {
      checkDiskName(d.name, 'disk');
      if (!Number.isSafeInteger(d.size) || d.size < 0) throw new BulwarkError(`disk ${d.name}: bad size ${d.size}`, { kind: 'invalid' });
      if (this.#disks.has(d.name)) throw new BulwarkError(`disk ${d.name} listed twice`, { kind: 'invalid' });
      const blockCount = blockCountOf(d.size, header.blockSize);
      this.#disks.set(d.name, { size: d.size, blockCount, changed: new Uint8Array(Math.ceil(blockCount / 8)), busy: false, descriptor: null });
    }
  }

  /**
   * Opens the full `fullPath` at `generation` (the .vbm's) for injection: bytes past its
   * committed length (leftovers of an interrupted transform) are cut. Caller holds the folder lock.
   */
  static async open(
    fullPath: string, generation: number, header: FileHeader, pool: EncodePool, keys: ChainKeys | null, disks: readonly { name: string; size: number }[],
  ): Promise<InjectWriter> {
    const full = await BackupFile.open(fullPath, { generation });
    let fh: FileHandle | null = null;
    try {
      if (full.header.kind !== 'full' || full.header.fileId !== header.baseFileId || full.header.blockSize !== header.blockSize) {
        throw new BulwarkError(`${fullPath} is not the full this point continues`, { kind: 'conflict', context: { file: fullPath } });
      }
      fh = await open(fullPath, 'r+');
      await fh.truncate(full.slot.fileLength);
      return new InjectWriter(full, fh, header, pool, keys, disks);
    } catch (err) {
      await fh?.close();
      await full.close();
      throw err;
    }
  }

  /** True when the new point inherits block `i` of `disk` (it neither stores, zeroes nor holes it). */
  inherits(disk: string, i: number): boolean {
    const d = this.#disks.get(disk);
    if (!d || i >= d.blockCount) return true;
    return (d.changed[i >> 3]! & (1 << (i & 7))) === 0;
  }

  #fail(err: unknown): void {
    this.#error ??= new BulwarkError(`cannot write into full backup file ${this.path}: ${describeError(err)}`, { kind: 'unavailable', cause: err });
  }

  #append(bufs: readonly Buffer[], slot?: number): number {
    if (this.#error) throw this.#error;
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

  /** Writes the gathered batch (one gather write at a time; the next batch gathers meanwhile). */
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
    const prev = this.#writing;
    const w = prev
      .then(() => writevAll(this.#fh, bufs, at, bytes))
      .then(() => {
        this.io.bytesWritten += bytes;
      })
      .catch((err: unknown) => this.#fail(err))
      .finally(() => {
        for (const s of slots) this.#pool.release(s);
      });
    this.#writing = w;
    await prev; // at most two writes in flight
    if (this.#error) throw this.#error;
  }

  async #drain(): Promise<void> {
    await this.#flush();
    await this.#writing;
    if (this.#error) throw this.#error;
  }

  async writeDisk(name: string, blocks: AsyncIterable<DiskBlock>, opts: WriteDiskOptions & { parentBlock?: (index: number) => Promise<ParentBlock> } = {}): Promise<DiskWriteStats> {
    if (this.#done) throw new BulwarkError('the restore point is already committed or aborted', { kind: 'invalid' });
    const disk = this.#disks.get(name);
    if (!disk) throw new BulwarkError(`disk ${name} was not declared for this restore point`, { kind: 'invalid', context: { disk: name } });
    if (disk.busy || disk.descriptor) throw new BulwarkError(`disk ${name} is already written`, { kind: 'invalid', context: { disk: name } });
    if (opts.compareWithParent && !opts.parentBlock) throw new BulwarkError('compareWithParent needs a parent restore point', { kind: 'invalid' });
    disk.busy = true;
    const blockSize = this.header.blockSize;
    const { blockCount } = disk;
    const lastLength = disk.size - (blockCount - 1) * blockSize;
    const fd = this.#full.disk(name);
    const own = new StatsCounter(); // what P itself stores (returned to the caller)
    const merged = new StatsCounter(); // the full's new table (its descriptor)
    let unchangedBlocks = 0;
    let bytesRead = 0;
    const pages: TablePageRef[] = [];
    let page: BlockEntry[] = [];
    let pageChanged = false;
    let next = 0;
    const zero = Buffer.alloc(blockSize);

    const flushPage = async () => {
      const p = pages.length;
      const old = fd && p < fd.pages.length ? await this.#full.page(fd, p) : [];
      const out: BlockEntry[] = pageChanged ? page.map((e, k) => (e.kind === 'inherit' ? (old[k] ?? HOLE) : e)) : page.map((_, k) => old[k] ?? HOLE);
      // A disk that shrank inside a block: an inherited last block longer than the disk has there
      // is stored again, cut to the new length (a full's entries must fit its disk).
      const lastK = blockCount - 1 - p * ENTRIES_PER_PAGE;
      const last = out[lastK];
      if (last?.kind === 'stored' && last.plainLength > lastLength) {
        const plain = (await this.#full.readBlock(last, this.#keys)).subarray(0, lastLength);
        const enc = await this.#pool.encode(plain);
        encodeRecordHeaderInto(
          { type: 'block', compression: enc.compression, encrypted: this.header.encryption !== null, storedLength: enc.storedLength, plainLength: lastLength, payloadCrc: enc.crc },
          enc.header,
          0,
        );
        const recordOffset = this.#append([enc.header, enc.payload], enc.slot);
        out[lastK] = { kind: 'stored', digest: Buffer.from(enc.digest), recordOffset, storedLength: enc.storedLength, plainLength: lastLength, crc: enc.crc };
        pageChanged = true;
        disk.changed[(blockCount - 1) >> 3]! |= 1 << ((blockCount - 1) & 7);
      }
      for (const e of out) merged.add(e);
      const oldRef = fd?.pages[p];
      if (!pageChanged && oldRef && oldRef.entryCount === page.length) pages.push(oldRef);
      else {
        const payload = encodeTablePage(out);
        const crc = crc32c(payload);
        const head = encodeRecordHeader({ type: 'table-page', compression: 'none', encrypted: false, storedLength: payload.length, plainLength: payload.length, payloadCrc: crc });
        pages.push({ offset: this.#append([head, payload]), entryCount: page.length, crc });
      }
      page = [];
      pageChanged = false;
      crashPoint('inject-page');
      await this.#flushIfFull();
    };
    const setEntry = async (index: number, e: BlockEntry) => {
      while (next <= index) {
        const entry = next === index ? e : INHERIT;
        page.push(entry);
        own.add(entry);
        if (entry.kind !== 'inherit') {
          pageChanged = true;
          disk.changed[next >> 3]! |= 1 << (next & 7);
        }
        next++;
        if (page.length === ENTRIES_PER_PAGE) await flushPage();
      }
    };
    const retire = async (p: Pending) => {
      bytesRead += p.length;
      if (p.kind !== 'data') {
        let e: BlockEntry = p.kind === 'zero' ? ZERO : HOLE;
        if (opts.compareWithParent && (await opts.parentBlock!(p.index)).kind === p.kind) {
          e = INHERIT;
          unchangedBlocks++;
        }
        await setEntry(p.index, e);
        return;
      }
      const enc = await p.encoded;
      let queued = false;
      try {
        checkSourceDigest(name, p.index, p.sourceDigest, enc.digest, this.header.encryption !== null);
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
          await setEntry(p.index, { kind: 'stored', digest: enc.digest, ...dup });
          return;
        }
        encodeRecordHeaderInto(
          { type: 'block', compression: enc.compression, encrypted: this.header.encryption !== null, storedLength: enc.storedLength, plainLength: p.length, payloadCrc: enc.crc },
          enc.header,
          0,
        );
        const recordOffset = this.#append([enc.header, enc.payload], enc.slot);
        queued = true;
        const target = { recordOffset, storedLength: enc.storedLength, plainLength: p.length, crc: enc.crc };
        if (this.#dedup.size >= DEDUP_LIMIT) this.#dedup.delete(this.#dedup.keys().next().value!);
        this.#dedup.set(key, target);
        await setEntry(p.index, { kind: 'stored', digest: Buffer.from(enc.digest), ...target });
        await this.#flushIfFull();
      } finally {
        if (!queued) this.#pool.release(enc.slot);
      }
    };

    const queue: Pending[] = [];
    const inflight = this.#pool.slots + 2;
    try {
      let last = -1;
      for await (const b of blocks) {
        const length = checkIncomingBlock(name, b, last, blockCount, blockSize, lastLength);
        last = b.index;
        while (queue.length >= inflight) await retire(queue.shift()!);
        if (b.data === null) queue.push({ index: b.index, kind: 'hole', length });
        else if (b.data.equals(length === blockSize ? zero : zero.subarray(0, length))) queue.push({ index: b.index, kind: 'zero', length });
        else {
          let slot: number | null = null;
          const acquiring = this.#pool.acquire().then((s) => (slot = s));
          while (slot === null && queue.length > 0) {
            await Promise.race([acquiring, queue[0]!.kind === 'data' ? queue[0]!.encoded : Promise.resolve()]);
            if (slot === null) await retire(queue.shift()!);
          }
          if (slot === null) await this.#flush();
          await acquiring;
          const encoded = this.#pool.submit(slot!, b.data);
          encoded.catch(() => undefined);
          queue.push({ index: b.index, kind: 'data', length, encoded, sourceDigest: b.sha256 });
        }
        opts.onProgress?.(bytesRead, own.stats.storedBytes);
      }
      while (queue.length > 0) await retire(queue.shift()!);
      if (next < blockCount) await setEntry(blockCount - 1, INHERIT);
      if (page.length > 0) await flushPage();
      await this.#flush();
    } catch (err) {
      for (const p of queue) if (p.kind === 'data') await p.encoded.then((e) => this.#pool.release(e.slot), () => undefined);
      disk.busy = false;
      throw err;
    }
    opts.onProgress?.(disk.size, own.stats.storedBytes);
    disk.descriptor = { name, size: disk.size, blockCount, entriesPerPage: ENTRIES_PER_PAGE, stats: merged.stats, pages };
    disk.busy = false;
    const s = own.stats;
    return { name, size: disk.size, bytesRead: disk.size, unchangedBlocks, ...s };
  }

  /**
   * Steps (1)-(4): the .vrb of the full's point, the journal, the full's new index and slot flip,
   * the .vbm commit. `config` is in stored form. Returns the new point's record. Progress (step
   * `inject`): the full's disk bytes gone through while the .vrb takes the replaced records.
   */
  async commit(
    f: VmFolder,
    input: { chainId: string; fullPoint: PointRecord; point: { id: string; time: Date }; config: Buffer; repair: PendingRepairRecord | null } & TransformProgressOptions,
  ): Promise<PointRecord> {
    for (const [name, d] of this.#disks) {
      if (!d.descriptor) throw new BulwarkError(`disk ${name} was declared but not written`, { kind: 'invalid', context: { disk: name } });
    }
    this.#done = true;
    const qp = input.fullPoint;
    const full = this.#full;
    let vrbPath: string | null = null;
    try {
      await this.#drain();
      crashPoint('inject-appended');
      // (1) the reverse increment of Q: the full's old entries of every block P replaced.
      const vrbName = backupFileName(new Date(qp.time), qp.id, 'vrb');
      vrbPath = path.join(f.dir, vrbName);
      const tmp = temporaryNameFor(vrbPath);
      const untrack = trackTemporary(tmp);
      try {
        const sink = await RecordSink.create(tmp, { ...full.header, kind: 'reverse', fileId: randomUUID(), pointId: qp.id, baseFileId: full.header.fileId, timeMs: Date.parse(qp.time) });
        const progress = new StepProgress('inject', full.index.disks.reduce((sum, d) => sum + d.size, 0), () => ({ bytesRead: sink.bytesRead, bytesWritten: sink.bytesWritten }), input);
        progress.start();
        try {
          const disks: DiskDescriptor[] = [];
          let diskBase = 0;
          for (const fd of full.index.disks) {
            const pd = this.#disks.get(fd.name);
            const resized = pd !== undefined && pd.size !== fd.size;
            const base = diskBase;
            const source = async (p: number, count: number): Promise<BlockEntry[]> => {
              const { from, to } = pageSpan(base, fd.size, p, fd.entriesPerPage, full.header.blockSize);
              const first = p * fd.entriesPerPage;
              const replaced = (i: number) =>
                !pd || i >= pd.blockCount || !this.inherits(fd.name, i) || (resized && (i === fd.blockCount - 1 || i === pd.blockCount - 1));
              let any = false;
              for (let k = 0; k < count && !any; k++) any = replaced(first + k);
              if (!any) {
                progress.at(to);
                return new Array<BlockEntry>(count).fill(INHERIT);
              }
              const old = await full.page(fd, p);
              const entries = old.map((e, k) => (replaced(first + k) ? e : INHERIT));
              await sink.copyRecords(full, entries.filter((e): e is StoredBlockEntry => e.kind === 'stored'), (c, n) => progress.within(from, to, c, n));
              progress.at(to);
              return entries.map((e) => (e.kind === 'stored' ? sink.mapped(full, e) : e));
            };
            disks.push(await sink.writeTable(fd.name, fd.size, full.header.blockSize, source));
            diskBase += fd.size;
          }
          crashPoint('vrb-tables');
          await sink.commit(full.index.config, disks, 1, 0);
          progress.end();
        } finally {
          this.io.bytesRead += sink.bytesRead;
          this.io.bytesWritten += sink.bytesWritten;
          await sink.close();
        }
        crashPoint('vrb-written');
        await publish(tmp, vrbPath);
      } catch (err) {
        await rm(tmp, { force: true });
        throw err;
      } finally {
        untrack();
      }
      crashPoint('vrb-published');
      // (2) journal: from here a crash after the slot flip rolls forward.
      await updateBody(f, (b) => ({
        ...b,
        journal: {
          kind: 'reverse-inject', startedAt: new Date().toISOString(), points: [qp.id, input.point.id],
          files: [{ name: qp.file, generationBefore: full.slot.generation }, { name: vrbName, generationBefore: 0 }], step: 'append',
          newPoint: { id: input.point.id, time: input.point.time.toISOString() },
        },
      }));
      crashPoint('inject-journal');
      // (3) the full's new index, then the flip.
      const generation = full.slot.generation + 1;
      const index = encodeIndex({ config: input.config, disks: [...this.#disks.values()].map((d) => d.descriptor!) });
      const indexOffset = this.#end;
      await writevAll(this.#fh, [index], indexOffset, index.length);
      this.#end += index.length;
      this.io.bytesWritten += index.length;
      await this.#fh.sync();
      crashPoint('before-flip');
      const slot = encodeCommitSlot({ generation, indexOffset, indexLength: index.length, fileLength: this.#end, indexCrc: crc32c(index) });
      await this.#fh.write(slot, 0, slot.length, COMMIT_SLOT_OFFSETS[otherSlot(full)]);
      await this.#fh.sync();
      crashPoint('flipped');
      // (4)
      return await commitInjection(f, input.chainId, qp.id, { id: input.point.id, time: input.point.time.toISOString() }, vrbName, generation, this.#end, input.repair);
    } catch (err) {
      // Not committed: undo (the .vrb is not named by the .vbm; the full's slot was not flipped,
      // or the journal rolls it forward on the next open when it was).
      const body = await readBody(f).catch(() => null);
      if (body?.journal?.kind !== 'reverse-inject' || !(await flippedBeyond(this.path, full.slot.generation))) {
        if (body?.journal?.kind === 'reverse-inject') await updateBody(f, (b) => ({ ...b, journal: null })).catch(() => undefined);
        if (vrbPath) await removeFiles(f, [vrbPath]).catch(() => undefined);
        await this.#fh.truncate(full.slot.fileLength).catch(() => undefined);
      }
      throw err;
    } finally {
      await this.#close();
    }
  }

  async #close(): Promise<void> {
    await this.#writing.catch(() => undefined);
    for (const s of this.#batchSlots) this.#pool.release(s);
    this.#batch = [];
    this.#batchSlots = [];
    await this.#fh.close().catch(() => undefined);
    await this.#full.close().catch(() => undefined);
  }

  /** Stops: the bytes appended past the full's committed length are cut; nothing changed. */
  async abort(): Promise<void> {
    if (this.#done) return;
    this.#done = true;
    await this.#writing.catch(() => undefined);
    await this.#fh.truncate(this.#full.slot.fileLength).catch(() => undefined);
    await this.#close();
  }
}

async function flippedBeyond(file: string, generation: number): Promise<boolean> {
  const s = await highestSlot(file);
  return s !== null && s.generation > generation;
}

