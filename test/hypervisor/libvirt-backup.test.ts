// The libvirt adapter on a transient TCG domain booted from the test guest: a full backup and three
// incrementals (pull-mode backup-begin with checkpoints), with guest writes between and during
// them; each reassembled image is compared with nbdcopy's full copy of the same export, checked
// with e2fsck -fn and its files read back with debugfs. Then an aborted backup: its checkpoint is
// gone, no job or file is left, and the next incremental still holds every change.
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LibvirtHypervisor } from '../../src/hypervisor/libvirt/adapter.js';
import type { BackupView, Checkpoint } from '../../src/hypervisor/types.js';
import { assertIdenticalImages, e2fsckClean, ensureTestGuest, nbdcopyReference, reassembleDisk, sha256InImage } from '../fixtures/guest.js';
import { ensureLibvirtd, startTestDomain, virsh, type LibvirtDaemon, type TestDomain } from '../fixtures/libvirt.js';

let daemon: LibvirtDaemon | undefined;
let dom: TestDomain | undefined;
let work: string;
let adapterDir: string;
let hv: LibvirtHypervisor;
const chainId = 'job-lv1';
const domName = `bulwark-lv-${process.pid}`;

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-libvirt-backup-'));
  adapterDir = `/var/lib/libvirt/images/bulwark-backup-test-${process.pid}`;
  daemon = await ensureLibvirtd();
  dom = await startTestDomain({ name: domName });
  await dom.waitForAgent();
  hv = new LibvirtHypervisor({ workDir: adapterDir });
});

afterAll(async () => {
  await dom?.stop();
  await daemon?.stop();
  if (work) await rm(work, { recursive: true, force: true });
  if (adapterDir) await rm(adapterDir, { recursive: true, force: true });
});

async function guestWrite(file: string, kib: number): Promise<string> {
  const out = await dom!.sh(`mkdir -p /srv/data && dd if=/dev/urandom of=${file} bs=1k count=${kib} 2>/dev/null && sync && sha256sum ${file}`);
  return out.split(' ')[0]!;
}

interface Point {
  image: string;
  checkpoint: Checkpoint;
}

async function readAndCheck(view: BackupView, prev: Point | null, label: string): Promise<Point> {
  const disk = view.disks[0]!;
  const image = path.join(work, `${label}.raw`);
  const reference = path.join(work, `${label}.ref.raw`);
  await reassembleDisk(disk, disk.changes.kind === 'bitmap' ? prev!.image : null, image);
  await nbdcopyReference(disk, reference);
  await view.commit();
  await assertIdenticalImages(image, reference);
  await rm(reference);
  await e2fsckClean(image);
  return { image, checkpoint: view.checkpoint };
}

async function expectFiles(image: string, files: Record<string, string | undefined>): Promise<void> {
  for (const [file, sum] of Object.entries(files)) expect(await sha256InImage(image, file), file).toBe(sum);
}

async function checkpoints(): Promise<string[]> {
  return (await virsh(['checkpoint-list', domName, '--name'])).split('\n').map((s) => s.trim()).filter(Boolean);
}

async function expectNoLeftovers(): Promise<void> {
  expect(await virsh(['domjobinfo', domName])).toMatch(/Job type:\s+None/);
  expect(await readdir(adapterDir).catch(() => [])).toEqual([]);
}

