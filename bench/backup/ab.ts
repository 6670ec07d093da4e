// Same-time A/B of Bulwark's backup phases between work trees (run by hand, never in the tests):
//   npx tsx bench/backup/ab.ts --trees DIR1,DIR2 [--incrementals 6] [--repeat 1] [--fulls 1] [--env-b NAME=VALUE] [--work DIR] [--hold]
// One qemu-storage-daemon export of the 4 GiB mixed disk (bench/backup/run.ts steps 1-3): each
// tree takes a full into its own repository (in alternating order, `--fulls` times: the last one
// is the chain the incrementals continue), then the scattered 5% writes are recorded by bitmap bm0,
// which is frozen, and the trees take `--incrementals` incrementals each from the same bitmap,
// alternating A B, B A, A B, ... (each a new point of its chain with the same data). Each phase is
// its own process of the tree's compiled bench (`run.js --phase`), as run.ts runs it.
// Prints every phase (wall, CPU-s of the process after module load, peak RSS, the stderr phase
// split) and per tree the medians. `--hold`: after the fulls and the writes, print the commands to
// run a phase by hand (e.g. under perf) and wait for SIGINT or SIGTERM; then clean up.
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { QsdFixture } from '../../test/fixtures/qsd.js';
import { ensureMixedQcow2, runPhase, type Phase } from '../lib/backup-tools.js';
import { scatteredWrites } from '../source/disk.js';
import { MIXED_DISK_SIZE } from '../lib/mixed-disk.js';

const exec = promisify(execFile);
const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const load = () => loadavg()[0]!.toFixed(1);

async function compiledOf(tree: string): Promise<string> {
  const lib = (await import(path.join(tree, 'bench/lib/backup-tools.ts'))) as { compileBench: (entry: string, out: string) => Promise<string> };
  return lib.compileBench(path.join(tree, 'bench/backup/run.ts'), 'bench-backup');
}

async function main(): Promise<void> {
  const trees = opt('trees', process.cwd()).split(',').map((t) => path.resolve(t));
  const names = trees.map((t, i) => `${String.fromCharCode(65 + i)}:${path.basename(t)}`);
  const compiled: string[] = [];
  for (const t of trees) compiled.push(await compiledOf(t));
  const incrementals = Number(opt('incrementals', '6'));
  const fulls = Number(opt('fulls', '1'));
  // --repeat K: each incremental process takes K incrementals one after the other (run.ts --repeat:
  // a long-running agent's case); the last one is the result, the others are printed by the phase.
  const repeat = Number(opt('repeat', '1'));
  const envB = opt('env-b', '') ? opt('env-b', '').split('=') : null;
  const base = await ensureMixedQcow2();
  const work = await mkdtemp(path.join(opt('work', tmpdir()), 'bulwark-bench-ab-'));
  const overlay = path.join(work, 'disk.qcow2');
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
  const qsd = await QsdFixture.start({ image: overlay });
  const rows = new Map<string, { full: Phase[]; inc: Phase[] }>(names.map((n) => [n, { full: [], inc: [] }]));
  const phase = (i: number, kind: string, repo: string, exportName: string): Phase => {
    const l = load();
    // --env-b NAME=VALUE: tree B's phases run with this environment variable (e.g. the same tree
    // twice, B with BULWARK_BENCH_BLOCK_SIZE=262144).
    const saved = { ...process.env };
    if (i === 1 && envB) process.env[envB[0]!] = envB[1]!;
    const p = runPhase(compiled[i]!, '--phase', kind, '--repo', repo, '--socket', qsd.nbdSocket, '--export', exportName, ...(kind === 'incremental' ? ['--repeat', String(repeat)] : []));
    process.env = saved;
    console.log(`${names[i]!.padEnd(24)} ${kind.padEnd(11)} ${p.seconds.toFixed(2)} s, ${p.cpuSeconds.toFixed(2)} CPU-s, ${p.maxRssMiB.toFixed(0)} MiB, load ${l}`);
    return p;
  };
  try {
    const repos = trees.map((_, i) => path.join(work, `repo-${i}`));
    await qsd.qmp.execute('block-dirty-bitmap-add', { node: qsd.nodeName, name: 'bm0', persistent: false });
    await qsd.addExport('full');
    for (let f = 0; f < fulls; f++) {
      const order = trees.map((_, i) => i);
      if (f % 2 === 1) order.reverse();
      for (const i of order) {
        if (f > 0) await rm(repos[i]!, { recursive: true, force: true });
        rows.get(names[i]!)!.full.push(phase(i, 'full', repos[i]!, 'full'));
      }
    }
    await qsd.removeExport('full');
    const writes = scatteredWrites(MIXED_DISK_SIZE);
    await qsd.addExport('live', { writable: true });
    for (let i = 0; i < writes.length; i += 200) await qsd.qemuIo('live', ...writes.slice(i, i + 200).map((w) => `write -P ${w.fill} ${w.offset} ${w.length}`));
    await qsd.removeExport('live');
    await qsd.qmp.execute('block-dirty-bitmap-disable', { node: qsd.nodeName, name: 'bm0' });
    await qsd.addExport('inc', { bitmaps: ['bm0'] });
    if (args.includes('--hold')) {
      for (let i = 0; i < trees.length; i++) {
        console.log(`${names[i]}: node ${compiled[i]} --phase incremental --repo ${repos[i]} --socket ${qsd.nbdSocket} --export inc`);
      }
      console.log(`holding: SIGINT or SIGTERM (kill -INT ${process.pid}) cleans up`);
      await new Promise<void>((resolve) => {
        const keep = setInterval(() => undefined, 60_000);
        const done = () => {
          clearInterval(keep);
          resolve();
        };
        process.once('SIGINT', done);
        process.once('SIGTERM', done);
      });
      return;
    }
    for (let k = 0; k < incrementals; k++) {
      const order = trees.map((_, i) => i);
      if (k % 2 === 1) order.reverse();
      for (const i of order) rows.get(names[i]!)!.inc.push(phase(i, 'incremental', repos[i]!, 'inc'));
    }
    console.log(`\nmedians (load now ${loadavg().map((l) => l.toFixed(1)).join(' ')})`);
    for (const [n, r] of rows) {
      const m = (xs: Phase[], f: (p: Phase) => number) => (xs.length ? median(xs.map(f)).toFixed(2) : '-');
      console.log(
        `${n.padEnd(24)} full ${m(r.full, (p) => p.seconds)} s ${m(r.full, (p) => p.cpuSeconds)} CPU-s ${m(r.full, (p) => p.maxRssMiB)} MiB; ` +
          `incremental (${r.inc.length}) ${m(r.inc, (p) => p.seconds)} s ${m(r.inc, (p) => p.cpuSeconds)} CPU-s ${m(r.inc, (p) => p.maxRssMiB)} MiB`,
      );
    }
  } finally {
    await qsd.stop();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
