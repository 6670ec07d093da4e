// Instant recovery of a BIOS VM (no -kernel, no firmware recorded: QEMU's default SeaBIOS boots the
// first disk), real QEMU under TCG. The point is written straight into a temp repository: one raw
// disk whose sector 0 is a boot sector printing a marker on COM1 (test/fixtures/boot-sector.ts),
// and the recorded command line of a plain-QEMU VM that booted it. Instant recovery takes the boot
// settings from that configuration; the marker on the session's serial console shows SeaBIOS
// booted the backup's disk through the overlay and the NBD export. Stop removes the session, and
// the repository's files are unchanged.
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodePointMetadata, POINT_METADATA_FORMAT } from '../../src/agent/backup/point-metadata.js';
import type { DiskBlock } from '../../src/disk/types.js';
import { openRepository, verifyRepository, type Repository } from '../../src/repository/index.js';
import { launchFromPoint, startInstantRecovery, type InstantRecoverySession } from '../../src/restore/instant/index.js';
import { bootSector } from '../fixtures/boot-sector.js';
import { hashTree } from '../fixtures/guest-agent.js';

const MARKER = 'BULWARK-BIOS-BOOT';
const BS = 256 * 1024;
const SIZE = 4 * BS;
let work: string;
let repo: Repository;
let pointId: string;
let repoHashes: Record<string, string>;
let session: InstantRecoverySession | undefined;

async function waitForConsole(file: string, text: string, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const out = existsSync(file) ? await readFile(file, 'latin1') : '';
    if (out.includes(text)) return out;
    if (Date.now() > deadline) throw new Error(`"${text}" not on ${file} within ${timeoutMs} ms (it shows ${JSON.stringify(out.slice(-200))})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-irb-'));
  repo = await openRepository(path.join(work, 'repo'), { create: true });
  const vmDir = path.join(work, 'vms', 'bios1');
  // How the VM ran: SeaBIOS (QEMU's default), no -kernel, no -bios, no flash.
  const commandLine = [
    'qemu-system-x86_64', '-name', 'bios1', '-machine', 'pc', '-accel', 'tcg', '-m', '128', '-smp', '1',
    '-blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'vda-fmt', file: { driver: 'file', filename: path.join(vmDir, 'vda.img') } }),
    '-device', 'virtio-blk-pci,drive=vda-fmt,id=vda,bootindex=1',
    '-chardev', `socket,id=qmp0,path=${path.join(vmDir, 'qmp.sock')},server=on,wait=off`, '-mon', 'chardev=qmp0,mode=control',
  ];
  const vmConfig = encodePointMetadata({
    format: POINT_METADATA_FORMAT,
    hypervisor: 'qemu',
    vm: { name: 'bios1', id: path.join(vmDir, 'qmp.sock') },
    configuration: { kind: 'qemu', commandLine, blockGraph: [] },
    checkpoint: { chainId: 'c1', name: 'c1-0', time: new Date().toISOString(), disks: { vda: SIZE } } as never,
    consistency: 'crash',
    freezeWindowMs: null,
    warnings: [],
  });
  const first = Buffer.alloc(BS);
  bootSector(MARKER).copy(first, 0);
  async function* blocks(): AsyncGenerator<DiskBlock> {
    yield { index: 0, data: first };
    for (let i = 1; i < SIZE / BS; i++) yield { index: i, data: null };
  }
  const w = await repo.startRestorePoint({ job: 'j', vm: 'bios1', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: SIZE }], vmConfig });
  await w.writeDisk('vda', blocks());
  pointId = (await w.commit()).id;
  repoHashes = await hashTree(repo.root);
});

afterAll(async () => {
  await session?.stop().catch(() => undefined);
  if (work) await rm(work, { recursive: true, force: true });
});

describe('instant recovery of a BIOS VM', () => {
  it('SeaBIOS boots the backed-up disk (marker on the serial console); stop leaves nothing and the repository is unchanged', async () => {
    const point = await repo.openRestorePoint(pointId);
    try {
      expect(launchFromPoint(point)).toEqual({ machine: 'pc', memoryMiB: 128, cpus: 1 });
    } finally {
      await point.close();
    }

    const workDir = path.join(work, 'ir');
    session = await startInstantRecovery({ repository: repo, pointId, workDir, name: 'bios-ir' });
    const s = session;
    expect(s.state).toBe('running-from-backup');
    expect(s.servingBackup).toBe(true);
    const out = await waitForConsole(s.consoleLog, MARKER);
    expect(out).toContain(`${MARKER}\r\n`);
    const pid = s.pid!;
    expect(pid).toBeGreaterThan(0);
    // Booted without a kernel, from the overlay over the NBD export.
    const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
    expect(cmdline).not.toContain('-kernel');
    expect(cmdline).toContain('virtio-blk-pci,drive=vda-overlay,id=vda,bootindex=1');

    const dir = s.dir;
    await s.stop();
    session = undefined;
    expect(() => process.kill(pid, 0)).toThrow();
    expect(existsSync(dir)).toBe(false);
    expect(await readdir(workDir)).toEqual([]);
    expect(await hashTree(repo.root)).toEqual(repoHashes);
    const report = await verifyRepository(repo.root);
    expect(report.damage).toEqual([]);
    expect(report.ok).toBe(true);
  });
});
