// How well the incompressibility probe (src/repository/block-codec.ts, looksIncompressible)
// decides, block by block, on the bench image (run by hand, one thread):
//   npx tsx bench/format/probe.ts [--image PATH] [--block-size 1048576] [--every 1]
// Every non-zero block (every Nth with --every) is probed AND compressed by zstd with the
// product's settings, so the report says what the probe costs and saves: blocks it sent to zstd
// that zstd could not shrink (wasted zstd CPU), blocks it stored raw that zstd would have shrunk
// (lost ratio), and the CPU of each part. Also compares borg's "auto" idea (an lz4 trial on the
// whole block decides whether the real compressor runs) on the same blocks.
import { open } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { compressSync as lz4Compress } from 'lz4-napi';
import { looksIncompressible, probeScratch, sampleEntropy, ZSTD_HASH_LOG, ZSTD_LEVEL } from '../../src/repository/block-codec.js';
import { ensureMixedDiskImage } from '../lib/mixed-disk.js';

interface ZstdBinding {
  CCtx: new () => { compress2(dst: Uint8Array, src: Uint8Array): number; setParameter(p: number, v: number): void };
  compressBound(n: number): number;
  CParameter: { readonly compressionLevel: number; readonly hashLog: number };
}
const zstd = createRequire(import.meta.url)('zstd-napi/binding') as ZstdBinding;
const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);

const cpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

async function main(): Promise<void> {
  const image = await ensureMixedDiskImage(opt('image', path.join(tmpdir(), 'bulwark-bench', 'mixed-4g.raw')));
  const blockSize = Number(opt('block-size', '1048576'));
  const every = Number(opt('every', '1'));
  const cctx = new zstd.CCtx();
  cctx.setParameter(zstd.CParameter.compressionLevel, ZSTD_LEVEL);
  cctx.setParameter(zstd.CParameter.hashLog, ZSTD_HASH_LOG);
  const out = Buffer.allocUnsafe(zstd.compressBound(blockSize));
  const zero = Buffer.alloc(blockSize);
  const buf = Buffer.allocUnsafe(blockSize);
  const scratch = probeScratch();
  // The probe before 2026-11-26 (entropy of the sample only): where it decided otherwise.
  let oldDiffers = 0;
  let oldLost = 0;
  // Per decision: blocks, plain bytes, zstd output bytes (min(plain, zstd)), zstd CPU-s, probe CPU-s.
  type Row = { blocks: number; plain: number; zstdBytes: number; zstdCpu: number; notSmaller: number; under97: number };
  const row = (): Row => ({ blocks: 0, plain: 0, zstdBytes: 0, zstdCpu: 0, notSmaller: 0, under97: 0 });
  const rows = { raw: row(), zstd: row() };
  let probeCpu = 0;
  let lz4Cpu = 0;
  let lz4Skips = 0;
  let lz4SkipLost = 0;
  let lz4Missed = 0;
  let zeroBlocks = 0;
  const fh = await open(image, 'r');
  const size = (await fh.stat()).size;
  try {
    for (let i = 0; i * blockSize < size; i += every) {
      const b = buf.subarray(0, Math.min(blockSize, size - i * blockSize));
      await fh.read(b, 0, b.length, i * blockSize);
      if (b.equals(zero.subarray(0, b.length))) {
        zeroBlocks++;
        continue;
      }
      let t = cpu();
      const raw = looksIncompressible(b, scratch);
      probeCpu += cpu() - t;
      const rawOld = sampleEntropy(b) >= 7.85;
      t = cpu();
      const z = cctx.compress2(out, b);
      const zc = cpu() - t;
      t = cpu();
      const l = lz4Compress(b).length;
      lz4Cpu += cpu() - t;
      // borg's "auto": lz4 first; ratio >= 0.97 means "not worth compressing".
      if (l >= 0.97 * b.length) {
        lz4Skips++;
        if (z < 0.97 * b.length) lz4SkipLost += b.length - z;
      } else if (z >= b.length) lz4Missed++;
      if (rawOld !== raw) {
        oldDiffers++;
        if (rawOld && z < b.length) oldLost += b.length - z;
      }
      const r = raw ? rows.raw : rows.zstd;
      r.blocks++;
      r.plain += b.length;
      r.zstdBytes += Math.min(z, b.length);
      r.zstdCpu += zc;
      if (z >= b.length) r.notSmaller++;
      else if (z >= 0.97 * b.length) r.under97++;
    }
  } finally {
    await fh.close();
  }
  const MiB = 2 ** 20;
  console.log(`image ${image}, block size ${blockSize}, every ${every} block(s): ${zeroBlocks} zero blocks skipped`);
  for (const [name, r] of Object.entries(rows)) {
    console.log(
      `probe says ${name === 'raw' ? 'incompressible (stored raw)' : 'compressible (zstd runs)   '}: ${r.blocks} blocks, ${(r.plain / MiB).toFixed(0)} MiB; ` +
        `zstd would store ${(r.zstdBytes / MiB).toFixed(1)} MiB (${((100 * r.zstdBytes) / Math.max(1, r.plain)).toFixed(1)}%), ` +
        `zstd not smaller on ${r.notSmaller} blocks, < 3% smaller on ${r.under97}; zstd CPU ${r.zstdCpu.toFixed(2)} s`,
    );
  }
  console.log(`probe CPU ${probeCpu.toFixed(3)} s for ${rows.raw.blocks + rows.zstd.blocks} blocks (${((1e6 * probeCpu) / Math.max(1, rows.raw.blocks + rows.zstd.blocks)).toFixed(0)} us per block)`);
  console.log(`the entropy-only probe decided otherwise on ${oldDiffers} blocks; where it said raw, zstd saves ${(oldLost / MiB).toFixed(2)} MiB`);
  console.log(`lz4 trial (borg "auto"): CPU ${lz4Cpu.toFixed(2)} s; would skip zstd on ${lz4Skips} blocks (losing ${(lz4SkipLost / MiB).toFixed(1)} MiB zstd would have saved); runs zstd in vain on ${lz4Missed}`);
}

await main();
