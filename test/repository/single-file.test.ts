// Single-file mode (docs/formats/backup-files.md section 2): all VMs of a job in one file set in
// the job's `_all` folder. A full and two increments (one adds a VM, one drops one) read back
// bit-exact per VM, sequentially and by random access; listing, inspect and verify see the set;
// damage names the VM's disk; per-VM folders stay the default and coexist.
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import {
  ALL_VMS, catalogPoints, inspectRepository, listVmRestorePoints, openRepository, openVmDisk, startJobRestorePoint, verifyRepository, vmSliceId, vmsOfRestorePoint, type Repository,
} from '../../src/repository/index.js';
import { DiskModel, iterate } from '../../src/repository/test-helpers.js';

const BS = 262144;
let root: string;
let repo: Repository;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-single-'));
  repo = await openRepository(root, { create: true });
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** What every VM disk must read as at each point: point id -> vm -> disk -> bytes. */
const expected = new Map<string, Map<string, Map<string, Buffer>>>();
const models = new Map<string, DiskModel>();
const model = (vm: string, disk: string, size: number) => {
  const k = `${vm}/${disk}`;
  let m = models.get(k);
  if (!m) models.set(k, (m = new DiskModel(size, BS)));
  return m;
};

type Plan = Record<string, Record<string, { size: number; changes: Array<[number, 'data' | 'zero' | 'hole', number?]> }>>;

async function backup(kind: 'full' | 'incremental', plan: Plan): Promise<string> {
  const vms = Object.entries(plan).map(([name, disks]) => ({
    name,
    config: Buffer.from(`<domain><name>${name}</name></domain>`),
    disks: Object.entries(disks).map(([d, x]) => ({ name: d, size: x.size })),
  }));
  const w = await startJobRestorePoint(repo, { job: 'nightly', kind, blockSize: BS, vms });
  // Disks of different VMs written concurrently, as the executor does.
  await Promise.all(
    Object.entries(plan).flatMap(([vm, disks]) => Object.entries(disks).map(([d, x]) => w.writeDisk(vm, d, iterate(model(vm, d, x.size).change(x.changes))))),
  );
  const p = await w.commit();
  const snap = new Map<string, Map<string, Buffer>>();
  for (const [vm, disks] of Object.entries(plan)) snap.set(vm, new Map(Object.keys(disks).map((d) => [d, Buffer.from(models.get(`${vm}/${d}`)!.bytes)])));
  expected.set(p.id, snap);
  return p.id;
}

