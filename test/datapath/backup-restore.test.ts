// The one-host data path on a running test guest (TCG): backupVm into a temporary repository —
// full, then incremental after guest writes — and restoreDisk of each point, bit-exact (qemu-img
// compare) to nbdcopy's copy of the same fleecing view taken during the backup, e2fsck clean, the
// guest's files right (debugfs). A failure mid-backup (the NBD export removed, or the abort
// signal) leaves no visible restore point and the next backup still has every change.
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupVm, chainIdFor, previousCheckpoint, type BackupVmOptions, type BackupVmSummary } from '../../src/agent/backup/disk-backup.js';
import { LocalDataPathExecutor } from '../../src/agent/backup/executor.js';
import { JobEngine } from '../../src/server/jobs/engine.js';
import { InMemoryJobEngineStore } from '../../src/server/jobs/memory-store.js';
import { QemuHypervisor } from '../../src/hypervisor/qemu/adapter.js';
import type { BackupView } from '../../src/hypervisor/types.js';
import { openRepository, type Repository } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/restore-disk.js';
import { assertIdenticalImages, e2fsckClean, nbdcopyReference, sha256InImage, startTestGuest, type TestGuest } from '../fixtures/guest.js';

const run = promisify(execFile);
let guest: TestGuest;
let work: string;
let hv: QemuHypervisor;
let repo: Repository;
const VM = 'datapath-vm';
const JOB = 'nightly';

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-datapath-'));
  guest = await startTestGuest({ name: VM });
  await guest.waitForAgent();
  hv = new QemuHypervisor({ qmpGlob: path.join(guest.dir, 'qmp.sock'), workDir: path.join(work, 'adapter') });
  repo = await openRepository(path.join(work, 'repo'), { create: true });
});

afterAll(async () => {
  await hv?.close();
  await guest?.stop();
  if (work) await rm(work, { recursive: true, force: true });
});

async function guestWrite(file: string, kib: number): Promise<string> {
  const out = await guest.sh(`mkdir -p /srv/data && dd if=/dev/urandom of=${file} bs=1k count=${kib} 2>/dev/null && sync && sha256sum ${file}`);
  return out.split(' ')[0]!;
}

/** Runs a backup and keeps nbdcopy's copy of each disk's view (the reference at that instant). */
async function backup(label: string, extra: Partial<BackupVmOptions> = {}): Promise<{ summary: BackupVmSummary; refs: Record<string, string>; logs: string[] }> {
  const refs: Record<string, string> = {};
  const logs: string[] = [];
  const summary = await backupVm({
    hypervisor: hv,
    repository: repo,
    job: JOB,
    vm: VM,
    requireGuestProcessing: true,
    threads: 1,
    onLog: (level, message) => logs.push(`${level}: ${message}`),
    onView: async (view: BackupView) => {
      for (const d of view.disks) {
        refs[d.disk.name] = path.join(work, `${label}-${d.disk.name}.ref.raw`);
        await nbdcopyReference(d, refs[d.disk.name]!);
      }
    },
    ...extra,
  });
  return { summary, refs, logs };
}

async function restoreAndCheck(pointId: string, refs: Record<string, string>, files: Record<string, string | undefined>): Promise<void> {
  for (const [disk, ref] of Object.entries(refs)) {
    const to = path.join(work, `${pointId}-${disk}.raw`);
    const r = await restoreDisk({ repository: repo, pointId, disk, to, imageDigest: true });
    await assertIdenticalImages(to, ref);
    const { stdout } = await run('sha256sum', [ref]);
    expect(r.sha256).toBe(stdout.split(' ')[0]);
    await e2fsckClean(to);
    for (const [file, sum] of Object.entries(files)) expect(await sha256InImage(to, file), file).toBe(sum);
    for (const [file, sum] of Object.entries(guest.image.manifest.testdata)) {
      expect(await sha256InImage(to, `${guest.image.manifest.testdataDir}/${file}`), file).toBe(sum);
    }
    await rm(to);
  }
}

async function visibleFilesOfRepo(): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      if (e.isDirectory()) await walk(path.join(d, e.name));
      else out.push(e.name);
    }
  };
  await walk(repo.root);
  return out.sort();
}

