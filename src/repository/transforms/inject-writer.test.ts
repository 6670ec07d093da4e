// Reverse injection written straight into the full (inject-writer.ts): every point of a reverse
// chain reads back bit-exact through resizes, added and dropped disks, zero and hole blocks,
// compareWithParent, concurrent disks and an abort; the full grows by the new point's data only
// (no staging copy) and the .vrb holds exactly the replaced blocks.
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { openRepository, verifyRepository, type Repository, type RestorePointInfo } from '../index.js';
import { BackupFile } from '../backup-file.js';
import { DiskModel, iterate } from '../test-helpers.js';

const BS = 262144;
const ZEROES = Buffer.alloc(BS);
let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-inject-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

type Change = Array<[number, 'data' | 'zero' | 'hole', number?]>;
interface Step {
  readonly disks: Record<string, { size: number; changes: Change }>;
  readonly compare?: boolean;
}

/** The disk's bytes; of a disk past one table page, its first 8 and last 10 blocks (where the data is), zeroes between. */
async function read(repo: Repository, id: string, disk: string, size: number): Promise<Buffer> {
  const p = await repo.openRestorePoint(id);
  try {
    const d = p.openDisk(disk);
    if (size <= 64 * BS) return await d.read(0, size);
    const out = Buffer.alloc(size);
    (await d.read(0, 8 * BS)).copy(out, 0);
    const tail = size - (1020 * BS);
    (await d.read(1020 * BS, tail)).copy(out, 1020 * BS);
    return out;
  } finally {
    await p.close();
  }
}

