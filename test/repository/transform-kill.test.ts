// Crash safety of the transforms: a child process backing up three VMs (forever forward with
// merges and compaction, forward with synthetic fulls and chain deletion, reverse with injection
// and .vrb deletion) is SIGKILLed >= 100 times at a random transform step (fault injection) or
// after a random delay. After every kill: opening the repository finishes or undoes the
// interrupted transform; every point reads back bit-exact; the newest 3 runs of every VM are all
// there (nothing committed is lost); no temporary or unnamed file is left. Then the next run succeeds.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { build } from 'esbuild';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { openRepository, readChainMetadata, verifyRepository, vmFolder, type Repository } from '../../src/repository/index.js';
import { patterned } from '../../src/repository/test-helpers.js';
import { tryLockFolder } from '../../src/storage/local-fs.js';
import { KILL_BLOCK_SIZE, KILL_DISK_SIZE, modelAt, pointChanges } from './fixtures/kill-model.js';
import { JOB } from './fixtures/method-runner.js';
import { nextRun, round, WORKER_POLICIES } from './fixtures/transform-worker.js';

const KILLS = Number(process.env.BULWARK_TRANSFORM_KILLS ?? 100);
let work: string;
let bundle: string;
beforeAll(async () => {
  // On tmpfs when there is one: a SIGKILL leaves the page cache to the next open, so what is
  // tested is the same; the writers' fsyncs, slow on a busy disk, cost nothing there.
  work = await mkdtemp(path.join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'bulwark-tkill-'));
  bundle = path.join(import.meta.dirname, '..', '..', 'node_modules', '.cache', 'bulwark-tests', `transform-worker-${process.pid}.mjs`);
  await build({
    entryPoints: [path.join(import.meta.dirname, 'fixtures', 'transform-worker.ts')],
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

// Disk content at run k, built from the nearest cached earlier run (points of three VMs are
// checked in turn, so kill-model's single memo would rebuild from run 0 each time).
const models = new Map<number, Buffer>();
function model(k: number): Buffer {
  const hit = models.get(k);
  if (hit) return hit;
  const from = Math.max(-1, ...[...models.keys()].filter((j) => j < k));
  const disk = from < 0 ? Buffer.from(modelAt(0)) : Buffer.from(models.get(from)!);
  for (let j = Math.max(1, from + 1); j <= k; j++) {
    for (const [i, kind] of pointChanges(j)) {
      const off = i * KILL_BLOCK_SIZE;
      const len = Math.min(KILL_BLOCK_SIZE, KILL_DISK_SIZE - off);
      if (kind === 'zero') disk.fill(0, off, off + len);
      else patterned(len, off, j).copy(disk, off);
    }
  }
  models.set(k, disk);
  if (models.size > 60) models.delete(Math.min(...models.keys()));
  return disk;
}

interface Worker {
  readonly child: ChildProcess;
  readonly crashAt: number;
  readonly stderr: () => string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/**
 * Starts a worker ahead: node and the bundle load while the test still checks the previous
 * kill's repository; the worker touches the repository only after `go` (see {@link runAndKill}).
 */
function startWorker(root: string, crashAt: number, start: number): Worker {
  const child = spawn(process.execPath, [bundle, root], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, BULWARK_TEST_CRASH_AT: String(crashAt), BULWARK_WORKER_START: String(start), BULWARK_WORKER_WAIT: '1', LOG_LEVEL: 'silent' },
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdin.on('error', () => undefined); // `go` to a worker that already died: its exit says why
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve, reject) => {
    child.on('error', reject);
    child.on('exit', (code, signal) => resolve({ code, signal }));
  });
  exited.catch(() => undefined);
  return { child, crashAt, stderr: () => stderr, exited };
}

/** Lets a started worker run until it is killed: at its crash step, or after `delayMs` when its crashAt is 0. */
async function runAndKill(w: Worker, delayMs: number): Promise<string | null> {
  let timer: NodeJS.Timeout | undefined;
  w.child.stdout!.on('data', (d: Buffer) => {
    if (w.crashAt === 0 && timer === undefined && d.toString().includes('ready')) timer = setTimeout(() => w.child.kill('SIGKILL'), delayMs);
  });
  w.child.stdin!.write('go\n');
  const { code, signal } = await w.exited;
  clearTimeout(timer);
  if (signal === 'SIGKILL') return /BULWARK_CRASH (\S+)/.exec(w.stderr())?.[1] ?? null;
  throw new Error(`worker exited by itself (code ${code}): ${w.stderr()}`);
}

/**
 * Waits until the killed worker's folder locks are free: the kernel drops a flock once the
 * worker's lock helper has read EOF and exited, a moment after the worker itself died (on a
 * loaded machine, after openRepository may already have looked, found the folder busy and left
 * its journal for the next open).
 */
async function locksReleased(root: string): Promise<void> {
  for (const vm of Object.keys(WORKER_POLICIES)) {
    for (let tries = 0; ; tries++) {
      const lock = await tryLockFolder(vmFolder(root, JOB, vm)).catch(() => null);
      if (lock) {
        await lock.release();
        break;
      }
      if (tries > 200) throw new Error(`the folder of ${vm} stays locked after its writer was killed`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }
}

/** Checks a VM folder; with `read`, every point is read back and compared (else its run number only). */
async function checkVm(repo: Repository, root: string, vm: string, read = true): Promise<number> {
  const meta = await readChainMetadata(path.join(vmFolder(root, JOB, vm), `${vm}.vbm`));
  if (!meta) return -1;
  expect(meta.body.journal, `${vm}: no journal left after open`).toBeNull();
  const points = await repo.listRestorePoints({ job: JOB, vm });
  const runs: number[] = [];
  for (const p of points) {
    const rp = await repo.openRestorePoint(p.id);
    try {
      const k = Number(rp.vmConfig.toString().replace('point ', ''));
      runs.push(k);
      if (read) expect((await rp.openDisk('vda').read(0, KILL_DISK_SIZE)).equals(model(k)), `${vm}: point of run ${k} reads bit-exact`).toBe(true);
    } finally {
      await rp.close();
    }
  }
  const latest = Math.max(...runs);
  // Retention keeps 3; nothing newer may be missing (a crash can leave more, never fewer).
  for (let k = Math.max(0, latest - 2); k <= latest; k++) expect(runs, `${vm}: run ${k} kept`).toContain(k);
  const files = await readdir(vmFolder(root, JOB, vm));
  expect(files.filter((n) => n.includes('.tmp-')), `${vm}: temporaries swept`).toEqual([]);
  const named = new Set(points.map((p) => path.basename(p.file)));
  expect(files.filter((n) => /\.(vbk|vib|vrb)$/.test(n) && !named.has(n)), `${vm}: unnamed files swept`).toEqual([]);
  return latest;
}

/** One lane: its own repository and worker; `kills` kills in a row, checked after each. */
async function lane(n: number, kills: number, steps: Map<string, number>): Promise<{ root: string; progress: Record<string, number> }> {
  const root = path.join(work, `repo-${n}`);
  // Seeded in this process so retention, merges, synthetic fulls and injections start at once.
  const seedRepo = await openRepository(root, { create: true });
  for (let r = 0; r < 4; r++) await round(seedRepo, n);
  let seed = 4242 + n;
  const rnd = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 4294967296;
  };
  // Kill k: fault injection at a random step, or (every tenth) after a random delay.
  const plan = Array.from({ length: kills }, (_, kill) => {
    const crashAt = kill % 10 === 9 ? 0 : 1 + Math.floor(rnd() * 12);
    return { crashAt, delayMs: Math.floor(rnd() * 300), start: kill % 3 };
  });
  const progress: Record<string, number> = {};
  const ahead = (kill: number) => (kill < kills ? startWorker(root, plan[kill]!.crashAt, plan[kill]!.start) : undefined);
  let next = ahead(0);
  try {
    for (let kill = 0; kill < kills; kill++) {
      const step = await runAndKill(next!, plan[kill]!.delayMs);
      next = ahead(kill + 1); // loads while this kill is checked
      if (step) steps.set(step, (steps.get(step) ?? 0) + 1);
      await locksReleased(root);
      const repo = await openRepository(root); // recovers and sweeps
      // Every point is read back every 4th kill (damage would persist until then) and at the end.
      for (const vm of Object.keys(WORKER_POLICIES)) progress[vm] = await checkVm(repo, root, vm, kill % 4 === 0);
    }
  } finally {
    next?.child.kill('SIGKILL');
  }
  return { root, progress };
}

it(`SIGKILL at >= ${KILLS} transform steps never loses or damages a committed point; the next run succeeds`, async () => {
  const steps = new Map<string, number>();
  const started = Date.now();
  // Two lanes in parallel: the machine has two cores and each kill mostly waits for a process start.
  const lanes = await Promise.all([lane(0, Math.ceil(KILLS / 2), steps), lane(1, Math.floor(KILLS / 2), steps)]);
  console.log(`${KILLS} kills in ${Date.now() - started} ms; steps: ${JSON.stringify(Object.fromEntries(steps))}`);
  const byTransform = (re: RegExp) => [...steps].filter(([s]) => re.test(s)).reduce((a, [, n]) => a + n, 0);
  expect([...steps.values()].reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(KILLS * 0.85);
  // Every transform was interrupted several times (steps: see the crashPoint calls).
  const least = Math.max(1, Math.floor(KILLS / 40));
  // Where the delay kills land depends on the machine's speed, and with them which run (and so
  // which transform) the fault-injection kills after them reach. Kill on in lane 0, at later and
  // later steps, until every transform has been interrupted as often as asked below.
  const wanted: Array<[RegExp, number]> = [
    [/^merge|^reopened|^overlay|flip/, 4 * least],
    [/^vrb|^inject/, 2 * least],
    [/^synthetic/, least],
    [/deleted$/, least],
    [/^compact/, least],
  ];
  const laneZero = lanes[0];
  for (let extra = 0; extra < 60 && wanted.some(([re, n]) => byTransform(re) < n); extra++) {
    const step = await runAndKill(startWorker(laneZero.root, 1 + ((extra * 7) % 48), extra % 3), 0);
    if (step) steps.set(step, (steps.get(step) ?? 0) + 1);
    await locksReleased(laneZero.root);
    const repo = await openRepository(laneZero.root); // recovers and sweeps
    for (const vm of Object.keys(WORKER_POLICIES)) laneZero.progress[vm] = await checkVm(repo, laneZero.root, vm, extra % 4 === 0);
  }
  expect(byTransform(/^merge|^reopened|^overlay|flip/), 'kills inside merges and injections').toBeGreaterThanOrEqual(4 * least);
  expect(byTransform(/^vrb|^inject/), 'kills inside reverse injections').toBeGreaterThanOrEqual(2 * least);
  expect(byTransform(/^synthetic/), 'kills inside synthetic fulls').toBeGreaterThanOrEqual(least);
  expect(byTransform(/deleted$/), 'kills inside retention deletions').toBeGreaterThanOrEqual(least);
  expect(byTransform(/^compact/), 'kills inside compactions').toBeGreaterThanOrEqual(least);
  for (const { root, progress } of lanes) {
    for (const vm of Object.keys(WORKER_POLICIES)) expect(progress[vm], `${vm} made progress`).toBeGreaterThan(4); // the seed ends at run 3
    // The next run succeeds, and the repository verifies clean.
    const repo = await openRepository(root);
    const before = await Promise.all(Object.keys(WORKER_POLICIES).map((vm) => nextRun(repo, vm)));
    await round(repo);
    const after = await Promise.all(Object.keys(WORKER_POLICIES).map((vm) => nextRun(repo, vm)));
    expect(after).toEqual(before.map((k) => k + 1));
    for (const vm of Object.keys(WORKER_POLICIES)) await checkVm(repo, root, vm);
    const report = await verifyRepository(root);
    expect(report.damage).toEqual([]);
  }
}, 600_000);
