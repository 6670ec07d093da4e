// A full guest OS booted by SeaBIOS from its disk under instant recovery (real QEMU, TCG): the
// BIOS-bootable test guest (test/fixtures/bios-guest.ts: extlinux on the test guest's disk) is
// written as a restore point with the recorded command line of a plain-QEMU BIOS VM (no -kernel;
// its disk on virtio-blk with bootindex=1, the guest agent channel). Instant recovery takes the
// boot settings and hardware from that configuration: SeaBIOS boots the backup's disk through the
// overlay and the NBD export, extlinux loads the kernel, and the guest agent answers; the guest's
// /proc/cmdline is extlinux's, and its test files match their checksums. The repository is
// unchanged. One guest boot (~20-40 s under TCG).
import { execFile } from 'node:child_process';
import { open, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodePointMetadata, POINT_METADATA_FORMAT } from '../../src/agent/backup/point-metadata.js';
import type { DiskBlock } from '../../src/disk/types.js';
import { QgaClient } from '../../src/hypervisor/qga/client.js';
import { openRepository, verifyRepository, type Repository } from '../../src/repository/index.js';
import { launchFromPoint, startInstantRecovery, type InstantRecoverySession } from '../../src/restore/instant/index.js';
import { BIOS_GUEST_APPEND, ensureBiosGuest, type BiosGuestImage } from '../fixtures/bios-guest.js';
import { hashTree } from '../fixtures/guest-agent.js';

const run = promisify(execFile);
const BS = 1024 * 1024;
let work: string;
let repo: Repository;
let pointId: string;
let image: BiosGuestImage;
let repoHashes: Record<string, string>;
let session: InstantRecoverySession | undefined;

beforeAll(async () => {
  image = await ensureBiosGuest();
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-irg-'));
  repo = await openRepository(path.join(work, 'repo'), { create: true });
  const raw = path.join(work, 'disk.raw');
  await run('qemu-img', ['convert', '-q', '-f', 'qcow2', '-O', 'raw', image.rootImage, raw]);
  const fh = await open(raw, 'r');
  try {
    const size = (await fh.stat()).size;
    const vmDir = path.join(work, 'vms', 'bios-guest');
    const commandLine = [
      'qemu-system-x86_64', '-name', 'bios-guest', '-machine', 'pc', '-accel', 'tcg', '-m', '256', '-smp', '1', '-nodefaults', '-display', 'none',
      '-blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'vda-fmt', file: { driver: 'file', filename: path.join(vmDir, 'vda.img') } }),
      '-device', 'virtio-blk-pci,drive=vda-fmt,id=vda,bootindex=1',
      '-device', 'virtio-serial-pci', '-chardev', `socket,id=qga0,path=${path.join(vmDir, 'qga.sock')},server=on,wait=off`,
      '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
      '-serial', `file:${path.join(vmDir, 'console.log')}`, '-qmp', `unix:${path.join(vmDir, 'qmp.sock')},server=on,wait=off`,
    ];
    const vmConfig = encodePointMetadata({
      format: POINT_METADATA_FORMAT,
      hypervisor: 'qemu',
      vm: { name: 'bios-guest', id: path.join(vmDir, 'qmp.sock') },
      configuration: { kind: 'qemu', commandLine, blockGraph: [] },
      checkpoint: { chainId: 'g1', name: 'g1-0', time: new Date().toISOString(), disks: { vda: size } } as never,
      consistency: 'crash',
      freezeWindowMs: null,
      warnings: [],
    });
    const zero = Buffer.alloc(BS);
    async function* blocks(): AsyncGenerator<DiskBlock> {
      for (let i = 0; i * BS < size; i++) {
        const buf = Buffer.alloc(Math.min(BS, size - i * BS));
        await fh.read(buf, 0, buf.length, i * BS);
        yield { index: i, data: buf.equals(zero.subarray(0, buf.length)) ? null : buf };
      }
    }
    const w = await repo.startRestorePoint({ job: 'j', vm: 'bios-guest', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size }], vmConfig });
    await w.writeDisk('vda', blocks());
    pointId = (await w.commit()).id;
  } finally {
    await fh.close();
    await rm(raw, { force: true });
  }
  repoHashes = await hashTree(repo.root);
}, 300_000);

afterAll(async () => {
  await session?.stop().catch(() => undefined);
  if (work) await rm(work, { recursive: true, force: true });
});

describe('instant recovery of a BIOS guest OS', () => {
  it('SeaBIOS boots the backed-up disk, extlinux the kernel, and the guest agent answers; test files match; the repository is unchanged', async () => {
    const point = await repo.openRestorePoint(pointId);
    try {
      expect(launchFromPoint(point)).toEqual({ machine: 'pc', memoryMiB: 256, cpus: 1 });
    } finally {
      await point.close();
    }
    session = await startInstantRecovery({ repository: repo, pointId, workDir: path.join(work, 'ir'), name: 'bios-guest-ir' });
    const s = session;
    const cmdline = (await readFile(`/proc/${s.pid!}/cmdline`, 'utf8')).split('\0');
    expect(cmdline).not.toContain('-kernel');
    expect(cmdline).toContain('virtio-blk-pci,drive=vda-overlay,id=vda,bootindex=1');
    await s.waitForAgent(180_000);
    const qga = await QgaClient.connect({ socketPath: s.agentSocket, timeoutMs: 30_000 });
    try {
      // The kernel was started by extlinux from the disk (it names the image it loaded, then its APPEND line).
      const proc = await qga.exec('/bin/cat', ['/proc/cmdline'], { timeoutMs: 30_000 });
      expect(proc.stdout.toString('utf8').trim()).toBe(`BOOT_IMAGE=/boot/vmlinuz initrd=/boot/initrd.img ${BIOS_GUEST_APPEND}`);
      const sums = await qga.exec('/bin/sh', ['-c', `cd ${image.guest.manifest.testdataDir} && sha256sum -c SHA256SUMS`], { timeoutMs: 60_000 });
      expect(sums.exitCode).toBe(0);
    } finally {
      await qga.close();
    }
    await s.stop();
    session = undefined;
    expect(await hashTree(repo.root)).toEqual(repoHashes);
    const report = await verifyRepository(repo.root);
    expect(report.ok).toBe(true);
  });
});
