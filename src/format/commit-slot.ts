// A commit slot (64 bytes; two live in the header page): which index a file's current generation
// uses. docs/formats/backup-files.md section 3.2. The valid slot with the highest generation wins.
import { crc32c } from '@node-rs/crc32';
import { check, readU64, writeU64 } from './errors.js';

export const COMMIT_SLOT_SIZE = 64;
const CRC_AT = 60;
const S = 'commit slot';

export interface CommitSlot {
  readonly generation: number;
  readonly indexOffset: number;
  readonly indexLength: number;
  readonly fileLength: number;
  readonly indexCrc: number;
}

export function encodeCommitSlot(s: CommitSlot): Buffer {
  const b = Buffer.alloc(COMMIT_SLOT_SIZE);
  writeU64(b, 0, s.generation);
  writeU64(b, 8, s.indexOffset);
  writeU64(b, 16, s.indexLength);
  writeU64(b, 24, s.fileLength);
  b.writeUInt32LE(s.indexCrc >>> 0, 32);
  b.writeUInt32LE(crc32c(b.subarray(0, CRC_AT)), CRC_AT);
  return b;
}

/**
 * Decodes a slot. Returns null for an empty slot (generation 0); throws for a damaged one.
 * `fileSize` is the real size of the file: an index beyond it makes the slot invalid.
 */
export function decodeCommitSlot(b: Buffer, fileSize: number): CommitSlot | null {
  check(b.length >= COMMIT_SLOT_SIZE, S, `needs ${COMMIT_SLOT_SIZE} bytes, got ${b.length}`);
  const generation = readU64(b, 0, S, 'generation');
  if (generation === 0 && b.subarray(0, COMMIT_SLOT_SIZE).every((x) => x === 0)) return null;
  check(b.readUInt32LE(CRC_AT) === crc32c(b.subarray(0, CRC_AT)), S, 'checksum mismatch');
  check(generation > 0, S, 'generation 0 with content');
  const indexOffset = readU64(b, 8, S, 'index offset');
  const indexLength = readU64(b, 16, S, 'index length');
  const fileLength = readU64(b, 24, S, 'file length');
  check(indexOffset >= 4096, S, `index offset ${indexOffset} inside the header page`);
  check(fileLength === indexOffset + indexLength, S, 'file length is not the end of the index');
  check(fileLength <= fileSize, S, `needs ${fileLength} bytes but the file has ${fileSize} (truncated?)`);
  return { generation, indexOffset, indexLength, fileLength, indexCrc: b.readUInt32LE(32) };
}

/**
 * Picks the current commit: the valid slot with the highest generation. Damaged slots are skipped
 * (the other one may still be good); throws only when no slot is valid, with the reasons.
 */
export function pickCommitSlot(slots: readonly Buffer[], fileSize: number): { slot: CommitSlot; index: number } {
  let best: { slot: CommitSlot; index: number } | null = null;
  const problems: string[] = [];
  for (const [index, raw] of slots.entries()) {
    try {
      const s = decodeCommitSlot(raw, fileSize);
      if (s && (!best || s.generation > best.slot.generation)) best = { slot: s, index };
      if (!s) problems.push(`slot ${'AB'[index] ?? index} empty`);
    } catch (err) {
      problems.push(`slot ${'AB'[index] ?? index}: ${(err as Error).message}`);
    }
  }
  check(best !== null, S, `no valid commit (file not committed or damaged): ${problems.join('; ')}`);
  return best;
}
