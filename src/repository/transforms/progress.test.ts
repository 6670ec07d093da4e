// Live progress of the repository transforms (progress.ts): the throttle as a table, then a real
// merge, synthetic full, compaction and reverse injection of a chain spanning two table pages
// with several copy runs per page each report more than start and end, never move back, end at
// their total, and their last report's repository bytes are the transform's own I/O.
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DiskBlock } from '../../disk/types.js';
import { openRepository, type Repository } from '../index.js';
import { iterate } from '../test-helpers.js';
import { pageSpan, shouldReport, StepProgress, type ProgressThrottle, type TransformProgress } from './progress.js';

const T: ProgressThrottle = { everyMs: 250, everyBytes: 100 };

describe('shouldReport', () => {
  const cases: Array<[string, { atMs: number; bytesDone: number } | null, number, number, number, boolean]> = [
    // name, last, now, done, total, expected
    ['the first report always', null, 0, 0, 1000, true],
    ['the first report of an empty step', null, 0, 0, 0, true],
    ['no forward progress', { atMs: 0, bytesDone: 10 }, 10_000, 10, 1000, false],
    ['moved back (never reported)', { atMs: 0, bytesDone: 10 }, 10_000, 5, 1000, false],
    ['little progress, little time', { atMs: 1000, bytesDone: 10 }, 1100, 50, 1000, false],
    ['enough bytes', { atMs: 1000, bytesDone: 10 }, 1001, 110, 1000, true],
    ['one byte short of enough', { atMs: 1000, bytesDone: 10 }, 1001, 109, 1000, false],
    ['enough time', { atMs: 1000, bytesDone: 10 }, 1250, 11, 1000, true],
    ['one ms short of enough time', { atMs: 1000, bytesDone: 10 }, 1249, 11, 1000, false],
    ['the end is end()\'s to tell, with the last bytes written', { atMs: 0, bytesDone: 990 }, 5000, 1000, 1000, false],
    ['one byte short of the end', { atMs: 1000, bytesDone: 890 }, 1001, 999, 1000, true],
    ['an empty step has no second report', { atMs: 0, bytesDone: 0 }, 5000, 0, 0, false],
  ];
  it.each(cases)('%s', (_name, last, now, done, total, expected) => {
    expect(shouldReport(last, now, done, total, T)).toBe(expected);
  });
});

describe('StepProgress', () => {
  it('reports 0, the throttled steps forward, and the total once at the end; clamps and never moves back', () => {
    const told: TransformProgress[] = [];
    let now = 0;
    const p = new StepProgress('merge', 1000, () => ({ bytesRead: now, bytesWritten: 2 * now }), { onProgress: (x) => told.push(x), throttle: T }, () => now);
    p.start();
    p.at(50); // too little
    p.at(150); // enough bytes
    p.at(100); // back: ignored
    now = 300;
    p.at(151); // enough time
    p.within(200, 400, 1, 2); // 300
    p.at(5000); // clamped to the total: told by end()
    now = 400;
    p.end();
    p.end(); // once
    expect(told.map((x) => x.bytesDone)).toEqual([0, 150, 151, 300, 1000]);
    expect(told.every((x) => x.step === 'merge' && x.bytesTotal === 1000)).toBe(true);
    expect(told.at(-1)).toMatchObject({ bytesRead: 400, bytesWritten: 800 });
    expect(p.bytesDone).toBe(1000);
  });

  it('a listener that throws does not stop the step (progress is for the eye)', () => {
    let calls = 0;
    const p = new StepProgress('merge', 10, () => ({ bytesRead: 0, bytesWritten: 0 }), {
      onProgress: () => {
        calls++;
        throw new Error('link lost');
      },
      throttle: { everyMs: 1e9, everyBytes: 1 },
    });
    expect(() => {
      p.start();
      p.at(5);
      p.end();
    }).not.toThrow();
    expect(calls).toBe(3);
  });

  it('within an empty span goes to its end', () => {
    const told: number[] = [];
    const p = new StepProgress('compact', 10, () => ({ bytesRead: 0, bytesWritten: 0 }), { onProgress: (x) => told.push(x.bytesDone), throttle: { everyMs: 1e9, everyBytes: 1 } });
    p.start();
    p.within(0, 4, 0, 0);
    expect(told).toEqual([0, 4]);
  });

  it('page spans cover the disk exactly, the last page cut at the disk end', () => {
    expect(pageSpan(100, 2500, 0, 4, 256)).toEqual({ from: 100, to: 1124 });
    expect(pageSpan(100, 2500, 2, 4, 256)).toEqual({ from: 2148, to: 2600 });
    expect(pageSpan(0, 2500, 3, 4, 256)).toEqual({ from: 2500, to: 2500 });
  });
});

// Two table pages per disk (1024 entries a page) and incompressible blocks, so each page's copy
// takes several 8 MiB runs: a step has reports between its start and its end.
const BS = 262144;
const BLOCKS = 1030;
const SIZE = BLOCKS * BS - 1000;
const JOB = 'progress';
/** Every report (no time condition; every 8 MiB of disk bytes at most). */
const EVERY: ProgressThrottle = { everyMs: Number.MAX_SAFE_INTEGER, everyBytes: 8 * 1024 * 1024 };