it('writes all VMs of a job into one file set per point and reads each VM back bit-exact', async () => {
  const size1 = 5 * BS + 1234; // not a multiple of the block size
  const size2 = 3 * BS + 17;
  const full = await backup('full', {
    web1: { vda: { size: size1, changes: [[0, 'data', 1], [1, 'zero'], [2, 'data', 2], [5, 'data', 3]] }, vdb: { size: size2, changes: [[0, 'data', 4], [3, 'data', 5]] } },
    db1: { vda: { size: size2, changes: [[0, 'data', 6], [1, 'data', 6], [2, 'data', 7]] } },
  });
  const inc1 = await backup('incremental', {
    web1: { vda: { size: size1, changes: [[2, 'data', 8], [4, 'data', 9]] }, vdb: { size: size2, changes: [] } },
    db1: { vda: { size: size2, changes: [[1, 'hole']] } },
    mail1: { vda: { size: size2, changes: [[0, 'data', 10], [3, 'data', 11]] } }, // a VM added to the job
  });
  const inc2 = await backup('incremental', {
    web1: { vda: { size: size1, changes: [[5, 'data', 12]] }, vdb: { size: size2, changes: [[1, 'data', 13]] } },
    mail1: { vda: { size: size2, changes: [[0, 'zero']] } }, // db1 left the job
  });

  const chains = await repo.listChains({ job: 'nightly', vm: ALL_VMS });
  expect(chains).toHaveLength(1);
  expect(chains[0]!.folder).toBe(path.join(root, 'nightly', '_all'));
  expect(chains[0]!.points.map((p) => p.id)).toEqual([full, inc1, inc2]);
  expect(chains[0]!.points[1]!.disks.map((d) => d.name).sort()).toEqual(['db1/vda', 'mail1/vda', 'web1/vda', 'web1/vdb']);

  for (const id of [full, inc1, inc2]) {
    const p = await repo.openRestorePoint(id);
    try {
      const want = expected.get(id)!;
      const vms = vmsOfRestorePoint(p);
      expect(vms.map((v) => v.name).sort()).toEqual([...want.keys()].sort());
      for (const v of vms) {
        expect(v.config.toString()).toBe(`<domain><name>${v.name}</name></domain>`);
        expect(v.disks.map((d) => d.name).sort()).toEqual([...want.get(v.name)!.keys()].sort());
        for (const d of v.disks) {
          const bytes = want.get(v.name)!.get(d.name)!;
          const disk = openVmDisk(p, v.name, d.name);
          expect(disk.size).toBe(bytes.length);
          const parts: Buffer[] = [];
          for await (const b of disk.stream()) parts.push(b.data ?? Buffer.alloc(Math.min(BS, disk.size - b.index * BS)));
          expect(Buffer.concat(parts).equals(bytes), `${id} ${v.name}/${d.name} sequential`).toBe(true);
          const at = BS - 100; // random access across a block boundary
          expect((await disk.read(at, 300)).equals(bytes.subarray(at, at + 300)), `${id} ${v.name}/${d.name} random`).toBe(true);
        }
      }
    } finally {
      await p.close();
    }
  }

  // A VM's points across per-VM and single-file sets: per-VM stays the default and coexists.
  const w = await repo.startRestorePoint({ job: 'nightly', vm: 'web1', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size: BS }] });
  await w.writeDisk('vda', iterate([{ index: 0, data: Buffer.alloc(BS, 1) }]));
  const own = await w.commit();
  expect(own.file.startsWith(path.join(root, 'nightly', 'web1') + path.sep)).toBe(true);
  expect((await listVmRestorePoints(repo, 'nightly', 'web1')).map((p) => p.id)).toEqual([full, inc1, inc2, own.id]);
  expect((await listVmRestorePoints(repo, 'nightly', 'db1')).map((p) => p.id)).toEqual([full, inc1]);

  // Listing with no database (a fresh open of the folder, as `repo rescan` does).
  const again = await openRepository(root);
  expect((await again.listRestorePoints({ job: 'nightly', vm: ALL_VMS })).map((p) => p.id)).toEqual([full, inc1, inc2]);

  const report = await inspectRepository(root);
  const set = report.chains.find((c) => c.vm === ALL_VMS)!;
  expect(set.points.map((p) => p.id)).toEqual([full, inc1, inc2]);
  expect(set.points[0]!.disks.map((d) => d.name).sort()).toEqual(['db1/vda', 'web1/vda', 'web1/vdb']);
  expect(set.points[0]!.problem).toBeUndefined();

  const ok = await verifyRepository(root);
  expect(ok.damage).toEqual([]);
  expect(ok.ok).toBe(true);

  // Damage inside one VM's block is named with that VM's disk.
  const p = await repo.openRestorePoint(full);
  let fileOffset: number;
  try {
    const r = await p.resolve('db1/vda', 2);
    if (r.kind !== 'stored') throw new Error('expected a stored block');
    fileOffset = r.entry.recordOffset + 32 + 10;
  } finally {
    await p.close();
  }
  const fh = await open(chains[0]!.points[0]!.file, 'r+');
  try {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, fileOffset);
    b[0] = b[0]! ^ 0xff;
    await fh.write(b, 0, 1, fileOffset);
  } finally {
    await fh.close();
  }
  const bad = await verifyRepository(root);
  expect(bad.ok).toBe(false);
  expect(bad.damage.some((d) => d.disk === 'db1/vda' && d.block === 2 && d.point === full)).toBe(true);
});

it('refuses a per-VM point of a VM named like the single-file set, and names too long for it', async () => {
  await expect(repo.startRestorePoint({ job: 'other', vm: ALL_VMS, kind: 'full', disks: [{ name: 'vda', size: BS }] })).rejects.toThrow(/VM\/DISK/);
  await expect(startJobRestorePoint(repo, { job: 'other', kind: 'full', vms: [{ name: 'v'.repeat(60), disks: [{ name: 'vda1', size: BS }] }] })).rejects.toThrow(/longer than 64 bytes/);
  await expect(startJobRestorePoint(repo, { job: 'other', kind: 'full', vms: [{ name: 'a', disks: [{ name: 'x/y', size: BS }] }] })).rejects.toThrow(/contains '\/'/);
});

