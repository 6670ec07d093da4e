// Several disks written concurrently into one restore-point file: records interleave, each disk
// keeps its own block table, in-file dedup works across disks, and a failing disk fails the point.
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setImmediate as tick } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DiskBlock } from '../disk/types.js';
import { openRepository, type RestorePointInfo } from './index.js';
import { DiskModel, patterned } from './test-helpers.js';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-writer-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const BS = 262144;
type Change = [number, 'data' | 'zero' | 'hole', number?];

/** Yields to the event loop between blocks (every `every` blocks) so the disks really interleave. */
async function* slowly(blocks: DiskBlock[], every: number, failAt = -1): AsyncGenerator<DiskBlock> {
  for (const [n, b] of blocks.entries()) {
    if (n % every === 0) await tick();
    if (n === failAt) throw new Error(`source of the test disk broke at block ${b.index}`);
    yield b;
  }
}

/** Bytes of a block every disk holds at some index: identical, so stored once in the file. */
const SHARED = patterned(BS, 0, 4242);

function plan(m: DiskModel, seed: number): Change[] {
  const out: Change[] = [];
  for (let i = 0; i < m.blockCount; i++) {
    const r = (i * 7 + seed) % 10;
    if (r === 0) out.push([i, 'zero']);
    else if (r === 1) out.push([i, 'hole']);
    else out.push([i, 'data', seed * 1000 + i]);
  }
  return out;
}

async function readBack(info: RestorePointInfo, name: string, m: DiskModel) {
  const repo = await openRepository(root);
  const p = await repo.openRestorePoint(info.id);
  try {
    const d = p.openDisk(name);
    const seq = Buffer.alloc(m.size);
    let n = 0;
    for await (const b of d.stream()) {
      expect(b.index).toBe(n++);
      if (b.data) b.data.copy(seq, b.index * BS);
    }
    expect(n).toBe(m.blockCount);
    expect(seq.equals(m.bytes)).toBe(true);
    // Random access: ranges crossing block edges, in shuffled order.
    for (let k = 0; k < 24; k++) {
      const off = (k * 104729 * 13) % m.size;
      const len = Math.min(m.size - off, ((k * 7919) % (2 * BS)) + 1);
      expect((await d.read(off, len)).equals(m.bytes.subarray(off, off + len))).toBe(true);
    }
    const offsets: number[] = [];
    for (let i = 0; i < m.blockCount; i++) {
      const r = await p.resolve(name, i);
      if (r.kind === 'stored') offsets.push(r.entry.recordOffset);
    }
    return offsets;
  } finally {
    await p.close();
  }
}

