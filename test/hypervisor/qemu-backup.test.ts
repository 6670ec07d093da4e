// The qemu adapter on a running test guest (TCG): a full backup and three incrementals with guest
// writes between and during them. Every point-in-time image reassembled from the changed blocks is
// compared with nbdcopy's full copy of the same fleecing export (qemu-img compare), checked with
// e2fsck -fn, and its files are read back with debugfs and their checksums compared with what the
// guest computed. One guest serves every case of this file.
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { createServer, type Socket } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QemuHypervisor } from '../../src/hypervisor/qemu/adapter.js';
import type { BackupView, Checkpoint } from '../../src/hypervisor/types.js';
import type { QmpClient } from '../../src/hypervisor/qmp/client.js';
import {
  assertIdenticalImages,
  e2fsckClean,
  nbdcopyReference,
  reassembleDisk,
  sha256InImage,
  startTestGuest,
  type TestGuest,
} from '../fixtures/guest.js';

let guest: TestGuest;
let work: string;
let hv: QemuHypervisor;
const chainId = 'job-q1';

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-qemu-backup-'));
  guest = await startTestGuest({ name: 'qemu-backup-vm' });
  await guest.waitForAgent();
  hv = new QemuHypervisor({ qmpGlob: path.join(guest.dir, 'qmp.sock'), workDir: path.join(work, 'adapter') });
});

afterAll(async () => {
  await guest?.stop();
  if (work) await rm(work, { recursive: true, force: true });
});

/** Writes a file of random data in the guest, syncs, and returns its sha256 as the guest computes it. */
async function guestWrite(file: string, kib: number): Promise<string> {
  const out = await guest.sh(`mkdir -p /srv/data && dd if=/dev/urandom of=${file} bs=1k count=${kib} 2>/dev/null && sync && sha256sum ${file}`);
  return out.split(' ')[0]!;
}

/** Overwrites 64 KiB in the middle of an existing file (in place) and returns its new sha256. */
async function guestOverwrite(file: string, atKiB: number): Promise<string> {
  const out = await guest.sh(`dd if=/dev/urandom of=${file} bs=1k seek=${atKiB} count=64 conv=notrunc 2>/dev/null && sync && sha256sum ${file}`);
  return out.split(' ')[0]!;
}

interface Point {
  image: string;
  checkpoint: Checkpoint;
}

/**
 * Reads the backup view into a reassembled image (on top of `prev`), checks it against nbdcopy's
 * full copy of the same export, then commits. Returns the new point.
 */
async function readAndCheck(view: BackupView, prev: Point | null, label: string): Promise<Point> {
  const disk = view.disks[0]!;
  const image = path.join(work, `${label}.raw`);
  const reference = path.join(work, `${label}.ref.raw`);
  const stats = await reassembleDisk(disk, disk.changes.kind === 'bitmap' ? prev!.image : null, image);
  await nbdcopyReference(disk, reference);
  await view.commit();
  await assertIdenticalImages(image, reference);
  await rm(reference);
  await e2fsckClean(image);
  if (disk.changes.kind === 'bitmap') expect(stats.bytesRead).toBeLessThan(disk.size / 4);
  return { image, checkpoint: view.checkpoint };
}

async function withControl<T>(fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
  const qmp = await guest.control();
  try {
    return await fn(qmp);
  } finally {
    await qmp.close();
  }
}

async function expectFiles(image: string, files: Record<string, string | undefined>): Promise<void> {
  for (const [file, sum] of Object.entries(files)) expect(await sha256InImage(image, file), file).toBe(sum);
}

async function expectNoLeftovers(): Promise<void> {
  const qmp = await guest.control();
  try {
    expect(await qmp.execute('query-block-exports')).toEqual([]);
    expect(await qmp.execute('query-block-jobs')).toEqual([]);
    const nodes = await qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
    expect(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('bulwark-'))).toEqual([]);
  } finally {
    await qmp.close();
  }
  const adapterDir = path.join(work, 'adapter');
  for (const sub of await readdir(adapterDir).catch(() => [] as string[])) {
    expect((await readdir(path.join(adapterDir, sub))).filter((f) => f.endsWith('.qcow2'))).toEqual([]);
  }
}

async function bitmapsOnRoot(): Promise<Array<{ name: string; recording: boolean; inconsistent?: boolean }>> {
  const qmp = await guest.control();
  try {
    const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string; recording: boolean; inconsistent?: boolean }> }>>(
      'query-named-block-nodes',
      { flat: true },
    );
    return (nodes.find((n) => n['node-name'] === 'vda-fmt')?.['dirty-bitmaps'] ?? []).map((b) => ({ name: b.name, recording: b.recording, inconsistent: b.inconsistent ?? false }));
  } finally {
    await qmp.close();
  }
}

