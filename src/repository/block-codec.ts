// How one block's plain data becomes a stored record payload and back: digest, compression,
// encryption and CRC32C (docs/formats/backup-files.md sections 3.3 and 3.6). Used by the worker
// threads (encode) and by the readers (decode). No file I/O here.
import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import { crc32c } from '@node-rs/crc32';
import { compressSync as lz4Compress, uncompressSync as lz4Uncompress } from 'lz4-napi';
import type { Compression } from '../format/index.js';
import type { ChainKeys } from './chain-keys.js';

// zstd-napi's low-level binding compresses into a caller's buffer (no copy); it is CommonJS.
interface ZstdBinding {
  CCtx: new () => {
    compress(dst: Uint8Array, src: Uint8Array, level: number): number;
    compress2(dst: Uint8Array, src: Uint8Array): number;
    setParameter(param: number, value: number): void;
  };
  DCtx: new () => { decompress(dst: Uint8Array, src: Uint8Array): number };
  compressBound(n: number): number;
  CParameter: { readonly compressionLevel: number; readonly hashLog: number };
}
const zstd = createRequire(import.meta.url)('zstd-napi/binding') as ZstdBinding;

export const GCM_NONCE = 12;
export const GCM_TAG = 16;
/**
 * zstd level of the default codec, chosen by measurement (docs/decisions/0004): on the bench's
 * text-like blocks level 1 is as fast per core as the negative levels and compresses 4.3x.
 */
export const ZSTD_LEVEL = 1;
/**
 * Hash table of zstd's fast strategy, log2 entries (level 1's own is 13 for a 1 MiB block). 15
 * (128 KiB per context, still inside a core's L2) finds more matches in 1 MiB blocks: on the
 * bench image's compressible blocks 7% smaller output for no more CPU, measured alternating block
 * by block (bench/format/README.md). Decoders need nothing: the frame format is the same.
 */
export const ZSTD_HASH_LOG = 15;

/**
 * Incompressibility probe (docs/decisions/0004 and 0008). A block is stored raw without running
 * zstd when BOTH hold:
 * 1. the order-0 entropy of PROBE_SLICES × PROBE_SLICE bytes sampled across the block is ≥ PROBE_BITS
 *    (random, compressed and encrypted data measure ~7.95 bits per byte on such a sample; text,
 *    code, zero-padded and structured data far less);
 * 2. no two 4 KiB pages of the block begin with the same 6 bytes (a 48-bit key, exact in a
 *    double). Pages are what guests write and file systems align files to; a repeated or
 *    zero-filled page between the sampled slices (two copies of a compressed file, a zeroed
 *    range) is something zstd would find.
 * Both cost ~10-40 us per 1 MiB block; zstd's own pass over a random block costs ~270 us. A wrong
 * "incompressible" only costs ratio (the block is stored as it is), never data; a wrong
 * "compressible" costs a zstd pass, after which a block zstd did not shrink is stored raw anyway.
 */
const PROBE_SLICES = 16;
const PROBE_SLICE = 256;
const PROBE_BITS = 7.85;
const PAGE = 4096;
const LOG2 = new Float64Array(PROBE_SLICES * PROBE_SLICE + 1).map((_, i) => (i > 0 ? i * Math.log2(i) : 0));

/** Reusable scratch of the probe (one per encoder thread). */
export interface ProbeScratch {
  readonly counts: Uint32Array;
  heads: Float64Array;
}
export function probeScratch(): ProbeScratch {
  return { counts: new Uint32Array(256), heads: new Float64Array(256) };
}