it('catalog: one record per VM of each single-file point, opened by its id like a per-VM point; retention, merges and reverse injection on _all chains', async () => {
  const job = 'perjob';
  const sizes = { a: 4 * BS + 77, b: 2 * BS };
  let ms = { a: new DiskModel(sizes.a, BS), b: new DiskModel(sizes.b, BS) };
  const write = async (kind: 'full' | 'incremental' | 'reverse', changes: { a: Array<[number, 'data' | 'zero' | 'hole', number?]>; b: Array<[number, 'data' | 'zero' | 'hole', number?]> }, method: 'forward' | 'reverse' = 'forward', jobName = job) => {
    const w = await startJobRestorePoint(repo, {
      job: jobName, kind, blockSize: BS, chainMethod: method, threads: 0,
      vms: (['a', 'b'] as const).map((vm) => ({ name: vm, config: Buffer.from(`cfg ${vm}`), disks: [{ name: 'vda', size: sizes[vm] }] })),
    });
    await w.writeDisk('a', 'vda', iterate(ms.a.change(changes.a)));
    await w.writeDisk('b', 'vda', iterate(ms.b.change(changes.b)));
    const p = await w.commit();
    return { id: p.id, a: Buffer.from(ms.a.bytes), b: Buffer.from(ms.b.bytes) };
  };
  const check = async (jobName: string, pts: Array<{ id: string; a: Buffer; b: Buffer }>) => {
    const listed = catalogPoints(await repo.listRestorePoints({ job: jobName, vm: ALL_VMS }));
    expect(listed.map((p) => p.vm).sort()).toEqual(pts.flatMap(() => ['a', 'b']).sort());
    expect(new Set(listed.map((p) => p.id)).size).toBe(listed.length); // one id per VM and point
    for (const p of pts) {
      for (const vm of ['a', 'b'] as const) {
        const id = vmSliceId(p.id, vm);
        const rec = listed.find((x) => x.id === id)!;
        expect(rec.disks).toEqual([{ name: 'vda', size: sizes[vm] }]);
        const rp = await repo.openRestorePoint(id);
        try {
          expect(rp.info.vm).toBe(vm);
          expect(rp.vmConfig.toString()).toBe(`cfg ${vm}`);
          expect(rp.disks).toEqual([{ name: 'vda', size: sizes[vm] }]);
          expect((await rp.openDisk('vda').read(0, sizes[vm])).equals(p[vm]), `${jobName} ${p.id} ${vm}`).toBe(true);
          await expect(async () => rp.openDisk('b/vda')).rejects.toThrow(/has no disk/);
        } finally {
          await rp.close();
        }
      }
    }
  };
  // Forever forward on the job's set: retention merges the oldest increment into the full.
  const pts = [await write('full', { a: [[0, 'data'], [4, 'data']], b: [[1, 'data']] })];
  pts.push(await write('incremental', { a: [[0, 'data', 10]], b: [] }));
  pts.push(await write('incremental', { a: [[4, 'zero']], b: [[0, 'data', 12]] }));
  const r = await repo.applyRetention(job, ALL_VMS, { method: 'forever-forward', retention: { points: 2 } });
  expect(r.actions.map((x) => x.kind)).toEqual(['merge']);
  await check(job, pts.slice(1));
  // Reverse incremental on a job's set: the newest point is the full, the older ones .vrb.
  ms = { a: new DiskModel(sizes.a, BS), b: new DiskModel(sizes.b, BS) };
  const rv = [await write('full', { a: [[1, 'data', 20]], b: [[1, 'data', 21]] }, 'reverse', 'revjob')];
  rv.push(await write('reverse', { a: [[1, 'data', 22], [2, 'data', 23]], b: [] }, 'reverse', 'revjob'));
  rv.push(await write('reverse', { a: [], b: [[0, 'hole']] }, 'reverse', 'revjob'));
  await check('revjob', rv);
  expect(catalogPoints(await repo.listRestorePoints({ job: 'revjob', vm: ALL_VMS })).map((p) => `${p.vm}:${p.kind}`)).toEqual(['a:reverse', 'b:reverse', 'a:reverse', 'b:reverse', 'a:full', 'b:full']);
  // A slice id nobody has is not found.
  await expect(repo.openRestorePoint(vmSliceId(rv[0]!.id, 'nobody'))).rejects.toThrow(/no restore point/);
});
