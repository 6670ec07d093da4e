// The sealed form of a guest file index (docs/formats/file-index.md, "Sealed form"): a 128-byte
// header carrying the chain's KDF parameters, then AES-256-GCM frames. Pure encode/decode of the
// header, the frame heads and each frame's associated data; the encryption itself is done by the
// catalog with node:crypto.
import { crc32c } from '@node-rs/crc32';
import { check, writeU64 } from './errors.js';
import type { KdfParams } from './header.js';

/** First 8 bytes of SHA-256("bulwark sealed file index v1"). NEVER change it. */
export const SEALED_FILE_INDEX_MAGIC = Buffer.from('76bc68048aecbf0f', 'hex');
export const SEALED_FILE_INDEX_MAGIC_NAME = 'bulwark sealed file index v1';
export const SEALED_HEADER_SIZE = 128;
export const FRAME_HEAD_SIZE = 20;
export const GCM_TAG_SIZE = 16;
/** Readers refuse longer frames (a damaged length must not make them allocate gigabytes). */
export const MAX_FRAME_LENGTH = 16 * 1024 * 1024;
export const FRAME_LAST = 1;

const S = 'sealed file index header';
const F = 'sealed file index frame';

export interface SealedIndexHeader {
  readonly kdf: KdfParams;
  /** Largest plain frame the writer produced. */
  readonly frameSize: number;
}

export function encodeSealedHeader(h: SealedIndexHeader): Buffer {
  const b = Buffer.alloc(SEALED_HEADER_SIZE);
  SEALED_FILE_INDEX_MAGIC.copy(b, 0);
  b.writeUInt8(h.kdf.log2N, 8);
  b.writeUInt8(h.kdf.r, 9);
  b.writeUInt8(h.kdf.p, 10);
  b.writeUInt32LE(h.frameSize, 12);
  check(h.kdf.salt.length === 32 && h.kdf.keyCheck.length === 32, S, 'salt and key check must be 32 bytes');
  h.kdf.salt.copy(b, 16);
  h.kdf.keyCheck.copy(b, 48);
  b.writeUInt32LE(crc32c(b.subarray(0, 124)), 124);
  return b;
}

/** Whether these first bytes are those of a sealed index. */
export function isSealedFileIndex(first: Buffer): boolean {
  return first.length >= 8 && first.subarray(0, 8).equals(SEALED_FILE_INDEX_MAGIC);
}

export function decodeSealedHeader(b: Buffer): SealedIndexHeader {
  check(b.length >= SEALED_HEADER_SIZE, S, `${b.length} bytes, need ${SEALED_HEADER_SIZE}`);
  check(isSealedFileIndex(b), S, 'bad magic');
  check(b.readUInt32LE(124) === crc32c(b.subarray(0, 124)), S, 'CRC mismatch');
  const log2N = b.readUInt8(8);
  const r = b.readUInt8(9);
  const p = b.readUInt8(10);
  check(log2N >= 10 && log2N <= 22 && r >= 1 && p >= 1, S, 'scrypt parameters out of range');
  return {
    kdf: { log2N, r, p, salt: Buffer.from(b.subarray(16, 48)), keyCheck: Buffer.from(b.subarray(48, 80)) },
    frameSize: b.readUInt32LE(12),
  };
}

export interface FrameHead {
  readonly length: number;
  readonly flags: number;
  readonly nonce: Buffer;
}

export function encodeFrameHead(f: FrameHead): Buffer {
  const b = Buffer.alloc(FRAME_HEAD_SIZE);
  b.writeUInt32LE(f.length, 0);
  b.writeUInt32LE(f.flags, 4);
  f.nonce.copy(b, 8);
  return b;
}

export function decodeFrameHead(b: Buffer): FrameHead {
  check(b.length >= FRAME_HEAD_SIZE, F, 'truncated frame head');
  const length = b.readUInt32LE(0);
  const flags = b.readUInt32LE(4);
  check(length <= MAX_FRAME_LENGTH, F, `length ${length} exceeds ${MAX_FRAME_LENGTH}`);
  check((flags & ~FRAME_LAST) === 0, F, `unknown flags ${flags}`);
  return { length, flags, nonce: Buffer.from(b.subarray(8, 20)) };
}

/** Associated data of frame `n`: header ‖ point id ‖ n (u64) ‖ flags (u32). */
export function frameAad(header: Buffer, pointId: string, n: number, flags: number): Buffer {
  const id = Buffer.from(pointId, 'utf8');
  const b = Buffer.alloc(header.length + id.length + 12);
  header.copy(b, 0);
  id.copy(b, header.length);
  writeU64(b, header.length + id.length, n);
  b.writeUInt32LE(flags, header.length + id.length + 8);
  return b;
}
