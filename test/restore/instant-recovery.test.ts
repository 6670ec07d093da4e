// Instant VM recovery of the test guest (TCG): one backup (backupVm into a temp repository) shared
// by the cases. (a) the VM boots from the backup (NBD server → nbd node → local qcow2 overlay)
// with the boot settings taken from the point's recorded QEMU command line, and the time from
// launch to the guest agent's answer is logged next to the same guest booted from its own disk
// (a restored copy of the same point); (b) writes inside the recovered VM leave the repository
// unchanged (verify, file hashes, the point's disk SHA-256); (c) migrate moves the VM onto its own
// qcow2, the backup side is closed and the VM keeps running with its data; stop leaves nothing.
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupVm } from '../../src/agent/backup/disk-backup.js';
import { QemuHypervisor } from '../../src/hypervisor/qemu/adapter.js';
import { openRepository, verifyRepository, type Repository } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/restore-disk.js';
import { InstantRecoverySessions, launchFromPoint, startInstantRecovery, type InstantRecoverySession } from '../../src/restore/instant/index.js';
import { sha256InImage, startTestGuest, TestGuest, type TestGuestImage } from '../fixtures/guest.js';
import { guestSh, hashTree } from '../fixtures/guest-agent.js';

const run = promisify(execFile);
const VM = 'ir-vm';
let work: string;
let repo: Repository;
let pointId: string;
let image: TestGuestImage;
let pointSha: string;
let repoHashes: Record<string, string>;
const sessions = new InstantRecoverySessions();
let sessionId = '';
let session: InstantRecoverySession | undefined;
let own: TestGuest | undefined;

async function pointDiskSha(): Promise<string> {
  const to = path.join(work, `sha-${Date.now()}.raw`);
  try {
    return (await restoreDisk({ repository: repo, pointId, disk: 'vda', to, imageDigest: true })).sha256!;
  } finally {
    await rm(to, { force: true });
  }
}

