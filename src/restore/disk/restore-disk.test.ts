import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openRepository, type Repository } from '../../repository/index.js';
import { DiskModel, iterate } from '../../repository/test-helpers.js';
import { restoreDisk } from './restore-disk.js';

let dir: string;
let repo: Repository;
const BS = 262144;

beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-restore-disk-'));
  repo = await openRepository(path.join(dir, 'repo'), { create: true });
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('restoreDisk (raw)', () => {
  it('restores full and incremental points bit-exact, sparse, with the right SHA-256', async () => {
    const size = 40 * BS + 1234;
    const m = new DiskModel(size, BS);
    const w0 = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size }], threads: 0 });
    await w0.writeDisk('vda', iterate(m.change([[0, 'data'], [3, 'data'], [7, 'zero'], [40, 'data']])));
    const p0 = await w0.commit();
    const at0 = Buffer.from(m.bytes);
    const w1 = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'incremental', disks: [{ name: 'vda', size }], threads: 0 });
    await w1.writeDisk('vda', iterate(m.change([[3, 'hole'], [5, 'data', 99], [40, 'data', 7]])));
    const p1 = await w1.commit();

    for (const [p, bytes] of [[p0, at0], [p1, m.bytes]] as const) {
      const to = path.join(dir, `${p.id}.raw`);
      const r = await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to });
      const out = await readFile(to);
      expect(out.equals(bytes)).toBe(true);
      expect(r.sha256).toBe(createHash('sha256').update(bytes).digest('hex'));
      expect(r.size).toBe(size);
      // Sparse: far fewer blocks allocated than the disk's size.
      expect((await stat(to)).blocks * 512).toBeLessThan(size / 4);
    }
  });

  it('refuses to overwrite an existing file unless told to, and leaves no temporary on failure', async () => {
    const size = 4 * BS;
    const m = new DiskModel(size, BS);
    const w = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size }], threads: 0 });
    await w.writeDisk('vda', iterate(m.change([[1, 'data']])));
    const p = await w.commit();
    const to = path.join(dir, 'out.raw');
    await writeFile(to, 'keep me');
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to })).rejects.toThrow(/already exists/);
    expect(await readFile(to, 'utf8')).toBe('keep me');
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'nope', to: path.join(dir, 'x.raw') })).rejects.toThrow(/no disk nope/);
    const r = await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, overwrite: true });
    expect((await readFile(to)).equals(m.bytes)).toBe(true);
    expect(r.bytesWritten).toBe(BS);
    const { readdir } = await import('node:fs/promises');
    expect((await readdir(dir)).filter((f) => f.includes('.bulwark-restore-'))).toEqual([]);
  });
});
