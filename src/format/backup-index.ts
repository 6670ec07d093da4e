// The index at the end of a backup file's committed area: VM configuration, one descriptor per
// disk (128 bytes) and the refs to its block-table pages (16 bytes each).
// docs/formats/backup-files.md section 3.4.
import { check, readU64, writeU64 } from './errors.js';
import { BLOCK_ENTRY_SIZE, ENTRIES_PER_PAGE } from './block-table.js';
import { HEADER_PAGE_SIZE } from './header.js';
import { INDEX_MAGIC } from './magic.js';
import { RECORD_HEADER_SIZE } from './record.js';

export const INDEX_HEADER_SIZE = 64;
export const DISK_DESCRIPTOR_SIZE = 128;
export const TABLE_PAGE_REF_SIZE = 16;
export const MAX_DISKS = 256;
export const MAX_DISK_NAME_BYTES = 64;
/** VM configuration blobs above this are refused (they are libvirt XML or QEMU args, not data). */
export const MAX_CONFIG_BYTES = 16 * 1024 * 1024;
const S = 'index';

export interface TablePageRef {
  /** Offset of the table-page record (its header). */
  readonly offset: number;
  readonly entryCount: number;
  /** CRC32C of the page payload. */
  readonly crc: number;
}

/** What a file stored for one disk: counters kept for inspect without reading the tables. */
export interface DiskStats {
  storedBytes: number;
  plainBytes: number;
  storedBlocks: number;
  dedupBlocks: number;
  zeroBlocks: number;
  holeBlocks: number;
  inheritBlocks: number;
}

export interface DiskDescriptor {
  readonly name: string;
  readonly size: number;
  readonly blockCount: number;
  readonly entriesPerPage: number;
  readonly stats: DiskStats;
  readonly pages: readonly TablePageRef[];
}

export interface BackupIndex {
  /** The VM configuration in stored form (encrypted when the chain is). */
  readonly config: Buffer;
  readonly disks: readonly DiskDescriptor[];
}

export function blockCountOf(size: number, blockSize: number): number {
  return Math.ceil(size / blockSize);
}

export function checkDiskName(name: string, structure = S): void {
  const bytes = Buffer.byteLength(name, 'utf8');
  check(bytes >= 1 && bytes <= MAX_DISK_NAME_BYTES, structure, `disk name must be 1-${MAX_DISK_NAME_BYTES} bytes: ${JSON.stringify(name)}`);
  check(!name.includes('\0'), structure, 'disk name contains a zero byte');
}

const pad8 = (n: number) => (n + 7) & ~7;

export function encodeIndex(idx: BackupIndex): Buffer {
  check(idx.disks.length <= MAX_DISKS, S, `more than ${MAX_DISKS} disks`);
  check(idx.config.length <= MAX_CONFIG_BYTES, S, 'VM configuration too large');
  let len = INDEX_HEADER_SIZE + pad8(idx.config.length);
  for (const d of idx.disks) len += DISK_DESCRIPTOR_SIZE + d.pages.length * TABLE_PAGE_REF_SIZE;
  const b = Buffer.alloc(len);
  INDEX_MAGIC.copy(b, 0);
  b.writeUInt32LE(idx.disks.length, 8);
  b.writeUInt32LE(idx.config.length, 12);
  idx.config.copy(b, INDEX_HEADER_SIZE);
  let at = INDEX_HEADER_SIZE + pad8(idx.config.length);
  for (const d of idx.disks) {
    checkDiskName(d.name);
    b.write(d.name, at, 'utf8');
    writeU64(b, at + 64, d.size);
    writeU64(b, at + 72, d.blockCount);
    b.writeUInt32LE(d.pages.length, at + 80);
    b.writeUInt32LE(d.entriesPerPage, at + 84);
    writeU64(b, at + 88, d.stats.storedBytes);
    writeU64(b, at + 96, d.stats.plainBytes);
    b.writeUInt32LE(d.stats.storedBlocks, at + 104);
    b.writeUInt32LE(d.stats.dedupBlocks, at + 108);
    b.writeUInt32LE(d.stats.zeroBlocks, at + 112);
    b.writeUInt32LE(d.stats.holeBlocks, at + 116);
    b.writeUInt32LE(d.stats.inheritBlocks, at + 120);
    at += DISK_DESCRIPTOR_SIZE;
    for (const p of d.pages) {
      writeU64(b, at, p.offset);
      b.writeUInt32LE(p.entryCount, at + 8);
      b.writeUInt32LE(p.crc >>> 0, at + 12);
      at += TABLE_PAGE_REF_SIZE;
    }
  }
  return b;
}