describe('libvirt adapter on a running domain', () => {
  const files: Record<string, string | undefined> = {};
  let last: Point | null = null;

  it('lists the domain with its disk and XML', async () => {
    const vm = await hv.getVm(domName);
    expect(vm.state).toBe('running');
    expect(vm.disks).toEqual([expect.objectContaining({ name: 'vda', targetDev: 'vda', format: 'qcow2', virtualSize: 128 * 1024 * 1024, imagePath: dom!.diskPath })]);
    expect(vm.configuration.kind === 'libvirt' && vm.configuration.domainXml).toContain(`<name>${domName}</name>`);
    expect((await hv.listVms()).map((v) => v.name)).toContain(domName);
  });

  it('full backup, application-consistent, with a write during it', async () => {
    files['/srv/data/lv-before.bin'] = await guestWrite('/srv/data/lv-before.bin', 1024);
    const view = await hv.beginBackup(domName, { mode: 'online', requireGuestProcessing: true, chainId, previous: null });
    expect(view.consistency).toBe('application');
    console.log(`libvirt full: freeze window ${view.freezeWindowMs} ms`);
    expect(view.disks[0]!.changes).toMatchObject({ kind: 'full', reason: 'no-checkpoint' });
    files['/srv/data/lv-during-0.bin'] = await guestWrite('/srv/data/lv-during-0.bin', 256);
    last = await readAndCheck(view, null, 'lv0');
    const image = await ensureTestGuest();
    for (const [f, sum] of Object.entries(image.manifest.testdata)) expect(await sha256InImage(last.image, `/srv/testdata/${f}`), f).toBe(sum);
    await expectFiles(last.image, { '/srv/data/lv-before.bin': files['/srv/data/lv-before.bin'], '/srv/data/lv-during-0.bin': undefined });
    expect(await checkpoints()).toEqual(['bulwark-job-lv1-1']);
    await expectNoLeftovers();
  });

  for (const n of [1, 2, 3]) {
    it(`incremental ${n} from the checkpoint's bitmap`, async () => {
      files[`/srv/data/lv-inc-${n}.bin`] = await guestWrite(`/srv/data/lv-inc-${n}.bin`, 500 + 200 * n);
      const view = await hv.beginBackup(domName, { mode: 'online', requireGuestProcessing: true, chainId, previous: last!.checkpoint });
      expect(view.disks[0]!.changes).toMatchObject({ kind: 'bitmap', bitmap: `bulwark-job-lv1-${n}` });
      const during = `/srv/data/lv-during-${n}.bin`;
      const duringSum = await guestWrite(during, 256);
      last = await readAndCheck(view, last, `lv${n}`);
      await expectFiles(last.image, files);
      await expectFiles(last.image, { [during]: undefined });
      files[during] = duringSum;
      expect(await checkpoints()).toEqual([`bulwark-job-lv1-${n + 1}`]);
      await expectNoLeftovers();
    });
  }

  it('an aborted backup removes its checkpoint, job and files; the next incremental has every change', async () => {
    files['/srv/data/lv-before-abort.bin'] = await guestWrite('/srv/data/lv-before-abort.bin', 300);
    const view = await hv.beginBackup(domName, { mode: 'online', requireGuestProcessing: false, chainId, previous: last!.checkpoint });
    expect(await checkpoints()).toHaveLength(2);
    await view.abort(new Error('test: the target failed'));
    expect(await checkpoints()).toEqual([last!.checkpoint.name]);
    await expectNoLeftovers();
    files['/srv/data/lv-after-abort.bin'] = await guestWrite('/srv/data/lv-after-abort.bin', 300);
    const next = await hv.beginBackup(domName, { mode: 'offline', requireGuestProcessing: false, chainId, previous: last!.checkpoint });
    expect(next.disks[0]!.changes.kind).toBe('bitmap');
    expect(next.pauseWindowMs).not.toBeNull();
    last = await readAndCheck(next, last, 'lv-after-abort');
    await expectFiles(last.image, files);
    expect((await hv.getVm(domName)).state).toBe('running');
  });

  it('a deleted checkpoint is detected and the disk read in full', async () => {
    await virsh(['checkpoint-delete', domName, last!.checkpoint.name]);
    const view = await hv.beginBackup(domName, { mode: 'online', requireGuestProcessing: false, chainId, previous: last!.checkpoint });
    expect(view.disks[0]!.changes).toMatchObject({ kind: 'full', reason: 'bitmap-missing', compareDigests: true });
    last = await readAndCheck(view, null, 'lv-deleted');
    await expectFiles(last.image, files);
  });
});