const testdata = async (image: string): Promise<void> => {
  for (const [file, sum] of Object.entries(guest.image.manifest.testdata)) {
    expect(await sha256InImage(image, `${guest.image.manifest.testdataDir}/${file}`), file).toBe(sum);
  }
};

/** The latest stored point of the chain (its image and checkpoint). */
let last: Point | null = null;

describe('qemu adapter on a running guest', () => {
  const files: Record<string, string | undefined> = {};

  it('lists the VM with its disk, command line and block graph', async () => {
    const vms = await hv.listVms();
    expect(vms).toHaveLength(1);
    const vm = vms[0]!;
    expect(vm.name).toBe('qemu-backup-vm');
    expect(vm.state).toBe('running');
    expect(vm.disks).toEqual([
      expect.objectContaining({ name: 'vda', nodeName: 'vda-fmt', format: 'qcow2', virtualSize: 128 * 1024 * 1024, imagePath: guest.disks[0]!.path, persistentBitmaps: true }),
    ]);
    expect(vm.configuration.kind).toBe('qemu');
    if (vm.configuration.kind === 'qemu') {
      expect(vm.configuration.commandLine).toContain('-name');
      expect(JSON.stringify(vm.configuration.blockGraph)).toContain('vda-fmt');
    }
  });

  it('full backup, application-consistent, with writes during it', async () => {
    files['/srv/data/before-full.bin'] = await guestWrite('/srv/data/before-full.bin', 1536);
    const view = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: true, chainId, previous: null });
    expect(view.consistency).toBe('application');
    expect(view.freezeWindowMs).not.toBeNull();
    console.log(`full: freeze window ${view.freezeWindowMs} ms`);
    expect(view.disks[0]!.changes).toMatchObject({ kind: 'full', reason: 'no-checkpoint' });
    // Written after the snapshot: must not be in this point, must be in the next.
    files['/srv/data/during-0.bin'] = await guestWrite('/srv/data/during-0.bin', 512);
    last = await readAndCheck(view, null, 'p0');
    await testdata(last.image);
    await expectFiles(last.image, { '/srv/data/before-full.bin': files['/srv/data/before-full.bin'], '/srv/data/during-0.bin': undefined });
    expect(await bitmapsOnRoot()).toEqual([{ name: 'bulwark-job-q1-1', recording: true, inconsistent: false }]);
    await expectNoLeftovers();
  });

  for (const n of [1, 2, 3]) {
    it(`incremental ${n}: only changed blocks, bit-exact to the point in time`, async () => {
      files[`/srv/data/inc-${n}.bin`] = await guestWrite(`/srv/data/inc-${n}.bin`, 700 + 300 * n);
      files['/srv/data/before-full.bin'] = await guestOverwrite('/srv/data/before-full.bin', 64 * n);
      const view = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: true, chainId, previous: last!.checkpoint });
      expect(view.consistency).toBe('application');
      expect(view.disks[0]!.changes).toMatchObject({ kind: 'bitmap', bitmap: `bulwark-job-q1-${n}` });
      console.log(`incremental ${n}: freeze window ${view.freezeWindowMs} ms`);
      const during = `/srv/data/during-${n}.bin`;
      const duringSum = await guestWrite(during, 256);
      last = await readAndCheck(view, last, `p${n}`);
      await expectFiles(last.image, files);
      await expectFiles(last.image, { [during]: undefined });
      files[during] = duringSum;
      expect(await bitmapsOnRoot()).toEqual([{ name: `bulwark-job-q1-${n + 1}`, recording: true, inconsistent: false }]);
      await expectNoLeftovers();
    });
  }

  it('offline mode pauses the VM around the snapshot instead', async () => {
    const view = await hv.beginBackup('qemu-backup-vm', { mode: 'offline', requireGuestProcessing: false, chainId, previous: last!.checkpoint });
    expect(view.pauseWindowMs).not.toBeNull();
    expect(view.freezeWindowMs).toBeNull();
    last = await readAndCheck(view, last, 'p-offline');
    await expectFiles(last.image, files);
    expect((await hv.getVm('qemu-backup-vm')).state).toBe('running');
  });

  it('a deleted bitmap is detected; the disk is read in full with digests and the next incremental works', async () => {
    await withControl((qmp) => qmp.execute('block-dirty-bitmap-remove', { node: 'vda-fmt', name: last!.checkpoint.name }));
    files['/srv/data/after-delete.bin'] = await guestWrite('/srv/data/after-delete.bin', 300);
    const view = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: false, chainId, previous: last!.checkpoint });
    expect(view.disks[0]!.changes).toMatchObject({ kind: 'full', reason: 'bitmap-missing', compareDigests: true });
    expect(view.warnings.join('\n')).toMatch(/bitmap-missing/);
    last = await readAndCheck(view, null, 'p-deleted');
    await expectFiles(last.image, files);
    files['/srv/data/after-delete-2.bin'] = await guestWrite('/srv/data/after-delete-2.bin', 200);
    const next = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: false, chainId, previous: last.checkpoint });
    expect(next.disks[0]!.changes.kind).toBe('bitmap');
    last = await readAndCheck(next, last, 'p-deleted-2');
    await expectFiles(last.image, files);
  });

  it('a resized disk is detected and read in full at its new size', async () => {
    await withControl((qmp) => qmp.execute('block_resize', { 'node-name': 'vda-fmt', size: 160 * 1024 * 1024 }));
    files['/srv/data/after-resize.bin'] = await guestWrite('/srv/data/after-resize.bin', 300);
    const view = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: false, chainId, previous: last!.checkpoint });
    expect(view.disks[0]!.changes).toMatchObject({ kind: 'full', reason: 'disk-resized' });
    expect(view.disks[0]!.size).toBe(160 * 1024 * 1024);
    last = await readAndCheck(view, null, 'p-resized');
    await expectFiles(last.image, files);
    expect(last.checkpoint.disks.vda!.size).toBe(160 * 1024 * 1024);
  });

  it('QEMU killed and restarted: the inconsistent bitmap is detected and the backup is still correct', async () => {
    files['/srv/data/before-kill.bin'] = await guestWrite('/srv/data/before-kill.bin', 400);
    await guest.kill();
    await guest.start();
    await guest.waitForAgent();
    files['/srv/data/after-restart.bin'] = await guestWrite('/srv/data/after-restart.bin', 300);
    const view = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: false, chainId, previous: last!.checkpoint });
    const changes = view.disks[0]!.changes;
    expect(changes.kind).toBe('full');
    if (changes.kind === 'full') {
      expect(['bitmap-inconsistent', 'hypervisor-restarted']).toContain(changes.reason);
      expect(changes.compareDigests).toBe(true);
    }
    expect(view.checkpoint.instance).not.toBe(last!.checkpoint.instance);
    last = await readAndCheck(view, null, 'p-restarted');
    await expectFiles(last.image, files);
    await testdata(last.image);
    // The stale inconsistent bitmap is gone, only the new one tracks.
    expect(await bitmapsOnRoot()).toEqual([{ name: view.checkpoint.name, recording: true, inconsistent: false }]);
  });
});

