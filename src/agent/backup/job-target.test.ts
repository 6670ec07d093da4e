// JobPointTarget (per-job storage) on a real repository in a temp dir: two VMs' parts written side
// by side become ONE point of the job's `_all` folder, committed once when both asked; each VM's
// part reads back under its catalog id; an increment finds each VM's checkpoint in the parent;
// one VM aborting releases the other (waiting) VM with the job's error and leaves nothing visible.
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import type { Checkpoint } from '../../hypervisor/types.js';
import { ALL_VMS, catalogPoints, openRepository, type Repository } from '../../repository/index.js';
import { DiskModel, iterate } from '../../repository/test-helpers.js';
import { JobPointTarget } from './job-target.js';
import { encodePointMetadata, POINT_METADATA_FORMAT } from './point-metadata.js';

const BS = 262144;
let dir: string;
let repo: Repository;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-job-target-'));
  repo = await openRepository(path.join(dir, 'repo'), { create: true });
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function meta(vm: string, sequence: number): Buffer {
  const checkpoint: Checkpoint = { chainId: `bw-${vm}`, name: `bw-${vm}-${sequence}`, sequence, instance: 'x', disks: {}, createdAt: new Date(0).toISOString() };
  return encodePointMetadata({ format: POINT_METADATA_FORMAT, hypervisor: 'qemu', vm: { name: vm, id: vm }, configuration: {} as never, checkpoint, consistency: 'crash', freezeWindowMs: null, warnings: [] });
}

async function read(pointId: string, disk: string): Promise<Buffer> {
  const p = await repo.openRestorePoint(pointId);
  try {
    const d = p.openDisk(disk);
    return await d.read(0, d.size);
  } finally {
    await p.close();
  }
}

