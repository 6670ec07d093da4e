// Scratch bench (by hand): restoreDisk variants on the mixed disk, compiled, in child processes.
//   npx tsx bench/restore/variants.ts [--runs 3] [--variants digest+verify,digest,verify,none] [--threads N]
//                                     [--to-dir DIR]  (where the restored image goes; default the bench folder
//                                                      under os.tmpdir(); /dev/shm takes the disk out)
// --runs 0 only compiles (.cache/bench-restore-variants/variants.js; run a phase of it by hand:
// `node .cache/bench-restore-variants/variants.js --phase restore --variant none --to FILE`).
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { loadavg } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openRepository } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/index.js';
import { BENCH_DIR, compileBench, runPhase, type Phase } from '../lib/backup-tools.js';
import { MIXED_DISK_SIZE, mixedDiskBlocks } from '../lib/mixed-disk.js';

const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const REPO = path.join(BENCH_DIR, 'restoreperf-repo');

async function main(): Promise<void> {
  if (opt('phase', '') === 'restore') {
    const v = opt('variant', 'digest');
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    const repo = await openRepository(REPO);
    const [p] = await repo.listRestorePoints({});
    const r = await restoreDisk({ repository: repo, pointId: p!.id, disk: 'vda', to: opt('to', ''), overwrite: true, verify: v.includes('verify'), imageDigest: v.includes('digest'), ...(opt('threads', '') ? { threads: Number(opt('threads', '')) } : {}) });
    const cpu = process.cpuUsage(c0);
    const out: Phase & { timings: unknown } = { timings: r.timings, seconds: (performance.now() - t0) / 1000, cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssMiB: process.resourceUsage().maxRSS / 1024, sha256: r.sha256 };
    console.log(JSON.stringify(out));
    return;
  }
  if (!existsSync(REPO)) {
    const repo = await openRepository(REPO, { create: true });
    const w = await repo.startRestorePoint({ job: 'bench', vm: 'mixed', kind: 'full', disks: [{ name: 'vda', size: MIXED_DISK_SIZE }] });
    await w.writeDisk('vda', mixedDiskBlocks(1 << 20));
    await w.commit();
  }
  const compiled = await compileBench(fileURLToPath(import.meta.url), 'bench-restore-variants');
  const runs = Number(opt('runs', '3'));
  if (runs === 0) return;
  const variants = opt('variants', 'digest+verify,digest,verify,none').split(',');
  const to = path.join(opt('to-dir', BENCH_DIR), 'restoreperf-out.raw');
  const rows = new Map<string, Phase[]>(variants.map((v) => [v, []]));
  for (let r = 0; r < runs; r++) {
    for (const v of variants) {
      const l = loadavg()[0]!.toFixed(1);
      const res = runPhase(compiled, '--phase', 'restore', '--variant', v, '--to', to, ...(opt('threads', '') ? ['--threads', opt('threads', '')] : []));
      await rm(to, { force: true });
      rows.get(v)!.push(res);
      console.log(`run ${r + 1} ${v.padEnd(14)} ${(MIXED_DISK_SIZE / res.seconds / 1e9).toFixed(2)} GB/s (${res.seconds.toFixed(2)} s, cpu ${res.cpuSeconds.toFixed(2)} s, RSS ${res.maxRssMiB.toFixed(0)} MiB) load ${l} ${res.sha256?.slice(0, 12) ?? ''} ${JSON.stringify((res as Phase & { timings?: unknown }).timings)}`);
    }
  }
  for (const [v, xs] of rows) console.log(`median ${v.padEnd(14)} ${(MIXED_DISK_SIZE / median(xs.map((x) => x.seconds)) / 1e9).toFixed(2)} GB/s, ${median(xs.map((x) => x.seconds)).toFixed(2)} s, cpu ${median(xs.map((x) => x.cpuSeconds)).toFixed(2)} s, RSS ${median(xs.map((x) => x.maxRssMiB)).toFixed(0)} MiB`);
}
await main();
