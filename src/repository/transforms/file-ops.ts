// Building block of every transform (docs/formats/backup-files.md section 5): a RecordSink
// appends to a backup file — a new one (reverse increment, synthetic full, compacted full) or an
// existing one beyond its committed length (merge, reverse injection) — copying block records
// from other files as stored bytes (no recompression), writing table pages and an index, and
// committing through a commit slot. Nothing here decides what a file means; the callers do.
import { open, type FileHandle } from 'node:fs/promises';
import { crc32c } from '@node-rs/crc32';
import { BulwarkError } from '../../common/errors.js';
import {
  blockCountOf,
  COMMIT_SLOT_OFFSETS,
  decodeRecordHeader,
  encodeCommitSlot,
  encodeHeader,
  encodeIndex,
  encodeRecordHeader,
  encodeTablePage,
  ENTRIES_PER_PAGE,
  HEADER_PAGE_SIZE,
  RECORD_HEADER_SIZE,
  type BlockEntry,
  type DiskDescriptor,
  type DiskStats,
  type FileHeader,
  type StoredBlockEntry,
  type TablePageRef,
} from '../../format/index.js';
import { corrupt, type BackupFile } from '../backup-file.js';

/** Largest read when copying runs of adjacent records. */
const CHUNK = 8 * 1024 * 1024;
/**
 * Writeback of appended bytes is started every this many bytes (a datasync in the background),
 * so the commit's fsync does not wait for the whole copy to reach the disk: the disk writes while
 * the next records are read and copied.
 */
const SYNC_EVERY = 32 * 1024 * 1024;

/** Source of a disk's entries, one table page at a time (bounded memory whatever the disk size). */
export type PageSource = (page: number, entryCount: number) => Promise<readonly BlockEntry[]>;

export class RecordSink {
  readonly path: string;
  readonly fh: FileHandle;
  /** Next append position. */
  end: number;
  bytesWritten = 0;
  bytesRead = 0;
  readonly #copied = new Map<string, StoredBlockEntry>();
  #sinceSync = 0;
  #syncing: Promise<void> | null = null;
  #syncError: unknown = null;

  private constructor(path: string, fh: FileHandle, end: number) {
    this.path = path;
    this.fh = fh;
    this.end = end;
  }

  /** A new file at `path` (exclusive create) with `header`'s page and empty commit slots. */
  static async create(path: string, header: FileHeader): Promise<RecordSink> {
    const fh = await open(path, 'wx', 0o640);
    const sink = new RecordSink(path, fh, 0);
    try {
      await sink.append(encodeHeader(header));
    } catch (err) {
      await fh.close(); // the caller removes the temporary file; its handle is ours to close
      throw err;
    }
    return sink;
  }

  /**
   * An existing committed file opened for an in-place transform: everything beyond the current
   * commit's file length (leftovers of an interrupted transform) is cut, then appends follow.
   */
  static async reopen(file: BackupFile): Promise<RecordSink> {
    const fh = await open(file.path, 'r+');
    try {
      await fh.truncate(file.slot.fileLength);
    } catch (err) {
      await fh.close();
      throw err;
    }
    return new RecordSink(file.path, fh, file.slot.fileLength);
  }

  async append(buf: Buffer): Promise<number> {
    const { pos, written } = this.#startAppend(buf);
    await written;
    return pos;
  }

