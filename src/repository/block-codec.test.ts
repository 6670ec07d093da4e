import { createCipheriv, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { compress as zstdCompress } from 'zstd-napi';
import { describe, expect, it } from 'vitest';
import { BlockEncoder, decodePayload, GCM_NONCE, GCM_TAG, looksIncompressible, payloadBound, sampleEntropy } from './block-codec.js';
import { openRepository } from './index.js';

const B = 1 << 20;
const text = () => {
  const line = Buffer.from('2026-11-25 12:00 host1 kernel: disk block backup restore virtual machine id=');
  const b = Buffer.alloc(B);
  for (let at = 0, n = 0; at < B; n++) at += b.write(`${line.toString()}${n}\n`, at);
  return b;
};

/** Deterministic pseudo-random bytes (AES-CTR keystream), so a failing case can be replayed. */
const random = (n: number, seed = 1) => {
  const iv = Buffer.alloc(16);
  iv.writeUInt32LE(seed);
  return createCipheriv('aes-128-ctr', Buffer.alloc(16, 7), iv).update(Buffer.alloc(n));
};
/** The probe's sampled slices (16 x 256 bytes, evenly spread): see block-codec.ts. */
const sampled = (n: number) => Array.from({ length: 16 }, (_, s) => s * Math.floor((n - 256) / 15));
const with_ = (b: Buffer, f: (b: Buffer) => void) => (f(b), b);

// name, block, probe says incompressible, zstd shrinks it by at least this share
const CASES: Array<[string, () => Buffer, boolean, number]> = [
  ['random 1 MiB', () => random(B), true, 0],
  ['random 256 KiB (a 256 KiB chain)', () => random(B / 4), true, 0],
  ['random 4 MiB', () => random(4 * B), true, 0],
  ['log-like text', () => text(), false, 0.7],
  ['all zero', () => Buffer.alloc(B), false, 0.99],
  ['half random, half zero', () => Buffer.concat([random(B / 2), Buffer.alloc(B / 2)]), false, 0.45],
  ['random with a 64 KiB zero run between the sampled slices (sparse)', () => with_(random(B), (b) => b.fill(0, 4096, 17 * 4096)), false, 0.05],
  ['random 4 KiB page repeated (two copies of a compressed file)', () => Buffer.concat(Array.from({ length: 256 }, () => random(4096, 9))), false, 0.9],
  ['random, second quarter a copy of the first', () => with_(random(B), (b) => b.copy(b, B / 4, 0, B / 4)), false, 0.2],
  // zstd-1's window is 512 KiB: it finds nothing here, runs in vain and the block is stored raw.
  ['random, second half a copy of the first', () => with_(random(B), (b) => b.copy(b, B / 2, 0, B / 2)), false, 0],
  ['base64 of random bytes', () => Buffer.from(random((B / 4) * 3).toString('base64')), false, 0.2],
  ['mixed: random, text and zero thirds', () => Buffer.concat([random(B / 4), text().subarray(0, B / 2), Buffer.alloc(B / 4)]), false, 0.5],
  ['a single zero page inside random data (nothing to gain)', () => with_(random(B), (b) => b.fill(0, 4096 * 100, 4096 * 101)), true, 0],
  ['under 64 KiB: never probed', () => random(32 * 1024), false, 0],
  // The probe only looks at a sample: text everywhere except where it looks (the sampled slices
  // and each page's first bytes) is taken for random and stored raw: ratio lost, never data (the
  // round trips below).
  [
    'text with random bytes exactly where the probe looks',
    () =>
      with_(text(), (b) => {
        sampled(B).forEach((at, i) => random(256, 100 + i).copy(b, at));
        for (let at = 0; at < B; at += 4096) random(8, 1000 + at / 4096).copy(b, at);
      }),
    true,
    0.5,
  ],
];

describe('incompressibility probe', () => {
  it.each(CASES)('%s', (_name, make, incompressible, zstdSaves) => {
    const block = make();
    expect(looksIncompressible(block)).toBe(incompressible);
    // What zstd alone does with it (the probe's premise): "compressible" blocks really shrink.
    const out = Buffer.alloc(payloadBound(block.length));
    const stored = new BlockEncoder('zstd', null, Buffer.alloc(16), block.length);
    const r = stored.encodeInto(block, out);
    if (!incompressible && zstdSaves > 0) expect(r.storedLength).toBeLessThanOrEqual(block.length * (1 - zstdSaves));
    if (incompressible) expect(r).toMatchObject({ raw: true, compression: 'none', storedLength: block.length });
    // What zstd makes of the whole block, probe or not (the blind spot case shrinks > 2x).
    if (incompressible && zstdSaves > 0) expect(zstdCompress(block).length).toBeLessThan(block.length * (1 - zstdSaves));
  });

  it('the entropy of the sample separates random (> 7.9 bits/byte) from text (< 6)', () => {
    expect(sampleEntropy(random(B))).toBeGreaterThan(7.9);
    expect(sampleEntropy(text())).toBeLessThan(6);
    expect(sampleEntropy(Buffer.alloc(B))).toBe(0);
  });
});

describe('every probe decision reads back bit-exact', () => {
  const aad = Buffer.alloc(16, 3);
  const keys = { blockKey: Buffer.alloc(32, 1), digestKey: Buffer.alloc(32, 2) };
  for (const compression of ['zstd', 'lz4', 'none'] as const) {
    for (const encrypted of [false, true]) {
      it(`${compression}${encrypted ? ', encrypted' : ''}`, () => {
        for (const [name, make] of CASES) {
          const block = make();
          const enc = new BlockEncoder(compression, encrypted ? keys : null, aad, block.length);
          const out = Buffer.alloc(payloadBound(block.length));
          const r = enc.encodeInto(block, out);
          const payload = r.raw ? block : out.subarray(0, r.storedLength);
          expect(r.crc, name).toBe(crc32c(payload));
          // Never larger than plain + the GCM framing: incompressible data is stored as it is.
          expect(r.storedLength, name).toBeLessThanOrEqual(block.length + (encrypted ? GCM_NONCE + GCM_TAG : 0));
          const back = decodePayload(Buffer.from(payload), r.compression, encrypted, block.length, encrypted ? keys : null, aad);
          expect(back.equals(block), name).toBe(true);
        }
      });
    }
  }
});

describe('BlockEncoder', () => {
  it('stores a random block raw (payload = the plain bytes, not copied) and a text block compressed; both decode', () => {
    const enc = new BlockEncoder('zstd', null, Buffer.alloc(16), B);
    const out = Buffer.alloc(payloadBound(B));
    const rnd = randomBytes(B);
    const r = enc.encodeInto(rnd, out);
    expect(r).toMatchObject({ raw: true, compression: 'none', storedLength: B, crc: crc32c(rnd) });
    expect(out.subarray(0, 16).equals(Buffer.alloc(16))).toBe(true);
    expect(decodePayload(rnd, r.compression, false, B, null, Buffer.alloc(16)).equals(rnd)).toBe(true);
    const t = text();
    const c = enc.encodeInto(t, out);
    expect(c.raw).toBe(false);
    expect(c.compression).toBe('zstd');
    expect(c.storedLength).toBeLessThan(B / 4);
    const payload = out.subarray(0, c.storedLength);
    expect(c.crc).toBe(crc32c(payload));
    expect(decodePayload(payload, 'zstd', false, B, null, Buffer.alloc(16)).equals(t)).toBe(true);
  });

  it('encrypts an incompressible block into out (never raw)', () => {
    const keys = { blockKey: randomBytes(32), digestKey: randomBytes(32) };
    const aad = randomBytes(16);
    const enc = new BlockEncoder('zstd', keys, aad, B);
    const out = Buffer.alloc(payloadBound(B));
    const rnd = randomBytes(B);
    const r = enc.encodeInto(rnd, out);
    expect(r.raw).toBe(false);
    expect(decodePayload(out.subarray(0, r.storedLength), r.compression, true, B, keys, aad).equals(rnd)).toBe(true);
  });
});

describe('through the repository (encoder threads, file, reader)', () => {
  it('a disk made of every probe case reads back bit-exact; random-looking blocks are stored raw, the rest compressed', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'bulwark-probe-'));
    try {
      const blocks = CASES.filter(([, make]) => make().length === B).map(([name, make, incompressible, zstdSaves]) => ({ name, data: make(), incompressible, zstdSaves }));
      const size = blocks.length * B;
      const repo = await openRepository(dir, { create: true });
      const w = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'full', disks: [{ name: 'vda', size }] });
      await w.writeDisk('vda', (async function* () {
        for (const [index, b] of blocks.entries()) yield { index, data: b.data };
      })());
      const info = await w.commit();
      const p = await repo.openRestorePoint(info.id);
      try {
        const d = p.openDisk('vda');
        for (const [i, b] of blocks.entries()) {
          expect((await d.read(i * B, B)).equals(b.data), b.name).toBe(true);
          const r = await p.resolve('vda', i);
          if (r.kind !== 'stored') {
            // An all-zero block is a zero entry, never a record.
            expect(b.data.equals(Buffer.alloc(B)), b.name).toBe(true);
            continue;
          }
          if (b.incompressible) expect(r.entry.storedLength, b.name).toBe(B);
          else if (b.zstdSaves > 0) expect(r.entry.storedLength, b.name).toBeLessThanOrEqual(B * (1 - b.zstdSaves));
        }
      } finally {
        await p.close();
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