/** True when two 4 KiB pages of `plain` start with the same 6 bytes. */
function repeatsPages(plain: Uint8Array, scratch: ProbeScratch): boolean {
  const pages = Math.floor(plain.length / PAGE);
  if (scratch.heads.length < pages) scratch.heads = new Float64Array(pages);
  const heads = scratch.heads.subarray(0, pages);
  for (let p = 0, at = 0; p < pages; p++, at += PAGE) {
    heads[p] = plain[at]! + plain[at + 1]! * 0x100 + plain[at + 2]! * 0x10000 + plain[at + 3]! * 0x1000000 + plain[at + 4]! * 0x100000000 + plain[at + 5]! * 0x10000000000;
  }
  heads.sort();
  for (let p = 1; p < pages; p++) if (heads[p] === heads[p - 1]) return true;
  return false;
}

/** Order-0 entropy (bits per byte) of PROBE_SLICES slices of PROBE_SLICE bytes spread over `plain`. */
export function sampleEntropy(plain: Uint8Array, counts: Uint32Array = new Uint32Array(256)): number {
  counts.fill(0);
  const step = Math.floor((plain.length - PROBE_SLICE) / (PROBE_SLICES - 1));
  for (let s = 0; s < PROBE_SLICES; s++) {
    const at = s * step;
    for (let i = at; i < at + PROBE_SLICE; i++) counts[plain[i]!]!++;
  }
  const n = PROBE_SLICES * PROBE_SLICE;
  // H = log2(n) - sum(c log2 c) / n
  let sum = 0;
  for (let b = 0; b < 256; b++) sum += LOG2[counts[b]!]!;
  return Math.log2(n) - sum / n;
}

/** True when `plain` looks like random bytes (zstd would not shrink it): see the probe above. */
export function looksIncompressible(plain: Uint8Array, scratch: ProbeScratch = probeScratch()): boolean {
  if (plain.length < 64 * 1024) return false;
  return sampleEntropy(plain, scratch.counts) >= PROBE_BITS && !repeatsPages(plain, scratch);
}

/** Bytes a payload may need beyond the plain length (compression bound + GCM overhead). */
export function payloadBound(blockSize: number): number {
  return Math.max(zstd.compressBound(blockSize), blockSize + 1024) + GCM_NONCE + GCM_TAG;
}

export function blockDigest(plain: Uint8Array, keys: ChainKeys | null): Buffer {
  return keys ? createHmac('sha256', keys.digestKey).update(plain).digest() : createHash('sha256').update(plain).digest();
}

export interface EncodedBlock {
  readonly storedLength: number;
  readonly compression: Compression;
  readonly crc: number;
  readonly digest: Buffer;
  /**
   * True when the payload is the plain data itself (stored uncompressed, not encrypted) and was
   * NOT copied into `out`: the caller writes the plain bytes as the payload.
   */
  readonly raw: boolean;
}

function zstdCompressor(): InstanceType<ZstdBinding['CCtx']> {
  const c = new zstd.CCtx();
  c.setParameter(zstd.CParameter.compressionLevel, ZSTD_LEVEL);
  c.setParameter(zstd.CParameter.hashLog, ZSTD_HASH_LOG);
  return c;
}

/** Reusable per-thread state (zstd contexts are expensive to create). */
export class BlockEncoder {
  #cctx = zstdCompressor();
  #scratch: Buffer;
  #probe = probeScratch();

  constructor(
    readonly compression: Compression,
    readonly keys: ChainKeys | null,
    readonly aad: Buffer,
    blockSize: number,
  ) {
    this.#scratch = Buffer.allocUnsafe(payloadBound(blockSize));
  }

