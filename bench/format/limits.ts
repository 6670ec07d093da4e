// What the write path must cost at least on this machine (run by hand): every stage of encoding
// the bench image, timed alone on one thread over all its blocks, in CPU seconds.
//   npx tsx bench/format/limits.ts [--image PATH] [--levels 1,3,-1,-5]
// The sum is the CPU floor of a full backup of the image; divided by 2 cores, its wall floor.
import { createHash } from 'node:crypto';
import { openSync, readSync } from 'node:fs';
import { createRequire } from 'node:module';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { looksIncompressible } from '../../src/repository/block-codec.js';
import { ensureMixedDiskImage } from '../lib/mixed-disk.js';

interface ZstdCCtx { compress(dst: Uint8Array, src: Uint8Array, level: number): number }
const zstd = createRequire(import.meta.url)('zstd-napi/binding') as { CCtx: new () => ZstdCCtx; compressBound(n: number): number };
const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);
const image = await ensureMixedDiskImage(opt('image', path.join(tmpdir(), 'bulwark-bench', 'mixed-4g.raw')));
const levels = opt('levels', '1,3,-1,-5').split(',').map(Number);
const B = 1 << 20;
const fd = openSync(image, 'r');
const buf = Buffer.allocUnsafe(B);
const zero = Buffer.alloc(B);
const out = Buffer.allocUnsafe(zstd.compressBound(B));
const cctx = new zstd.CCtx();
const cpu = new Map<string, number>();
let compressible = 0;
let random = 0;
let zeros = 0;
const stored = new Map<number, number>();
const time = <T>(name: string, f: () => T): T => {
  const t0 = process.cpuUsage();
  const r = f();
  const u = process.cpuUsage(t0);
  cpu.set(name, (cpu.get(name) ?? 0) + (u.user + u.system) / 1e6);
  return r;
};
const l0 = loadavg()[0]!.toFixed(1);
for (let i = 0; ; i++) {
  const n = time('read 1 MiB (page cache)', () => readSync(fd, buf, 0, B, i * B));
  if (n === 0) break;
  const b = buf.subarray(0, n);
  if (time('zero check', () => b.equals(zero.subarray(0, n)))) {
    zeros++;
    continue;
  }
  time('copy into a slot', () => b.copy(out));
  time('sha-256', () => createHash('sha256').update(b).digest());
  const rnd = time('entropy probe', () => looksIncompressible(b));
  if (rnd) random++;
  else compressible++;
  for (const lvl of levels) {
    const len = rnd ? n : time(`zstd ${lvl} (compressible blocks)`, () => Math.min(n, cctx.compress(out, b, lvl)));
    stored.set(lvl, (stored.get(lvl) ?? 0) + len);
  }
  time('zstd 1 on random blocks (if not probed)', () => (rnd ? cctx.compress(out, b, 1) : 0));
  time('crc32c of the stored bytes', () => crc32c(rnd ? b : out.subarray(0, Math.min(n, stored.get(levels[0]!)! > 0 ? n >> 2 : n))));
}
console.log(`image ${image}: ${zeros} zero, ${compressible} compressible, ${random} random 1 MiB blocks; load ${l0} -> ${loadavg()[0]!.toFixed(1)}`);
for (const [k, v] of cpu) console.log(`  ${k.padEnd(42)} ${v.toFixed(2)} cpu-s`);
for (const lvl of levels) console.log(`  zstd ${lvl}: file ${(stored.get(lvl)! / 2 ** 20).toFixed(0)} MiB of data`);
const floor = ['zero check', 'copy into a slot', 'sha-256', 'entropy probe', `zstd ${levels[0]} (compressible blocks)`, 'crc32c of the stored bytes'].reduce((a, k) => a + (cpu.get(k) ?? 0), 0);
console.log(`encode floor (zstd ${levels[0]}): ${floor.toFixed(2)} cpu-s = ${(4 / floor).toFixed(2)} GiB per cpu-s; on 2 cores >= ${(floor / 2).toFixed(2)} s wall for the image, + reading it`);
