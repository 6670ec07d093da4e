import { watch } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../common/errors.js';
import { openRepository, type RestorePointInfo } from './index.js';
import { DiskModel, iterate } from './test-helpers.js';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-repo-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const BS = 262144;

async function readAllSequential(repo: Awaited<ReturnType<typeof openRepository>>, id: string, disk: string, size: number, password?: string) {
  const p = await repo.openRestorePoint(id, { password });
  try {
    const d = p.openDisk(disk);
    const out = Buffer.alloc(size);
    let expectIndex = 0;
    for await (const b of d.stream()) {
      expect(b.index).toBe(expectIndex++);
      if (b.data) b.data.copy(out, b.index * BS);
    }
    expect(expectIndex).toBe(Math.ceil(size / BS));
    return { out, p, d };
  } finally {
    await p.close();
  }
}

describe('repository round trip', () => {
  it('full + 5 increments: every point bit-exact, sequentially and by random access', async () => {
    const repo = await openRepository(root);
    const sizes = { vda: 7 * BS + 12345, vdb: 3 * BS - 1 };
    const models = { vda: new DiskModel(sizes.vda, BS), vdb: new DiskModel(sizes.vdb, BS) };
    const snapshots: Array<{ point: RestorePointInfo; vda: Buffer; vdb: Buffer }> = [];
    const plan: Array<{ vda: Array<[number, 'data' | 'zero' | 'hole', number?]>; vdb: Array<[number, 'data' | 'zero' | 'hole', number?]>; compare?: boolean }> = [
      { vda: [[0, 'data'], [1, 'data'], [2, 'zero'], [3, 'data'], [5, 'data', 5], [6, 'data', 5], [7, 'data']], vdb: [[0, 'data'], [2, 'data']] },
      { vda: [[1, 'data', 101], [7, 'data', 107]], vdb: [] },
      { vda: [[0, 'hole'], [4, 'data', 104]], vdb: [[1, 'data', 201]] },
      { vda: [[3, 'zero'], [2, 'data', 102]], vdb: [[2, 'hole']] },
      // compareWithParent: re-send the whole disk, only the real change must be stored
      { vda: [[6, 'data', 106]], vdb: [[0, 'data', 300]], compare: true },
      { vda: [[7, 'data', 7]], vdb: [] },
    ];
    for (const [n, step] of plan.entries()) {
      const w = await repo.startRestorePoint({
        job: 'nightly', vm: 'web 1', kind: n === 0 ? 'full' : 'incremental', blockSize: BS,
        compression: 'zstd', time: new Date(Date.UTC(2026, 0, 1 + n)), vmConfig: Buffer.from(`<domain n="${n}"/>`),
        disks: [{ name: 'vda', size: sizes.vda }, { name: 'vdb', size: sizes.vdb }], threads: n === 2 ? 2 : 0,
      });
      for (const name of ['vda', 'vdb'] as const) {
        const changed = models[name].change(step[name]);
        if (step.compare) {
          // A source with no changed-block tracking sends every block.
          const all = Array.from({ length: models[name].blockCount }, (_, i) => {
            const slice = models[name].bytes.subarray(i * BS, i * BS + models[name].lengthOf(i));
            return { index: i, data: slice.every((x) => x === 0) ? null : Buffer.from(slice) };
          });
          const st = await w.writeDisk(name, iterate(all), { compareWithParent: true });
          expect(st.storedBlocks).toBe(changed.filter((b) => b.data).length);
        } else {
          await w.writeDisk(name, iterate(changed));
        }
      }
      const point = await w.commit();
      snapshots.push({ point, vda: Buffer.from(models.vda.bytes), vdb: Buffer.from(models.vdb.bytes) });
    }
    const reopened = await openRepository(root);
    const points = await reopened.listRestorePoints({ vm: 'web 1' });
    expect(points.map((p) => p.id)).toEqual(snapshots.map((s) => s.point.id));
    expect(points.map((p) => p.kind)).toEqual(['full', 'incremental', 'incremental', 'incremental', 'incremental', 'incremental']);
    for (const [n, s] of snapshots.entries()) {
      for (const name of ['vda', 'vdb'] as const) {
        const { out } = await readAllSequential(reopened, s.point.id, name, sizes[name]);
        expect(out.equals(s[name]), `point ${n} disk ${name} sequential`).toBe(true);
      }
      const p = await reopened.openRestorePoint(s.point.id);
      expect(p.vmConfig.toString()).toBe(`<domain n="${n}"/>`);
      const d = p.openDisk('vda');
      // Random access: unaligned ranges crossing block boundaries, and the tail.
      for (const [off, len] of [[0, 1], [BS - 3, 10], [BS * 2 - 100, BS + 200], [sizes.vda - 77, 77], [12345, 5 * BS], [0, sizes.vda]] as const) {
        expect((await d.read(off, len)).equals(s.vda.subarray(off, off + len)), `point ${n} read ${off}+${len}`).toBe(true);
      }
      // And ranges drawn at random (seeded, so a failure repeats) on both disks, read all at once:
      // the reads share the point's block cache and run in parallel.
      for (const name of ['vda', 'vdb'] as const) {
        const disk = name === 'vda' ? d : p.openDisk(name);
        const size = sizes[name];
        const ranges = fc.sample(
          fc.integer({ min: 0, max: size - 1 }).chain((off) => fc.tuple(fc.constant(off), fc.integer({ min: 1, max: Math.min(size - off, 3 * BS) }))),
          { numRuns: 40, seed: 4242 + n },
        );
        const got = await Promise.all(ranges.map(([off, len]) => disk.read(off, len)));
        for (const [i, [off, len]] of ranges.entries()) {
          expect(got[i]!.equals(s[name].subarray(off, off + len)), `point ${n} ${name} random read ${off}+${len}`).toBe(true);
        }
      }
      const ext = await d.extents(0, sizes.vda);
      expect(ext.reduce((a, e) => a + e.length, 0)).toBe(sizes.vda);
      for (const e of ext) if (e.kind !== 'data') expect(s.vda.subarray(e.offset, e.offset + e.length).every((x) => x === 0)).toBe(true);
      await expect(d.read(sizes.vda - 1, 2)).rejects.toThrow(/outside disk/);
      await p.close();
    }
    const chains = await reopened.listChains({ job: 'nightly' });
    expect(chains).toHaveLength(1);
    expect(chains[0]!.points).toHaveLength(6);
  });

  it('reports the bytes stored so far while a disk is written (live progress), the total at its end', async () => {
    const repo = await openRepository(root);
    const m = new DiskModel(30 * BS, BS);
    // Twice the encoder slots (12): the writer must retire blocks before it can take the rest.
    const blocks = m.change(Array.from({ length: 30 }, (_, i) => [i, 'data', 900 + i] as [number, 'data', number]));
    const w = await repo.startRestorePoint({ job: 'live', vm: 'v', kind: 'full', blockSize: BS, threads: 2, disks: [{ name: 'vda', size: m.size }] });
    const reports: Array<[number, number]> = [];
    const st = await w.writeDisk('vda', iterate(blocks), { onProgress: (done, stored) => reports.push([done, stored]) });
    await w.commit();
    expect(st.storedBytes).toBeGreaterThan(0);
    expect(reports.at(-1)).toEqual([m.size, st.storedBytes]);
    for (let i = 1; i < reports.length; i++) expect(reports[i]![1]).toBeGreaterThanOrEqual(reports[i - 1]![1]);
    const midway = reports.slice(0, -1).filter(([done, stored]) => done < m.size && stored > 0 && stored < st.storedBytes);
    expect(midway.length, JSON.stringify(reports)).toBeGreaterThan(0);
  });

  it('a source may reuse its buffer after yielding (worker threads copy before the next pull)', async () => {
    const repo = await openRepository(root);
    const m = new DiskModel(12 * BS + 5, BS);
    const blocks = m.change(Array.from({ length: 13 }, (_, i) => [i, "data", 500 + i] as [number, "data", number]));
    const shared = Buffer.alloc(BS);
    const w = await repo.startRestorePoint({ job: 'reuse', vm: 'v', kind: 'full', blockSize: BS, threads: 2, disks: [{ name: 'vda', size: m.size }] });
    await w.writeDisk('vda', (async function* () {
      for (const b of blocks) {
        const view = shared.subarray(0, b.data!.length);
        b.data!.copy(view);
        yield { index: b.index, data: view };
        shared.fill(0xee); // the source overwrites its buffer as soon as it is asked for more
      }
    })());
    const info = await w.commit();
    const p = await repo.openRestorePoint(info.id);
    expect((await p.openDisk('vda').read(0, m.size)).equals(m.bytes)).toBe(true);
    await p.close();
  });

  it('deduplicates identical blocks inside a file', async () => {
    const repo = await openRepository(root);
    const same = Buffer.alloc(BS, 0x5a);
    const w = await repo.startRestorePoint({ job: 'dedup', vm: 'v', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: 4 * BS }] });
    const st = await w.writeDisk('vda', iterate([0, 1, 2, 3].map((index) => ({ index, data: same }))));
    expect(st.storedBlocks).toBe(4);
    expect(st.dedupBlocks).toBe(3);
    const p = await w.commit();
    const r = await repo.openRestorePoint(p.id);
    expect((await r.openDisk('vda').read(0, 4 * BS)).equals(Buffer.alloc(4 * BS, 0x5a))).toBe(true);
    await r.close();
  });

  it('every block size and compression', async () => {
    const repo = await openRepository(root);
    for (const blockSize of [262144, 524288, 1048576, 4194304]) {
      for (const compression of ['zstd', 'lz4', 'none'] as const) {
        const size = blockSize + 4097;
        const m = new DiskModel(size, blockSize);
        const w = await repo.startRestorePoint({ job: 'sizes', vm: `bs${blockSize}-${compression}`, kind: 'full', blockSize, compression, threads: 0, disks: [{ name: 'd', size }] });
        await w.writeDisk('d', iterate(m.change([[0, 'data'], [1, 'data']])));
        const info = await w.commit();
        const p = await repo.openRestorePoint(info.id);
        expect((await p.openDisk('d').read(0, size)).equals(m.bytes)).toBe(true);
        await p.close();
      }
    }
  });

  it('encryption: right password reads, wrong password says so, missing password asks', async () => {
    const repo = await openRepository(root);
    const m = new DiskModel(2 * BS + 3, BS);
    const w = await repo.startRestorePoint({ job: 'enc', vm: 'v', kind: 'full', blockSize: BS, threads: 0, encryption: { password: 'correct horse', hint: 'the horse', log2N: 12 }, vmConfig: Buffer.from('secret xml'), disks: [{ name: 'vda', size: m.size }] });
    await w.writeDisk('vda', iterate(m.change([[0, 'data'], [2, 'data']])));
    const full = await w.commit();
    const w2 = await repo.startRestorePoint({ job: 'enc', vm: 'v', kind: 'incremental', password: 'correct horse', threads: 0, disks: [{ name: 'vda', size: m.size }] });
    await w2.writeDisk('vda', iterate(m.change([[1, 'data', 9]])));
    const inc = await w2.commit();
    const p = await repo.openRestorePoint(inc.id, { password: 'correct horse' });
    expect((await p.openDisk('vda').read(0, m.size)).equals(m.bytes)).toBe(true);
    await p.close();
    const pf = await repo.openRestorePoint(full.id, { password: 'correct horse' });
    expect(pf.vmConfig.toString()).toBe('secret xml');
    await pf.close();
    const wrong = await repo.openRestorePoint(full.id, { password: 'battery staple' }).catch((e: unknown) => e);
    expect(wrong).toBeInstanceOf(BulwarkError);
    expect((wrong as BulwarkError).kind).toBe('unauthorized');
    expect((wrong as BulwarkError).message).toMatch(/wrong password/);
    expect((wrong as BulwarkError).hint).toMatch(/the horse/);
    await expect(repo.openRestorePoint(full.id)).rejects.toThrow(/password is needed/);
    await expect(repo.startRestorePoint({ job: 'enc', vm: 'v', kind: 'incremental', password: 'nope', disks: [] })).rejects.toThrow(/wrong password/);
  });

  it('refuses bad input and a second writer; abort leaves nothing', async () => {
    const repo = await openRepository(root);
    const w = await repo.startRestorePoint({ job: 'j', vm: 'busy', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: 2 * BS }] });
    await expect(repo.startRestorePoint({ job: 'j', vm: 'busy', kind: 'full', disks: [] })).rejects.toThrow(/another writer/);
    await expect(w.writeDisk('vda', iterate([{ index: 1, data: Buffer.alloc(BS, 1) }, { index: 0, data: Buffer.alloc(BS, 1) }]))).rejects.toThrow(/out of order/);
    await expect(w.writeDisk('nope', iterate([]))).rejects.toThrow(/not declared/);
    await w.abort();
    const dir = path.join(root, 'j', 'busy');
    expect((await readdir(dir)).filter((n) => !n.endsWith('.vbm') && n !== 'writer.lock')).toEqual([]);
    const w2 = await repo.startRestorePoint({ job: 'j', vm: 'busy', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: 2 * BS }] });
    await expect(w2.commit()).rejects.toThrow(/not written/);
    await expect(repo.startRestorePoint({ job: 'j', vm: 'none', kind: 'incremental', disks: [] })).rejects.toThrow(/full backup first/);
  });

  it('open sweeps temporaries of dead writers and uncommitted files', async () => {
    const dir = path.join(root, 'nightly', 'web%201');
    await writeFile(path.join(dir, 'x.vbk.tmp-999999999-abcd'), 'junk');
    const orphan = Buffer.alloc(4096);
    Buffer.from('7532a6b8f157bb6c', 'hex').copy(orphan); // a Bulwark increment nobody committed
    await writeFile(path.join(dir, '20990101T000000Z-deadbeef.vib'), orphan);
    await writeFile(path.join(dir, 'foreign.vbk'), 'another product uses this extension');
    const repo = await openRepository(root);
    expect((await repo.sweep()).removed).toEqual([]);
    const names = await readdir(dir);
    expect(names.some((n) => n.includes('.tmp-'))).toBe(false);
    expect(names).not.toContain('20990101T000000Z-deadbeef.vib');
    expect(names).toContain('foreign.vbk');
  });
});

