// Health check and repair: a flipped byte in a stored block is found and named (file, point, disk,
// block, disk offset); the pending repair recorded in the .vbm makes the next backup store that
// block fresh; the repaired point reads bit-exact and checks clean. Damaged metadata asks for an
// active full.
import { open, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackupFile } from '../../src/repository/backup-file.js';
import { openRepository, planRun, verifyRepository, type Repository, type RestorePointInfo } from '../../src/repository/index.js';
import { DiskModel, iterate } from '../../src/repository/test-helpers.js';

const BS = 262144;
const SIZE = 6 * BS + 999;
let root: string;
let repo: Repository;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-health-'));
  repo = await openRepository(root);
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function write(vm: string, model: DiskModel, kind: 'full' | 'incremental', blocks: ReturnType<DiskModel['change']>, compare = false): Promise<RestorePointInfo> {
  const w = await repo.startRestorePoint({ job: 'h', vm, kind, blockSize: BS, threads: 0, disks: [{ name: 'vda', size: SIZE }] });
  await w.writeDisk('vda', iterate(blocks), { compareWithParent: compare });
  return w.commit();
}

async function read(id: string): Promise<Buffer> {
  const p = await repo.openRestorePoint(id);
  try {
    return await p.openDisk('vda').read(0, SIZE);
  } finally {
    await p.close();
  }
}

/** Flips one byte of file `file` at `offset`. */
async function flip(file: string, offset: number): Promise<void> {
  const fh = await open(file, 'r+');
  const b = Buffer.alloc(1);
  await fh.read(b, 0, 1, offset);
  b[0] = b[0]! ^ 0x40;
  await fh.write(b, 0, 1, offset);
  await fh.close();
}

const allBlocks = (m: DiskModel) =>
  Array.from({ length: m.blockCount }, (_, i) => {
    const s = m.bytes.subarray(i * BS, i * BS + m.lengthOf(i));
    return { index: i, data: s.every((x) => x === 0) ? null : Buffer.from(s) };
  });