let root: string;
let repo: Repository;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-progress-'));
  repo = await openRepository(root);
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Random data at `indexes` (the last block cut to the disk's end). */
function blocksAt(indexes: number[]): DiskBlock[] {
  return indexes.map((index) => ({ index, data: randomBytes(Math.min(BS, SIZE - index * BS)) }));
}
const range = (from: number, count: number): number[] => Array.from({ length: count }, (_, k) => from + k);

async function writePoint(vm: string, kind: 'full' | 'incremental' | 'reverse', day: number, disks: Record<string, number[]>, onTransformProgress?: (p: TransformProgress) => void): Promise<Map<string, DiskBlock[]>> {
  const w = await repo.startRestorePoint({
    job: JOB, vm, kind, blockSize: BS, compression: 'lz4', time: new Date(Date.UTC(2026, 0, day)),
    ...(kind === 'full' ? { chainMethod: vm === 'rv' ? 'reverse' : 'forward' } : {}),
    disks: Object.keys(disks).map((name) => ({ name, size: SIZE })), threads: 0,
    ...(onTransformProgress ? { onTransformProgress } : {}),
  });
  const written = new Map<string, DiskBlock[]>();
  for (const [name, indexes] of Object.entries(disks)) {
    const blocks = blocksAt(indexes);
    written.set(name, blocks);
    await w.writeDisk(name, iterate(blocks));
  }
  await w.commit();
  return written;
}

/** Reports of one step: more than start and end, monotonic, ending at the total (all disks). */
function expectLive(told: TransformProgress[], step: TransformProgress['step'], disks: number): void {
  expect(told.length).toBeGreaterThanOrEqual(4);
  expect(told.every((p) => p.step === step && p.bytesTotal === disks * SIZE)).toBe(true);
  expect(told[0]!.bytesDone).toBe(0);
  expect(told.at(-1)!.bytesDone).toBe(disks * SIZE);
  const inBetween = told.filter((p) => p.bytesDone > 0 && p.bytesDone < disks * SIZE);
  expect(inBetween.length).toBeGreaterThanOrEqual(2);
  for (let i = 1; i < told.length; i++) {
    expect(told[i]!.bytesDone).toBeGreaterThan(told[i - 1]!.bytesDone);
    expect(told[i]!.bytesRead).toBeGreaterThanOrEqual(told[i - 1]!.bytesRead);
    expect(told[i]!.bytesWritten).toBeGreaterThanOrEqual(told[i - 1]!.bytesWritten);
  }
}

/** The point's block `index` of `disk` reads as `data`. */
async function expectBlock(pointId: string, disk: string, b: DiskBlock): Promise<void> {
  const p = await repo.openRestorePoint(pointId);
  try {
    expect((await p.openDisk(disk).read(b.index * BS, b.data!.length)).equals(b.data!)).toBe(true);
  } finally {
    await p.close();
  }
}

it('a merge (forever-forward retention) reports live progress, ending at the total with its own I/O', async () => {
  // 2 disks; the increment changes 48 blocks (12 MiB) on each page of each disk.
  const pick = [...range(0, 48), ...range(1024, 6)];
  await writePoint('ff', 'full', 1, { vda: [...range(0, 160), ...range(1024, 6)], vdb: pick });
  const inc = await writePoint('ff', 'incremental', 2, { vda: [...range(100, 48), ...range(1024, 6)], vdb: pick });
  await writePoint('ff', 'incremental', 3, { vda: [5] });
  const told: TransformProgress[] = [];
  const report = (await repo.applyRetention(JOB, 'ff', { method: 'forever-forward', retention: { points: 2 } }, { now: new Date(Date.UTC(2026, 0, 4)), onProgress: (p) => told.push(p), throttle: EVERY })) as Awaited<
    ReturnType<Repository['applyRetention']>
  > & { io: { bytesRead: number; bytesWritten: number } };
  expect(report.actions.filter((a) => a.kind === 'merge')).toHaveLength(1);
  expectLive(told, 'merge', 2);
  expect(told.at(-1)).toMatchObject({ bytesRead: report.io.bytesRead, bytesWritten: report.io.bytesWritten });
  // The increment's records were read once (no extra reads for progress): about its 108 blocks.
  expect(report.io.bytesRead).toBeGreaterThanOrEqual(108 * BS);
  expect(report.io.bytesRead).toBeLessThan(120 * BS);
  const points = await repo.listRestorePoints({ job: JOB, vm: 'ff' });
  await expectBlock(points[0]!.id, 'vda', inc.get('vda')![7]!);
  await expectBlock(points[0]!.id, 'vdb', inc.get('vdb')![50]!);
});

it('a synthetic full reports live progress, ending at the total with its own I/O', async () => {
  await writePoint('sf', 'full', 1, { vda: [...range(0, 40), ...range(1024, 6)] });
  const last = await writePoint('sf', 'incremental', 2, { vda: [...range(20, 40), 1029] });
  const told: TransformProgress[] = [];
  const p = (await repo.synthesizeFull(JOB, 'sf', { onProgress: (x) => told.push(x), throttle: EVERY })) as Awaited<ReturnType<Repository['synthesizeFull']>> & {
    io: { bytesRead: number; bytesWritten: number };
  };
  expect(p.kind).toBe('full');
  expectLive(told, 'synthetic-full', 1);
  expect(told.at(-1)).toMatchObject({ bytesRead: p.io.bytesRead, bytesWritten: p.io.bytesWritten });
  await expectBlock(p.id, 'vda', last.get('vda')![40]!);
});

it('a compaction of a full reports live progress, ending at the total with its own I/O', async () => {
  // The merged full of the first test holds records nothing references any more.
  const told: TransformProgress[] = [];
  const r = (await repo.compactFull(JOB, 'ff', { onProgress: (x) => told.push(x), throttle: EVERY })) as Awaited<ReturnType<Repository['compactFull']>> & {
    io: { bytesRead: number; bytesWritten: number };
  };
  expect(r.bytesAfter).toBeLessThan(r.bytesBefore);
  expectLive(told, 'compact', 2);
  expect(told.at(-1)).toMatchObject({ bytesRead: r.io.bytesRead, bytesWritten: r.io.bytesWritten });
});

it('a reverse injection reports the progress of its .vrb step at commit', async () => {
  await writePoint('rv', 'full', 1, { vda: [...range(0, 60), ...range(1024, 6)] });
  const told: TransformProgress[] = [];
  await writePoint('rv', 'reverse', 2, { vda: [...range(10, 40), 1027] }, (p) => told.push({ ...p }));
  // Default throttle: 32 MiB of disk bytes; a page is 256 MiB, so the step still reports between.
  expect(told.length).toBeGreaterThanOrEqual(3);
  expect(told.every((p) => p.step === 'inject' && p.bytesTotal === SIZE)).toBe(true);
  expect(told.at(-1)!.bytesDone).toBe(SIZE);
  for (let i = 1; i < told.length; i++) expect(told[i]!.bytesDone).toBeGreaterThan(told[i - 1]!.bytesDone);
  // The .vrb took the 41 replaced blocks: read once, written once.
  expect(told.at(-1)!.bytesRead).toBeGreaterThanOrEqual(41 * BS);
  expect(told.at(-1)!.bytesRead).toBeLessThan(45 * BS);
});

it('a synthetic full of an encrypted chain re-encrypts every block for the new chain: bit-exact with the password, refused without, with live progress', async () => {
  const password = 'synth-pw-7';
  const put = async (kind: 'full' | 'incremental', day: number, indexes: number[]): Promise<DiskBlock[]> => {
    const w = await repo.startRestorePoint({
      job: JOB, vm: 'enc', kind, time: new Date(Date.UTC(2026, 0, day)), disks: [{ name: 'vda', size: SIZE }], threads: 0,
      ...(kind === 'full' ? { blockSize: BS, compression: 'zstd' as const, encryption: { password, log2N: 10 } } : { password }),
    });
    const blocks = blocksAt(indexes);
    await w.writeDisk('vda', iterate(blocks));
    await w.commit();
    return blocks;
  };
  const full = await put('full', 1, [...range(0, 30), ...range(1024, 6)]);
  const inc = await put('incremental', 2, [...range(10, 30), 1029]);
  const told: TransformProgress[] = [];
  const p = await repo.synthesizeFull(JOB, 'enc', { password, onProgress: (x) => told.push(x), throttle: EVERY });
  expect(p).toMatchObject({ kind: 'full', encrypted: true });
  expect(told.at(-1)).toMatchObject({ step: 'synthetic-full', bytesDone: SIZE, bytesTotal: SIZE });
  expect(told.filter((x) => x.bytesDone > 0 && x.bytesDone < SIZE).length).toBeGreaterThanOrEqual(2);
  // Every block of the point as it was: from the old full where the increment did not change it.
  const opened = await repo.openRestorePoint(p.id, { password });
  try {
    const disk = opened.openDisk('vda');
    const want = new Map<number, Buffer>();
    for (const b of [...full, ...inc]) want.set(b.index, b.data!);
    for (const [index, data] of want) expect((await disk.read(index * BS, data.length)).equals(data), `block ${index}`).toBe(true);
    expect((await disk.read(50 * BS, BS)).equals(Buffer.alloc(BS))).toBe(true);
  } finally {
    await opened.close();
  }
  await expect(repo.openRestorePoint(p.id, { password: 'wrong-pw-1' })).rejects.toMatchObject({ kind: 'unauthorized' });
  // It stands alone: the old chain's increment file is gone, the new chain is the point's.
  expect((await repo.listRestorePoints({ job: JOB, vm: 'enc' })).map((x) => x.kind)).toEqual(['full', 'full']);
});