describe('the first point of a VM folder', () => {
  it('names the folder in a .vbm before its backup file gets its name, so a crash between the two leaves a file the sweep removes', async () => {
    const repo = await openRepository(root);
    const dir = path.join(root, 'first', 'vm');
    await mkdir(dir, { recursive: true });
    const seen: string[] = [];
    const watcher = watch(dir, (_event, name) => {
      if (name && !name.includes('.tmp-') && (name.endsWith('.vbm') || /\.vbk$/.test(name))) seen.push(name);
    });
    try {
      const w = await repo.startRestorePoint({ job: 'first', vm: 'vm', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: BS }] });
      await w.writeDisk('vda', iterate([{ index: 0, data: Buffer.alloc(BS, 7) }]));
      const p = await w.commit();
      for (let i = 0; i < 100 && !seen.includes(path.basename(p.file)); i++) await new Promise((r) => setTimeout(r, 10));
      const vbk = seen.indexOf(path.basename(p.file));
      expect(vbk).toBeGreaterThanOrEqual(0);
      expect(seen.indexOf('vm.vbm')).toBeGreaterThanOrEqual(0);
      expect(seen.indexOf('vm.vbm')).toBeLessThan(vbk);
    } finally {
      watcher.close();
    }
    // What such a crash leaves (a .vbm naming no point, a published file) is swept: 'open sweeps temporaries of dead writers and uncommitted files'.
  });
});

