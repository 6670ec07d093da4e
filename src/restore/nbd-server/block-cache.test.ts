import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { RandomAccessDisk } from '../../disk/types.js';
import { withBlockCache } from './block-cache.js';

/** An in-memory disk that counts reads and can be told to fail. */
function memDisk(size: number): RandomAccessDisk & { reads: number; fail: boolean } {
  const data = Buffer.alloc(size);
  for (let i = 0; i < size; i++) data[i] = (i * 13 + (i >> 9)) & 0xff;
  const d = {
    size,
    reads: 0,
    fail: false,
    read(offset: number, length: number): Promise<Buffer> {
      d.reads++;
      if (d.fail) return Promise.reject(new Error('media error'));
      if (offset + length > size) return Promise.reject(new Error('past end'));
      return Promise.resolve(Buffer.from(data.subarray(offset, offset + length)));
    },
    close: () => Promise.resolve(),
  };
  return d;
}

describe('withBlockCache', () => {
  it('reads the same bytes as the disk for any range (unaligned sizes and offsets)', async () => {
    const inner = memDisk(10_000_001);
    const cached = withBlockCache(inner, { blockSize: 65536, maxBytes: 4 * 65536 });
    await fc.assert(
      fc.asyncProperty(fc.nat(inner.size - 1), fc.nat(300_000), async (offset, len) => {
        const length = Math.min(len, inner.size - offset);
        const want = await inner.read(offset, length);
        expect((await cached.read(offset, length)).equals(want)).toBe(true);
      }),
      { numRuns: 300 },
    );
    expect(cached.stats.bytes).toBeLessThanOrEqual(4 * 65536);
  });

  it('fetches a block once for concurrent and repeated small reads', async () => {
    const inner = memDisk(3 * 1024 * 1024 + 5);
    const cached = withBlockCache(inner);
    await Promise.all(Array.from({ length: 64 }, (_, i) => cached.read(i * 4096, 4096)));
    await cached.read(100, 4096);
    expect(inner.reads).toBe(1);
    expect((await cached.read(3 * 1024 * 1024, 5)).length).toBe(5);
    expect(inner.reads).toBe(2);
    expect(cached.stats).toMatchObject({ misses: 2 });
  });

  it('does not cache failures', async () => {
    const inner = memDisk(1 << 20);
    const cached = withBlockCache(inner, { blockSize: 4096 });
    inner.fail = true;
    await expect(cached.read(0, 10)).rejects.toThrow(/media error/);
    inner.fail = false;
    expect((await cached.read(0, 10)).equals(await inner.read(0, 10))).toBe(true);
  });
});