describe('backupVm + restoreDisk on a running guest', () => {
  const files: Record<string, string | undefined> = {};
  const points: string[] = [];

  it('full backup: application-consistent, restored bit-exact', async () => {
    files['/srv/data/a.bin'] = await guestWrite('/srv/data/a.bin', 1536);
    const progress: number[] = [];
    const { summary, refs, logs } = await backup('p0', { onProgress: (p) => progress.push(p.bytesRead) });
    expect(summary.kind).toBe('full');
    expect(summary.consistency).toBe('application');
    expect(summary.freezeWindowMs).not.toBeNull();
    expect(summary.disks.map((d) => [d.name, d.read, d.fullReason])).toEqual([['vda', 'full', 'no-checkpoint']]);
    expect(summary.disks[0]!.bytesRead).toBeGreaterThan(0);
    expect(summary.disks[0]!.bytesStored).toBeGreaterThan(0);
    expect(progress.at(-1)).toBe(summary.disks[0]!.bytesRead);
    expect(logs.join('\n')).toMatch(/committed/);
    expect((await repo.listRestorePoints({ job: JOB, vm: VM })).map((p) => p.id)).toEqual([summary.pointId]);
    points.push(summary.pointId);
    console.log(`full: read ${summary.disks[0]!.bytesRead} stored ${summary.disks[0]!.bytesStored} in ${summary.durationMs} ms, freeze ${summary.freezeWindowMs} ms`);
    await restoreAndCheck(summary.pointId, refs, files);
  });

  it('incremental after guest writes: only changed blocks, restored bit-exact (raw and qcow2)', async () => {
    files['/srv/data/b.bin'] = await guestWrite('/srv/data/b.bin', 900);
    files['/srv/data/a.bin'] = (await guest.sh('dd if=/dev/urandom of=/srv/data/a.bin bs=1k seek=128 count=64 conv=notrunc 2>/dev/null && sync && sha256sum /srv/data/a.bin')).split(' ')[0]!;
    const { summary, refs } = await backup('p1');
    expect(summary.kind).toBe('incremental');
    const d = summary.disks[0]!;
    expect(d.read).toBe('bitmap');
    expect(d.bytesRead).toBeLessThan(d.size / 4);
    expect(d.bytesChanged).toBeGreaterThan(0);
    points.push(summary.pointId);
    console.log(`incremental: read ${d.bytesRead} changed ${d.bytesChanged} stored ${d.bytesStored} in ${summary.durationMs} ms`);
    await restoreAndCheck(summary.pointId, refs, files);
    const q = path.join(work, 'p1.qcow2');
    const r = await restoreDisk({ repository: repo, pointId: summary.pointId, disk: 'vda', to: q, format: 'qcow2' });
    expect(r.format).toBe('qcow2');
    await run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', q, refs.vda!]);
    expect((await run('qemu-img', ['info', '--output=json', q])).stdout).toMatch(/"format": "qcow2"/);
    await expect(restoreDisk({ repository: repo, pointId: summary.pointId, disk: 'vda', to: q })).rejects.toThrow(/already exists/);
    await rm(q);
  });

  it('a failure mid-backup leaves no restore point; the next backup has every change', async () => {
    const before = await visibleFilesOfRepo();
    files['/srv/data/c.bin'] = await guestWrite('/srv/data/c.bin', 700);
    // 1. The NBD export disappears while the backup reads.
    const qmp = await guest.control();
    try {
      await expect(
        backup('fail1', {
          onView: async (view) => {
            await qmp.execute('block-export-del', { id: view.disks[0]!.nbd.exportName, mode: 'hard' });
          },
        }),
      ).rejects.toThrow();
    } finally {
      await qmp.close();
    }
    // 2. The session is stopped (abort signal) once the view exists.
    const stop = new AbortController();
    await expect(backup('fail2', { signal: stop.signal, onView: async () => stop.abort(new Error('session stopped')) })).rejects.toThrow(/stopped/);
    // 3. Stopped in the middle of streaming an active full (after its first blocks were written).
    const midway = new AbortController();
    let progressCalls = 0;
    await expect(
      backup('fail3', {
        full: true,
        concurrency: 2,
        signal: midway.signal,
        onProgress: (p) => {
          progressCalls++;
          if (p.bytesRead > 0) midway.abort(new Error('session stopped midway'));
        },
      }),
    ).rejects.toThrow(/stopped midway/);
    expect(progressCalls).toBeGreaterThan(0);
    expect((await repo.listRestorePoints({ job: JOB, vm: VM })).map((p) => p.id)).toEqual(points);
    expect(await visibleFilesOfRepo()).toEqual(before);
    const { summary, refs } = await backup('p2');
    expect(summary.kind).toBe('incremental');
    expect(summary.disks[0]!.read).toBe('bitmap');
    await restoreAndCheck(summary.pointId, refs, files);
  });

  it('the job engine through LocalDataPathExecutor: a VM with two disks, one task per disk, one restore point', async () => {
    // A second disk, hot-added: it is new to the chain (full read into the increment), vda stays incremental.
    const vdb = path.join(work, 'vdb.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', vdb, String(24 * 1024 * 1024)]);
    const qmp = await guest.control();
    try {
      await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'vdb-fmt', discard: 'unmap', file: { driver: 'file', filename: vdb, discard: 'unmap' } });
      await qmp.execute('device_add', { driver: 'virtio-blk-pci', drive: 'vdb-fmt', id: 'vdb' });
    } finally {
      await qmp.close();
    }
    const vdbSum = (
      await guest.sh('i=0; while [ ! -b /dev/vdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; dd if=/dev/urandom of=/dev/vdb bs=64k seek=5 count=20 2>/dev/null && sync && sha256sum /dev/vdb')
    ).split(' ')[0]!;
    files['/srv/data/d.bin'] = await guestWrite('/srv/data/d.bin', 300);

    const executor = new LocalDataPathExecutor({
      hosts: async () => [{ kind: 'qemu', qmpGlob: path.join(guest.dir, 'qmp.sock'), workDir: path.join(work, 'adapter') }],
      repositoryPath: async () => repo.root,
    });
    const store = new InMemoryJobEngineStore();
    store.putJob({ id: 'j1', name: JOB, vms: [VM], repository: 'local', retry: { count: 0, waitSeconds: 0 }, settings: { requireGuestProcessing: true } });
    const engine = new JobEngine({ store, executor, disks: executor, progressIntervalMs: 0 });
    try {
      const { sessionId } = await engine.runNow(JOB);
      const state = await engine.waitForEnd(sessionId);
      const logs = (store.logs.get(sessionId) ?? []).map((l) => `${l.level}: ${l.message}`).join('\n');
      expect(state, logs).toBe('success');
      const tasks = await store.listTasks(sessionId);
      expect(tasks.map((t) => [t.disk, t.state]).sort()).toEqual([['vda', 'success'], ['vdb', 'success']]);
      for (const t of tasks) expect(t.progress.bytesRead, t.disk).toBeGreaterThan(0);
      expect(logs).toMatch(/vdb: full read \(disk-new/);
      const all = await repo.listRestorePoints({ job: JOB, vm: VM });
      expect(all).toHaveLength(points.length + 2); // + p2 of the previous case, + this one
      const point = all.at(-1)!;
      expect(point.kind).toBe('incremental');
      expect(point.disks.map((d) => d.name)).toEqual(['vda', 'vdb']);
      const toB = path.join(work, 'engine-vdb.raw');
      const rb = await restoreDisk({ repository: repo, pointId: point.id, disk: 'vdb', to: toB, imageDigest: true });
      expect(rb.sha256).toBe(vdbSum);
      const toA = path.join(work, 'engine-vda.raw');
      await restoreDisk({ repository: repo, pointId: point.id, disk: 'vda', to: toA });
      await e2fsckClean(toA);
      for (const [file, sum] of Object.entries(files)) expect(await sha256InImage(toA, file), file).toBe(sum);
      await rm(toA);
      await rm(toB);
    } finally {
      await engine.shutdown();
      await executor.close();
    }
  });

  it('a deleted bitmap: the disk is read in full into an increment, unchanged blocks are not stored, bit-exact', async () => {
    const prev = (await previousCheckpoint(repo, JOB, VM, chainIdFor(JOB, VM)))!;
    const qmp = await guest.control();
    try {
      await qmp.execute('block-dirty-bitmap-remove', { node: 'vda-fmt', name: prev.checkpoint.name });
      await qmp.execute('block-dirty-bitmap-remove', { node: 'vdb-fmt', name: prev.checkpoint.name });
    } finally {
      await qmp.close();
    }
    files['/srv/data/e.bin'] = await guestWrite('/srv/data/e.bin', 400);
    await guest.sh('rm -f /srv/data/b.bin && sync && fstrim / 2>/dev/null; true');
    files['/srv/data/b.bin'] = undefined;
    // Part of vdb's data is discarded: holes now where the parent point has data. An increment
    // must record them as zeroes (a block not given in an increment means "unchanged").
    await guest.sh('blkdiscard -o 1048576 -l 1048576 /dev/vdb && sync');
    const { summary, refs } = await backup('p-deleted');
    expect(summary.kind).toBe('incremental');
    const byName = Object.fromEntries(summary.disks.map((d) => [d.name, d]));
    expect(byName.vda).toMatchObject({ read: 'full', fullReason: 'bitmap-missing', comparedWithParent: true });
    expect(byName.vdb).toMatchObject({ read: 'full', fullReason: 'bitmap-missing', comparedWithParent: true });
    expect(byName.vda!.unchangedBlocks).toBeGreaterThan(0);
    expect(summary.warnings.join('\n')).toMatch(/bitmap-missing|missing/);
    console.log(`bitmap missing: vda read ${byName.vda!.bytesRead}, stored ${byName.vda!.bytesStored}, ${byName.vda!.unchangedBlocks} blocks unchanged`);
    await restoreAndCheck(summary.pointId, { vda: refs.vda! }, files);
    const to = path.join(work, 'deleted-vdb.raw');
    await restoreDisk({ repository: repo, pointId: summary.pointId, disk: 'vdb', to });
    await assertIdenticalImages(to, refs.vdb!);
    await rm(to);
  });
});