describe('health check and repair', () => {
  for (const compare of [false, true]) {
    it(`finds a flipped byte, names it, and the next run repairs it (${compare ? 'source without changed-block tracking' : 'changed blocks + repair blocks'})`, async () => {
      const vm = compare ? 'cmp' : 'cbt';
      const m = new DiskModel(SIZE, BS);
      const full = await write(vm, m, 'full', m.change([[0, 'data'], [1, 'data'], [2, 'data'], [3, 'data'], [5, 'data'], [6, 'data']]));
      const inc1 = await write(vm, m, 'incremental', m.change([[1, 'data', 11]]));
      const latest = await write(vm, m, 'incremental', m.change([[5, 'data', 15]]));
      expect((await repo.healthCheck('h', vm)).ok).toBe(true);

      // Damage block 3 (held by the full, inherited by the latest point) in the middle of its payload.
      const f = await BackupFile.open(full.file);
      const e = await f.entry('vda', 3);
      await f.close();
      if (e.kind !== 'stored') throw new Error('block 3 should be stored');
      await flip(full.file, e.recordOffset + 32 + Math.floor(e.storedLength / 2));

      const report = await repo.healthCheck('h', vm);
      expect(report.ok).toBe(false);
      expect(report.metadataDamaged).toBe(false);
      expect(report.points).toEqual([latest.id]);
      expect(report.damaged.map(({ file, point, disk, block, diskOffset }) => ({ file, point, disk, block, diskOffset }))).toEqual([
        { file: full.file, point: latest.id, disk: 'vda', block: 3, diskOffset: 3 * BS },
      ]);
      expect(report.damaged[0]!.reason).toMatch(/CRC/);
      expect(await repo.pendingRepair('h', vm)).toEqual([{ disk: 'vda', blocks: [3] }]);
      // The listing carries the mark (the catalog shows such a point as corrupt).
      expect((await repo.listRestorePoints({ job: 'h', vm })).map((p) => [p.id, p.damage])).toEqual([
        [full.id, undefined],
        [inc1.id, undefined],
        [latest.id, { metadata: false, disks: ['vda'] }],
      ]);
      expect(planRun(await repo.chainState('h', vm), { method: 'forever-forward', retention: { points: 7 } }, new Date()).kind).toBe('incremental');

      // The next run: the changed blocks plus the repair blocks re-read from the source (or, with
      // compareWithParent, every block; the pending one must not be inherited although its digest matches).
      const changed = m.change([[0, 'data', 20]]);
      const repair = (await repo.pendingRepair('h', vm))[0]!.blocks.map((i) => ({ index: i, data: Buffer.from(m.bytes.subarray(i * BS, i * BS + m.lengthOf(i))) }));
      const next = compare
        ? await write(vm, m, 'incremental', allBlocks(m), true)
        : await write(vm, m, 'incremental', [...changed, ...repair].sort((a, b) => a.index - b.index));
      expect(await repo.pendingRepair('h', vm)).toEqual([]);
      expect((await read(next.id)).equals(m.bytes)).toBe(true);
      const after = await repo.healthCheck('h', vm);
      expect(after.ok).toBe(true);
      expect(after.points).toEqual([next.id]);
      // The older points still hold the damaged record: the whole chain check says which.
      const chain = await repo.healthCheck('h', vm, { wholeChain: true });
      expect(chain.points).toEqual([full.id, inc1.id, latest.id, next.id]);
      expect(chain.damaged.map((d) => d.point)).toEqual([full.id, inc1.id, latest.id]);
      expect(chain.damaged.every((d) => d.block === 3 && d.file === full.file)).toBe(true);
      expect(chain.repair).toBeNull(); // the latest point is clean: nothing for the next run to repair
      expect((await repo.chainState('h', vm)).damaged?.map((d) => d.point)).toEqual([full.id, inc1.id, latest.id]);
      expect((await repo.listRestorePoints({ job: 'h', vm })).filter((p) => p.damage).map((p) => p.id)).toEqual([full.id, inc1.id, latest.id]);

      // Retention never merges a damaged point into the full: refused with a warning, the chain
      // kept whole, an active full next; the old chain goes whole once none of its points is kept.
      const ff = { method: 'forever-forward' as const, retention: { points: 2 } };
      const refused = await repo.applyRetention('h', vm, ff);
      expect(refused.removedPoints).toEqual([]);
      expect(refused.actions).toMatchObject([{ kind: 'none', damaged: [full.id, inc1.id] }]);
      expect(refused.actions[0]!.reason).toMatch(/merge refused: point .* has damaged vda block\(s\) 3/);
      expect((await repo.listRestorePoints({ job: 'h', vm })).map((p) => p.id)).toEqual([full.id, inc1.id, latest.id, next.id]);
      const plan = planRun(await repo.chainState('h', vm), ff, new Date());
      expect(plan.kind).toBe('full');
      const fresh = await write(vm, m, 'full', allBlocks(m));
      const fresh2 = await write(vm, m, 'incremental', m.change([[2, 'data', 22]]));
      const gone = await repo.applyRetention('h', vm, ff);
      expect(gone.actions.map((a) => a.kind)).toEqual(['delete-chain']);
      expect((await repo.listRestorePoints({ job: 'h', vm })).map((p) => p.id)).toEqual([fresh.id, fresh2.id]);
      expect((await repo.chainState('h', vm)).damaged).toEqual([]);
      expect((await repo.listRestorePoints({ job: 'h', vm })).some((p) => p.damage)).toBe(false);
      expect((await read(fresh2.id)).equals(m.bytes)).toBe(true);
    });
  }

  it('damaged metadata (a table page) asks for an active full, which clears it', async () => {
    const m = new DiskModel(SIZE, BS);
    await write('meta', m, 'full', m.change([[0, 'data'], [2, 'data']]));
    const inc = await write('meta', m, 'incremental', m.change([[2, 'data', 12]]));
    const f = await BackupFile.open(inc.file);
    const page = f.index.disks[0]!.pages[0]!;
    await f.close();
    await flip(inc.file, page.offset + 32 + 70);
    const report = await repo.healthCheck('h', 'meta');
    expect(report.ok).toBe(false);
    expect(report.metadataDamaged).toBe(true);
    expect(report.metadataProblems.join('\n')).toMatch(/table/);
    const plan = planRun(await repo.chainState('h', 'meta'), { method: 'forever-forward', retention: { points: 7 } }, new Date());
    expect(plan.kind).toBe('full');
    expect(plan.reason).toMatch(/active full/);
    const fresh = await write('meta', m, 'full', allBlocks(m));
    expect((await repo.chainState('h', 'meta')).repair).toBeNull();
    expect((await read(fresh.id)).equals(m.bytes)).toBe(true);
    expect((await repo.healthCheck('h', 'meta')).ok).toBe(true);
    expect((await verifyRepository(root)).damage.length).toBeGreaterThan(0); // the old damage is still there, reported
  });
});