describe('a disk that grew between points', () => {
  it('reads the inherited short last block of the smaller disk padded with zeroes', async () => {
    const repo = await openRepository(root);
    const small = BS + 1000;
    const big = 3 * BS;
    const first = Buffer.alloc(small, 0x5a);
    const full = await repo.startRestorePoint({ job: 'grow', vm: 'vm', kind: 'full', blockSize: BS, compression: 'none', disks: [{ name: 'vda', size: small }], threads: 0 });
    await full.writeDisk('vda', iterate([{ index: 0, data: first.subarray(0, BS) }, { index: 1, data: first.subarray(BS) }]));
    const p1 = await full.commit();
    const third = Buffer.alloc(BS, 0x77);
    const incr = await repo.startRestorePoint({ job: 'grow', vm: 'vm', kind: 'incremental', parent: p1.id, blockSize: BS, compression: 'none', disks: [{ name: 'vda', size: big }], threads: 0 });
    await incr.writeDisk('vda', iterate([{ index: 2, data: third }]));
    const p2 = await incr.commit();
    const point = await repo.openRestorePoint(p2.id);
    try {
      const disk = point.openDisk('vda');
      const expected = Buffer.concat([first, Buffer.alloc(2 * BS - small), third]);
      expect((await disk.read(0, big)).equals(expected)).toBe(true);
      const streamed: Buffer[] = [];
      for await (const b of disk.stream()) streamed.push(b.data ?? Buffer.alloc(Math.min(BS, big - b.index * BS)));
      expect(Buffer.concat(streamed).equals(expected)).toBe(true);
    } finally {
      await point.close();
    }
  });
});
