// Decodes batches of stored blocks of a disk restore: one pread for records that lie back to back
// in a backup file; per record the header, lengths and CRC32C are checked (the format's rule),
// the payload decrypted and decompressed, optionally the plain data checked against the SHA-256
// (HMAC) in the block table; then the run is written with pwritev at the disk offsets. A block
// whose table digest is that of zeroes (and whose data confirms it) stays a hole. Synchronous:
// called in the decoder threads (restore-worker.ts), or on the calling thread for threads: 0.
//
// Direct I/O: given `directFd` (the output opened O_DIRECT), runs of whole, aligned blocks are
// written through it from page-aligned memory, bypassing the page cache (no kernel copy, no
// writeback later: docs/decisions/0006-restore-image-digest.md, "After"). Such memory comes from a
// WebAssembly memory, whose buffer starts on a page boundary (Node has no aligned allocator);
// stored (raw) and lz4 / encrypted blocks are copied into it. Anything else (a short last block),
// or a file system that refuses an aligned direct write (EINVAL), goes through `outFd`.
import { createHash, createHmac } from 'node:crypto';
import { readSync } from 'node:fs';
import { createRequire } from 'node:module';
import { crc32c } from '@node-rs/crc32';
import { decodeRecordHeader, RECORD_HEADER_SIZE } from '../../format/index.js';
import { decodePayload } from '../../repository/block-codec.js';
import { writevAllSync } from '../../storage/writev.js';
import type { DecodeInit, DecodeJob, DecodeResult } from './restore-pool.js';

// zstd-napi's low-level binding decompresses into a caller's buffer (no allocation per block).
interface ZstdBinding {
  DCtx: new () => { decompress(dst: Uint8Array, src: Uint8Array): number };
}
const zstd = createRequire(import.meta.url)('zstd-napi/binding') as ZstdBinding;

/** Alignment of direct writes: offset, length and memory (a page: what every Linux file system accepts). */
export const DIRECT_ALIGN = 4096;
interface WasmMemoryCtor {
  new (d: { initial: number; maximum?: number }): { readonly buffer: ArrayBuffer };
}
const WasmMemory = (globalThis as unknown as { WebAssembly: { Memory: WasmMemoryCtor } }).WebAssembly.Memory;

/** `bytes` of page-aligned memory (a WebAssembly memory's buffer, 64 KiB pages). */
export function alignedBuffer(bytes: number): Buffer {
  const pages = Math.max(1, Math.ceil(bytes / 65536));
  return Buffer.from(new WasmMemory({ initial: pages, maximum: pages }).buffer, 0, bytes);
}

class BlockError extends Error {
  constructor(
    readonly block: number,
    readonly fileOffset: number,
    message: string,
  ) {
    super(message);
  }
}

export function readFully(fd: number, buf: Buffer, position: number): void {
  let done = 0;
  while (done < buf.length) {
    const n = readSync(fd, buf, done, buf.length - done, position + done);
    if (n === 0) throw new Error(`unexpected end of file at ${position + done} (truncated?)`);
    done += n;
  }
}