async function waitForConsole(file: string, text: string, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(existsSync(file) && (await readFile(file, 'utf8')).includes(text))) {
    if (Date.now() > deadline) throw new Error(`"${text}" not on ${file} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-ir-'));
  repo = await openRepository(path.join(work, 'repo'), { create: true });
  const src = await startTestGuest({ name: VM });
  try {
    image = src.image;
    await src.waitForAgent();
    const hv = new QemuHypervisor({ qmpGlob: src.qmpSocket, workDir: path.join(work, 'adapter') });
    try {
      const summary = await backupVm({ hypervisor: hv, repository: repo, job: 'nightly', vm: VM, threads: 1 });
      pointId = summary.pointId;
    } finally {
      await hv.close();
    }
  } finally {
    await src.stop();
  }
  pointSha = await pointDiskSha();
  repoHashes = await hashTree(repo.root);
});

afterAll(async () => {
  await sessions.stopAll();
  await own?.stop();
  if (work) await rm(work, { recursive: true, force: true });
});

describe('instant VM recovery of the test guest', () => {
  it('(a) boots from the backup with the recorded boot settings; time to agent logged next to a boot from its own disk', async () => {
    const point = await repo.openRestorePoint(pointId);
    try {
      expect(launchFromPoint(point)).toMatchObject({ kernel: image.vmlinux, initrd: image.initrd, memoryMiB: 256 });
    } finally {
      await point.close();
    }

    // The same guest from its own disk: a qcow2 restored from the same point.
    const ownDir = path.join(work, 'own');
    const ownDisk = path.join(work, 'own-vda.qcow2');
    await restoreDisk({ repository: repo, pointId, disk: 'vda', to: ownDisk, format: 'qcow2' });
    await run('mkdir', ['-p', ownDir]);
    own = new TestGuest(image, ownDir, true, [{ name: 'vda', nodeName: 'vda-fmt', path: ownDisk, format: 'qcow2' }], { name: 'ir-own' });
    let t0 = Date.now();
    await own.start();
    await own.waitForAgent();
    const ownMs = Date.now() - t0;
    await own.stop();
    own = undefined;

    t0 = Date.now();
    sessionId = (await sessions.start({ repository: repo, pointId, workDir: path.join(work, 'ir'), name: 'ir1' })).id;
    session = sessions.get(sessionId);
    await waitForConsole(session.consoleLog, 'bulwark-guest: ready');
    await session.waitForAgent();
    const instantMs = Date.now() - t0;
    console.log(`launch → guest-ping reply: from backup ${instantMs} ms, from own disk ${ownMs} ms (difference ${instantMs - ownMs} ms)`);
    expect(session.state).toBe('running-from-backup');
    expect(session.servingBackup).toBe(true);
    expect(session.pid).toBeGreaterThan(0);
    expect(sessions.list()).toMatchObject([{ id: sessionId, name: 'ir1', vm: VM, pointId, state: 'running-from-backup', runningFromBackup: true }]);
    // The guest sees the backed-up files.
    const sums = await guestSh(session.agentSocket, `cd ${image.manifest.testdataDir} && sha256sum -c SHA256SUMS`);
    expect(sums).toMatch(/OK/);
    expect(sums).not.toMatch(/FAILED/);
  });

  it('a failed start closes everything it opened (QEMU cannot load the kernel; unknown point)', async () => {
    const workDir = path.join(work, 'ir-fail');
    await expect(
      startInstantRecovery({ repository: repo, pointId, workDir, name: 'bad', launch: { kernel: path.join(work, 'no-such-kernel') } }),
    ).rejects.toThrow(/exited at start/);
    expect(await readdir(workDir)).toEqual([]);
    await expect(startInstantRecovery({ repository: repo, pointId: 'nope', workDir, name: 'bad2' })).rejects.toThrow(/no restore point nope/);
    expect(await readdir(workDir)).toEqual([]);
    await expect(startInstantRecovery({ repository: repo, vm: VM, workDir: path.join(work, 'ir'), name: 'ir1', launch: { kernel: image.vmlinux } })).rejects.toThrow(/already exists/);
  });

  it('(b) writes inside the recovered VM never change the repository', async () => {
    const s = session!;
    const written = (await guestSh(s.agentSocket, 'dd if=/dev/urandom of=/srv/ir-written.bin bs=1k count=2048 2>/dev/null && sync && sha256sum /srv/ir-written.bin')).split(' ')[0]!;
    expect(written).toMatch(/^[0-9a-f]{64}$/);
    const overlay = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', s.disks[0]!.overlay])).stdout) as { 'actual-size': number };
    expect(overlay['actual-size']).toBeGreaterThan(2 * 1024 * 1024);
    const report = await verifyRepository(repo.root);
    expect(report.damage).toEqual([]);
    expect(report.ok).toBe(true);
    expect(await hashTree(repo.root)).toEqual(repoHashes);
    expect(await pointDiskSha()).toBe(pointSha);
    (s as { written?: string }).written = written;
  });

  it('(c) migrate: the VM keeps running on its own disk after the backup side is closed; stop leaves nothing', async () => {
    const s = session!;
    const written = (s as { written?: string }).written!;
    const prod = path.join(work, 'prod');
    const nbdSocket = s.nbdSocket;
    const t0 = Date.now();
    const targets = await sessions.migrate(sessionId, prod);
    console.log(`migrate (mirror sync=full of ${s.disks[0]!.size} bytes, pivot, close backup side): ${Date.now() - t0} ms`);
    expect(targets).toEqual({ vda: path.join(prod, 'vda.qcow2') });
    expect(s.state).toBe('migrated');
    expect(s.servingBackup).toBe(false);
    expect(sessions.list()).toMatchObject([{ id: sessionId, state: 'migrated', runningFromBackup: false, disks: [{ name: 'vda', target: targets.vda }] }]);
    expect(existsSync(nbdSocket)).toBe(false);
    expect(existsSync(s.disks[0]!.overlay)).toBe(false);

    await s.waitForAgent(10_000);
    expect((await guestSh(s.agentSocket, 'sha256sum /srv/ir-written.bin')).split(' ')[0]).toBe(written);
    // Reads that never went through the overlay (testdata from the backup) now come from the new disk.
    const alpha = Object.keys(image.manifest.testdata).find((f) => f !== 'SHA256SUMS' && !f.includes(' '))!;
    await guestSh(s.agentSocket, 'sync && echo 3 > /proc/sys/vm/drop_caches');
    expect((await guestSh(s.agentSocket, `sha256sum '${image.manifest.testdataDir}/${alpha}'`)).split(' ')[0]).toBe(image.manifest.testdata[alpha]);
    await guestSh(s.agentSocket, 'echo after-migrate > /srv/after.txt && sync');

    const pid = s.pid!;
    const dir = s.dir;
    await sessions.stop(sessionId);
    session = undefined;
    expect(sessions.list()).toEqual([]);
    expect(() => process.kill(pid, 0)).toThrow();
    expect(existsSync(dir)).toBe(false);
    expect(await readdir(path.join(work, 'ir'))).toEqual([]);

    // The migrated disk holds everything: the backup's files, the writes from both phases.
    await run('qemu-img', ['check', '-q', targets.vda!]);
    const raw = path.join(work, 'prod.raw');
    await run('qemu-img', ['convert', '-q', '-f', 'qcow2', '-O', 'raw', targets.vda!, raw]);
    expect(await sha256InImage(raw, '/srv/ir-written.bin')).toBe(written);
    expect(await sha256InImage(raw, '/srv/after.txt')).toBe(createHash('sha256').update('after-migrate\n').digest('hex'));
    // And the repository is still untouched.
    expect(await hashTree(repo.root)).toEqual(repoHashes);
  });
});
