// The benchmark disk every Bulwark bench reuses: a deterministic 4 GiB raw image of varied
// extents, ~35% zero, ~35% text-like (zstd-1 ~4-5x; the whole image ~2.7x), ~30% random, matching the workload
// of /work/shared/notes/peers-measured.md. Generated from a seed, so every run and every machine
// sees the same bytes; nothing is stored in the repository.
import { createCipheriv } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, rename, stat } from 'node:fs/promises';
import path from 'node:path';
import type { DiskBlock } from '../../src/disk/types.js';

export const MIXED_DISK_SIZE = 4 * 1024 ** 3;
const GRAIN = 65536;

export type MixedKind = 'zero' | 'text' | 'random';
export interface MixedExtent {
  readonly offset: number;
  readonly length: number;
  readonly kind: MixedKind;
}

/** xorshift32: small, fast, deterministic. */
function prng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 4294967296;
  };
}

/** The extents of the image: lengths 64 KiB .. 32 MiB (64 KiB grains), kinds weighted 35/35/30. */
export function mixedDiskExtents(size = MIXED_DISK_SIZE, seed = 1): MixedExtent[] {
  const rnd = prng(seed);
  const out: MixedExtent[] = [];
  let offset = 0;
  while (offset < size) {
    const r = rnd();
    const kind: MixedKind = r < 0.35 ? 'zero' : r < 0.7 ? 'text' : 'random';
    // Skewed towards short extents: 64 KiB .. 32 MiB.
    const grains = 1 + Math.floor(rnd() ** 3 * 512);
    const length = Math.min(size - offset, grains * GRAIN);
    const prev = out[out.length - 1];
    if (prev && prev.kind === kind) out[out.length - 1] = { ...prev, length: prev.length + length };
    else out.push({ offset, length, kind });
    offset += length;
  }
  return out;
}

const WORDS = (
  'the of and to in is was that for on with as by at from this be are or it an have not which ' +
  'kernel disk block backup restore virtual machine guest host network storage file system data ' +
  'error warning info debug config server client request response session user root home var log ' +
  'usr lib bin etc tmp proc sys dev mnt opt srv boot package version update install remove 0 1 2 ' +
  'http https json xml html css script function return const let var if else while for true false'
).split(' ');

let textPool: Buffer | null = null;
/**
 * 8 MiB of log-like text, built once per process: lines drawn from 1024 templates with a varying
 * counter and time stamp, as in a guest's logs and config files (zstd-1 ~5x on this text, so the
 * whole image compresses ~2.7x like the peers' workload).
 */
function getTextPool(): Buffer {
  if (textPool) return textPool;
  const rnd = prng(7);
  const templates: string[] = [];
  for (let t = 0; t < 1024; t++) {
    const n = 5 + Math.floor(rnd() * 12);
    let s = '';
    for (let i = 0; i < n; i++) s += WORDS[Math.floor(rnd() * WORDS.length)] + ' ';
    templates.push(s);
  }
  const parts: string[] = [];
  let len = 0;
  for (let line = 0; len < 8 * 1024 * 1024; line++) {
    const s = `2026-11-${String(1 + (line % 28)).padStart(2, '0')} ${String(line % 24).padStart(2, '0')}:${String((line >> 3) % 60).padStart(2, '0')} host${line % 16} ${templates[Math.floor(rnd() * templates.length)]}id=${line}\n`;
    parts.push(s);
    len += s.length;
  }
  textPool = Buffer.from(parts.join(''), 'latin1');
  return textPool;
}

const KEY = Buffer.from('bulwark-bench-mixed-disk-key-v1!', 'latin1').subarray(0, 16);

/** Writes the image bytes of [offset, offset + out.length) into `out`. */
export function fillMixed(out: Buffer, offset: number, extents: readonly MixedExtent[]): void {
  let lo = 0;
  let hi = extents.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (extents[mid]!.offset <= offset) lo = mid;
    else hi = mid - 1;
  }
  let at = 0;
  for (let e = lo; at < out.length && e < extents.length; e++) {
    const x = extents[e]!;
    const from = Math.max(offset + at, x.offset);
    const to = Math.min(offset + out.length, x.offset + x.length);
    if (to <= from) continue;
    const dst = out.subarray(from - offset, to - offset);
    switch (x.kind) {
      case 'zero':
        dst.fill(0);
        break;
      case 'random': {
        // AES-CTR keystream at this offset: incompressible, unique, reproducible, ~GB/s.
        const iv = Buffer.alloc(16);
        iv.writeBigUInt64BE(BigInt(Math.floor(from / 16)), 8);
        const c = createCipheriv('aes-128-ctr', KEY, iv);
        const skip = from % 16;
        if (skip === 0) {
          dst.fill(0);
          c.update(dst).copy(dst);
        } else c.update(Buffer.alloc(dst.length + skip)).copy(dst, 0, skip);
        break;
      }
      case 'text': {
        const pool = getTextPool();
        // 64 KiB slices of the pool chosen by offset; every 4 KiB sector starts with its offset
        // (8 bytes) so no two blocks are identical.
        for (let p = from; p < to; ) {
          const chunkEnd = Math.min(to, (Math.floor(p / GRAIN) + 1) * GRAIN);
          const src = ((Math.floor(p / GRAIN) * 2654435761) >>> 0) % (pool.length - 2 * GRAIN);
          pool.copy(dst, p - from, src + (p % GRAIN), src + (p % GRAIN) + (chunkEnd - p));
          p = chunkEnd;
        }
        for (let sector = Math.ceil(from / 4096) * 4096; sector + 8 <= to; sector += 4096) dst.writeDoubleLE(sector, sector - from);
        break;
      }
    }
    at = to - offset;
  }
}

/** The image as fixed-size blocks (data always present; the consumer detects zeroes). */
export async function* mixedDiskBlocks(blockSize: number, opts: { size?: number; seed?: number } = {}): AsyncGenerator<DiskBlock> {
  const size = opts.size ?? MIXED_DISK_SIZE;
  const extents = mixedDiskExtents(size, opts.seed);
  for (let i = 0; i * blockSize < size; i++) {
    const b = Buffer.allocUnsafe(Math.min(blockSize, size - i * blockSize));
    fillMixed(b, i * blockSize, extents);
    yield { index: i, data: b };
  }
}

/** Writes the image to `file` once (temp + rename); reuses an existing file of the right size. */
export async function ensureMixedDiskImage(file: string, opts: { size?: number; seed?: number } = {}): Promise<string> {
  const size = opts.size ?? MIXED_DISK_SIZE;
  if (existsSync(file) && (await stat(file)).size === size) return file;
  await mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w');
  try {
    for await (const b of mixedDiskBlocks(4 * 1024 * 1024, opts)) await fh.write(b.data!, 0, b.data!.length, b.index * 4 * 1024 * 1024);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, file);
  return file;
}

/** Share of each kind in the image (for reports). */
export function mixedDiskComposition(size = MIXED_DISK_SIZE, seed = 1): Record<MixedKind, number> {
  const r = { zero: 0, text: 0, random: 0 };
  for (const e of mixedDiskExtents(size, seed)) r[e.kind] += e.length / size;
  return r;
}
