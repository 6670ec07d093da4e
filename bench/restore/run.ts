// Restore benchmark (run by hand, never in the test suite):
//   npx tsx bench/restore/run.ts [--runs 3] [--peers restic,borg] [--skip-disk] [--skip-instant] [--work-dir DIR]
// 1. Full disk restore: the 4 GiB mixed disk (bench/lib/mixed-disk.ts, as a qcow2 served by
//    qemu-storage-daemon) is backed up once by Bulwark and by each peer, then each restores it to
//    a raw file --runs times (who goes first rotates); every restore is checked bit-exact. Bulwark
//    restores with restoreDisk in its own process, compiled as shipped (peak RSS is its own); it
//    returns once the image is on disk (fdatasync). The peers return with their data still in the
//    page cache, so their restore is also timed with a `sync -d` of the output after it
//    ("+sync": the time until the restored disk is durable, as Bulwark's).
// 2. Instant recovery, time from launch to the guest agent's answer, for the same test guest in a
//    restore point whose disk is 1 GiB and one whose disk is 16 GiB (the guest's blocks, the rest
//    unallocated), alternating, --runs times each: the time must not grow with the disk size.
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { QemuHypervisor } from '../../src/hypervisor/qemu/adapter.js';
import { backupVm } from '../../src/agent/backup/disk-backup.js';
import { openRepository } from '../../src/repository/index.js';
import { startInstantRecovery } from '../../src/restore/instant/index.js';
import { QsdFixture } from '../../test/fixtures/qsd.js';
import { startTestGuest } from '../../test/fixtures/guest.js';
import { bulwarkBackup, bulwarkRestore, compileBench, ensureMixedQcow2, PEERS, runPhase, sha256OfExport, sha256OfFile, type Phase } from '../lib/backup-tools.js';
import { MIXED_DISK_SIZE } from '../lib/mixed-disk.js';

const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);
const GB = 1e9;
const GiB = 1024 ** 3;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const load = () => loadavg()[0]!.toFixed(1);

async function diskRestore(runs: number): Promise<void> {
  const compiled = await compileBench(fileURLToPath(import.meta.url), 'bench-restore');
  const peers = opt('peers', 'restic,borg').split(',').filter(Boolean).map((n) => PEERS[n]!);
  // Repositories and restored images (default os.tmpdir(); /dev/shm takes the disk out: CPU-bound).
  const work = await mkdtemp(path.join(opt('work-dir', tmpdir()), 'bulwark-bench-restore-'));
  const qsd = await QsdFixture.start({ image: await ensureMixedQcow2(), readOnly: true, exportName: 'full' });
  try {
    const want = await sha256OfExport(qsd.nbdUri('full'));
    const repos = new Map(['bulwark', ...peers.map((p) => p.name)].map((n) => [n, path.join(work, `repo-${n}`)]));
    const full = runPhase(compiled, '--phase', 'full', '--repo', repos.get('bulwark')!, '--socket', qsd.nbdSocket, '--export', 'full');
    for (const p of peers) {
      await p.init(repos.get(p.name)!);
      await p.backup(repos.get(p.name)!, qsd.nbdUri('full'), 'full');
    }
    const rows: { tool: string; r: Phase; load: string; synced: number }[] = [];
    const order = ['bulwark', ...peers.map((p) => p.name)];
    for (let r = 0; r < runs; r++) {
      for (let i = 0; i < order.length; i++) {
        const tool = order[(i + r) % order.length]!;
        const to = path.join(work, `restored-${tool}.raw`);
        const l = load();
        const res = tool === 'bulwark' ? runPhase(compiled, '--phase', 'restore', '--repo', repos.get('bulwark')!, '--point', full.pointId!, '--to', to) : await PEERS[tool]!.restore(repos.get(tool)!, 'full', to);
        const s0 = performance.now();
        if (tool !== 'bulwark') execFileSync('sync', ['-d', to]);
        const synced = res.seconds + (tool === 'bulwark' ? 0 : (performance.now() - s0) / 1000);
        const got = res.sha256 ?? (await sha256OfFile(to));
        if (got !== want) throw new Error(`${tool}: restored disk differs (sha256 ${got} != ${want})`);
        await rm(to, { force: true });
        rows.push({ tool, r: res, load: l, synced });
        console.log(`run ${r + 1} ${tool.padEnd(8)} restore ${(MIXED_DISK_SIZE / res.seconds / GB).toFixed(2)} GB/s (${res.seconds.toFixed(2)} s, +sync ${synced.toFixed(2)} s, cpu ${res.cpuSeconds.toFixed(2)} s, RSS ${res.maxRssMiB.toFixed(0)} MiB), bit-exact, load ${l}`);
      }
    }
    for (const tool of order) {
      const xs = rows.filter((x) => x.tool === tool).map((x) => x.r);
      const synced = median(rows.filter((x) => x.tool === tool).map((x) => x.synced));
      console.log(`median ${tool.padEnd(8)} restore ${(MIXED_DISK_SIZE / median(xs.map((x) => x.seconds)) / GB).toFixed(2)} GB/s, ${median(xs.map((x) => x.seconds)).toFixed(2)} s, +sync ${(MIXED_DISK_SIZE / synced / GB).toFixed(2)} GB/s (${synced.toFixed(2)} s), cpu ${median(xs.map((x) => x.cpuSeconds)).toFixed(2)} s, RSS ${median(xs.map((x) => x.maxRssMiB)).toFixed(0)} MiB`);
    }
  } finally {
    await qsd.stop();
    await rm(work, { recursive: true, force: true });
  }
}

