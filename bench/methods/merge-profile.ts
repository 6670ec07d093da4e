// Profile of one forever-forward merge (run by hand): a full of --size-gib (default 1) of
// incompressible blocks, an increment of --change of the 4 GiB disk (default 5% = 205 blocks),
// then applyRetention merges it; prints the time of each step of the merge. --progress: every
// other run with a live progress listener (MAINTPROGRESS), to compare its cost with none.
//   npx tsx bench/methods/merge-profile.ts [--size-gib 1] [--blocks 205] [--runs 3] [--progress]
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import type { DiskBlock } from '../../src/disk/types.js';
import { openRepository } from '../../src/repository/index.js';

const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);
const BS = 1048576;
const SIZE = Math.round(Number(opt('size-gib', '1')) * 1024 ** 3);
const BLOCKS = Math.ceil(SIZE / BS);
const CHANGED = Number(opt('blocks', '205'));
const RUNS = Number(opt('runs', '3'));
const PROGRESS = args.includes('--progress');

async function* blocks(indices: Iterable<number>): AsyncGenerator<DiskBlock> {
  const buf = Buffer.allocUnsafe(BS);
  for (const i of indices) {
    randomFillSync(buf);
    yield { index: i, data: buf };
  }
}
const dir = await mkdtemp(path.join(tmpdir(), 'bulwark-merge-profile-'));
try {
  const repo = await openRepository(dir);
  const point = async (kind: 'full' | 'incremental', which: number[]) => {
    const w = await repo.startRestorePoint({ job: 'p', vm: 'v', kind, blockSize: BS, disks: [{ name: 'vda', size: SIZE }] });
    await w.writeDisk('vda', blocks(which));
    return w.commit();
  };
  await point('full', Array.from({ length: BLOCKS }, (_, i) => i));
  let seed = 11;
  const pick = () => {
    const s = new Set<number>();
    while (s.size < CHANGED) {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      s.add((seed >>> 0) % BLOCKS);
    }
    return [...s].sort((a, b) => a - b);
  };
  await point('incremental', pick());
  const times: Record<string, number[]> = { none: [], live: [] };
  for (let r = 0; r < RUNS; r++) {
    await point('incremental', pick());
    const live = PROGRESS && r % 2 === 1;
    let reports = 0;
    const t0 = performance.now();
    await repo.applyRetention('p', 'v', { method: 'forever-forward', retention: { points: 2 } }, live ? { onProgress: () => void reports++ } : {});
    const s = (performance.now() - t0) / 1000;
    times[live ? 'live' : 'none']!.push(s);
    console.log(`merge of ${CHANGED} MiB into a ${(SIZE / 1024 ** 3).toFixed(1)} GiB full: ${s.toFixed(2)} s${live ? ` (live progress: ${reports} reports)` : ''} (load ${loadavg()[0]!.toFixed(1)})`);
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  if (PROGRESS) console.log(`median: without progress ${median(times.none!)?.toFixed(2)} s, with live progress ${median(times.live!)?.toFixed(2)} s`);
} finally {
  await rm(dir, { recursive: true, force: true });
}
