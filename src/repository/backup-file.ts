// Reads one committed backup file: header page, current commit slot, index; block-table pages on
// demand (small cache); block records with every check of docs/formats/backup-files.md section 6.
// Errors are BulwarkError kind 'corrupt' naming the file; callers add disk, offset and point.
import { open, type FileHandle } from 'node:fs/promises';
import { crc32c } from '@node-rs/crc32';
import { BulwarkError } from '../common/errors.js';
import {
  COMMIT_SLOT_OFFSETS,
  COMMIT_SLOT_SIZE,
  decodeCommitSlot,
  decodeHeader,
  decodeIndex,
  decodeRecordHeader,
  decodeTablePage,
  FormatError,
  HEADER_PAGE_SIZE,
  HOLE,
  pickCommitSlot,
  RECORD_HEADER_SIZE,
  type BackupIndex,
  type BlockEntry,
  type CommitSlot,
  type DiskDescriptor,
  type FileHeader,
  type RecordHeader,
  type StoredBlockEntry,
} from '../format/index.js';
import { decodePayload } from './block-codec.js';
import type { ChainKeys } from './chain-keys.js';
import { uuidToBytes } from '../format/index.js';

const PAGE_CACHE = 64;

export function corrupt(message: string, context: Record<string, string | number | undefined>, cause?: unknown): BulwarkError {
  return new BulwarkError(message, { kind: 'corrupt', context, cause, hint: 'run `bulwark repo verify` on the repository to see all damage' });
}

/**
 * What a backup file is read through: a FileHandle, or bytes in memory (the damage tests verify
 * tens of thousands of mutated copies of a file without a file system round trip each).
 */
export interface ByteSource {
  read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  stat(): Promise<{ size: number }>;
  close(): Promise<void>;
}

/** A ByteSource over `bytes` (not copied). */
export function memorySource(bytes: Buffer): ByteSource {
  return {
    read: (buffer, offset, length, position) => {
      const n = Math.max(0, Math.min(length, bytes.length - position));
      if (n > 0) bytes.copy(buffer, offset, position, position + n);
      return Promise.resolve({ bytesRead: n });
    },
    stat: () => Promise.resolve({ size: bytes.length }),
    close: () => Promise.resolve(),
  };
}

export class BackupFile {
  readonly path: string;
  readonly header: FileHeader;
  readonly slot: CommitSlot;
  /** Which slot (0 = A, 1 = B) is current. */
  readonly slotIndex: number;
  readonly index: BackupIndex;
  readonly size: number;
  readonly aad: Buffer;
  readonly #handle: FileHandle | null;
  readonly #fh: ByteSource;
  readonly #pages = new Map<string, Promise<BlockEntry[]>>();
  readonly #disks = new Map<string, DiskDescriptor>();

  private constructor(path: string, fh: ByteSource, handle: FileHandle | null, size: number, header: FileHeader, slot: CommitSlot, slotIndex: number, index: BackupIndex) {
    this.path = path;
    this.#fh = fh;
    this.#handle = handle;
    this.size = size;
    this.header = header;
    this.slot = slot;
    this.slotIndex = slotIndex;
    this.index = index;
    this.aad = uuidToBytes(header.chainId);
    for (const d of index.disks) this.#disks.set(d.name, d);
  }

  /**
   * Opens and checks header, commit slot and index. With `generation` (the one the .vbm names),
   * the slot of that generation is used when it is valid, so a reader sees the point the .vbm
   * names even while an in-place transform has committed a newer generation; otherwise (or
   * after a compaction, which keeps only its new generation) the highest valid slot.
   */
  static async open(path: string, opts: { generation?: number; write?: boolean; source?: ByteSource } = {}): Promise<BackupFile> {
    let fh: ByteSource;
    let handle: FileHandle | null = null;
    if (opts.source) fh = opts.source;
    else {
      try {
        fh = handle = await open(path, opts.write ? 'r+' : 'r');
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        throw new BulwarkError(`cannot open backup file ${path}`, { kind: code === 'ENOENT' ? 'not-found' : 'internal', context: { file: path }, cause: err });
      }
    }
    try {
      const size = (await fh.stat()).size;
      if (size < HEADER_PAGE_SIZE) throw new FormatError('header page', `file is ${size} bytes, shorter than the header page (truncated?)`);
      const page = Buffer.alloc(HEADER_PAGE_SIZE);
      await readExactly(fh, page, 0);
      const header = decodeHeader(page);
      const raws = COMMIT_SLOT_OFFSETS.map((o) => page.subarray(o, o + COMMIT_SLOT_SIZE));
      let { slot, index: slotIndex } = pickCommitSlot(raws, size);
      if (opts.generation !== undefined && slot.generation !== opts.generation) {
        let found = false;
        let damaged: string | null = null;
        for (const [i, raw] of raws.entries()) {
          let s: CommitSlot | null = null;
          try {
            s = decodeCommitSlot(raw, size);
          } catch (err) {
            damaged = `slot ${'AB'[i]}: ${(err as Error).message}`;
            continue;
          }
          if (s?.generation === opts.generation) {
            slot = s;
            slotIndex = i;
            found = true;
          }
        }
        // The named slot may be the damaged one: the other holds another point (section 3.2).
        if (!found && damaged !== null) throw new FormatError('commit slot', `no valid slot holds generation ${opts.generation}, the one the chain metadata names, and ${damaged}`);
      }
      const raw = Buffer.alloc(slot.indexLength);
      await readExactly(fh, raw, slot.indexOffset);
      if (crc32c(raw) !== slot.indexCrc) throw new FormatError('index', 'checksum mismatch');
      const index = decodeIndex(raw, header.blockSize, slot.indexOffset);
      return new BackupFile(path, fh, handle, size, header, slot, slotIndex, index);
    } catch (err) {
      await fh.close();
      if (err instanceof FormatError) throw corrupt(`damaged backup file ${path}: ${err.message}`, { file: path }, err);
      throw err;
    }
  }

