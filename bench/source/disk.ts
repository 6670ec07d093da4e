// Deterministic test disks for the source benchmark: a mixed image (about 35% zero extents left
// unallocated, 35% text-like, 30% random, extents of 64 KiB..4 MiB) and a scattered "day of guest
// writes" (64 KiB grains in runs). Same seed, same bytes, on every machine.
import { createCipheriv, createHash } from 'node:crypto';
import { open } from 'node:fs/promises';

const KiB = 1024;
const GRAIN = 64 * KiB;

/** splitmix64 as a small deterministic PRNG (numbers in [0, 2^32)). */
export class Prng {
  #s: bigint;
  constructor(seed: number) {
    this.#s = BigInt(seed) & 0xffffffffffffffffn;
  }
  next(): number {
    this.#s = (this.#s + 0x9e3779b97f4a7c15n) & 0xffffffffffffffffn;
    let z = this.#s;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & 0xffffffffffffffffn;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & 0xffffffffffffffffn;
    return Number((z ^ (z >> 31n)) & 0xffffffffn);
  }
  below(n: number): number {
    return this.next() % n;
  }
}

export type MixedKind = 'zero' | 'text' | 'random';
export interface MixedExtent {
  readonly offset: number;
  readonly length: number;
  readonly kind: MixedKind;
}

/** The layout of the mixed disk: extents of 64 KiB..4 MiB, kinds 35/35/30. */
export function mixedLayout(size: number, seed = 1): MixedExtent[] {
  const rng = new Prng(seed);
  const out: MixedExtent[] = [];
  for (let pos = 0; pos < size; ) {
    const length = Math.min(GRAIN * (1 + rng.below(64)), size - pos);
    const r = rng.below(100);
    out.push({ offset: pos, length, kind: r < 35 ? 'zero' : r < 70 ? 'text' : 'random' });
    pos += length;
  }
  return out;
}

/** Pseudo-random bytes for [offset, offset+length): AES-256-CTR keyed by the seed, so any range is reproducible. */
function randomBytesAt(seed: number, offset: number, length: number): Buffer {
  const key = createHash('sha256').update(`bulwark-bench-${seed}`).digest();
  const iv = Buffer.alloc(16);
  iv.writeUInt32BE(Math.floor(offset / 16 / 0x100000000), 8);
  iv.writeUInt32BE((offset / 16) >>> 0, 12);
  const c = createCipheriv('aes-256-ctr', key, iv);
  return Buffer.concat([c.update(Buffer.alloc(length)), c.final()]);
}

let textCorpus: Buffer | undefined;
/** 1 MiB of word salad from a fixed vocabulary: compresses like text. */
function corpus(): Buffer {
  if (textCorpus) return textCorpus;
  const words = 'the of backup disk block extent restore point chain guest agent snapshot bitmap dirty qemu virtual machine repository job session compress data file system kernel'.split(' ');
  const rng = new Prng(42);
  const parts: string[] = [];
  let len = 0;
  while (len < 1024 * KiB + 4096) {
    const w = words[rng.below(words.length)]!;
    const sep = rng.below(12) === 0 ? '.\n' : ' ';
    parts.push(w + sep);
    len += w.length + sep.length;
  }
  textCorpus = Buffer.from(parts.join('')).subarray(0, 1024 * KiB);
  return textCorpus;
}

function textAt(offset: number, length: number): Buffer {
  const c = corpus();
  const out = Buffer.allocUnsafe(length);
  let start = (offset * 7 + 13) % (c.length - 4096);
  for (let p = 0; p < length; ) {
    const n = Math.min(length - p, c.length - start);
    c.copy(out, p, start, start + n);
    p += n;
    start = 0;
  }
  // A little variation per 4 KiB so blocks are not all identical.
  for (let p = 0; p + 8 <= length; p += 4096) out.writeUInt32BE((offset + p) >>> 0, p);
  return out;
}

/** Writes the mixed disk as a sparse raw file (zero extents are not written). */
export async function writeMixedRaw(file: string, size: number, seed = 1): Promise<MixedExtent[]> {
  const layout = mixedLayout(size, seed);
  const fh = await open(file, 'w');
  try {
    await fh.truncate(size);
    for (const e of layout) {
      if (e.kind === 'zero') continue;
      const data = e.kind === 'random' ? randomBytesAt(seed, e.offset, e.length) : textAt(e.offset, e.length);
      await fh.write(data, 0, data.length, e.offset);
    }
  } finally {
    await fh.close();
  }
  return layout;
}

/** One run of rewritten grains. */
export interface WriteRun {
  readonly offset: number;
  readonly length: number;
  readonly fill: number;
}

/**
 * A scattered incremental: `fraction` of the disk in 64 KiB grains, grouped in runs of 1..8
 * consecutive grains at random places (no overlaps). 5% of 4 GiB gives ~3,300 grains in ~700 runs.
 */
export function scatteredWrites(size: number, fraction = 0.05, seed = 7): WriteRun[] {
  const rng = new Prng(seed);
  const grains = Math.floor(size / GRAIN);
  const want = Math.round((size * fraction) / GRAIN);
  const used = new Uint8Array(grains);
  const runs: WriteRun[] = [];
  let got = 0;
  while (got < want) {
    const len = Math.min(1 + rng.below(8), want - got);
    const start = rng.below(grains - len);
    let free = true;
    // Keep a clean grain on both sides so runs stay separate runs.
    for (let g = Math.max(0, start - 1); g < Math.min(grains, start + len + 1); g++) if (used[g]) free = false;
    if (!free) continue;
    for (let g = start; g < start + len; g++) used[g] = 1;
    runs.push({ offset: start * GRAIN, length: len * GRAIN, fill: 1 + rng.below(254) });
    got += len;
  }
  return runs.sort((a, b) => a.offset - b.offset);
}
