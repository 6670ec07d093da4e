// The VM folder writer lock (docs/formats/backup-files.md section 2) against real processes: a
// holder excludes everyone else until it ends, even by SIGKILL; a leftover lock file naming a
// live pid (pid reuse) does not block; of processes racing for a free or stale lock exactly one
// wins.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { build } from 'esbuild';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { folderIsLocked, readLockHolder, tryLockFolder } from '../../src/storage/local-fs.js';

let work: string;
let bundle: string;
const children: ChildProcessWithoutNullStreams[] = [];
beforeAll(async () => {
  work = await mkdtemp(path.join(tmpdir(), 'bulwark-lock-'));
  bundle = path.join(import.meta.dirname, '..', '..', 'node_modules', '.cache', 'bulwark-tests', `lock-holder-${process.pid}.mjs`);
  await build({
    entryPoints: [path.join(import.meta.dirname, 'fixtures', 'lock-holder.ts')],
    bundle: true, platform: 'node', format: 'esm', target: 'node20', outfile: bundle, external: ['pino'], logLevel: 'silent',
  });
});
afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  await rm(work, { recursive: true, force: true });
  await rm(bundle, { force: true });
});

/** Starts a holder process; resolves with its first answer (`won` / `busy`). */
function holder(dir: string, startAt = 0): { child: ChildProcessWithoutNullStreams; answer: Promise<string> } {
  const child = spawn(process.execPath, [bundle, dir, String(startAt)], { stdio: ['pipe', 'pipe', 'pipe'] });
  children.push(child);
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const answer = new Promise<string>((resolve, reject) => {
    child.stdout.once('data', (d: Buffer) => resolve(d.toString().trim()));
    child.once('exit', (code) => reject(new Error(`lock holder exited with ${code} before answering: ${stderr}`)));
  });
  return { child, answer };
}

async function exited(child: ChildProcessWithoutNullStreams): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  await new Promise((r) => child.once('exit', r));
}

it('a holder process excludes this one and is named; after it is SIGKILLed the lock is free at once', async () => {
  const dir = await mkdtemp(path.join(work, 'vm-'));
  const h = holder(dir);
  expect(await h.answer).toBe('won');
  expect(await tryLockFolder(dir)).toBeNull();
  expect(await folderIsLocked(dir)).toBe(true);
  expect((await readLockHolder(path.join(dir, 'writer.lock')))?.pid).toBe(h.child.pid);
  h.child.kill('SIGKILL');
  await exited(h.child);
  // The kernel drops the lock when the helper sees the pipe close: no stale-lock guessing.
  let lock = await tryLockFolder(dir);
  for (let i = 0; !lock && i < 50; i++) {
    await new Promise((r) => setTimeout(r, 100));
    lock = await tryLockFolder(dir);
  }
  expect(lock).not.toBeNull();
  expect((await readLockHolder(lock!.path))?.pid).toBe(process.pid);
  await lock!.release();
  expect(await readFile(path.join(dir, 'writer.lock'), 'utf8')).toBe('');
  expect(await folderIsLocked(dir)).toBe(false);
});

it('a leftover lock file naming a live process (a reused pid) does not block', async () => {
  const dir = await mkdtemp(path.join(work, 'vm-'));
  // pid 1 always runs: a lock file naming a pid proves nothing once the writer is gone.
  await writeFile(path.join(dir, 'writer.lock'), '1\n');
  expect(await folderIsLocked(dir)).toBe(false);
  const lock = await tryLockFolder(dir);
  expect(lock).not.toBeNull();
  await lock!.release();
});

it('of 6 processes racing for a stale lock exactly one wins', async () => {
  const dir = await mkdtemp(path.join(work, 'vm-'));
  // A stale lock left by a SIGKILLed holder.
  const first = holder(dir);
  expect(await first.answer).toBe('won');
  first.child.kill('SIGKILL');
  await exited(first.child);
  const startAt = Date.now() + 1500;
  const racers = Array.from({ length: 6 }, () => holder(dir, startAt));
  const answers = await Promise.all(racers.map((r) => r.answer));
  expect(answers.filter((a) => a === 'won')).toHaveLength(1);
  expect(answers.filter((a) => a === 'busy')).toHaveLength(5);
  const winner = racers[answers.indexOf('won')]!;
  expect((await readLockHolder(path.join(dir, 'writer.lock')))?.pid).toBe(winner.child.pid);
  winner.child.stdin.end();
  await Promise.all(racers.map((r) => exited(r.child)));
  expect(await folderIsLocked(dir)).toBe(false);
});

it('two locks in one process exclude each other too', async () => {
  const dir = await mkdtemp(path.join(work, 'vm-'));
  const a = await tryLockFolder(dir);
  expect(a).not.toBeNull();
  expect(await tryLockFolder(dir)).toBeNull();
  await a!.release();
  const b = await tryLockFolder(dir);
  expect(b).not.toBeNull();
  await b!.release();
});