  /** The file's handle (opened with `write` for transforms: appends go through it). */
  get handle(): FileHandle {
    if (!this.#handle) throw new BulwarkError(`backup file ${this.path} was opened from memory: it has no file handle`, { kind: 'internal', context: { file: this.path } });
    return this.#handle;
  }

  disk(name: string): DiskDescriptor | undefined {
    return this.#disks.get(name);
  }

  /** The table page `p` of disk `d`, checked; cached. */
  async page(d: DiskDescriptor, p: number): Promise<BlockEntry[]> {
    const key = `${d.name}\0${p}`;
    let hit = this.#pages.get(key);
    if (hit) {
      this.#pages.delete(key);
      this.#pages.set(key, hit);
      return hit;
    }
    hit = this.#loadPage(d, p);
    this.#pages.set(key, hit);
    hit.catch(() => this.#pages.delete(key));
    if (this.#pages.size > PAGE_CACHE) this.#pages.delete(this.#pages.keys().next().value!);
    return hit;
  }

  async #loadPage(d: DiskDescriptor, p: number): Promise<BlockEntry[]> {
    const ref = d.pages[p]!;
    const where = { file: this.path, disk: d.name, page: p, fileOffset: ref.offset };
    const len = RECORD_HEADER_SIZE + ref.entryCount * 64;
    const buf = Buffer.allocUnsafe(len);
    try {
      await readExactly(this.#fh, buf, ref.offset);
      const h = decodeRecordHeader(buf);
      if (h.type !== 'table-page') throw new FormatError('table page', 'record is not a table page');
      if (h.storedLength !== len - RECORD_HEADER_SIZE) throw new FormatError('table page', 'length disagrees with the index');
      const payload = buf.subarray(RECORD_HEADER_SIZE);
      if (crc32c(payload) !== ref.crc || h.payloadCrc !== ref.crc) throw new FormatError('table page', 'checksum mismatch');
      const entries = decodeTablePage(payload, ref.entryCount);
      for (const e of entries) {
        if (e.kind === 'stored' && e.recordOffset + RECORD_HEADER_SIZE + e.storedLength > this.slot.indexOffset) {
          throw new FormatError('block-table entry', `record at ${e.recordOffset} lies outside the data area`);
        }
        if (e.kind === 'inherit' && this.header.kind === 'full') throw new FormatError('block-table entry', 'inherit in a full backup file');
      }
      return entries;
    } catch (err) {
      if (err instanceof FormatError) throw corrupt(`damaged block table in ${this.path}, disk ${d.name}, page ${p}: ${err.message}`, where, err);
      throw err;
    }
  }

  /** Entry of block `i` of disk `name`; a disk or block this file does not have reads as a hole. */
  async entry(name: string, i: number): Promise<BlockEntry> {
    const d = this.#disks.get(name);
    if (!d || i >= d.blockCount) return HOLE;
    const page = await this.page(d, Math.floor(i / d.entriesPerPage));
    return page[i % d.entriesPerPage]!;
  }

  /** Reads a record and checks its header and payload CRC against the entry. Throws FormatError. */
  async readRecord(e: StoredBlockEntry): Promise<{ header: RecordHeader; payload: Buffer }> {
    const buf = Buffer.allocUnsafe(RECORD_HEADER_SIZE + e.storedLength);
    await readExactly(this.#fh, buf, e.recordOffset);
    const header = decodeRecordHeader(buf);
    if (header.type !== 'block') throw new FormatError('block record', 'record is not a block');
    if (header.storedLength !== e.storedLength || header.plainLength !== e.plainLength) throw new FormatError('block record', 'lengths disagree with the block table');
    const payload = buf.subarray(RECORD_HEADER_SIZE);
    const crc = crc32c(payload);
    if (crc !== e.crc || header.payloadCrc !== e.crc) throw new FormatError('block record', 'CRC32C mismatch');
    return { header, payload };
  }

  /** Plain data of a stored block. Throws FormatError or Error (decode) without context. */
  async readBlock(e: StoredBlockEntry, keys: ChainKeys | null): Promise<Buffer> {
    const { header, payload } = await this.readRecord(e);
    return decodePayload(payload, header.compression, header.encrypted, e.plainLength, keys, this.aad);
  }

  /** Raw bytes of the file (verify walks the data area with this). */
  async readAt(buf: Buffer, position: number): Promise<void> {
    await readExactly(this.#fh, buf, position);
  }

  async close(): Promise<void> {
    await this.#fh.close();
  }
}

export async function readExactly(fh: ByteSource, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw new FormatError('file', `unexpected end of file at ${position + done} (truncated?)`);
    done += bytesRead;
  }
}