/**
 * Decodes and checks an index. `blockSize` comes from the header; `indexOffset` bounds the data
 * area, so every table-page ref must lie in [4096, indexOffset).
 */
export function decodeIndex(b: Buffer, blockSize: number, indexOffset: number): BackupIndex {
  check(b.length >= INDEX_HEADER_SIZE, S, `needs ${INDEX_HEADER_SIZE} bytes, got ${b.length}`);
  check(b.subarray(0, 8).equals(INDEX_MAGIC), S, 'bad magic');
  const diskCount = b.readUInt32LE(8);
  const configLength = b.readUInt32LE(12);
  check(diskCount <= MAX_DISKS, S, `disk count ${diskCount} above ${MAX_DISKS}`);
  check(configLength <= MAX_CONFIG_BYTES, S, `config length ${configLength} too large`);
  let at = INDEX_HEADER_SIZE + pad8(configLength);
  check(at <= b.length, S, 'truncated VM configuration');
  const config = Buffer.from(b.subarray(INDEX_HEADER_SIZE, INDEX_HEADER_SIZE + configLength));
  const disks: DiskDescriptor[] = [];
  const names = new Set<string>();
  for (let i = 0; i < diskCount; i++) {
    const D = `${S}, disk ${i}`;
    check(at + DISK_DESCRIPTOR_SIZE <= b.length, D, 'truncated descriptor');
    const rawName = b.subarray(at, at + 64);
    const nul = rawName.indexOf(0);
    const nameBytes = nul < 0 ? rawName : rawName.subarray(0, nul);
    check(nul < 0 || rawName.subarray(nul).every((x) => x === 0), D, 'garbage after disk name');
    const name = nameBytes.toString('utf8');
    check(Buffer.from(name, 'utf8').equals(nameBytes), D, 'disk name is not UTF-8');
    checkDiskName(name, D);
    check(!names.has(name), D, `duplicate disk name ${JSON.stringify(name)}`);
    names.add(name);
    const size = readU64(b, at + 64, D, 'size');
    const blockCount = readU64(b, at + 72, D, 'block count');
    const pageCount = b.readUInt32LE(at + 80);
    const entriesPerPage = b.readUInt32LE(at + 84);
    check(blockCount === blockCountOf(size, blockSize), D, `block count ${blockCount} does not fit size ${size}`);
    check(entriesPerPage >= 1 && entriesPerPage <= ENTRIES_PER_PAGE, D, `entries per page ${entriesPerPage}`);
    check(pageCount === Math.ceil(blockCount / entriesPerPage), D, `page count ${pageCount} does not fit ${blockCount} blocks`);
    const stats: DiskStats = {
      storedBytes: readU64(b, at + 88, D, 'stored bytes'),
      plainBytes: readU64(b, at + 96, D, 'plain bytes'),
      storedBlocks: b.readUInt32LE(at + 104),
      dedupBlocks: b.readUInt32LE(at + 108),
      zeroBlocks: b.readUInt32LE(at + 112),
      holeBlocks: b.readUInt32LE(at + 116),
      inheritBlocks: b.readUInt32LE(at + 120),
    };
    at += DISK_DESCRIPTOR_SIZE;
    check(at + pageCount * TABLE_PAGE_REF_SIZE <= b.length, D, 'truncated table-page refs');
    const pages: TablePageRef[] = [];
    for (let p = 0; p < pageCount; p++) {
      const offset = readU64(b, at, D, 'page offset');
      const entryCount = b.readUInt32LE(at + 8);
      const expected = p < pageCount - 1 ? entriesPerPage : blockCount - p * entriesPerPage;
      check(entryCount === expected, D, `page ${p} has ${entryCount} entries, expected ${expected}`);
      check(
        offset >= HEADER_PAGE_SIZE && offset + RECORD_HEADER_SIZE + entryCount * BLOCK_ENTRY_SIZE <= indexOffset,
        D,
        `page ${p} at ${offset} lies outside the data area`,
      );
      pages.push({ offset, entryCount, crc: b.readUInt32LE(at + 12) });
      at += TABLE_PAGE_REF_SIZE;
    }
    disks.push({ name, size, blockCount, entriesPerPage, stats, pages });
  }
  check(at === b.length, S, `${b.length - at} unexpected bytes after the last disk`);
  return { config, disks };
}
