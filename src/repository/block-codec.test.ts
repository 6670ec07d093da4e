import { randomBytes } from 'node:crypto';
import { crc32c } from '@node-rs/crc32';
import { describe, expect, it } from 'vitest';
import { BlockEncoder, decodePayload, looksIncompressible, payloadBound } from './block-codec.js';

const B = 1 << 20;
const text = () => {
  const line = Buffer.from('2026-11-25 12:00 host1 kernel: disk block backup restore virtual machine id=');
  const b = Buffer.alloc(B);
  for (let at = 0, n = 0; at < B; n++) at += b.write(`${line.toString()}${n}\n`, at);
  return b;
};

describe('incompressibility probe', () => {
  it('says random bytes are incompressible and text, zeroes and half-random blocks are not', () => {
    expect(looksIncompressible(randomBytes(B))).toBe(true);
    expect(looksIncompressible(text())).toBe(false);
    expect(looksIncompressible(Buffer.alloc(B))).toBe(false);
    const half = Buffer.concat([randomBytes(B / 2), Buffer.alloc(B / 2)]);
    expect(looksIncompressible(half)).toBe(false);
  });
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