async function instantRecovery(runs: number): Promise<void> {
  const work = await mkdtemp(path.join(tmpdir(), 'bw-ir-'));
  try {
    const repo = await openRepository(path.join(work, 'repo'), { create: true });
    // The test guest, backed up as it runs (the recorded QEMU command line boots the copies).
    const src = await startTestGuest({ name: 'bench-ir' });
    let guestPoint: string;
    try {
      await src.waitForAgent();
      const hv = new QemuHypervisor({ qmpGlob: src.qmpSocket, workDir: path.join(work, 'adapter') });
      try {
        guestPoint = (await backupVm({ hypervisor: hv, repository: repo, job: 'bench', vm: 'bench-ir' })).pointId;
      } finally {
        await hv.close();
      }
    } finally {
      await src.stop();
    }
    // The same guest in points whose disk is 1 GiB and 16 GiB: its blocks, then unallocated.
    const sizes = [1 * GiB, 16 * GiB];
    const points = new Map<number, string>();
    const p = await repo.openRestorePoint(guestPoint);
    try {
      for (const size of sizes) {
        const w = await repo.startRestorePoint({ job: 'bench', vm: `ir-${size / GiB}g`, kind: 'full', vmConfig: p.vmConfig, disks: [{ name: 'vda', size }] });
        await w.writeDisk('vda', p.openDisk('vda').stream());
        points.set(size, (await w.commit()).id);
      }
    } finally {
      await p.close();
    }
    const times = new Map<number, number[]>(sizes.map((s) => [s, []]));
    for (let r = 0; r < runs; r++) {
      for (const size of r % 2 === 0 ? sizes : [...sizes].reverse()) {
        const l = load();
        const t0 = Date.now();
        const s = await startInstantRecovery({ repository: repo, pointId: points.get(size)!, workDir: path.join(work, 'ir'), name: `r${r}-${size / GiB}g` });
        try {
          await s.waitForAgent(300_000);
          const ms = Date.now() - t0;
          times.get(size)!.push(ms);
          console.log(`run ${r + 1} instant recovery, ${size / GiB} GiB disk: launch -> guest agent ${ms} ms, load ${l}`);
        } finally {
          await s.stop();
        }
      }
    }
    for (const size of sizes) console.log(`median instant recovery ${String(size / GiB).padStart(2)} GiB disk: ${median(times.get(size)!)} ms (${times.get(size)!.join(', ')})`);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const phase = opt('phase', '');
  if (phase === 'full') return void console.log(JSON.stringify(await bulwarkBackup(opt('repo', ''), opt('socket', ''), opt('export', ''), 'full')));
  if (phase === 'restore') return void console.log(JSON.stringify(await bulwarkRestore(opt('repo', ''), opt('point', ''), opt('to', ''))));
  const runs = Number(opt('runs', '3'));
  if (!args.includes('--skip-disk')) await diskRestore(runs);
  if (!args.includes('--skip-instant')) await instantRecovery(runs);
  console.log(`load average now: ${loadavg().map((l) => l.toFixed(1)).join(' ')}`);
}

await main();
