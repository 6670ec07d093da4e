// What limits a disk restore on this machine, per core (run by hand, never in the test suite):
//   npx tsx bench/restore/limits.ts [--mib 512]
// Over the first --mib MiB of the bench's mixed disk (bench/lib/mixed-disk.ts) in 1 MiB blocks:
// SHA-256 (node:crypto), CRC32C (@node-rs/crc32) and zstd-1 decode (zstd-napi, into a reused
// buffer) in GB/s of one core; then the page-cache write rate of a 1 GiB file (pwrite 4 MiB, no
// fsync) and the same with fdatasync at the end (the disk's rate), in a temp dir.
import { createHash } from 'node:crypto';
import { createRequire } from 'node:module';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { fillMixed, mixedDiskExtents } from '../lib/mixed-disk.js';

interface Zstd {
  CCtx: new () => { compress(dst: Uint8Array, src: Uint8Array, level: number): number };
  DCtx: new () => { decompress(dst: Uint8Array, src: Uint8Array): number };
  compressBound(n: number): number;
}
const zstd = createRequire(import.meta.url)('zstd-napi/binding') as Zstd;
const args = process.argv.slice(2);
const MIB = 1024 * 1024;
const total = Number(args.includes('--mib') ? args[args.indexOf('--mib') + 1] : '512') * MIB;
const GB = 1e9;

function rate(label: string, bytes: number, fn: () => void): void {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  fn();
  const s = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(c0);
  console.log(`${label.padEnd(44)} ${(bytes / s / GB).toFixed(2)} GB/s (${s.toFixed(2)} s wall, ${((cpu.user + cpu.system) / 1e6).toFixed(2)} CPU-s)`);
}

const extents = mixedDiskExtents();
const blocks: Buffer[] = [];
for (let at = 0; at < total; at += MIB) {
  const b = Buffer.alloc(MIB);
  fillMixed(b, at, extents);
  blocks.push(b);
}
console.log(`load ${loadavg()[0]!.toFixed(1)}; ${blocks.length} blocks of the mixed disk`);
rate('SHA-256, 1 MiB blocks', total, () => {
  for (const b of blocks) createHash('sha256').update(b).digest();
});
const zeroes = Buffer.alloc(MIB);
rate('SHA-256 of zeroes, one stream', total, () => {
  const h = createHash('sha256');
  for (let i = 0; i < blocks.length; i++) h.update(zeroes);
  h.digest();
});
rate('CRC32C', total, () => {
  for (const b of blocks) crc32c(b);
});
rate('Buffer.equals against zeroes (old zero test)', total, () => {
  for (const b of blocks) b.equals(zeroes);
});
const cctx = new zstd.CCtx();
const compressed = blocks.map((b) => {
  const out = Buffer.allocUnsafe(zstd.compressBound(b.length));
  return out.subarray(0, cctx.compress(out, b, 1));
});
const stored = compressed.reduce((n, c) => n + c.length, 0);
const dctx = new zstd.DCtx();
const plain = Buffer.allocUnsafe(MIB);
rate(`zstd-1 decode (${(total / stored).toFixed(1)}x), plain bytes`, total, () => {
  for (const c of compressed) dctx.decompress(plain, c);
});

const dir = await mkdtemp(path.join(tmpdir(), 'bulwark-limits-'));
try {
  const size = 1024 * MIB;
  const chunk = Buffer.alloc(4 * MIB, 0x5a);
  for (const sync of [false, true]) {
    const file = path.join(dir, `w${sync ? 's' : ''}.raw`);
    const fh = await open(file, 'w');
    const t0 = performance.now();
    for (let at = 0; at < size; at += chunk.length) await fh.write(chunk, 0, chunk.length, at);
    if (sync) await fh.datasync();
    const s = (performance.now() - t0) / 1000;
    await fh.close();
    console.log(`${(sync ? 'write 1 GiB + fdatasync' : 'write 1 GiB to the page cache').padEnd(44)} ${(size / s / GB).toFixed(2)} GB/s (${s.toFixed(2)} s)`);
    await rm(file);
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