  /** Reserves the next bytes for `buf` now (pos) and writes them (written). */
  #startAppend(buf: Buffer): { pos: number; written: Promise<void> } {
    if (this.#syncError) throw this.#syncError as Error;
    const pos = this.end;
    this.end += buf.length;
    return { pos, written: this.#write(buf, pos) };
  }

  async #write(buf: Buffer, pos: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.fh.write(buf, done, buf.length - done, pos + done);
      done += bytesWritten;
    }
    this.bytesWritten += buf.length;
    this.#sinceSync += buf.length;
    if (this.#sinceSync >= SYNC_EVERY && !this.#syncing) {
      this.#sinceSync = 0;
      // An error is kept and thrown by the next append or the commit (never unhandled).
      this.#syncing = this.fh
        .datasync()
        .catch((err: unknown) => {
          this.#syncError ??= err;
        })
        .finally(() => (this.#syncing = null));
    }
  }

  /** The entry of a record copied from `src` (after copyRecords). */
  mapped(src: BackupFile, e: StoredBlockEntry): StoredBlockEntry {
    const m = this.#copied.get(`${src.header.fileId}:${e.recordOffset}`);
    if (!m) throw new BulwarkError(`record at ${e.recordOffset} of ${src.path} was not copied`, { kind: 'internal' });
    return m;
  }

  /**
   * Copies the records of `entries` from `src` (each once, adjacent records in one read), checking
   * every record header and payload CRC on the way: damage is never copied. `onCopied` is told
   * after each run read (record bytes of this call copied so far, of all it copies): progress.
   */
  async copyRecords(src: BackupFile, entries: readonly StoredBlockEntry[], onCopied?: (copied: number, toCopy: number) => void): Promise<void> {
    const key = (e: StoredBlockEntry) => `${src.header.fileId}:${e.recordOffset}`;
    const todo = new Map<number, StoredBlockEntry>();
    for (const e of entries) if (!this.#copied.has(key(e))) todo.set(e.recordOffset, e);
    const sorted = [...todo.values()].sort((a, b) => a.recordOffset - b.recordOffset);
    // Runs of adjacent records, each read in one piece; the next run is read while this one is
    // checked and written.
    const runs: Array<[number, number, number, number]> = []; // [first, past, start, end]
    for (let i = 0; i < sorted.length; ) {
      const start = sorted[i]!.recordOffset;
      let end = start + RECORD_HEADER_SIZE + sorted[i]!.storedLength;
      let j = i + 1;
      while (j < sorted.length && sorted[j]!.recordOffset === end && end - start < CHUNK) {
        end += RECORD_HEADER_SIZE + sorted[j]!.storedLength;
        j++;
      }
      runs.push([i, j, start, end]);
      i = j;
    }
    const read = (r: [number, number, number, number]) => {
      const buf = Buffer.allocUnsafe(r[3] - r[2]);
      const p = src.readAt(buf, r[2]).then(() => buf);
      p.catch(() => undefined); // awaited below; never an unhandled rejection meanwhile
      return p;
    };
    const toCopy = runs.reduce((sum, r) => sum + (r[3] - r[2]), 0);
    let copied = 0;
    let next = runs.length > 0 ? read(runs[0]!) : null;
    // One write in flight while the next run is checked: the CRC work overlaps the write.
    let writing: Promise<void> = Promise.resolve();
    try {
      for (let r = 0; r < runs.length; r++) {
        const [i, j, start] = runs[r]!;
        const buf = await next!;
        next = r + 1 < runs.length ? read(runs[r + 1]!) : null;
        this.bytesRead += buf.length;
        for (let k = i; k < j; k++) {
          const e = sorted[k]!;
          const at = e.recordOffset - start;
          try {
            const h = decodeRecordHeader(buf, at);
            const payload = buf.subarray(at + RECORD_HEADER_SIZE, at + RECORD_HEADER_SIZE + e.storedLength);
            if (h.type !== 'block' || h.storedLength !== e.storedLength || h.plainLength !== e.plainLength || h.payloadCrc !== e.crc || crc32c(payload) !== e.crc) {
              throw new Error('record header or CRC32C does not match the block table');
            }
          } catch (err) {
            throw corrupt(`damaged block record in ${src.path} at file offset ${e.recordOffset}: ${(err as Error).message}`, { file: src.path, fileOffset: e.recordOffset }, err);
          }
        }
        await writing;
        const { pos, written } = this.#startAppend(buf);
        written.catch(() => undefined); // awaited before the next write or at the end
        writing = written;
        for (let k = i; k < j; k++) {
          const e = sorted[k]!;
          this.#copied.set(key(e), { ...e, recordOffset: pos + (e.recordOffset - start) });
        }
        copied += buf.length;
        onCopied?.(copied, toCopy);
      }
    } catch (err) {
      await writing.catch(() => undefined);
      throw err;
    }
    await writing;
  }

  /**
   * Writes the block table of one disk from `source` (page by page). `reuse(p)` may return the
   * ref of an identical page already in this file (in-place transforms), which is then not
   * rewritten. Returns the disk's descriptor with statistics over the live entries.
   */
  async writeTable(name: string, size: number, blockSize: number, source: PageSource, reuse?: (page: number, entryCount: number) => TablePageRef | null): Promise<DiskDescriptor> {
    const blockCount = blockCountOf(size, blockSize);
    const pageCount = Math.ceil(blockCount / ENTRIES_PER_PAGE);
    const stats: DiskStats = { storedBytes: 0, plainBytes: 0, storedBlocks: 0, dedupBlocks: 0, zeroBlocks: 0, holeBlocks: 0, inheritBlocks: 0 };
    const seen = new Set<number>();
    const pages: TablePageRef[] = [];
    for (let p = 0; p < pageCount; p++) {
      const count = Math.min(ENTRIES_PER_PAGE, blockCount - p * ENTRIES_PER_PAGE);
      const entries = await source(p, count);
      if (entries.length !== count) throw new BulwarkError(`disk ${name} page ${p}: ${entries.length} entries, expected ${count}`, { kind: 'internal' });
      for (const e of entries) {
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
            if (seen.has(e.recordOffset)) stats.dedupBlocks++;
            else {
              seen.add(e.recordOffset);
              stats.storedBytes += e.storedLength;
              stats.plainBytes += e.plainLength;
            }
            break;
        }
      }
      const old = reuse?.(p, count) ?? null;
      if (old) {
        pages.push(old);
        continue;
      }
      const payload = encodeTablePage(entries);
      const crc = crc32c(payload);
      const rec = Buffer.concat([
        encodeRecordHeader({ type: 'table-page', compression: 'none', encrypted: false, storedLength: payload.length, plainLength: payload.length, payloadCrc: crc }),
        payload,
      ]);
      pages.push({ offset: await this.append(rec), entryCount: count, crc });
    }
    return { name, size, blockCount, entriesPerPage: ENTRIES_PER_PAGE, stats, pages };
  }

  /**
   * Appends the index, fsyncs, writes commit slot `slotIndex` with `generation`, fsyncs, closes.
   * Until the slot write the file's previous commit (if any) is untouched and current.
   */
  async commit(config: Buffer, disks: readonly DiskDescriptor[], generation: number, slotIndex: number, beforeSlot?: () => Promise<void>): Promise<{ fileLength: number }> {
    try {
      const index = encodeIndex({ config, disks });
      const indexOffset = await this.append(index);
      await this.#syncing;
      if (this.#syncError) throw this.#syncError as Error;
      await this.fh.sync();
      await beforeSlot?.();
      const slot = encodeCommitSlot({ generation, indexOffset, indexLength: index.length, fileLength: this.end, indexCrc: crc32c(index) });
      await this.fh.write(slot, 0, slot.length, COMMIT_SLOT_OFFSETS[slotIndex]);
      await this.fh.sync();
      return { fileLength: this.end };
    } finally {
      await this.close();
    }
  }

  #closed = false;
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#syncing;
    await this.fh.close();
  }
}

/** The index of the slot an in-place transform overwrites: the one not current. */
export function otherSlot(file: BackupFile): number {
  return file.slotIndex === 0 ? 1 : 0;
}

export { HEADER_PAGE_SIZE };
