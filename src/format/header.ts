// The 4096-byte header page at offset 0 of every backup file (.vbk, .vib, .vrb):
// docs/formats/backup-files.md section 3.1. Pure encode/decode; the two commit slots inside the
// page are encoded by commit-slot.ts and placed at COMMIT_SLOT_OFFSETS.
import { crc32c } from '@node-rs/crc32';
import { check, FormatError, readU64, writeU64 } from './errors.js';
import { FORWARD_INCREMENT_MAGIC, FULL_FILE_MAGIC, REVERSE_INCREMENT_MAGIC } from './magic.js';
import { bytesToUuid, uuidToBytes } from './uuid.js';

export const HEADER_PAGE_SIZE = 4096;
export const HEADER_CRC_OFFSET = 508;
/** Offsets of commit slot A and B inside the header page. */
export const COMMIT_SLOT_OFFSETS = [512, 576] as const;
export const FORMAT_MINOR = 0;
/** First byte after the commit slots; [640, 4096) is reserved and covered by the header CRC. */
export const RESERVED_AFTER_SLOTS = 640;

export const BLOCK_SIZES = [262144, 524288, 1048576, 4194304] as const;
export type BlockSize = (typeof BLOCK_SIZES)[number];
export function isBlockSize(n: number): n is BlockSize {
  return (BLOCK_SIZES as readonly number[]).includes(n);
}

export type BackupFileKind = 'full' | 'forward' | 'reverse';
export type Compression = 'none' | 'zstd' | 'lz4';
export const COMPRESSION_CODES: Record<Compression, number> = { none: 0, zstd: 1, lz4: 2 };
export function compressionFromCode(code: number, structure: string): Compression {
  switch (code) {
    case 0:
      return 'none';
    case 1:
      return 'zstd';
    case 2:
      return 'lz4';
    default:
      throw new FormatError(structure, `unknown compression code ${code}`);
  }
}

export interface KdfParams {
  readonly log2N: number;
  readonly r: number;
  readonly p: number;
  /** 32 bytes. */
  readonly salt: Buffer;
  /** 32 bytes: HMAC-SHA-256(block key, "bulwark key check v1"). */
  readonly keyCheck: Buffer;
}

export interface FileHeader {
  readonly kind: BackupFileKind;
  readonly formatMinor: number;
  readonly blockSize: BlockSize;
  readonly fileId: string;
  readonly chainId: string;
  readonly pointId: string;
  /** File this one inherits from; NIL_UUID for a full file. */
  readonly baseFileId: string;
  readonly timeMs: number;
  readonly compression: Compression;
  /** Present when the chain is encrypted (AES-256-GCM, scrypt). */
  readonly encryption: KdfParams | null;
}

const S = 'header page';

function magicOf(kind: BackupFileKind): Buffer {
  switch (kind) {
    case 'full':
      return FULL_FILE_MAGIC;
    case 'forward':
      return FORWARD_INCREMENT_MAGIC;
    case 'reverse':
      return REVERSE_INCREMENT_MAGIC;
  }
}

/** Encodes the header page with both commit slots empty. */
export function encodeHeader(h: FileHeader): Buffer {
  const b = Buffer.alloc(HEADER_PAGE_SIZE);
  magicOf(h.kind).copy(b, 0);
  b.writeUInt16LE(h.formatMinor, 8);
  b.writeUInt16LE(h.encryption ? 1 : 0, 10);
  b.writeUInt32LE(h.blockSize, 12);
  uuidToBytes(h.fileId, S).copy(b, 16);
  uuidToBytes(h.chainId, S).copy(b, 32);
  uuidToBytes(h.pointId, S).copy(b, 48);
  uuidToBytes(h.baseFileId, S).copy(b, 64);
  writeU64(b, 80, h.timeMs);
  b.writeUInt8(COMPRESSION_CODES[h.compression], 88);
  if (h.encryption) {
    check(h.encryption.salt.length === 32 && h.encryption.keyCheck.length === 32, S, 'salt and key check must be 32 bytes');
    b.writeUInt8(1, 89);
    b.writeUInt8(1, 90);
    b.writeUInt8(h.encryption.log2N, 91);
    b.writeUInt8(h.encryption.r, 92);
    b.writeUInt8(h.encryption.p, 93);
    h.encryption.salt.copy(b, 96);
    h.encryption.keyCheck.copy(b, 128);
  }
  b.writeUInt32LE(headerCrc(b), HEADER_CRC_OFFSET);
  return b;
}

/** CRC32C over the whole page except the CRC field and the two commit slots: [0, 508) ++ [640, 4096). */
export function headerCrc(page: Buffer): number {
  return crc32c(page.subarray(RESERVED_AFTER_SLOTS, HEADER_PAGE_SIZE), crc32c(page.subarray(0, HEADER_CRC_OFFSET)));
}

/** Which file kind a magic names, or null. */
export function fileKindOfMagic(magic: Buffer): BackupFileKind | null {
  if (magic.equals(FULL_FILE_MAGIC)) return 'full';
  if (magic.equals(FORWARD_INCREMENT_MAGIC)) return 'forward';
  if (magic.equals(REVERSE_INCREMENT_MAGIC)) return 'reverse';
  return null;
}

/** Decodes and checks the header page (the first 4096 bytes of a file). */
export function decodeHeader(b: Buffer): FileHeader {
  check(b.length >= HEADER_PAGE_SIZE, S, `needs ${HEADER_PAGE_SIZE} bytes, got ${b.length}`);
  const kind = fileKindOfMagic(b.subarray(0, 8));
  check(kind !== null, S, 'bad magic: not a Bulwark backup file');
  const crc = b.readUInt32LE(HEADER_CRC_OFFSET);
  check(crc === headerCrc(b), S, 'checksum mismatch');
  const flags = b.readUInt16LE(10);
  const blockSize = b.readUInt32LE(12);
  check(isBlockSize(blockSize), S, `block size ${blockSize} is not one of ${BLOCK_SIZES.join(', ')}`);
  const encFlag = (flags & 1) === 1;
  const encAlg = b.readUInt8(89);
  const kdf = b.readUInt8(90);
  check(encFlag === (encAlg === 1), S, 'encryption flag and algorithm disagree');
  check(encAlg <= 1, S, `unknown encryption ${encAlg}`);
  let encryption: KdfParams | null = null;
  if (encFlag) {
    check(kdf === 1, S, `unknown key derivation ${kdf}`);
    const log2N = b.readUInt8(91);
    const r = b.readUInt8(92);
    const p = b.readUInt8(93);
    check(log2N >= 10 && log2N <= 22 && r >= 1 && p >= 1, S, 'scrypt parameters out of range');
    encryption = {
      log2N,
      r,
      p,
      salt: Buffer.from(b.subarray(96, 128)),
      keyCheck: Buffer.from(b.subarray(128, 160)),
    };
  }
  return {
    kind,
    formatMinor: b.readUInt16LE(8),
    blockSize,
    fileId: bytesToUuid(b.subarray(16, 32)),
    chainId: bytesToUuid(b.subarray(32, 48)),
    pointId: bytesToUuid(b.subarray(48, 64)),
    baseFileId: bytesToUuid(b.subarray(64, 80)),
    timeMs: readU64(b, 80, S, 'time'),
    compression: compressionFromCode(b.readUInt8(88), S),
    encryption,
  };
}