describe('JobPointTarget: one restore point for every VM of a job', () => {
  const web = new DiskModel(2 * BS + 100, BS);
  const db = new DiskModel(BS + 7, BS);

  it('full: both VMs register, write side by side, commit once; each VM part reads back under its catalog id', async () => {
    const t = new JobPointTarget({ repository: repo, threads: 0, job: 'j', vms: ['web', 'db'], kind: 'full', blockSize: BS, compression: 'lz4' });
    expect(await t.previousCheckpoint('j', 'web', 'bw-web')).toBeNull();
    let webStarted = false;
    const webSink = t.startRestorePoint({ job: 'j', vm: 'web', kind: 'full', vmConfig: meta('web', 1), disks: [{ name: 'vda', size: web.size }] }).then((s) => {
      webStarted = true;
      return s;
    });
    await new Promise((r) => setTimeout(r, 20));
    expect(webStarted).toBe(false); // waits for the job's other VM
    const dbSink = await t.startRestorePoint({ job: 'j', vm: 'db', kind: 'full', vmConfig: meta('db', 1), disks: [{ name: 'vda', size: db.size }] });
    const ws = await webSink;
    await Promise.all([ws.writeDisk('vda', iterate(web.change([[0, 'data'], [2, 'data']]))), dbSink.writeDisk('vda', iterate(db.change([[1, 'data', 9]])))]);
    let committed = false;
    const first = ws.commit().then((p) => ((committed = true), p));
    await new Promise((r) => setTimeout(r, 20));
    expect(committed).toBe(false); // commits when every VM asked
    expect(await repo.listRestorePoints({ job: 'j', vm: ALL_VMS })).toEqual([]);
    const [p1, p2] = await Promise.all([first, dbSink.commit()]);
    expect(p1.id).toBe(p2.id);
    expect(p1.vm).toBe(ALL_VMS);
    const slices = catalogPoints([p1]);
    expect(slices.map((s) => [s.vm, s.disks.map((d) => d.name)])).toEqual([
      ['web', ['vda']],
      ['db', ['vda']],
    ]);
    expect((await read(slices[0]!.id, 'vda')).equals(web.bytes)).toBe(true);
    expect((await read(slices[1]!.id, 'vda')).equals(db.bytes)).toBe(true);
    expect((await readdir(path.join(repo.root, 'j'))).sort()).toEqual([ALL_VMS]);
  });

  it('incremental: each VM finds its checkpoint in the parent (none for a VM not in it); a VM aborting fails the other and writes nothing', async () => {
    const parent = (await repo.listRestorePoints({ job: 'j', vm: ALL_VMS })).at(-1)!;
    const t = new JobPointTarget({ repository: repo, threads: 0, job: 'j', vms: ['web', 'db'], kind: 'incremental', parent });
    expect((await t.previousCheckpoint('j', 'web', 'bw-web'))?.checkpoint.name).toBe('bw-web-1');
    expect((await t.previousCheckpoint('j', 'web', 'bw-other'))).toBeNull();
    expect(await t.previousCheckpoint('j', 'new-vm', 'bw-new-vm')).toBeNull();

    const waiting = t.startRestorePoint({ job: 'j', vm: 'web', kind: 'incremental', vmConfig: meta('web', 2), disks: [{ name: 'vda', size: web.size }] });
    t.fail(new BulwarkError('VM db: its snapshot failed', { kind: 'unavailable', context: { vm: 'db' } }));
    const err = await waiting.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect((err as BulwarkError).message).toBe("job j's restore point (all its VMs in one) is not written: VM db: its snapshot failed");
    expect((err as BulwarkError).context).toMatchObject({ job: 'j', vm: 'db' });
    await expect(t.startRestorePoint({ job: 'j', vm: 'db', kind: 'incremental', disks: [{ name: 'vda', size: db.size }] })).rejects.toThrow(/VM db: its snapshot failed/);
    expect((await repo.listRestorePoints({ job: 'j', vm: ALL_VMS })).map((p) => p.id)).toEqual([parent.id]);

    // The folder is free again: the next increment of both VMs writes and reads back.
    const t2 = new JobPointTarget({ repository: repo, threads: 0, job: 'j', vms: ['web', 'db'], kind: 'incremental', parent });
    const [a, b] = await Promise.all([
      t2.startRestorePoint({ job: 'j', vm: 'web', kind: 'incremental', vmConfig: meta('web', 2), disks: [{ name: 'vda', size: web.size }] }),
      t2.startRestorePoint({ job: 'j', vm: 'db', kind: 'incremental', vmConfig: meta('db', 2), disks: [{ name: 'vda', size: db.size }] }),
    ]);
    await Promise.all([a.writeDisk('vda', iterate(web.change([[1, 'data', 5]]))), b.writeDisk('vda', iterate([]))]);
    const [p] = await Promise.all([a.commit(), b.commit()]);
    expect(p.kind).toBe('incremental');
    const slices = catalogPoints([p]);
    expect((await read(slices.find((s) => s.vm === 'web')!.id, 'vda')).equals(web.bytes)).toBe(true);
    expect((await read(slices.find((s) => s.vm === 'db')!.id, 'vda')).equals(db.bytes)).toBe(true);

    const t3 = new JobPointTarget({ repository: repo, threads: 0, job: 'j', vms: ['web', 'db'], kind: 'incremental', parent: p });
    const [c, d] = await Promise.all([
      t3.startRestorePoint({ job: 'j', vm: 'web', kind: 'incremental', vmConfig: meta('web', 3), disks: [{ name: 'vda', size: web.size }] }),
      t3.startRestorePoint({ job: 'j', vm: 'db', kind: 'incremental', vmConfig: meta('db', 3), disks: [{ name: 'vda', size: db.size }] }),
    ]);
    // A VM aborting after both started (a disk error): the other's commit rejects, nothing is visible.
    await c.writeDisk('vda', iterate(web.change([[0, 'data', 77]])));
    const committing = c.commit();
    await d.abort();
    await expect(committing).rejects.toThrow(/job j's restore point \(all its VMs in one\) is not written: the backup of VM db was aborted/);
    expect((await repo.listRestorePoints({ job: 'j', vm: ALL_VMS })).map((x) => x.id)).toEqual([parent.id, p.id]);
  });
});
