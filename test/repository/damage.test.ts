// Damage detection: every single-byte flip and every truncation of any repository file is found
// by verify and named (file, and disk/block/offset when it hits a block); a reader refuses the
// damaged block with an error naming file, disk, offset and restore point.
import { copyFile, mkdtemp, readFile, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../src/common/errors.js';
import { openRepository, verifyRepository } from '../../src/repository/index.js';
import { DiskModel, iterate } from '../../src/repository/test-helpers.js';

const BS = 262144;
let root: string;
let files: string[];
let fullId: string;

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-damage-'));
  const repo = await openRepository(root);
  const m = new DiskModel(3 * BS + 1000, BS);
  const same = Buffer.alloc(BS, 7);
  const w = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'full', blockSize: BS, threads: 0, vmConfig: Buffer.from('<x/>'), disks: [{ name: 'vda', size: m.size }, { name: 'vdb', size: 2 * BS }] });
  await w.writeDisk('vda', iterate(m.change([[0, 'data'], [1, 'zero'], [3, 'data']])));
  await w.writeDisk('vdb', iterate([{ index: 0, data: same }, { index: 1, data: same }]));
  fullId = (await w.commit()).id;
  const w2 = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'incremental', threads: 0, disks: [{ name: 'vda', size: m.size }, { name: 'vdb', size: 2 * BS }] });
  await w2.writeDisk('vda', iterate(m.change([[2, 'data', 9]])));
  await w2.writeDisk('vdb', iterate([]));
  await w2.commit();
  const dir = path.join(root, 'j', 'v');
  files = (await readdir(dir)).filter((n) => n !== 'writer.lock').map((n) => path.join(dir, n)); // the lock file holds no data (section 2)
  expect((await verifyRepository(root)).ok).toBe(true);
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/**
 * Positions to flip (about 170 per file, to keep the test to seconds): the structure bytes of the
 * header page and commit slots, samples of reserved bytes, a spread over the data area, and the
 * index at the end. For the .vbm: its header and a spread over the JSON body.
 */
function positions(file: string, len: number): number[] {
  const out = new Set<number>();
  const spread = (from: number, to: number, n: number) => {
    for (let k = 0; k < n && from < to; k++) out.add(from + Math.floor(((to - from) * k) / n));
  };
  if (file.endsWith('.vbm')) {
    spread(0, Math.min(len, 64), 40);
    spread(64, len, 90);
    return [...out];
  }
  spread(0, 160, 40); // header fields
  spread(160, 512, 12); // reserved + header CRC
  for (let i = 504; i < 512; i++) out.add(i);
  spread(512, 640, 32); // both commit slots
  spread(640, 4096, 10); // reserved page tail
  spread(4096, Math.max(4096, len - 300), 50); // records and table pages
  spread(Math.max(4096, len - 300), len, 30); // index
  return [...out].sort((a, b) => a - b);
}

describe('damage is detected and named', () => {
  it('any single-byte flip in any file', async () => {
    let flips = 0;
    for (const file of files) {
      const original = await readFile(file);
      try {
        for (const pos of positions(file, original.length)) {
          const damaged = Buffer.from(original);
          damaged[pos]! ^= 1 << (pos % 8);
          await writeFile(file, damaged);
          const r = await verifyRepository(root);
          flips++;
          expect(r.ok, `${path.basename(file)} byte ${pos} flipped`).toBe(false);
          expect(r.damage.some((d) => d.file === file), `${path.basename(file)} byte ${pos}: ${JSON.stringify(r.damage)}`).toBe(true);
        }
      } finally {
        await writeFile(file, original);
      }
    }
    expect(flips).toBeGreaterThan(400);
    expect((await verifyRepository(root)).ok).toBe(true);
  });

  it('any truncation of any file', async () => {
    for (const file of files) {
      const original = await readFile(file);
      try {
        for (const len of [0, 1, 63, 64, 100, 4095, 4096, 4200, Math.floor(original.length / 2), original.length - 1]) {
          if (len >= original.length) continue;
          await writeFile(file, original);
          await truncate(file, len);
          const r = await verifyRepository(root);
          expect(r.ok, `${path.basename(file)} truncated to ${len}`).toBe(false);
          expect(r.damage.some((d) => d.file === file)).toBe(true);
        }
      } finally {
        await writeFile(file, original);
      }
    }
  });

  it('a damaged block names file, disk, block, offset and restore point, for readers and verify', async () => {
    const vbk = files.find((f) => f.endsWith('.vbk'))!;
    const original = await readFile(vbk);
    const backup = `${vbk}.orig`;
    await copyFile(vbk, backup);
    try {
      // The first record after the header page is block 0 of vda: flip a payload byte.
      const damaged = Buffer.from(original);
      damaged[4096 + 32 + 5]! ^= 0xff;
      await writeFile(vbk, damaged);
      const r = await verifyRepository(root);
      const d = r.damage.find((x) => x.block !== undefined)!;
      expect(d).toMatchObject({ file: vbk, disk: 'vda', block: 0, diskOffset: 0, fileOffset: 4096, point: fullId });
      expect(d.affectedPoints).toHaveLength(2); // the full and the increment that inherits from it
      const repo = await openRepository(root);
      const p = await repo.openRestorePoint(fullId);
      const err = await p.openDisk('vda').read(0, 10).catch((e: unknown) => e);
      await p.close();
      expect(err).toBeInstanceOf(BulwarkError);
      const e = err as BulwarkError;
      expect(e.kind).toBe('corrupt');
      expect(e.context).toMatchObject({ file: vbk, disk: 'vda', block: 0, offset: 0, point: fullId });
      expect(e.message).toMatch(/vda.*block 0.*offset 0.*restore point/);
    } finally {
      await rm(backup, { force: true });
      await writeFile(vbk, original);
    }
  });
});
