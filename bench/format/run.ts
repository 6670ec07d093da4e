// Format benchmark (run by hand): write the 4 GiB mixed disk image into a full backup and read it
// back. Reports input GB/s for the write, GB/s for a sequential restore read, peak RSS per phase,
// and CPU seconds (user+sys over all threads) so results on a loaded machine can be judged.
//   npx tsx bench/format/run.ts [--runs 3] [--block-size 1048576] [--compression zstd] [--image PATH]
//                               [--repo-dir DIR]   (where the repository is made; default os.tmpdir())
//                               [--copy-source]    (the source reads into its own buffers, copied
//                                                   into the encoder slots; default: it reads
//                                                   straight into buffers the writer lends)
// Each phase runs in its own process so its peak RSS is its own, from JavaScript compiled the way
// the product ships it (esbuild into .cache/bench-format/, no tsx loader threads in the process).
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import type { DiskBlock } from '../../src/disk/types.js';
import type { Compression } from '../../src/format/index.js';
import { openRepository } from '../../src/repository/index.js';
import { ensureMixedDiskImage, mixedDiskComposition } from '../lib/mixed-disk.js';

const args = process.argv.slice(2);
const opt = (name: string, def: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1]! : def;
};
const GB = 1e9;

interface PhaseResult {
  phase: string;
  seconds: number;
  cpuSeconds: number;
  bytes: number;
  maxRssMiB: number;
  crc?: number;
  fileBytes?: number;
  pointId?: string;
}

/**
 * The image as blocks, one read ahead (as a real source pipelines its reads). With `lend`, each
 * block is read straight into a buffer the writer lends (an encoder slot: no copy); else into
 * three reused buffers (the writer copies each block before asking for the next one, so buffer
 * i % 3 is free again by then).
 */
async function* readImage(file: string, blockSize: number, onData: (b: Buffer) => void, lend?: { take(): Promise<Buffer>; giveBack(b: Buffer): void }): AsyncGenerator<DiskBlock> {
  const fh = await open(file, 'r');
  let ahead: Promise<Buffer> | null = null;
  try {
    const size = (await fh.stat()).size;
    const count = Math.ceil(size / blockSize);
    const ring = lend ? [] : [Buffer.allocUnsafe(blockSize), Buffer.allocUnsafe(blockSize), Buffer.allocUnsafe(blockSize)];
    const read = async (i: number) => {
      const into = lend ? await lend.take() : ring[i % 3]!;
      const b = into.subarray(0, Math.min(blockSize, size - i * blockSize));
      const { bytesRead } = await fh.read(b, 0, b.length, i * blockSize);
      if (bytesRead !== b.length) throw new Error('short read');
      return b;
    };
    ahead = count > 0 ? read(0) : null;
    for (let i = 0; i < count; i++) {
      const b = await ahead!;
      ahead = i + 1 < count ? read(i + 1) : null;
      onData(b);
      yield { index: i, data: b };
    }
  } finally {
    if (ahead) await ahead.then((b) => lend?.giveBack(b), () => undefined);
    await fh.close();
  }
}

async function phaseWrite(image: string, repoDir: string, blockSize: number, compression: Compression, threads?: number, copySource = false): Promise<PhaseResult> {
  const fh = await open(image, 'r');
  const size = (await fh.stat()).size;
  await fh.close();
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const repo = await openRepository(repoDir, { create: true });
  const w = await repo.startRestorePoint({ job: 'bench', vm: 'mixed', kind: 'full', blockSize, compression, threads, disks: [{ name: 'vda', size }] });
  let crc = 0;
  let n = 0;
  // The check covers every 8th block (both sides), so the bench measures the product, not itself.
  const lend = copySource ? undefined : { take: () => w.lendBuffer(), giveBack: (b: Buffer) => w.giveBackBuffer(b) };
  await w.writeDisk('vda', readImage(image, blockSize, (b) => (crc = n++ % 8 === 0 ? crc32c(b, crc) : crc), lend));
  const info = await w.commit();
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  return { phase: 'write', seconds, cpuSeconds: (cpu.user + cpu.system) / 1e6, bytes: size, maxRssMiB: process.resourceUsage().maxRSS / 1024, crc, fileBytes: info.fileBytes, pointId: info.id };
}

async function phaseRead(repoDir: string, pointId: string): Promise<PhaseResult> {
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const repo = await openRepository(repoDir);
  const p = await repo.openRestorePoint(pointId);
  const d = p.openDisk('vda');
  let crc = 0;
  let bytes = 0;
  const zero = Buffer.alloc(d.blockSize);
  for await (const b of d.stream()) {
    const len = Math.min(d.blockSize, d.size - b.index * d.blockSize);
    if (b.index % 8 === 0) crc = crc32c(b.data ?? zero.subarray(0, len), crc);
    bytes += len;
  }
  await p.close();
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  return { phase: 'read', seconds, cpuSeconds: (cpu.user + cpu.system) / 1e6, bytes, maxRssMiB: process.resourceUsage().maxRSS / 1024, crc };
}

