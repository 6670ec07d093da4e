// A restore point the last health check marked `corrupt` is restored as a VM all the same (as
// `restore disk`, `mount` and `restore files` do): its blocks are CRC-checked as they are read, so
// only a damaged block fails. Before, `restore vm` and `instant-recovery start` refused the point
// outright ("restore point X is corrupt", no hint). Real repository, real restore (no QEMU start).
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ConfigDatabase } from '../db/connect.js';
import type { ServiceContext } from '../services/common.js';
import { getRestorePoint } from '../services/sessions.js';
import { RecoveryService } from './recovery.js';
import { seedQemuVmPoint } from './recovery-test-point.js';

let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let pointId: string;
let image: Buffer;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-recovery-corrupt-'));
  ({ cdb, ctx, pointId, image } = await seedQemuVmPoint(dir, { state: 'corrupt' }));
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