describe('concurrent disks in one restore point', () => {
  it('three disks written at once round-trip bit-exact; records interleave; identical blocks stored once', async () => {
    const repo = await openRepository(root);
    const sizes = { vda: 23 * BS + 777, vdb: 9 * BS - 5, vdc: 31 * BS + BS / 2 + 1 };
    const models = { vda: new DiskModel(sizes.vda, BS), vdb: new DiskModel(sizes.vdb, BS), vdc: new DiskModel(sizes.vdc, BS) };
    const names = ['vda', 'vdb', 'vdc'] as const;
    const disks = names.map((name) => ({ name, size: sizes[name] }));
    const w = await repo.startRestorePoint({ job: 'multi', vm: 'vm1', kind: 'full', blockSize: BS, threads: 2, disks });
    const streams = names.map((name, k) => {
      // Block 3 of every disk holds the same bytes.
      const blocks = models[name].change(plan(models[name], k + 1)).map((b) => (b.index === 3 ? { index: 3, data: SHARED } : b));
      SHARED.copy(models[name].bytes, 3 * BS);
      return w.writeDisk(name, slowly(blocks, k + 1));
    });
    const stats = await Promise.all(streams);
    const full = await w.commit();
    expect(stats.reduce((a, s) => a + s.dedupBlocks, 0)).toBe(2);
    const offsets = new Map<string, number[]>();
    for (const name of names) offsets.set(name, await readBack(full, name, models[name]));
    // Interleaved: some record of vdb lies between records of vda.
    const a = offsets.get('vda')!;
    expect(offsets.get('vdb')!.some((o) => o > Math.min(...a) && o < Math.max(...a))).toBe(true);

    // An increment of all three disks at once, from a source without changed-block tracking.
    const next = names.map((name, k) => {
      const all = models[name].change([[1, 'data', 9000 + k], [5, 'zero']]);
      const blocks: DiskBlock[] = [];
      for (let i = 0; i < models[name].blockCount; i++) {
        const off = i * BS;
        const len = models[name].lengthOf(i);
        const bytes = Buffer.from(models[name].bytes.subarray(off, off + len));
        blocks.push({ index: i, data: bytes });
      }
      expect(all).toHaveLength(2);
      return blocks;
    });
    const w2 = await repo.startRestorePoint({ job: 'multi', vm: 'vm1', kind: 'incremental', threads: 2, disks });
    const st2 = await Promise.all(names.map((name, k) => w2.writeDisk(name, slowly(next[k]!, 2), { compareWithParent: true })));
    const incr = await w2.commit();
    for (const [k, s] of st2.entries()) {
      // Only block 1 changed data; zero blocks over the parent's holes get a zero entry.
      expect(s.storedBlocks).toBe(1);
      expect(s.unchangedBlocks).toBe(s.inheritBlocks);
      expect(s.storedBlocks + s.zeroBlocks + s.inheritBlocks).toBe(models[names[k]!].blockCount);
      expect(s.unchangedBlocks).toBeGreaterThan(models[names[k]!].blockCount / 2);
    }
    for (const name of names) await readBack(incr, name, models[name]);
  });

  it('blocks read straight into lent encoder slots (no copy) round-trip, beside a copied disk; an unused lent buffer goes back', async () => {
    const repo = await openRepository(root);
    const a = new DiskModel(13 * BS + 99, BS);
    const b = new DiskModel(6 * BS, BS);
    const aBlocks = a.change(plan(a, 7));
    const bBlocks = b.change(plan(b, 8));
    const w = await repo.startRestorePoint({ job: 'multi', vm: 'lend', kind: 'full', blockSize: BS, threads: 2, disks: [{ name: 'vda', size: a.size }, { name: 'vdb', size: b.size }] });
    async function* lentSource(): AsyncGenerator<DiskBlock> {
      for (const blk of aBlocks) {
        await tick();
        if (blk.data === null) {
          yield blk;
          continue;
        }
        const into = await w.lendBuffer();
        expect(into.length).toBe(BS);
        blk.data.copy(into); // stands for a read into the buffer
        yield { index: blk.index, data: into.subarray(0, blk.data.length) };
      }
      w.giveBackBuffer(await w.lendBuffer());
    }
    const [sa, sb] = await Promise.all([w.writeDisk('vda', lentSource()), w.writeDisk('vdb', slowly(bBlocks, 1))]);
    const info = await w.commit();
    expect(sa.storedBlocks + sa.zeroBlocks + sa.holeBlocks).toBe(a.blockCount);
    expect(sb.storedBlocks + sb.zeroBlocks + sb.holeBlocks).toBe(b.blockCount);
    await readBack(info, 'vda', a);
    await readBack(info, 'vdb', b);
  });

  it('a failing disk fails the whole point: the others stop, commit refuses, nothing becomes visible', async () => {
    const repo = await openRepository(root);
    const dir = path.join(root, 'multi', 'vm2');
    const m = new DiskModel(40 * BS + 3, BS);
    const blocks = m.change(Array.from({ length: m.blockCount }, (_, i): Change => [i, 'data', i]));
    const disks = [{ name: 'vda', size: m.size }, { name: 'vdb', size: m.size }, { name: 'vdc', size: m.size }];
    for (const end of ['commit', 'abort'] as const) {
      const w = await repo.startRestorePoint({ job: 'multi', vm: 'vm2', kind: 'full', blockSize: BS, threads: 2, disks });
      const runs = [w.writeDisk('vda', slowly(blocks, 1)), w.writeDisk('vdb', slowly(blocks, 1, 6)), w.writeDisk('vdc', slowly(blocks, 1))];
      const settled = await Promise.allSettled(runs);
      expect(settled.map((s) => s.status)).toEqual(['rejected', 'rejected', 'rejected']);
      expect(String((settled[1] as PromiseRejectedResult).reason)).toMatch(/broke at block 6/);
      if (end === 'commit') await expect(w.commit()).rejects.toThrow(/broke at block 6/);
      else await w.abort();
      expect((await readdir(dir)).filter((n) => n !== 'writer.lock' && !n.endsWith('.vbm'))).toEqual([]);
      expect(await repo.listRestorePoints({ job: 'multi', vm: 'vm2' })).toEqual([]);
    }
    // The folder is usable again: the next point commits.
    const w = await repo.startRestorePoint({ job: 'multi', vm: 'vm2', kind: 'full', blockSize: BS, threads: 2, disks: [{ name: 'vda', size: m.size }] });
    await w.writeDisk('vda', slowly(blocks, 3));
    const info = await w.commit();
    await readBack(info, 'vda', m);
  });
});