async function phaseRawRead(image: string): Promise<PhaseResult> {
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  let bytes = 0;
  for await (const b of readImage(image, 4 * 1024 * 1024, () => undefined)) bytes += b.data!.length;
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  return { phase: 'raw-read', seconds, cpuSeconds: (cpu.user + cpu.system) / 1e6, bytes, maxRssMiB: process.resourceUsage().maxRSS / 1024 };
}

let compiled: string | null = null;
/** Compiles this bench and the encoder worker as the product ships (plain JS, no loader threads). */
async function compile(): Promise<string> {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
  const outdir = path.join(root, '.cache', 'bench-format');
  const { build } = await import('esbuild');
  await build({
    entryPoints: [fileURLToPath(import.meta.url), path.join(root, 'src/repository/block-worker.ts')],
    bundle: true, platform: 'node', format: 'esm', target: 'node20', outdir, entryNames: '[name]', packages: 'external', logLevel: 'warning',
  });
  return path.join(outdir, 'run.js');
}

function child(...a: string[]): PhaseResult {
  const entry = compiled ?? fileURLToPath(import.meta.url);
  const out = execFileSync(process.execPath, [...(compiled ? [] : process.execArgv), entry, ...a], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 20 });
  return JSON.parse(out.trim().split('\n').pop()!) as PhaseResult;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const phase = opt('phase', '');
  const blockSize = Number(opt('block-size', '1048576'));
  const compression = opt('compression', 'zstd') as Compression;
  if (phase === 'write') {
    const threads = args.includes('--threads') ? Number(opt('threads', '2')) : undefined;
    return void console.log(JSON.stringify(await phaseWrite(opt('image', ''), opt('repo', ''), blockSize, compression, threads, args.includes('--copy-source'))));
  }
  if (phase === 'read') return void console.log(JSON.stringify(await phaseRead(opt('repo', ''), opt('point', ''))));
  if (phase === 'raw-read') return void console.log(JSON.stringify(await phaseRawRead(opt('image', ''))));

  const runs = Number(opt('runs', '3'));
  compiled = await compile();
  const loads: string[] = [];
  const image = await ensureMixedDiskImage(opt('image', path.join(tmpdir(), 'bulwark-bench', 'mixed-4g.raw')));
  console.log(`image ${image}: composition ${JSON.stringify(mixedDiskComposition())}, block size ${blockSize}, ${compression}`);
  const results: PhaseResult[] = [];
  for (let r = 0; r < runs; r++) {
    const repo = await mkdtemp(path.join(opt('repo-dir', tmpdir()), 'bulwark-bench-repo-'));
    try {
      const raw = child('--phase', 'raw-read', '--image', image);
      const w = child('--phase', 'write', '--image', image, '--repo', repo, '--block-size', String(blockSize), '--compression', compression, ...(args.includes('--copy-source') ? ['--copy-source'] : []));
      const rd = child('--phase', 'read', '--repo', repo, '--point', w.pointId!);
      if (rd.crc !== w.crc) throw new Error(`read back differs: crc ${rd.crc} != ${w.crc}`);
      results.push(raw, w, rd);
      loads.push(loadavg().map((l) => l.toFixed(1)).join(' '));
      for (const x of [raw, w, rd]) {
        console.log(
          `run ${r + 1} ${x.phase.padEnd(8)} ${(x.bytes / x.seconds / GB).toFixed(2)} GB/s wall (${x.seconds.toFixed(2)} s), cpu ${x.cpuSeconds.toFixed(2)} s` +
            ` (${(x.bytes / x.cpuSeconds / GB).toFixed(2)} GB per cpu-s), peak RSS ${x.maxRssMiB.toFixed(0)} MiB` +
            (x.fileBytes ? `, file ${(x.fileBytes / 2 ** 20).toFixed(0)} MiB (${(x.bytes / x.fileBytes).toFixed(2)}x)` : '') +
            `, load ${loads.at(-1)}`,
        );
      }
    } finally {
      await rm(repo, { recursive: true, force: true });
    }
  }
  for (const ph of ['raw-read', 'write', 'read']) {
    const xs = results.filter((x) => x.phase === ph);
    console.log(
      `median ${ph.padEnd(8)} ${median(xs.map((x) => x.bytes / x.seconds / GB)).toFixed(2)} GB/s, ${median(xs.map((x) => x.cpuSeconds)).toFixed(2)} cpu-s, peak RSS ${median(xs.map((x) => x.maxRssMiB)).toFixed(0)} MiB`,
    );
  }
  console.log(`repository in ${opt('repo-dir', tmpdir())}; load average after each run: ${loads.join(' | ')}`);
}

await main();
