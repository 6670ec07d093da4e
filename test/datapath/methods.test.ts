// The three backup methods on a running test guest through the job engine and the one-host data
// path (LocalDataPathExecutor: plan, back up, synthetic full, retention): for each method, 10 runs
// one (simulated) day apart with guest writes between them; afterwards every kept restore point
// restores bit-exact (restore disk's SHA-256 = the SHA-256 of the point-in-time view, read by
// nbdcopy while the backup ran), and the repository holds exactly the files the policy says.
// Then a health check session names a flipped byte, and the next run repairs it (bit-exact).
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalDataPathExecutor } from '../../src/agent/backup/executor.js';
import type { BackupView } from '../../src/hypervisor/types.js';
import { openRepository, type Repository } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/restore-disk.js';
import { JobEngine } from '../../src/server/jobs/engine.js';
import { InMemoryJobEngineStore } from '../../src/server/jobs/memory-store.js';
import type { JobDefinition } from '../../src/server/jobs/ports.js';
import { startTestGuest, type TestGuest } from '../fixtures/guest.js';

const VM = 'methods-dp';
const DAY = 86_400_000;
const weekdayNames = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'] as const;
let work: string;
let guest: TestGuest;
let repo: Repository;
let store: InMemoryJobEngineStore;
let engine: JobEngine;
let dataPath: LocalDataPathExecutor;
// Simulated days: run k of a method is `k` days after the first (points carry that time).
const day0 = new Date(Math.floor(Date.now() / DAY) * DAY + 12 * 3600 * 1000);
let now = day0;
/** SHA-256 of the point-in-time view of vda, by the time of the point taken from it. */
const references = new Map<number, string>();

/** SHA-256 of a whole NBD export, read by nbdcopy (an independent reader). */
function sha256OfView(view: BackupView): Promise<string> {
  const d = view.disks.find((x) => x.disk.name === 'vda')!;
  const uri = `nbd+unix:///${encodeURIComponent(d.nbd.exportName)}?socket=${d.nbd.socketPath}`;
  return new Promise((resolve, reject) => {
    const child = spawn('nbdcopy', [uri, '-'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const hash = createHash('sha256');
    let err = '';
    child.stdout.on('data', (c: Buffer) => hash.update(c));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(hash.digest('hex')) : reject(new Error(`nbdcopy exited ${code}: ${err}`))));
  });
}

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-methods-dp-'));
  guest = await startTestGuest({ name: VM });
  await guest.waitForAgent();
  await guest.sh('mkdir -p /srv/m && sync');
  repo = await openRepository(path.join(work, 'repo'), { create: true });
  dataPath = new LocalDataPathExecutor({
    hosts: async () => [{ kind: 'qemu', qmpGlob: path.join(guest.dir, 'qmp.sock') }],
    repositoryPath: async () => repo.root,
    now: () => now,
    onView: async (_task, view) => {
      references.set(now.getTime(), await sha256OfView(view));
    },
  });
  store = new InMemoryJobEngineStore();
  engine = new JobEngine({ store, executor: dataPath, disks: dataPath });
}, 300_000);

afterAll(async () => {
  await engine?.shutdown();
  await dataPath?.close();
  await guest?.stop();
  if (work) await rm(work, { recursive: true, force: true });
});

async function backupFiles(job: string): Promise<string[]> {
  const dir = path.join(repo.root, job, VM);
  return (await readdir(dir)).filter((f) => /\.(vbk|vib|vrb)$/.test(f)).sort();
}

const ext = (files: string[]) => files.map((f) => f.slice(-3)).sort();

/** 10 runs a day apart, with guest writes between them; returns the logs of each run. */
async function tenRuns(job: JobDefinition, opts: { fullOn?: number[] } = {}): Promise<string[]> {
  store.putJob(job);
  const logs: string[] = [];
  for (let k = 0; k < 10; k++) {
    now = new Date(day0.getTime() + k * DAY);
    await guest.sh(`dd if=/dev/urandom of=/srv/m/${job.name}-${k}.bin bs=16k count=2 2>/dev/null && dd if=/dev/urandom of=/srv/m/${job.name}-0.bin bs=4k count=1 seek=${k} conv=notrunc 2>/dev/null; sync`);
    const { sessionId } = await engine.runNow(job.id, { full: opts.fullOn?.includes(k) ?? false });
    const state = await engine.waitForEnd(sessionId);
    const text = (store.logs.get(sessionId) ?? []).map((l) => `${l.level}: ${l.message}`).join('\n');
    expect(state, `${job.name} run ${k}:\n${text}`).toBe('success');
    logs.push(text);
  }
  return logs;
}