/** A decoder of batches (see the file comment), for whichever thread calls it. */
export function createDecoder(o: Omit<DecodeInit, 'role'>): (job: DecodeJob) => DecodeResult {
  const keys = o.blockKey && o.digestKey ? { blockKey: Buffer.from(o.blockKey), digestKey: Buffer.from(o.digestKey) } : null;
  const aads = o.files.map((f) => Buffer.from(f.aad));
  const dctx = new zstd.DCtx();
  const digestOf = (plain: Buffer): Buffer => (keys ? createHmac('sha256', keys.digestKey).update(plain).digest() : createHash('sha256').update(plain).digest());
  // Digest of an all-zero block, per length (a disk's last block is shorter).
  const zeroDigests = new Map<number, Buffer>();
  const zeroDigest = (len: number): Buffer => {
    let d = zeroDigests.get(len);
    if (!d) zeroDigests.set(len, (d = digestOf(Buffer.alloc(len))));
    return d;
  };
  let readBuf = Buffer.allocUnsafe(0);
  let plainBuf: Buffer = Buffer.allocUnsafe(0);
  // -1 once a direct write was refused: from then on, everything goes through the page cache.
  let directFd = o.directFd ?? -1;
  // Aligned memory for direct writes; where it cannot be had (a WebAssembly memory reserves
  // address space: a ulimit -v may refuse it), the page cache instead.
  const decodeBuffer = (bytes: number): Buffer => {
    if (directFd >= 0) {
      try {
        return alignedBuffer(bytes);
      } catch {
        directFd = -1;
      }
    }
    return Buffer.allocUnsafe(bytes);
  };
  const writeRun = (parts: Buffer[], at: number, length: number): void => {
    if (directFd >= 0 && at % DIRECT_ALIGN === 0 && length % DIRECT_ALIGN === 0) {
      try {
        writevAllSync(directFd, parts, at);
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
        directFd = -1;
      }
    }
    writevAllSync(o.outFd, parts, at);
  };
  let zeroes = Buffer.alloc(0);
  const isZero = (b: Buffer): boolean => {
    if (zeroes.length < b.length) zeroes = Buffer.alloc(b.length);
    return b.equals(zeroes.subarray(0, b.length));
  };

  const run = (job: DecodeJob): DecodeResult => {
    const n = job.blocks.length / 5;
    const fd = o.files[job.file]!.fd;
    const first = job.blocks[1]!;
    const lastAt = (n - 1) * 5;
    const span = job.blocks[lastAt + 1]! + RECORD_HEADER_SIZE + job.blocks[lastAt + 2]! - first;
    if (readBuf.length < span) readBuf = Buffer.allocUnsafe(span);
    if (plainBuf.length < n * o.blockSize) plainBuf = decodeBuffer(n * o.blockSize);
    try {
      readFully(fd, readBuf.subarray(0, span), first);
    } catch (err) {
      throw new BlockError(job.blocks[0]!, first, (err as Error).message);
    }
    let bytesWritten = 0;
    let parts: Buffer[] = [];
    let partsAt = 0;
    let partsEnd = -1;
    const flush = (): void => {
      if (parts.length === 0) return;
      writeRun(parts, partsAt, partsEnd - partsAt);
      parts = [];
    };
    for (let k = 0; k < n; k++) {
      const index = job.blocks[k * 5]!;
      const recordOffset = job.blocks[k * 5 + 1]!;
      const storedLength = job.blocks[k * 5 + 2]!;
      const plainLength = job.blocks[k * 5 + 3]!;
      const crc = job.blocks[k * 5 + 4]!;
      const want = Buffer.from(job.digests.buffer, job.digests.byteOffset + k * 32, 32);
      const at = recordOffset - first;
      let plain: Buffer;
      try {
        const header = decodeRecordHeader(readBuf, at);
        if (header.type !== 'block') throw new Error('record is not a block');
        if (header.storedLength !== storedLength || header.plainLength !== plainLength) throw new Error('lengths disagree with the block table');
        const payload = readBuf.subarray(at + RECORD_HEADER_SIZE, at + RECORD_HEADER_SIZE + storedLength);
        if (crc32c(payload) !== crc || header.payloadCrc !== crc) throw new Error('CRC32C mismatch');
        if (header.compression === 'zstd' && !header.encrypted) {
          plain = plainBuf.subarray(k * o.blockSize, k * o.blockSize + plainLength);
          let got: number;
          try {
            got = dctx.decompress(plain, payload);
          } catch (err) {
            throw new Error(`zstd: ${(err as Error).message}`);
          }
          if (got !== plainLength) throw new Error(`decompressed to ${got} bytes, expected ${plainLength}`);
        } else {
          plain = decodePayload(payload, header.compression, header.encrypted, plainLength, keys, aads[job.file]!);
        }
        if (o.verify && !digestOf(plain).equals(want)) throw new Error('plain data does not match the SHA-256 in the block table');
      } catch (err) {
        throw new BlockError(index, recordOffset, (err as Error).message);
      }
      // Zero data stays a hole: the table's digest says so in O(1); the data confirms it.
      if (want.equals(zeroDigest(plainLength)) && isZero(plain)) continue;
      // Direct writes need aligned memory: a block decoded elsewhere is copied into its slot.
      if (directFd >= 0 && plain.buffer !== plainBuf.buffer && plainLength % DIRECT_ALIGN === 0) {
        plain = plainBuf.subarray(k * o.blockSize, k * o.blockSize + plain.copy(plainBuf, k * o.blockSize));
      }
      const pos = index * o.blockSize;
      if (pos !== partsEnd) flush();
      if (parts.length === 0) partsAt = pos;
      parts.push(plain);
      partsEnd = pos + plainLength;
      bytesWritten += plainLength;
    }
    flush();
    return { id: job.id, ok: true, bytesWritten };
  };

  return (job: DecodeJob): DecodeResult => {
    try {
      return run(job);
    } catch (err) {
      const e = err instanceof BlockError ? err : new BlockError(job.blocks[0]!, job.blocks[1]!, (err as Error).message);
      return { id: job.id, ok: false, block: e.block, fileOffset: e.fileOffset, error: e.message };
    }
  };
}
