// A restore point the last health check marked `corrupt` is restored as a VM all the same (as
// `restore disk`, `mount` and `restore files` do): its blocks are CRC-checked as they are read, so
// only a damaged block fails. Before, `restore vm` and `instant-recovery start` refused the point
// outright ("restore point X is corrupt", no hint). Real repository, real restore (no QEMU start).
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodePointMetadata, POINT_METADATA_FORMAT } from '../../agent/backup/point-metadata.js';
import { openRepository } from '../../repository/index.js';
import { DiskModel, iterate } from '../../repository/test-helpers.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import { systemClock, type ServiceContext } from '../services/common.js';
import { createHost, createRepository } from '../services/infrastructure.js';
import { getRestorePoint, recordRestorePoint } from '../services/sessions.js';
import { RecoveryService } from './recovery.js';

const BS = 262144;
let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let pointId: string;
let image: Buffer;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-recovery-corrupt-'));
  cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  const repo = await openRepository(path.join(dir, 'repo'), { create: true });
  const repositoryId = (await createRepository(ctx, { name: 'main', path: repo.root })).id;
  const vmDir = path.join(dir, 'vms', 'vm1');
  await createHost(ctx, { name: 'kvm1', kind: 'qemu', uri: path.join(dir, 'vms', '*', 'qmp.sock') });
  const commandLine = [
    'qemu-system-x86_64', '-name', 'vm1', '-accel', 'tcg', '-m', '256',
    '-blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'vda-fmt', file: { driver: 'file', filename: path.join(vmDir, 'vda.img') } }),
    '-device', 'virtio-blk-pci,drive=vda-fmt,id=vda',
    '-chardev', `socket,id=qmp0,path=${path.join(vmDir, 'qmp.sock')},server=on,wait=off`, '-mon', 'chardev=qmp0,mode=control',
  ];
  const m = new DiskModel(3 * BS + 100, BS);
  const vmConfig = encodePointMetadata({
    format: POINT_METADATA_FORMAT,
    hypervisor: 'qemu',
    vm: { name: 'vm1', id: path.join(vmDir, 'qmp.sock') },
    configuration: { kind: 'qemu', commandLine, blockGraph: [] },
    checkpoint: { chainId: 'c1', name: 'c1-0', time: new Date().toISOString(), disks: { vda: m.size } } as never,
    consistency: 'crash',
    freezeWindowMs: null,
    warnings: [],
  });
  const w = await repo.startRestorePoint({ job: 'j', vm: 'vm1', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: m.size }], vmConfig });
  await w.writeDisk('vda', iterate(m.change([[0, 'data'], [2, 'zero'], [3, 'data']])));
  const p = await w.commit();
  image = Buffer.from(m.bytes);
  pointId = p.id;
  await recordRestorePoint(ctx, { id: p.id, vm: 'vm1', disks: [{ name: 'vda', size: m.size }], time: p.time.toISOString(), type: 'full', chainId: p.chainId, size: p.fileBytes, repositoryId, jobId: null, state: 'corrupt' });
});

afterAll(async () => {
  await cdb?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('a point marked corrupt by a health check', () => {
  it('is restored as a new VM (its blocks read clean), not refused', async () => {
    expect((await getRestorePoint(ctx, pointId)).state).toBe('corrupt');
    const service = new RecoveryService({ ctx, dataDir: path.join(dir, 'data') });
    try {
      const storage = path.join(dir, 'out', 'vm1-copy');
      const started = await service.startRestoreVm(pointId, { name: 'vm1-copy', storage, format: 'raw' });
      let t = service.getRestore(started.id);
      for (let i = 0; i < 500 && t.state === 'running'; i++) {
        await new Promise((r) => setTimeout(r, 20));
        t = service.getRestore(started.id);
      }
      expect(t.state, JSON.stringify(t.error)).toBe('success');
      const disk = t.result!.disks[0]!;
      expect(disk.name).toBe('vda');
      expect((await readFile(disk.path)).equals(image)).toBe(true);
    } finally {
      await service.close();
    }
  });
});

describe('VM restore records', () => {
  it('are bounded: past keepRestores the oldest finished one goes', async () => {
    const service = new RecoveryService({ ctx, dataDir: path.join(dir, 'data'), keepRestores: 1 });
    const done = async (id: string): Promise<void> => {
      for (let i = 0; i < 500 && service.getRestore(id).state === 'running'; i++) await new Promise((r) => setTimeout(r, 20));
      expect(service.getRestore(id).state).toBe('success');
    };
    try {
      const a = await service.startRestoreVm(pointId, { name: 'vm1-a', storage: path.join(dir, 'out', 'vm1-a'), format: 'raw' });
      await done(a.id);
      const b = await service.startRestoreVm(pointId, { name: 'vm1-b', storage: path.join(dir, 'out', 'vm1-b'), format: 'raw' });
      await done(b.id);
      expect(service.listRestores().map((r) => r.id)).toEqual([b.id]);
      expect(() => service.getRestore(a.id)).toThrow(/no VM restore/);
    } finally {
      await service.close();
    }
  });
});