describe('a disk added to the VM', () => {
  it('gets a full read for that disk only, the other disk stays incremental', async () => {
    const vdb = path.join(work, 'vdb.qcow2');
    const { execFile } = await import('node:child_process');
    const { promisify } = await import('node:util');
    await promisify(execFile)('qemu-img', ['create', '-q', '-f', 'qcow2', vdb, String(24 * 1024 * 1024 + 65536)]);
    await withControl(async (qmp) => {
      await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'vdb-fmt', file: { driver: 'file', filename: vdb } });
      await qmp.execute('device_add', { driver: 'virtio-blk-pci', drive: 'vdb-fmt', id: 'vdb' });
    });
    await guest.sh('i=0; while [ ! -b /dev/vdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; dd if=/dev/urandom of=/dev/vdb bs=64k seek=5 count=20 2>/dev/null && sync');
    const prev = await lastPoint_();
    const view = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: true, chainId, previous: prev.checkpoint });
    expect(view.disks.map((d) => [d.disk.name, d.changes.kind === 'full' ? d.changes.reason : d.changes.kind])).toEqual([
      ['vda', 'bitmap'],
      ['vdb', 'disk-new'],
    ]);
    const images: string[] = [];
    for (const d of view.disks) {
      const image = path.join(work, `added-${d.disk.name}.raw`);
      const reference = path.join(work, `added-${d.disk.name}.ref.raw`);
      const stats = await reassembleDisk(d, d.changes.kind === 'bitmap' ? prev.image : null, image);
      await nbdcopyReference(d, reference);
      await assertIdenticalImages(image, reference);
      await rm(reference);
      if (d.disk.name === 'vdb') expect(stats.bytesRead).toBe(20 * 65536);
      images.push(image);
    }
    await view.commit();
    await e2fsckClean(images[0]!);
    await rm(prev.image);
    last = { image: images[0]!, checkpoint: view.checkpoint };
    expect(Object.keys(view.checkpoint.disks)).toEqual(['vda', 'vdb']);
  });
});

