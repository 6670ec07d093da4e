// The offline console tools on a bare folder: `repo inspect` and `repo verify` (tables, JSON,
// exit codes 0 clean / 1 damage).
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { repoInspectCommand, repoVerifyCommand } from '../../src/cli/commands/repo-offline.js';
import { openRepository } from '../../src/repository/index.js';
import { DiskModel, iterate } from '../../src/repository/test-helpers.js';

const BS = 262144;
let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'bulwark-offline-'));
  const repo = await openRepository(root);
  const m = new DiskModel(4 * BS + 9, BS);
  const w = await repo.startRestorePoint({ job: 'nightly', vm: 'db', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: m.size }] });
  await w.writeDisk('vda', iterate([...m.change([[0, 'data'], [1, 'zero'], [3, 'data']]), { index: 4, data: Buffer.alloc(9, 1) }]));
  await w.commit();
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

function capture() {
  const o = { text: '', err: '' };
  return { o, output: { out: (t: string) => void (o.text += t), err: (t: string) => void (o.err += t) } };
}

it('inspect prints chains and points, and JSON with ratios', async () => {
  const a = capture();
  expect(await repoInspectCommand(root, { json: false }, a.output)).toBe(0);
  expect(a.o.text).toMatch(/nightly \/ db/);
  expect(a.o.text).toMatch(/full/);
  const b = capture();
  expect(await repoInspectCommand(root, { json: true }, b.output)).toBe(0);
  const r = JSON.parse(b.o.text);
  expect(r.chains[0].points[0].disks[0]).toMatchObject({ name: 'vda', size: 4 * BS + 9, storedBlocks: 3, zeroBlocks: 1, holeBlocks: 1 });
  expect(r.totals.compressionRatio).toBeGreaterThan(1);
});

it('verify: 0 when clean, 1 with the damaged file named after a flipped byte', async () => {
  const a = capture();
  expect(await repoVerifyCommand(root, { json: false }, a.output)).toBe(0);
  expect(a.o.text).toMatch(/OK: no damage/);
  const dir = path.join(root, 'nightly', 'db');
  const vbk = path.join(dir, (await readdir(dir)).find((n) => n.endsWith('.vbk'))!);
  const original = await readFile(vbk);
  const bad = Buffer.from(original);
  bad[4096 + 40]! ^= 0x20;
  await writeFile(vbk, bad);
  try {
    const b = capture();
    expect(await repoVerifyCommand(root, { json: false }, b.output)).toBe(1);
    expect(b.o.text).toMatch(/DAMAGE/);
    expect(b.o.text).toContain(vbk);
    const c = capture();
    expect(await repoVerifyCommand(root, { json: true }, c.output)).toBe(1);
    expect(JSON.parse(c.o.text).damage[0]).toMatchObject({ file: vbk, disk: 'vda', block: 0, diskOffset: 0 });
  } finally {
    await writeFile(vbk, original);
  }
  const d = capture();
  expect(await repoVerifyCommand(path.join(root, 'missing'), { json: false }, d.output)).toBe(1);
});
