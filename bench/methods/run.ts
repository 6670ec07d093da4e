// Backup-method benchmark (run by hand): repository bytes read and written per daily run of each
// method on a disk with a fixed daily change rate, and the time of merging one day's increment
// into the full. Bytes are this process's read/write syscall bytes (/proc/self/io rchar/wchar),
// so the writer's threads and every fsync'ed transform step are included, page cache or not.
//   npx tsx bench/methods/run.ts [--size-gib 4] [--change 0.05] [--runs 3] [--repo-dir DIR]
// Published I/O costs to compare with (per run, in units of the increment): forward 1x write,
// forever-forward merge ~2x (read + write the increment's blocks), synthetic full 2x the chain
// (read the chain, write a full), reverse incremental 3x (write + read and write the replaced blocks).
import { randomFillSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import type { DiskBlock } from '../../src/disk/types.js';
import { openRepository, type MethodPolicy, type Repository } from '../../src/repository/index.js';

const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);
const SIZE = Math.round(Number(opt('size-gib', '4')) * 1024 ** 3);
const CHANGE = Number(opt('change', '0.05'));
const RUNS = Number(opt('runs', '3'));
const BS = 1048576;
const BLOCKS = Math.ceil(SIZE / BS);
const MB = 1e6;

function io(): { read: number; written: number } {
  const t = readFileSync('/proc/self/io', 'utf8');
  const v = (k: string) => Number(new RegExp(`${k}: (\\d+)`).exec(t)![1]);
  return { read: v('rchar'), written: v('wchar') };
}
async function measure<T>(f: () => Promise<T>): Promise<{ value: T; read: number; written: number; ms: number }> {
  const a = io();
  const t0 = performance.now();
  const value = await f();
  const ms = performance.now() - t0;
  const b = io();
  return { value, read: b.read - a.read, written: b.written - a.written, ms };
}

/** Incompressible data (the worst case for I/O: stored bytes = plain bytes). */
function* blocks(indices: Iterable<number>): Generator<DiskBlock> {
  const buf = Buffer.allocUnsafe(BS);
  for (const i of indices) {
    randomFillSync(buf);
    yield { index: i, data: buf.subarray(0, Math.min(BS, SIZE - i * BS)) };
  }
}
let seed = 7;
function changedBlocks(): number[] {
  const n = Math.round(BLOCKS * CHANGE);
  const set = new Set<number>();
  while (set.size < n) {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    set.add((seed >>> 0) % BLOCKS);
  }
  return [...set].sort((a, b) => a - b);
}

async function point(repo: Repository, vm: string, kind: 'full' | 'incremental' | 'reverse', which: Iterable<number>, chainMethod: 'forward' | 'reverse' = 'forward') {
  const w = await repo.startRestorePoint({ job: 'bench', vm, kind, ...(kind === 'full' ? { chainMethod, blockSize: BS } : {}), disks: [{ name: 'vda', size: SIZE }] });
  await w.writeDisk('vda', (async function* () {
    yield* blocks(which);
  })());
  return w.commit();
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const dir = await mkdtemp(path.join(opt('repo-dir', tmpdir()), 'bulwark-bench-methods-'));
const load0 = loadavg()[0]!;
try {
  const repo = await openRepository(dir);
  const all = Array.from({ length: BLOCKS }, (_, i) => i);
  const rows: Record<string, { read: number[]; written: number[]; ms: number[] }> = {};
  const add = (name: string, m: { read: number; written: number; ms: number }) => {
    const r = (rows[name] ??= { read: [], written: [], ms: [] });
    r.read.push(m.read);
    r.written.push(m.written);
    r.ms.push(m.ms);
  };
  const increment = Math.round(BLOCKS * CHANGE) * BS;
  console.log(`disk ${(SIZE / 1024 ** 3).toFixed(1)} GiB, ${BLOCKS} blocks of 1 MiB, ${(CHANGE * 100).toFixed(1)}% change per run = ${(increment / MB).toFixed(0)} MB increment, ${RUNS} runs, repository ${dir}`);

  // Forever forward: each run writes an increment; retention of 2 points merges the oldest into the full.
  const ff: MethodPolicy = { method: 'forever-forward', retention: { points: 2 } };
  await point(repo, 'ff', 'full', all);
  await point(repo, 'ff', 'incremental', changedBlocks());
  for (let r = 0; r < RUNS; r++) {
    add('forward: write increment', await measure(() => point(repo, 'ff', 'incremental', changedBlocks())));
    add('forever-forward: merge oldest increment', await measure(() => repo.applyRetention('bench', 'ff', ff)));
  }
  add('compact full (after merges)', await measure(() => repo.compactFull('bench', 'ff')));

  // Forward with a synthetic full: increment, then the full built from the chain.
  await point(repo, 'syn', 'full', all);
  for (let r = 0; r < RUNS; r++) {
    const p = await point(repo, 'syn', 'incremental', changedBlocks());
    add('synthetic full (from full + increment)', await measure(() => repo.synthesizeFull('bench', 'syn', { point: p.id })));
  }

  // Reverse: each run injects into the full.
  await point(repo, 'rv', 'full', all, 'reverse');
  for (let r = 0; r < RUNS; r++) add('reverse: inject increment', await measure(() => point(repo, 'rv', 'reverse', changedBlocks())));

  console.log(`\nmedians of ${RUNS} (load average ${load0.toFixed(1)} at start, ${loadavg()[0]!.toFixed(1)} at end):`);
  console.log('operation'.padEnd(42), 'read MB'.padStart(9), 'written MB'.padStart(11), '(read+written)/increment'.padStart(25), 'seconds'.padStart(8));
  for (const [name, r] of Object.entries(rows)) {
    const rd = median(r.read);
    const wr = median(r.written);
    console.log(name.padEnd(42), (rd / MB).toFixed(0).padStart(9), (wr / MB).toFixed(0).padStart(11), ((rd + wr) / increment).toFixed(2).padStart(25), (median(r.ms) / 1000).toFixed(2).padStart(8));
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
