// Encoder threads outlive their pool: a closed pool's threads are kept idle and serve the next
// pool of the process, which may have another block size, codec and keys (each pool sends its
// own init), and its slot memory when it has the same shape and every slot came back. Every block
// round-trips bit-exact through decodePayload, and the digests are the plain data's SHA-256 (HMAC
// when encrypted).
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { crc32c } from '@node-rs/crc32';
import { describe, expect, it } from 'vitest';
import { decodePayload } from './block-codec.js';
import { EncodePool, idleEncoderThreads } from './encode-pool.js';

const K = 1024;

function blocks(size: number): Buffer[] {
  const text = Buffer.from('the quick brown fox jumps over the lazy dog '.repeat(Math.ceil(size / 44))).subarray(0, size);
  const half = Buffer.concat([randomBytes(size / 2), Buffer.alloc(size / 2, 7)]);
  return [text, randomBytes(size), half];
}

async function roundTrip(pool: EncodePool, size: number, keys: { blockKey: Buffer; digestKey: Buffer } | null, aad: Buffer): Promise<void> {
  for (const plain of blocks(size)) {
    const e = await pool.encode(plain);
    try {
      expect(crc32c(e.payload) >>> 0).toBe(e.crc);
      const back = decodePayload(Buffer.from(e.payload), e.compression, keys !== null, plain.length, keys, aad);
      expect(back.equals(plain)).toBe(true);
      const digest = keys ? createHmac('sha256', keys.digestKey).update(plain).digest() : createHash('sha256').update(plain).digest();
      expect(e.digest.equals(digest)).toBe(true);
    } finally {
      pool.release(e.slot);
    }
  }
}

describe('EncodePool threads', () => {
  it('a closed pool leaves its threads idle; the next pool (other block size, codec, keys) takes them and encodes right', async () => {
    const aad = randomBytes(16);
    const first = new EncodePool({ blockSize: 256 * K, compression: 'zstd', keys: null, aad, threads: 2 });
    await roundTrip(first, 256 * K, null, aad);
    await first.close();
    const idle = idleEncoderThreads();
    expect(idle).toBeGreaterThanOrEqual(2);

    const keys = { blockKey: randomBytes(32), digestKey: randomBytes(32) };
    const second = new EncodePool({ blockSize: 1024 * K, compression: 'lz4', keys, aad, threads: 2 });
    expect(idleEncoderThreads()).toBe(idle - 2);
    await roundTrip(second, 1024 * K, keys, aad);
    await second.close();
    await second.close(); // idempotent
    expect(idleEncoderThreads()).toBe(idle);

    // A pool closed before its threads ever ran a block still hands them back.
    const unused = new EncodePool({ blockSize: 256 * K, compression: 'zstd', keys: null, aad, threads: 2 });
    await unused.close();
    expect(idleEncoderThreads()).toBe(idle);
    const third = new EncodePool({ blockSize: 256 * K, compression: 'none', keys: null, aad, threads: 2 });
    await roundTrip(third, 256 * K, null, aad);
    await third.close();
  });

  it("a closed pool's slot memory goes to the next pool of its shape only when every slot came back", async () => {
    const aad = randomBytes(16);
    const opts = { blockSize: 256 * K, compression: 'zstd' as const, keys: null, aad, threads: 1 };
    const a = new EncodePool(opts);
    const lentFromA = await a.lend();
    const memoryOfA = lentFromA.buffer;
    a.giveBack(lentFromA);
    await roundTrip(a, 256 * K, null, aad);
    await a.close();
    const b = new EncodePool(opts);
    const lentFromB = await b.lend();
    expect(lentFromB.buffer).toBe(memoryOfA); // reused: every slot of a was back
    // b closes with a buffer still lent (a reader may still be writing into it): not reused.
    await b.close();
    const c = new EncodePool(opts);
    expect((await c.lend()).buffer).not.toBe(lentFromB.buffer);
    await c.close();
    // Another shape never takes it.
    const d = new EncodePool({ ...opts, blockSize: 512 * K });
    expect((await d.lend()).byteLength).toBe(512 * K);
    await d.close();
  });

  it('at most a few idle threads are kept', async () => {
    const aad = randomBytes(16);
    // Threads already idle from the tests above, plus new ones: never more than four stay.
    const pools = Array.from({ length: 3 }, () => new EncodePool({ blockSize: 256 * K, compression: 'zstd', keys: null, aad, threads: 2 }));
    await roundTrip(pools[0]!, 256 * K, null, aad);
    await Promise.all(pools.map((p) => p.close()));
    expect(idleEncoderThreads()).toBe(4);
  });
});