describe('failures leave nothing behind and keep tracking', () => {
  const extra: Record<string, string> = {};

  it('a QMP command error (export name taken) aborts cleanly, and the next incremental still has every change', async () => {
    const before = await bitmapsOnRoot();
    extra['/srv/data/fail-qmp.bin'] = await guestWrite('/srv/data/fail-qmp.bin', 300);
    const lastPoint = await lastPoint_();
    // Another NBD export already uses the name the adapter wants (it joins the running server).
    const qmp = await guest.control();
    const sock = path.join(work, 'intruder.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'intruder', 'node-name': 'vda-fmt', name: `bulwark-${chainId}-vda`, writable: false });
    try {
      await expect(
        hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: false, chainId, previous: lastPoint.checkpoint }),
      ).rejects.toThrow(/block-export-add/);
    } finally {
      await qmp.execute('block-export-del', { id: 'intruder' });
      await new Promise((r) => setTimeout(r, 200));
      await qmp.execute('nbd-server-stop');
      await qmp.close();
    }
    await expectNoLeftovers();
    expect(await bitmapsOnRoot()).toEqual(before);
    await nextIncrementalHas(extra);
  });

  it('an NBD connection dropped mid-read: abort cleans up and keeps tracking', async () => {
    const before = await bitmapsOnRoot();
    extra['/srv/data/fail-nbd.bin'] = await guestWrite('/srv/data/fail-nbd.bin', 2048);
    const lastPoint = await lastPoint_();
    const view = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: false, chainId, previous: lastPoint.checkpoint });
    const disk = view.disks[0]!;
    const qmp = await guest.control();
    let failure: unknown;
    try {
      // Drop every NBD client of the export while the reader runs.
      const read = reassembleDisk(disk, lastPoint.image, path.join(work, 'dropped.raw'), 64 * 1024);
      await qmp.execute('block-export-del', { id: disk.nbd.exportName, mode: 'hard' });
      await read;
    } catch (err) {
      failure = err;
    } finally {
      await qmp.close();
    }
    expect(failure).toBeDefined();
    await view.abort(failure);
    await expectNoLeftovers();
    expect(await bitmapsOnRoot()).toEqual(before);
    await nextIncrementalHas(extra);
  });

  it('an agent that does not answer: required guest processing fails cleanly; otherwise crash-consistent with a warning', async () => {
    const before = await bitmapsOnRoot();
    const lastPoint = await lastPoint_();
    // The VM runs, but its agent channel leads to a socket that accepts and never answers (a
    // paused VM is not asked at all: test/hypervisor/qemu-paused.test.ts).
    const silentSocket = path.join(work, 'silent-qga.sock');
    const accepted: Socket[] = [];
    const silent = createServer((c) => void accepted.push(c.on('error', () => undefined)));
    await new Promise<void>((resolve) => silent.listen(silentSocket, resolve));
    const deaf = new QemuHypervisor({ qmpGlob: path.join(guest.dir, 'qmp.sock'), workDir: path.join(work, 'adapter'), agentSocketFor: () => silentSocket });
    try {
      await expect(
        deaf.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: true, chainId, previous: lastPoint.checkpoint, freezeTimeoutMs: 1500 }),
      ).rejects.toThrow(/could not be frozen/);
      await expectNoLeftovers();
      expect(await bitmapsOnRoot()).toEqual(before);
      const view = await deaf.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: false, chainId, previous: lastPoint.checkpoint, freezeTimeoutMs: 1500 });
      expect(view.consistency).toBe('crash');
      expect(view.freezeWindowMs).toBeNull();
      expect(view.warnings.join('\n')).toMatch(/could not be frozen.*crash-consistent/);
      await view.abort('test: only the fallback was checked');
      expect(accepted.length).toBeGreaterThanOrEqual(2);
    } finally {
      for (const c of accepted) c.destroy();
      await new Promise<void>((resolve) => silent.close(() => resolve()));
    }
    await expectNoLeftovers();
    expect(await bitmapsOnRoot()).toEqual(before);
    // The guest is not left frozen: it can write again.
    extra['/srv/data/after-agent-timeout.bin'] = await guestWrite('/srv/data/after-agent-timeout.bin', 100);
    await nextIncrementalHas(extra);
  });
});

async function lastPoint_(): Promise<Point> {
  if (!last) throw new Error('the chain has no point yet (the cases of the first describe must run first)');
  return last;
}

async function nextIncrementalHas(files: Record<string, string>): Promise<void> {
  const prev = await lastPoint_();
  const view = await hv.beginBackup('qemu-backup-vm', { mode: 'online', requireGuestProcessing: true, chainId, previous: prev.checkpoint });
  expect(view.disks[0]!.changes.kind).toBe('bitmap');
  const disk = view.disks[0]!;
  const image = path.join(work, `after-failure-${view.checkpoint.sequence}.raw`);
  const reference = path.join(work, 'after-failure.ref.raw');
  await reassembleDisk(disk, prev.image, image);
  await nbdcopyReference(disk, reference);
  await view.commit();
  await assertIdenticalImages(image, reference);
  await rm(reference);
  await e2fsckClean(image);
  await expectFiles(image, files);
  await rm(prev.image);
  last = { image, checkpoint: view.checkpoint };
}
