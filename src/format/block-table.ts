// Block-table entries (64 bytes each) and table pages (up to 1024 entries, stored as records):
// docs/formats/backup-files.md section 3.5. Entry i describes block i of a disk.
import { check, FormatError, readU64, writeU64 } from './errors.js';

export const BLOCK_ENTRY_SIZE = 64;
export const ENTRIES_PER_PAGE = 1024;
const S = 'block-table entry';

/**
 * hole: unallocated; zero: all-zero data; stored: a record in this file; inherit: as in the base
 * file (invalid in a full file).
 */
export type BlockKind = 'hole' | 'zero' | 'stored' | 'inherit';

export interface StoredBlockEntry {
  readonly kind: 'stored';
  readonly storedLength: number;
  /** Offset of the record (its header) in this file. */
  readonly recordOffset: number;
  readonly plainLength: number;
  readonly crc: number;
  /** 32 bytes: SHA-256 (or HMAC-SHA-256 when encrypted) of the plain data. */
  readonly digest: Buffer;
}

export type BlockEntry = StoredBlockEntry | { readonly kind: 'hole' | 'zero' | 'inherit' };

export const HOLE: BlockEntry = Object.freeze({ kind: 'hole' });
export const ZERO: BlockEntry = Object.freeze({ kind: 'zero' });
export const INHERIT: BlockEntry = Object.freeze({ kind: 'inherit' });

const KIND_CODES: Record<BlockKind, number> = { hole: 0, zero: 1, stored: 2, inherit: 3 };

export function encodeBlockEntryInto(e: BlockEntry, b: Buffer, offset: number): void {
  b.fill(0, offset, offset + BLOCK_ENTRY_SIZE);
  b.writeUInt8(KIND_CODES[e.kind], offset);
  if (e.kind === 'stored') {
    check(e.digest.length === 32, S, 'digest must be 32 bytes');
    b.writeUInt32LE(e.storedLength, offset + 4);
    writeU64(b, offset + 8, e.recordOffset);
    b.writeUInt32LE(e.plainLength, offset + 16);
    b.writeUInt32LE(e.crc >>> 0, offset + 20);
    e.digest.copy(b, offset + 24);
  }
}

export function decodeBlockEntry(b: Buffer, offset: number): BlockEntry {
  check(b.length - offset >= BLOCK_ENTRY_SIZE, S, `needs ${BLOCK_ENTRY_SIZE} bytes`);
  const code = b.readUInt8(offset);
  switch (code) {
    case 0:
      return HOLE;
    case 1:
      return ZERO;
    case 3:
      return INHERIT;
    case 2: {
      const storedLength = b.readUInt32LE(offset + 4);
      const recordOffset = readU64(b, offset + 8, S, 'record offset');
      const plainLength = b.readUInt32LE(offset + 16);
      check(recordOffset >= 4096, S, `record offset ${recordOffset} inside the header page`);
      check(plainLength > 0, S, 'stored block with plain length 0');
      return {
        kind: 'stored',
        storedLength,
        recordOffset,
        plainLength,
        crc: b.readUInt32LE(offset + 20),
        digest: Buffer.from(b.subarray(offset + 24, offset + 56)),
      };
    }
    default:
      throw new FormatError(S, `unknown block kind ${code}`);
  }
}

/** Encodes a table page (the payload of a table-page record). */
export function encodeTablePage(entries: readonly BlockEntry[]): Buffer {
  check(entries.length > 0 && entries.length <= ENTRIES_PER_PAGE, 'table page', `bad entry count ${entries.length}`);
  const b = Buffer.alloc(entries.length * BLOCK_ENTRY_SIZE);
  entries.forEach((e, i) => encodeBlockEntryInto(e, b, i * BLOCK_ENTRY_SIZE));
  return b;
}

export function decodeTablePage(b: Buffer, entryCount: number): BlockEntry[] {
  check(b.length === entryCount * BLOCK_ENTRY_SIZE, 'table page', `length ${b.length} does not hold ${entryCount} entries`);
  const out: BlockEntry[] = [];
  for (let i = 0; i < entryCount; i++) out.push(decodeBlockEntry(b, i * BLOCK_ENTRY_SIZE));
  return out;
}
