// The CBT reader alone (run by hand): how fast the source side of a backup reads the bench disk
// over NBD from qemu-storage-daemon, with no repository writer behind it (blocks are dropped as
// soon as they arrive). Separates "the reader is slow" from "the reader waits for CPU the encoders
// take". Same disk and increment as bench/backup/run.ts.
//   npx tsx bench/backup/reader.ts [--runs 3] [--variants 'c8x4,c32x2'] [--phases full,incremental] [--block-size 262144]
// A variant cNxM reads with N blocks in flight over M NBD connections. Each line also gives the CPU
// qemu-storage-daemon spent serving the pass (utime + stime of its process): the source's own share.
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { QsdFixture } from '../../test/fixtures/qsd.js';
import { readBackupDisk } from '../../src/hypervisor/cbt/reader.js';
import { dirtyBitmapContext } from '../../src/hypervisor/nbd/protocol.js';
import type { BackupDiskView, DiskChanges } from '../../src/hypervisor/types.js';
import { ensureMixedQcow2 } from '../lib/backup-tools.js';
import { MIXED_DISK_SIZE } from '../lib/mixed-disk.js';
import { scatteredWrites } from '../source/disk.js';

const exec = promisify(execFile);
const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** CPU seconds (user + system) a process has used so far, from /proc. */
async function processCpu(pid: number): Promise<number> {
  const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).replace(/^.*\) /, '').split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

async function readAll(socketPath: string, exportName: string, changes: DiskChanges, concurrency: number, connections: number): Promise<{ s: number; cpu: number; mib: number; blocks: number }> {
  const view = { disk: { name: 'vda', targetDev: 'vda', imagePath: '', format: 'qcow2', virtualSize: MIXED_DISK_SIZE }, nbd: { socketPath, exportName }, size: MIXED_DISK_SIZE, changes } as unknown as BackupDiskView;
  let stats = { bytesRead: 0, dataBlocks: 0 };
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  for await (const b of readBackupDisk(view, { blockSize: Number(opt('block-size', String(1 << 20))), concurrency, connections, reuseBuffers: true, onStats: (s) => void (stats = s) })) void b;
  const cpu = process.cpuUsage(c0);
  return { s: (performance.now() - t0) / 1000, cpu: (cpu.user + cpu.system) / 1e6, mib: stats.bytesRead / 2 ** 20, blocks: stats.dataBlocks };
}

async function main(): Promise<void> {
  const runs = Number(opt('runs', '3'));
  const variants = opt('variants', 'c8x4').split(',').map((v) => {
    const m = /^c(\d+)x(\d+)$/.exec(v);
    if (!m) throw new Error(`bad variant ${v} (want cNxM)`);
    return { name: v, concurrency: Number(m[1]), connections: Number(m[2]) };
  });
  const phases = opt('phases', 'full,incremental').split(',');
  const base = await ensureMixedQcow2();
  const work = await mkdtemp(path.join(tmpdir(), 'bulwark-bench-reader-'));
  const overlay = path.join(work, 'disk.qcow2');
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
  const qsd = await QsdFixture.start({ image: overlay });
  try {
    await qsd.qmp.execute('block-dirty-bitmap-add', { node: qsd.nodeName, name: 'bm0', persistent: false });
    const writes = scatteredWrites(MIXED_DISK_SIZE);
    await qsd.addExport('live', { writable: true });
    for (let i = 0; i < writes.length; i += 200) await qsd.qemuIo('live', ...writes.slice(i, i + 200).map((w) => `write -P ${w.fill} ${w.offset} ${w.length}`));
    await qsd.removeExport('live');
    await qsd.qmp.execute('block-dirty-bitmap-disable', { node: qsd.nodeName, name: 'bm0' });
    await qsd.addExport('inc', { bitmaps: ['bm0'] });
    const changes: Record<string, DiskChanges> = {
      full: { kind: 'full', reason: 'no-checkpoint', detail: 'bench', compareDigests: false },
      incremental: { kind: 'bitmap', bitmap: 'bm0', context: dirtyBitmapContext('bm0') },
    };
    const results = new Map<string, Array<{ s: number; cpu: number; mib: number; blocks: number; qsd: number }>>();
    for (let r = 0; r < runs; r++) {
      for (const phase of phases) {
        for (const v of r % 2 === 0 ? variants : [...variants].reverse()) {
          const q0 = await processCpu(qsd.pid);
          const res = { ...(await readAll(qsd.nbdSocket, 'inc', changes[phase]!, v.concurrency, v.connections)), qsd: (await processCpu(qsd.pid)) - q0 };
          const key = `${phase} ${v.name}`;
          results.set(key, [...(results.get(key) ?? []), res]);
          console.log(`run ${r + 1} ${key.padEnd(20)} ${res.s.toFixed(2)} s, ${res.cpu.toFixed(2)} CPU-s, ${res.mib.toFixed(0)} MiB in ${res.blocks} blocks, qemu-storage-daemon ${res.qsd.toFixed(2)} CPU-s`);
        }
      }
    }
    console.log(`\nmedians of ${runs}:`);
    for (const [key, xs] of results) {
      const s = median(xs.map((x) => x.s));
      console.log(`${key.padEnd(20)} ${s.toFixed(2)} s  ${median(xs.map((x) => x.cpu)).toFixed(2)} CPU-s  ${(xs[0]!.mib / 1024 / s).toFixed(2)} GiB/s of data read, qemu-storage-daemon ${median(xs.map((x) => x.qsd)).toFixed(2)} CPU-s`);
    }
  } finally {
    await qsd.stop();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
