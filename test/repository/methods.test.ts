// The three backup methods through the repository API, 10 runs each with random writes into a
// test image between runs: after every run each kept point reads back bit-exact, and the VM
// folder holds exactly the files the policy says (no more, no fewer).
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DiskBlock } from '../../src/disk/types.js';
import { openRepository, verifyRepository, vmFolder, type MethodPolicy, type Repository } from '../../src/repository/index.js';
import { JOB, runOnce } from './fixtures/method-runner.js';

const BS = 262144;
const SIZE = 9 * BS + 4321;
const BLOCKS = Math.ceil(SIZE / BS);
const disk = { name: 'vda', size: SIZE, blockSize: BS };

let root: string;
let repo: Repository;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-methods-'));
  repo = await openRepository(root);
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A test image with random-access writes; tracks which blocks changed since the last run. */
class Image {
  readonly bytes = Buffer.alloc(SIZE);
  dirty = new Set<number>();
  #seed: number;
  constructor(seed: number) {
    this.#seed = seed;
  }
  #rnd(): number {
    this.#seed = (this.#seed * 1103515245 + 12345) % 2147483648;
    return this.#seed / 2147483648;
  }
  /** A few writes of random length at random offsets (some zeroing), like a guest's day. */
  scribble(day: number): void {
    const writes = 1 + Math.floor(this.#rnd() * 3);
    for (let w = 0; w < writes; w++) {
      const len = 1 + Math.floor(this.#rnd() * BS * 1.5);
      const off = Math.floor(this.#rnd() * (SIZE - len));
      if (this.#rnd() < 0.2) this.bytes.fill(0, off, off + len);
      else for (let i = 0; i < len; i++) this.bytes[off + i] = (day * 31 + ((off + i) >> 3) * 7 + (i & 0xff)) & 0xff;
      for (let b = Math.floor(off / BS); b <= Math.floor((off + len - 1) / BS); b++) this.dirty.add(b);
    }
  }
  *blocks(full: boolean): Generator<DiskBlock> {
    const which = full ? Array.from({ length: BLOCKS }, (_, i) => i) : [...this.dirty].sort((a, b) => a - b);
    for (const i of which) {
      const data = this.bytes.subarray(i * BS, Math.min(SIZE, (i + 1) * BS));
      yield { index: i, data: data.every((x) => x === 0) ? null : Buffer.from(data) };
    }
    this.dirty.clear();
  }
}

async function readPoint(id: string): Promise<Buffer> {
  const p = await repo.openRestorePoint(id);
  try {
    return await p.openDisk('vda').read(0, SIZE);
  } finally {
    await p.close();
  }
}

interface Expect {
  /** Points (by run number) the folder must hold after run k. */
  points(k: number, history: readonly { k: number; kind: string }[]): number[];
  /** Backup files by extension after run k. */
  files(k: number, history: readonly { k: number; kind: string }[]): { vbk: number; vib: number; vrb: number };
}

async function tenRuns(vm: string, policy: MethodPolicy, want: Expect): Promise<string[]> {
  const image = new Image(vm.length * 7919);
  const snapshots = new Map<string, { k: number; bytes: Buffer }>();
  const history: { k: number; kind: string }[] = [];
  const kinds: string[] = [];
  for (let k = 0; k < 10; k++) {
    if (k > 0) image.scribble(k);
    const { plan, point } = await runOnce(repo, vm, policy, k, disk, (full) => image.blocks(full));
    kinds.push(plan.kind);
    history.push({ k, kind: plan.kind });
    snapshots.set(point.id, { k, bytes: Buffer.from(image.bytes) });
    const points = await repo.listRestorePoints({ job: JOB, vm });
    expect(points.map((p) => snapshots.get(p.id)!.k), `points after run ${k}`).toEqual(want.points(k, history));
    for (const p of points) expect((await readPoint(p.id)).equals(snapshots.get(p.id)!.bytes), `point of run ${snapshots.get(p.id)!.k} after run ${k} reads bit-exact`).toBe(true);
    const files = (await readdir(vmFolder(root, JOB, vm))).filter((n) => !n.endsWith('.vbm') && n !== 'writer.lock');
    const count = (ext: string) => files.filter((n) => n.endsWith(`.${ext}`)).length;
    expect({ vbk: count('vbk'), vib: count('vib'), vrb: count('vrb'), other: files.length - count('vbk') - count('vib') - count('vrb') }, `files after run ${k}`).toEqual({
      ...want.files(k, history), other: 0,
    });
    expect(new Set(files)).toEqual(new Set(points.map((p) => path.basename(p.file))));
  }
  const report = await verifyRepository(root);
  expect(report.damage).toEqual([]);
  return kinds;
}

const lastN = (k: number, n: number) => Array.from({ length: Math.min(n, k + 1) }, (_, i) => k + 1 - Math.min(n, k + 1) + i);

describe('backup methods, 10 runs each', () => {
  it('forever forward incremental, keep 4 points: merges the oldest increment into the full', async () => {
    const kinds = await tenRuns('ff', { method: 'forever-forward', retention: { points: 4 } }, {
      points: (k) => lastN(k, 4),
      files: (k) => ({ vbk: 1, vib: Math.min(k, 3), vrb: 0 }),
    });
    expect(kinds).toEqual(['full', ...Array(9).fill('incremental')]);
  });

  it('forward incremental, synthetic full on sundays, active full on the 8th, keep 3 points: whole chains deleted', async () => {
    // Runs 0..9 are 2026-11-01 (sun) .. 2026-11-10: run 0 full, 7 synthetic (sun 8th is also the
    // active-full day: active wins), so chains start at runs 0 and 7.
    const policy: MethodPolicy = { method: 'forward', retention: { points: 3 }, syntheticFull: { weekdays: ['sun'] }, activeFull: { monthDays: [8] } };
    const chainStarts = [0, 7];
    const kinds = await tenRuns('fw', policy, {
      points: (k) => {
        const kept = lastN(k, 3);
        // A chain stays whole while any of its points is kept.
        const start = chainStarts.filter((s) => s <= kept[0]!).at(-1)!;
        return Array.from({ length: k - start + 1 }, (_, i) => start + i);
      },
      files: (k) => {
        const kept = lastN(k, 3);
        const start = chainStarts.filter((s) => s <= kept[0]!).at(-1)!;
        const fulls = chainStarts.filter((s) => s >= start && s <= k).length;
        return { vbk: fulls, vib: k - start + 1 - fulls, vrb: 0 };
      },
    });
    expect(kinds).toEqual(['full', 'incremental', 'incremental', 'incremental', 'incremental', 'incremental', 'incremental', 'full', 'incremental', 'incremental']);
  });

  it('forward incremental with a synthetic full: the point becomes a full of a new chain', async () => {
    const policy: MethodPolicy = { method: 'forward', retention: { points: 4 }, syntheticFull: { weekdays: ['wed', 'sat'] } };
    // Runs 3 (wed 4th) and 6 (sat 7th) are synthetic fulls: chains start at 0, 3, 6, 10 (wed 11th is run 10).
    const starts = [0, 3, 6];
    const kinds = await tenRuns('syn', policy, {
      points: (k) => {
        const kept = lastN(k, 4);
        const start = starts.filter((s) => s <= kept[0]!).at(-1)!;
        return Array.from({ length: k - start + 1 }, (_, i) => start + i);
      },
      files: (k) => {
        const kept = lastN(k, 4);
        const start = starts.filter((s) => s <= kept[0]!).at(-1)!;
        const fulls = starts.filter((s) => s >= start && s <= k).length;
        return { vbk: fulls, vib: k - start + 1 - fulls, vrb: 0 };
      },
    });
    expect(kinds.filter((x) => x === 'synthetic-full').length).toBe(2);
  });

  it('reverse incremental, keep 3 points: the newest is the full, the oldest .vrb deleted', async () => {
    const kinds = await tenRuns('rv', { method: 'reverse', retention: { points: 3 } }, {
      points: (k) => lastN(k, 3),
      files: (k) => ({ vbk: 1, vib: 0, vrb: Math.min(k, 2) }),
    });
    expect(kinds).toEqual(['full', ...Array(9).fill('reverse')]);
    const points = await repo.listRestorePoints({ job: JOB, vm: 'rv' });
    expect(points.map((p) => p.kind)).toEqual(['reverse', 'reverse', 'full']);
  });

  it('compaction after merges drops unreferenced records; every point still reads bit-exact', async () => {
    const before = await repo.listRestorePoints({ job: JOB, vm: 'ff' });
    const bytes = await Promise.all(before.map((p) => readPoint(p.id)));
    const r = await repo.compactFull(JOB, 'ff');
    expect(r.bytesAfter).toBeLessThan(r.bytesBefore);
    const after = await repo.listRestorePoints({ job: JOB, vm: 'ff' });
    expect(after.map((p) => p.id)).toEqual(before.map((p) => p.id));
    for (const [i, p] of after.entries()) expect((await readPoint(p.id)).equals(bytes[i]!)).toBe(true);
    expect((await verifyRepository(root)).damage).toEqual([]);
    // A merge after compaction still works (generation continues).
    const rv = await repo.compactFull(JOB, 'rv');
    expect(rv.bytesAfter).toBeLessThan(rv.bytesBefore);
  });
});