/** Every point of the job's VM restores to exactly the view it was taken from. */
async function everyPointBitExact(job: string): Promise<number> {
  const points = await repo.listRestorePoints({ job, vm: VM });
  for (const p of points) {
    const want = references.get(p.time.getTime());
    expect(want, `reference of point ${p.id} (${p.time.toISOString()})`).toBeDefined();
    const to = path.join(work, `${p.id}.raw`);
    const r = await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, imageDigest: true });
    await rm(to);
    expect(r.sha256, `point ${p.id} (${p.kind}, ${p.time.toISOString()}) of ${job}`).toBe(want);
  }
  return points.length;
}

function job(name: string, settings: Record<string, unknown>): JobDefinition {
  return { id: `id-${name}`, name, vms: [VM], repository: 'r', retry: { count: 0, waitSeconds: 0 }, settings: { blockSize: 256 * 1024, ...settings } };
}

describe('backup methods: 10 runs each on a running guest', () => {
  it('forever forward, keep 3: one full and two increments; the oldest increment merged into the full each run; compaction on its day', async () => {
    const wd = (k: number) => weekdayNames[new Date(day0.getTime() + k * DAY).getUTCDay()]!;
    const logs = await tenRuns(job('ffwd', { method: 'forever-forward', retention: { points: 3 }, compact: { weekdays: [wd(5)] } }));
    expect(logs[5]).toMatch(/compacted the full \S+\.vbk: \d+ -> \d+ bytes/);
    expect(logs[4]).not.toMatch(/compacted/);
    expect(logs[0]).toMatch(/this run: full/);
    expect(logs[5]).toMatch(/this run: incremental/);
    expect(logs[5]).toMatch(/retention: merged increment/);
    expect(ext(await backupFiles('ffwd'))).toEqual(['vbk', 'vib', 'vib']);
    const points = await repo.listRestorePoints({ job: 'ffwd', vm: VM });
    expect(points.map((p) => p.time.getTime())).toEqual([7, 8, 9].map((k) => day0.getTime() + k * DAY));
    expect(await everyPointBitExact('ffwd')).toBe(3);
  });

  it('forward, keep 4, synthetic full on day 3\'s weekday, active full on day 7\'s: whole chains deleted only when nothing kept depends on them', async () => {
    const wd = (k: number) => weekdayNames[new Date(day0.getTime() + k * DAY).getUTCDay()]!;
    const logs = await tenRuns(
      job('fwd', { method: 'forward', retention: { points: 4 }, syntheticFull: { weekdays: [wd(3)] }, activeFull: { weekdays: [wd(7)] } }),
    );
    expect(logs[3]).toMatch(/this run: synthetic-full/);
    expect(logs[3]).toMatch(/synthetic full built from the chain/);
    expect(logs[7]).toMatch(/this run: full \(active full scheduled/);
    expect(logs[7]).toMatch(/vda: full read/);
    // Kept: days 6-9; day 6 needs the synthetic chain (days 3-6), so it stays whole; days 0-2 went.
    const points = await repo.listRestorePoints({ job: 'fwd', vm: VM });
    expect(points.map((p) => [(p.time.getTime() - day0.getTime()) / DAY, p.kind])).toEqual([
      [3, 'full'],
      [4, 'incremental'],
      [5, 'incremental'],
      [6, 'incremental'],
      [7, 'full'],
      [8, 'incremental'],
      [9, 'incremental'],
    ]);
    expect(ext(await backupFiles('fwd'))).toEqual(['vbk', 'vbk', 'vib', 'vib', 'vib', 'vib', 'vib']);
    expect(await everyPointBitExact('fwd')).toBe(7);
  });

  it('reverse, keep 3: the newest point is the full, two reverse increments behind it', async () => {
    const logs = await tenRuns(job('rev', { method: 'reverse', retention: { points: 3 } }));
    expect(logs[0]).toMatch(/this run: full/);
    expect(logs[4]).toMatch(/this run: reverse/);
    expect(logs[4]).toMatch(/retention: deleted reverse point/);
    expect(ext(await backupFiles('rev'))).toEqual(['vbk', 'vrb', 'vrb']);
    const points = await repo.listRestorePoints({ job: 'rev', vm: VM });
    expect(points.map((p) => [(p.time.getTime() - day0.getTime()) / DAY, p.kind])).toEqual([
      [7, 'reverse'],
      [8, 'reverse'],
      [9, 'full'],
    ]);
    expect(await everyPointBitExact('rev')).toBe(3);
  });

  it('health check: a flipped byte is named; the next run re-reads that block and its point restores bit-exact', async () => {
    // A health check on every day of the week: each backup run also verifies its new point.
    const hc = job('hc', { method: 'forever-forward', retention: { points: 5 }, healthCheck: { weekdays: [...weekdayNames] } });
    store.putJob(hc);
    const runOnce = async (k: number, opts: Parameters<JobEngine['runNow']>[1] = {}) => {
      now = new Date(day0.getTime() + (20 + k) * DAY);
      await guest.sh(`dd if=/dev/urandom of=/srv/m/hc-${k}.bin bs=16k count=2 2>/dev/null; sync`);
      const { sessionId } = await engine.runNow(hc.id, opts);
      const state = await engine.waitForEnd(sessionId);
      return { state, log: (store.logs.get(sessionId) ?? []).map((l) => `${l.level}: ${l.message}`).join('\n') };
    };
    const first = await runOnce(0);
    expect(first.state).toBe('success');
    expect(first.log).toMatch(/health check of VM methods-dp: the latest point \S+ verified, \d+ block\(s\), no damage/);
    expect((await runOnce(1)).state).toBe('success');
    // Flip one byte in the middle of the latest point's file (block data, past the header page).
    const latest = (await repo.listRestorePoints({ job: 'hc', vm: VM })).at(-1)!;
    const { open, stat } = await import('node:fs/promises');
    const size = (await stat(latest.file)).size;
    const h = await open(latest.file, 'r+');
    const at = 4096 + Math.floor((size - 8192) / 2);
    const b = Buffer.alloc(1);
    await h.read(b, 0, 1, at);
    b[0] = b[0]! ^ 0x5a;
    await h.write(b, 0, 1, at);
    await h.close();

    const check = await engine.runNow(hc.id, { settings: { operation: 'health-check' }, noRetries: true });
    expect(await engine.waitForEnd(check.sessionId)).toBe('warning');
    const checkLog = (store.logs.get(check.sessionId) ?? []).map((l) => l.message).join('\n');
    const named = /damaged block (\d+) of disk vda \(disk offset \d+\) in (\S+), read by point/.exec(checkLog);
    expect(named, checkLog).not.toBeNull();
    expect(named![2]).toBe(latest.file);

    const repaired = await runOnce(2);
    expect(repaired.log).toMatch(new RegExp(`repair: re-reading vda blocks [0-9, ]*\\b${named![1]}\\b`));
    const point = (await repo.listRestorePoints({ job: 'hc', vm: VM })).at(-1)!;
    const to = path.join(work, 'repaired.raw');
    const r = await restoreDisk({ repository: repo, pointId: point.id, disk: 'vda', to, imageDigest: true });
    await rm(to);
    expect(r.sha256).toBe(references.get(point.time.getTime()));
    expect(repaired.log).toMatch(/health check of VM methods-dp: the latest point \S+ verified, \d+ block\(s\), no damage/);
    // The repair is recorded as done: a second check of the latest point is clean.
    const again = await engine.runNow(hc.id, { settings: { operation: 'health-check' }, noRetries: true });
    expect(await engine.waitForEnd(again.sessionId)).toBe('success');
  });
});
