// The 32-byte header in front of every record (a stored block or a block-table page) in the data
// area of a backup file: docs/formats/backup-files.md section 3.3.
import { crc32c } from '@node-rs/crc32';
import { check, FormatError } from './errors.js';
import { compressionFromCode, COMPRESSION_CODES, type Compression } from './header.js';
import { RECORD_MAGIC } from './magic.js';

export const RECORD_HEADER_SIZE = 32;
const CRC_AT = 28;
const S = 'record header';
/** Largest payload a v1 record may hold: a 4 MiB block, incompressible, plus GCM overhead and slack. */
export const MAX_RECORD_PAYLOAD = 4 * 1024 * 1024 + 4096;

export type RecordType = 'block' | 'table-page';

export interface RecordHeader {
  readonly type: RecordType;
  readonly compression: Compression;
  readonly encrypted: boolean;
  readonly storedLength: number;
  readonly plainLength: number;
  readonly payloadCrc: number;
}

/** Writes the record header into `b` at `offset` (the caller's buffer, to avoid a copy). */
export function encodeRecordHeaderInto(r: RecordHeader, b: Buffer, offset = 0): void {
  b.fill(0, offset, offset + RECORD_HEADER_SIZE);
  RECORD_MAGIC.copy(b, offset);
  b.writeUInt8(r.type === 'block' ? 1 : 2, offset + 4);
  b.writeUInt8(COMPRESSION_CODES[r.compression], offset + 5);
  b.writeUInt8(r.encrypted ? 1 : 0, offset + 6);
  b.writeUInt32LE(r.storedLength, offset + 8);
  b.writeUInt32LE(r.plainLength, offset + 12);
  b.writeUInt32LE(r.payloadCrc >>> 0, offset + 16);
  b.writeUInt32LE(crc32c(b.subarray(offset, offset + CRC_AT)), offset + CRC_AT);
}

export function encodeRecordHeader(r: RecordHeader): Buffer {
  const b = Buffer.alloc(RECORD_HEADER_SIZE);
  encodeRecordHeaderInto(r, b, 0);
  return b;
}

export function decodeRecordHeader(b: Buffer, offset = 0): RecordHeader {
  check(b.length - offset >= RECORD_HEADER_SIZE, S, `needs ${RECORD_HEADER_SIZE} bytes, got ${b.length - offset}`);
  check(b.subarray(offset, offset + 4).equals(RECORD_MAGIC), S, 'bad magic');
  check(b.readUInt32LE(offset + CRC_AT) === crc32c(b.subarray(offset, offset + CRC_AT)), S, 'checksum mismatch');
  const t = b.readUInt8(offset + 4);
  let type: RecordType;
  if (t === 1) type = 'block';
  else if (t === 2) type = 'table-page';
  else throw new FormatError(S, `unknown record type ${t}`);
  const enc = b.readUInt8(offset + 6);
  check(enc <= 1, S, `bad encrypted flag ${enc}`);
  const storedLength = b.readUInt32LE(offset + 8);
  const plainLength = b.readUInt32LE(offset + 12);
  check(storedLength <= MAX_RECORD_PAYLOAD && plainLength <= MAX_RECORD_PAYLOAD, S, 'length too large');
  return {
    type,
    compression: compressionFromCode(b.readUInt8(offset + 5), S),
    encrypted: enc === 1,
    storedLength,
    plainLength,
    payloadCrc: b.readUInt32LE(offset + 16),
  };
}
