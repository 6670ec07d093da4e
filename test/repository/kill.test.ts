// Crash safety: a separate writer process is SIGKILLed at >= 50 random moments while it writes
// restore points. After every kill: opening the repository sweeps its temporaries and uncommitted
// files, every committed point reads back bit-exact, and the next writer succeeds.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { build } from 'esbuild';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { openRepository, verifyRepository, type Repository } from '../../src/repository/index.js';
import { tryLockFolder } from '../../src/storage/local-fs.js';
import { modelAt, KILL_DISK_SIZE } from './fixtures/kill-model.js';

let work: string;
let bundle: string;
beforeAll(async () => {
  // On tmpfs when there is one: a SIGKILL leaves the page cache to the next open, so what is
  // tested is the same; the writer's fsyncs, slow on a busy disk, cost nothing there.
  work = await mkdtemp(path.join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'bulwark-kill-'));
  // Bundled once so each writer starts as plain node in ~0.1 s (native modules stay external).
  // Inside the project so the external native packages resolve from its node_modules.
  bundle = path.join(import.meta.dirname, '..', '..', 'node_modules', '.cache', 'bulwark-tests', `kill-writer-${process.pid}.mjs`);
  await build({
    entryPoints: [path.join(import.meta.dirname, 'fixtures', 'kill-writer.ts')],
    bundle: true, platform: 'node', format: 'esm', target: 'node20', outfile: bundle,
    external: ['@node-rs/crc32', 'lz4-napi', 'zstd-napi', 'pino'],
    banner: { js: "import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
    logLevel: 'silent',
  });
});
afterAll(async () => {
  await rm(work, { recursive: true, force: true });
  await rm(bundle, { force: true });
});

const expected = new Map<number, Buffer>();
const model = (k: number) => {
  let m = expected.get(k);
  if (!m) expected.set(k, (m = modelAt(k)));
  return m;
};

async function checkPoint(repo: Repository, id: string, k: number): Promise<void> {
  const p = await repo.openRestorePoint(id);
  try {
    expect(p.vmConfig.toString()).toBe(`point ${k}`);
    const got = await p.openDisk('vda').read(0, KILL_DISK_SIZE);
    expect(got.equals(model(k)), `point ${k} (${id}) reads back bit-exact`).toBe(true);
  } finally {
    await p.close();
  }
}

interface Writer {
  readonly child: ChildProcessWithoutNullStreams;
  readonly stderr: () => string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts a writer ahead: node and the bundle load while the test checks the previous kill; it writes after `go`. */
function startWriter(root: string): Writer {
  const child = spawn(process.execPath, [bundle, root], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdin.on('error', () => undefined); // `go` to a writer that already died: its exit says why
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve, reject) => {
    child.on('error', reject);
    child.on('exit', (code, signal) => resolve({ code, signal }));
  });
  exited.catch(() => undefined);
  return { child, stderr: () => stderr, exited };
}

/** Lets a started writer open the repository and write until it is killed, `delayMs` after it is ready. */
async function runAndKill(w: Writer, delayMs: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  w.child.stdout.on('data', (d: Buffer) => {
    if (timer === undefined && d.toString().includes('ready')) timer = setTimeout(() => w.child.kill('SIGKILL'), delayMs);
  });
  w.child.stdin.write('go\n');
  const { code, signal } = await w.exited;
  clearTimeout(timer);
  if (signal !== 'SIGKILL') throw new Error(`writer exited by itself (code ${code}): ${w.stderr()}`);
}

/**
 * Waits until the killed writer's lock helper has let go of the VM folder's lock (the kernel drops
 * it when the helper sees its pipe close, a moment after the writer dies): until then a sweep
 * rightly leaves the folder alone, as it would for a live writer.
 */
async function lockFreed(dir: string): Promise<void> {
  if (!existsSync(dir)) return; // killed before the folder was made: nothing to lock
  for (let i = 0; ; i++) {
    const lock = await tryLockFolder(dir);
    if (lock) return lock.release();
    if (i > 200) throw new Error(`the lock of ${dir} was not released 10 s after its writer was killed`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

it('SIGKILL at >= 50 random points never damages a committed restore point', async () => {
  const root = path.join(work, 'repo');
  await (await openRepository(root, { create: true })).sweep();
  const dir = path.join(root, 'kill', 'v');
  let seed = 12345;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  let kills = 0;
  let sweptSomething = 0;
  let lastCount = 0;
  // Kills land within `span` ms of the writer being ready. When ten kills in a row committed
  // nothing (a loaded machine writes slower), the window widens so that points still commit
  // between kills; at least 50 kills, and on until the writers made progress (bounded).
  let span = 250;
  let stalled = 0;
  let next = startWriter(root);
  try {
    for (; kills < 50 || (lastCount <= 5 && kills < 150); kills++) {
      const writer = next;
      await runAndKill(writer, Math.floor(rnd() * span));
      next = startWriter(root); // loads while this kill is checked
      await lockFreed(dir);
      const before = await readdir(dir).catch(() => [] as string[]);
      const repo = await openRepository(root); // sweeps
      const after = await readdir(dir).catch(() => [] as string[]);
      if (before.length !== after.length) sweptSomething++;
      expect(after.filter((n) => n.includes('.tmp-'))).toEqual([]);
      const points = await repo.listRestorePoints({ vm: 'v' });
      expect(points.length).toBeGreaterThanOrEqual(lastCount); // nothing committed is ever lost
      const named = new Set(points.map((p) => path.basename(p.file)));
      expect(after.filter((n) => /\.(vbk|vib|vrb)$/.test(n) && !named.has(n))).toEqual([]);
      if (points.length > 0) await checkPoint(repo, points[points.length - 1]!.id, points.length - 1);
      stalled = points.length > lastCount ? 0 : stalled + 1;
      if (stalled >= 10) [span, stalled] = [Math.min(span * 2, 4000), 0];
      lastCount = points.length;
    }
  } finally {
    next.child.kill('SIGKILL');
  }
  expect(kills).toBeGreaterThanOrEqual(50);
  expect(lastCount).toBeGreaterThan(5); // the writers made progress between kills
  expect(sweptSomething).toBeGreaterThan(0); // some kills landed mid-write
  const repo = await openRepository(root);
  const points = await repo.listRestorePoints({ vm: 'v' });
  for (const [k, p] of points.entries()) await checkPoint(repo, p.id, k);
  const report = await verifyRepository(root);
  expect(report.damage).toEqual([]);
  // The next write succeeds.
  const w = await repo.startRestorePoint({ job: 'kill', vm: 'v', kind: 'incremental', threads: 0, disks: [{ name: 'vda', size: KILL_DISK_SIZE }] });
  await w.writeDisk('vda', (async function* () {})());
  const info = await w.commit();
  expect(info.base).toBe(points[points.length - 1]!.id);
});