  /**
   * Encodes `plain` into `out` (payload only; `out` must hold payloadBound bytes). When the
   * result is `raw`, nothing was written to `out`: the payload is `plain` itself.
   */
  encodeInto(plain: Buffer, out: Buffer): EncodedBlock {
    const digest = blockDigest(plain, this.keys);
    const enc = this.keys !== null;
    // Compress straight into `out` when not encrypting, else into scratch and encrypt into out.
    const target = enc ? this.#scratch : out;
    let compression: Compression = this.compression;
    let len = 0;
    if (compression !== 'none' && looksIncompressible(plain, this.#probe)) compression = 'none';
    switch (compression) {
      case 'zstd':
        len = this.#cctx.compress2(target, plain);
        break;
      case 'lz4': {
        const c = lz4Compress(plain);
        len = c.length;
        if (len < plain.length) c.copy(target, 0);
        break;
      }
      case 'none':
        len = plain.length;
        break;
    }
    if (compression === 'none' || len >= plain.length) {
      if (!enc) return { storedLength: plain.length, compression: 'none', crc: crc32c(plain), digest, raw: true };
      compression = 'none';
      len = plain.length;
    }
    const body = compression === 'none' ? plain : target.subarray(0, len);
    let storedLength = len;
    if (enc) {
      const nonce = randomBytes(GCM_NONCE);
      nonce.copy(out, 0);
      const cipher = createCipheriv('aes-256-gcm', this.keys.blockKey, nonce);
      cipher.setAAD(this.aad);
      let at = GCM_NONCE;
      // Feed GCM in 64 KiB slices: much faster than one large update in Node 20.
      for (let i = 0; i < len; i += 65536) at += cipher.update(body.subarray(i, Math.min(len, i + 65536))).copy(out, at);
      at += cipher.final().copy(out, at);
      cipher.getAuthTag().copy(out, at);
      storedLength = at + GCM_TAG;
    }
    return { storedLength, compression, crc: crc32c(out.subarray(0, storedLength)), digest, raw: false };
  }
}

let dctx: InstanceType<ZstdBinding['DCtx']> | null = null;

/**
 * Turns a stored payload back into plain data. Throws a plain Error describing the failure;
 * the caller adds file/disk/block context. The CRC is checked by the caller before this.
 */
export function decodePayload(
  payload: Buffer,
  compression: Compression,
  encrypted: boolean,
  plainLength: number,
  keys: ChainKeys | null,
  aad: Buffer,
): Buffer {
  let body = payload;
  if (encrypted) {
    if (!keys) throw new Error('block is encrypted but no key is loaded');
    if (payload.length < GCM_NONCE + GCM_TAG) throw new Error('encrypted payload too short');
    const decipher = createDecipheriv('aes-256-gcm', keys.blockKey, payload.subarray(0, GCM_NONCE));
    decipher.setAAD(aad);
    decipher.setAuthTag(payload.subarray(payload.length - GCM_TAG));
    const parts: Buffer[] = [];
    const ct = payload.subarray(GCM_NONCE, payload.length - GCM_TAG);
    for (let i = 0; i < ct.length; i += 65536) parts.push(decipher.update(ct.subarray(i, Math.min(ct.length, i + 65536))));
    try {
      parts.push(decipher.final());
    } catch {
      throw new Error('authentication tag mismatch (data altered)');
    }
    body = Buffer.concat(parts);
  }
  switch (compression) {
    case 'none':
      if (body.length !== plainLength) throw new Error(`stored ${body.length} bytes, expected ${plainLength}`);
      return body;
    case 'zstd': {
      const out = Buffer.allocUnsafe(plainLength);
      dctx ??= new zstd.DCtx();
      let n: number;
      try {
        n = dctx.decompress(out, body);
      } catch (err) {
        throw new Error(`zstd: ${(err as Error).message}`);
      }
      if (n !== plainLength) throw new Error(`decompressed to ${n} bytes, expected ${plainLength}`);
      return out;
    }
    case 'lz4': {
      let out: Buffer;
      // The payload starts with the plain length (section 3.3): lz4 allocates what it says, so a
      // damaged one must not reach it (up to 4 GiB, seconds per block).
      if (body.length < 4 || body.readUInt32LE(0) !== plainLength) throw new Error(`lz4: payload does not start with the plain length ${plainLength}`);
      try {
        out = lz4Uncompress(body);
      } catch (err) {
        throw new Error(`lz4: ${(err as Error).message}`);
      }
      if (out.length !== plainLength) throw new Error(`decompressed to ${out.length} bytes, expected ${plainLength}`);
      return out;
    }
  }
}