it('reverse chain: every point bit-exact through resizes, new and dropped disks, compareWithParent and an abort', async () => {
  const repo = await openRepository(root);
  const models = new Map<string, DiskModel>();
  const model = (name: string, size: number): DiskModel => {
    const old = models.get(name);
    if (old && old.size === size) return old;
    const m = new DiskModel(size, BS);
    if (old) old.bytes.copy(m.bytes, 0, 0, Math.min(old.size, size));
    models.set(name, m);
    return m;
  };
  const steps: Step[] = [
    { disks: { vda: { size: 5 * BS + 777, changes: [[0, 'data'], [1, 'data'], [2, 'zero'], [4, 'data'], [5, 'data']] }, vdb: { size: 2 * BS, changes: [[0, 'data'], [1, 'data']] } } },
    { disks: { vda: { size: 5 * BS + 777, changes: [[1, 'data', 11], [5, 'data', 15]] }, vdb: { size: 2 * BS, changes: [] } } },
    // vda grows (its old last block was short), vdb dropped, vdc added
    { disks: { vda: { size: 1030 * BS + 5, changes: [[0, 'hole'], [6, 'data', 26], [1029, 'data', 29]] }, vdc: { size: BS + 1, changes: [[1, 'data', 31]] } } },
    // compareWithParent: the whole disk sent, only block 3 and the first of page 2 really change
    { disks: { vda: { size: 1030 * BS + 5, changes: [[3, 'data', 43], [1024, 'data', 44]] }, vdc: { size: BS + 1, changes: [] } }, compare: true },
    // vda shrinks to less than one table page
    { disks: { vda: { size: 3 * BS + 9, changes: [[2, 'data', 52]] }, vdc: { size: BS + 1, changes: [[0, 'zero']] } } },
  ];
  const points: Array<{ point: RestorePointInfo; bytes: Map<string, Buffer> }> = [];
  let fullPath = '';
  for (const [n, step] of steps.entries()) {
    const disks = Object.entries(step.disks).map(([name, d]) => ({ name, size: d.size }));
    const w = await repo.startRestorePoint({
      job: 'j', vm: 'rv', kind: n === 0 ? 'full' : 'reverse', chainMethod: 'reverse', blockSize: BS, time: new Date(Date.UTC(2026, 0, 1 + n)),
      vmConfig: Buffer.from(`point ${n}`), disks, threads: n % 2,
    });
    const before = n > 0 ? (await stat(fullPath)).size : 0;
    let newData = 0;
    // Disks written concurrently.
    await Promise.all(
      Object.entries(step.disks).map(async ([name, d]) => {
        const m = model(name, d.size);
        const changed = m.change(d.changes);
        newData += changed.reduce((a, b) => a + (b.data && b.data.some((x) => x !== 0) ? b.data.length : 0), 0);
        const blocks = step.compare
          ? Array.from({ length: m.blockCount }, (_, i) => {
              const data = m.bytes.subarray(i * BS, i * BS + m.lengthOf(i));
              // All-zero blocks as holes: the compare is about the data blocks (and keeps this test light).
              return { index: i, data: data.equals(ZEROES.subarray(0, data.length)) ? null : Buffer.from(data) };
            })
          : changed;
        const stats = await w.writeDisk(name, iterate(blocks), { compareWithParent: step.compare === true });
        // vda's block 5 was the short last block before the grow: its full-length form is new.
        const extra = name === 'vda' ? 1 : 0;
        if (step.compare) expect(stats.storedBlocks, `${name}: only real changes stored`).toBe(changed.filter((b) => b.data?.some((x) => x !== 0)).length + extra);
      }),
    );
    const point = await w.commit();
    if (n === 0) fullPath = point.file;
    else {
      expect(point.file).toBe(fullPath); // the newest point is the full, written in place
      // The full grew by the new records (compressed: at most the new data) plus table pages and
      // an index: no staging copy of the increment.
      expect((await stat(fullPath)).size - before).toBeLessThan(newData + 3 * 65600 + 8192);
    }
    const bytes = new Map<string, Buffer>();
    for (const [name, d] of Object.entries(step.disks)) bytes.set(name, Buffer.from(models.get(name)!.bytes.subarray(0, d.size)));
    points.push({ point, bytes });
    for (const [name, want] of bytes) expect((await read(repo, point.id, name, want.length)).equals(want), `point ${n} disk ${name}`).toBe(true);
  }
  // Older points after all injections (each injection moved the blocks it replaced into a .vrb).
  for (const [n, p] of points.entries()) {
    for (const [name, want] of p.bytes) expect((await read(repo, p.point.id, name, want.length)).equals(want), `point ${n} disk ${name} at the end`).toBe(true);
  }
  const listed = await repo.listRestorePoints({ job: 'j', vm: 'rv' });
  expect(listed.map((p) => p.kind)).toEqual(['reverse', 'reverse', 'reverse', 'reverse', 'full']);
  // The .vrb of the point before the last holds only the blocks the last point replaced (2 of vda, 1 of vdc).
  const vrb = await BackupFile.open(listed[3]!.file);
  try {
    const stored = vrb.index.disks.reduce((a, d) => a + d.stats.storedBlocks, 0);
    expect(stored).toBeLessThanOrEqual(1 + 1 + 4); // vda block 2 and the resized last blocks; vdc block 0
  } finally {
    await vrb.close();
  }

  // An aborted injection leaves the full as it was (its appended bytes cut) and every point intact.
  const sizeBefore = (await stat(fullPath)).size;
  const w = await repo.startRestorePoint({ job: 'j', vm: 'rv', kind: 'reverse', disks: [{ name: 'vda', size: 3 * BS + 9 }], threads: 0 });
  await w.writeDisk('vda', iterate(new DiskModel(3 * BS + 9, BS).change([[0, 'data', 99], [1, 'data', 98]])));
  expect((await stat(fullPath)).size).toBeGreaterThan(sizeBefore);
  await w.abort();
  expect((await stat(fullPath)).size).toBe(sizeBefore);
  for (const p of points) {
    for (const [name, want] of p.bytes) expect((await read(repo, p.point.id, name, want.length)).equals(want)).toBe(true);
  }
  const files = await readdir(path.dirname(fullPath));
  expect(files.filter((f) => f.includes('.tmp-') || f.startsWith('inject-'))).toEqual([]);
  expect((await verifyRepository(root)).damage).toEqual([]);
}, 60_000);
