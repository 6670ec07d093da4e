// By hand: instant recovery boot-to-agent against the same guest booted from its own disk, in the
// same run. The test guest (TCG) is backed up once into a temp repository; then, alternating,
// RUNS times each: (own) a qcow2 restored from that point booted with the same kernel, initrd and
// command line, and (instant) startInstantRecovery of the point. Each time is QEMU launch → the
// guest agent's guest-ping reply. Prints every run and the medians.
//
//   npx tsx bench/recovery/instant-boot.ts [RUNS=3]
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { backupVm } from '../../src/agent/backup/disk-backup.js';
import { QemuHypervisor } from '../../src/hypervisor/qemu/adapter.js';
import { openRepository } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/restore-disk.js';
import { startInstantRecovery } from '../../src/restore/instant/index.js';
import { startTestGuest, TestGuest } from '../../test/fixtures/guest.js';

const runs = Number(process.argv[2] ?? 3);
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

async function main(): Promise<void> {
  const work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-bench-ir-'));
  try {
    const repo = await openRepository(path.join(work, 'repo'), { create: true });
    const src = await startTestGuest({ name: 'bench-ir' });
    let pointId: string;
    try {
      await src.waitForAgent();
      const hv = new QemuHypervisor({ qmpGlob: src.qmpSocket, workDir: path.join(work, 'adapter') });
      try {
        pointId = (await backupVm({ hypervisor: hv, repository: repo, job: 'bench', vm: 'bench-ir' })).pointId;
      } finally {
        await hv.close();
      }
    } finally {
      await src.stop();
    }
    const image = src.image;
    const ownDisk = path.join(work, 'own-vda.qcow2');
    await restoreDisk({ repository: repo, pointId, disk: 'vda', to: ownDisk, format: 'qcow2' });
    const own: number[] = [];
    const instant: number[] = [];
    /** CPU time this process (NBD server, repository reads) spent during each instant boot. */
    const serverCpu: number[] = [];
    /** From the call to QEMU's spawn: opening the point, the NBD server, the overlays. */
    const prelaunch: number[] = [];
    for (let i = 0; i < runs; i++) {
      const dir = path.join(work, `own-${i}`);
      await mkdir(dir);
      const g = new TestGuest(image, dir, true, [{ name: 'vda', nodeName: 'vda-fmt', path: ownDisk, format: 'qcow2' }], { name: 'bench-own' });
      let t0 = Date.now();
      try {
        await g.start();
        await g.waitForAgent();
        own.push(Date.now() - t0);
      } finally {
        await g.stop();
      }
      t0 = Date.now();
      const cpu0 = process.cpuUsage();
      const s = await startInstantRecovery({ repository: repo, pointId, workDir: path.join(work, 'ir'), name: `bench-ir-${i}` });
      try {
        // As the own-disk guest does: ask the agent once the guest says it started it.
        while (!(await readFile(s.consoleLog, 'utf8').catch(() => '')).includes('bulwark-guest: ready')) await new Promise((r) => setTimeout(r, 50));
        await s.waitForAgent();
        instant.push(Date.now() - t0);
        const cpu = process.cpuUsage(cpu0);
        serverCpu.push(Math.round((cpu.user + cpu.system) / 1000));
        prelaunch.push(s.launchedAt - t0);
      } finally {
        await s.stop();
      }
      console.log(`run ${i + 1}: own disk ${own.at(-1)} ms, instant recovery ${instant.at(-1)} ms (of which before QEMU's launch ${prelaunch.at(-1)} ms; NBD server side CPU ${serverCpu.at(-1)} ms)`);
    }
    const mo = median(own);
    const mi = median(instant);
    console.log(`median of ${runs}: own disk ${mo} ms, instant recovery ${mi} ms, difference ${mi - mo} ms (x${(mi / mo).toFixed(2)})`);
    console.log(`load average at the end: ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
