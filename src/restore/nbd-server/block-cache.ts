// A block cache in front of a RandomAccessDisk. NBD clients (nbdfuse, a booting VM) read in
// small pieces, but a restore point stores 1 MiB compressed blocks: without a cache every 4 KiB
// read would fetch and decompress a whole block. Reads are cut at block boundaries, blocks are
// kept in LRU order up to a byte budget, and concurrent reads of one block fetch it once.
import { BulwarkError } from '../../common/errors.js';
import type { Extent, RandomAccessDisk } from '../../disk/types.js';

export interface BlockCacheOptions {
  /** Cache unit in bytes (default 1 MiB: the repository's block size). */
  readonly blockSize?: number;
  /** Most bytes kept (default 256 MiB). At least one block is always kept. */
  readonly maxBytes?: number;
}

export interface BlockCacheStats {
  hits: number;
  misses: number;
  /** Bytes currently cached. */
  bytes: number;
}

/** A RandomAccessDisk whose reads go through a block cache; close() closes the inner disk. */
export interface CachedDisk extends RandomAccessDisk {
  readonly stats: Readonly<BlockCacheStats>;
}

export function withBlockCache(inner: RandomAccessDisk, options: BlockCacheOptions = {}): CachedDisk {
  const blockSize = options.blockSize ?? 1024 * 1024;
  if (!Number.isInteger(blockSize) || blockSize <= 0) throw new BulwarkError(`bad cache block size ${blockSize}`, { kind: 'invalid' });
  const maxBytes = Math.max(options.maxBytes ?? 256 * 1024 * 1024, blockSize);
  const cache = new Map<number, Buffer>(); // insertion order = LRU order
  const pending = new Map<number, Promise<Buffer>>();
  const stats: BlockCacheStats = { hits: 0, misses: 0, bytes: 0 };

  const block = (index: number): Promise<Buffer> => {
    const hit = cache.get(index);
    if (hit) {
      stats.hits++;
      cache.delete(index);
      cache.set(index, hit);
      return Promise.resolve(hit);
    }
    const inFlight = pending.get(index);
    if (inFlight) {
      stats.hits++;
      return inFlight;
    }
    stats.misses++;
    const start = index * blockSize;
    const p = inner
      .read(start, Math.min(blockSize, inner.size - start))
      .then((data) => {
        cache.set(index, data);
        stats.bytes += data.length;
        for (const [k, v] of cache) {
          if (stats.bytes <= maxBytes) break;
          cache.delete(k);
          stats.bytes -= v.length;
        }
        return data;
      })
      .finally(() => pending.delete(index));
    pending.set(index, p);
    return p;
  };

  return {
    size: inner.size,
    stats,
    async read(offset: number, length: number): Promise<Buffer> {
      if (offset < 0 || length < 0 || offset + length > inner.size) {
        throw new BulwarkError(`read ${offset}+${length} passes the end of the disk (${inner.size})`, {
          kind: 'invalid',
          context: { offset, length },
        });
      }
      if (length === 0) return Buffer.alloc(0);
      const first = Math.floor(offset / blockSize);
      const last = Math.floor((offset + length - 1) / blockSize);
      const blocks = await Promise.all(Array.from({ length: last - first + 1 }, (_, i) => block(first + i)));
      if (blocks.length === 1) {
        const s = offset - first * blockSize;
        return blocks[0]!.subarray(s, s + length);
      }
      const out = Buffer.allocUnsafe(length);
      let at = 0;
      for (const [i, b] of blocks.entries()) {
        const bStart = (first + i) * blockSize;
        const s = Math.max(offset, bStart) - bStart;
        const e = Math.min(offset + length, bStart + b.length) - bStart;
        b.copy(out, at, s, e);
        at += e - s;
      }
      return out;
    },
    ...(inner.extents ? { extents: (offset: number, length: number): Promise<Extent[]> => inner.extents!(offset, length) } : {}),
    close: () => {
      cache.clear();
      stats.bytes = 0;
      return inner.close();
    },
  };
}
