// The offline console tools on a bare folder: `repo inspect` and `repo verify` (tables, JSON,
// exit codes 0 clean / 1 damage; an encrypted chain's password from $BULWARK_REPO_PASSWORD of the
// console's environment).
import { cp, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { repoInspectCommand, repoVerifyCommand } from '../../src/cli/commands/repo-offline.js';
import { runConsole } from '../../src/cli/program.js';
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

it('verify through the console: an encrypted chain is checked with $BULWARK_REPO_PASSWORD, CRCs only without it', async () => {
  const encRoot = await mkdtemp(path.join(tmpdir(), 'bulwark-offline-enc-'));
  try {
    const repo = await openRepository(encRoot);
    const m = new DiskModel(2 * BS + 5, BS);
    const w = await repo.startRestorePoint({ job: 'nightly', vm: 'db', kind: 'full', blockSize: BS, threads: 0, encryption: { password: 'right horse', hint: 'the horse', log2N: 10 }, disks: [{ name: 'vda', size: m.size }] });
    await w.writeDisk('vda', iterate(m.change([[0, 'data'], [2, 'data']])));
    await w.commit();
    const verify = async (env: Record<string, string>) => {
      const o = { out: '', err: '' };
      const ctx = { output: { out: (t: string) => void (o.out += t), err: (t: string) => void (o.err += t) }, env: { HOME: encRoot, ...env }, tty: false, reconnectLimitMs: 1000, exitCode: 0 };
      const code = await runConsole(ctx, ['repo', 'verify', encRoot]);
      return { code, ...o };
    };
    const withPassword = await verify({ BULWARK_REPO_PASSWORD: 'right horse' });
    expect(withPassword.code, withPassword.err).toBe(0);
    expect(withPassword.out).toMatch(/OK: no damage/);
    expect(withPassword.out).not.toMatch(/warning/);
    const without = await verify({});
    expect(without.code).toBe(0);
    expect(without.out).toMatch(/warning: chain \S+ of VM db is encrypted: no password given, so only CRCs were checked/);
    const wrong = await verify({ BULWARK_REPO_PASSWORD: 'wrong horse' });
    expect(wrong.code).toBe(0);
    expect(wrong.out).toMatch(/warning: chain \S+ of VM db: .*; only CRCs were checked/);
  } finally {
    await rm(encRoot, { recursive: true, force: true });
  }
});

it('a folder one level off the repository (its job or VM folder, or the folder above) is refused, naming the repository; an empty one says nothing was verified', async () => {
  // Before: each of these printed "OK: no damage found" (exit 0) having read no block.
  const job = path.join(root, 'nightly');
  const vm = path.join(job, 'db');
  const above = await mkdtemp(path.join(tmpdir(), 'bulwark-offline-above-'));
  const empty = await mkdtemp(path.join(tmpdir(), 'bulwark-offline-empty-'));
  try {
    await cp(root, path.join(above, 'repo'), { recursive: true });
    for (const [given, near] of [[job, root], [vm, root], [above, path.join(above, 'repo')]] as const) {
      for (const [tool, command] of [['verify', repoVerifyCommand], ['inspect', repoInspectCommand]] as const) {
        const a = capture();
        expect(await command(given, { json: false }, a.output), `${tool} ${given}`).toBe(1);
        expect(a.o.err).toContain(`${given} is not a repository folder (it holds no JOB/VM/VM.vbm), but ${near} is`);
        expect(a.o.err).toContain(`bulwark repo ${tool} ${near}`);
      }
    }
    const e = capture();
    expect(await repoVerifyCommand(empty, { json: false }, e.output)).toBe(0);
    expect(e.o.text).toMatch(/warning: no backup chains under .*: nothing was verified\nnothing to verify: no backup chains\n/);
    expect(e.o.text).not.toMatch(/OK: no damage/);
    // inspect names a VM folder whose backup files have no chain metadata (verify always did).
    await mkdir(path.join(empty, 'j', 'v'), { recursive: true });
    await writeFile(path.join(empty, 'j', 'v', '20261126T000000Z-12345678.vbk'), 'x');
    const i = capture();
    expect(await repoInspectCommand(empty, { json: false }, i.output)).toBe(1);
    expect(i.o.text).toMatch(/v\.vbm: missing chain metadata; 1 backup files cannot be placed in a chain/);
  } finally {
    await rm(above, { recursive: true, force: true });
    await rm(empty, { recursive: true, force: true });
  }
});
