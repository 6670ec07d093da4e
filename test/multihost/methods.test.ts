// Backup methods on a repository of ANOTHER host (network namespaces, fixture netns/hosts.ts): the
// repository agent plans each run, keeps the chain (retention, reverse injection, compaction) and
// health-checks it, as the one-host path does. Checked: forever forward with retention 3 over 5
// runs (one a `backup quick`) holds one full + 2 increments (merged, compacted); reverse
// incremental over 3 runs keeps the newest as the full with .vrb files (the oldest deleted by
// retention); a health check names a flipped byte and the next run repairs it; forward on the
// server's days (its clock moved on) builds a synthetic full and takes an active full. Every kept point is
// bit-exact (read from the agent's folder; the newest also restored by the repository agent
// through the server) and the catalog follows the folder. Needs root (ip netns).
import { createHash, randomBytes } from 'node:crypto';
import { open, readdir, stat } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openRepository, vmFolder, type RestorePointInfo } from '../../src/repository/index.js';
import { logText, MultiHost, multiHostSkipReason as skipReason, type SessionJson } from './netns/hosts.js';

const VM = 'mhm-vm';
const MiB = 1 << 20;
const allDays = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];

let h: MultiHost;
/** The disk's SHA-256 at each point's backup. */
const shaOf = new Map<string, string>();
let writes = 0;

/** The VM's points of a job as its folder holds them, oldest first. */
async function points(job: string): Promise<RestorePointInfo[]> {
  const repository = await openRepository(h.repoDir);
  return (await repository.listRestorePoints({ job, vm: VM })).sort((a, b) => a.time.getTime() - b.time.getTime());
}

async function files(job: string): Promise<string[]> {
  return (await readdir(vmFolder(h.repoDir, job, VM))).filter((f) => /\.(vbk|vib|vrb)$/.test(f)).sort();
}

/** A guest write of 64 KiB somewhere new, then a run; the new point's image is remembered. */
async function backup(job: string, start: () => Promise<string>): Promise<SessionJson> {
  writes++;
  await h.write(4 * MiB + (writes % 15) * 256 * 1024, 65536, 0x10 + writes);
  const s = await h.waitSession(await start());
  expect(s.state, logText(s)).toMatch(/success|warning/);
  const newest = (await points(job)).at(-1)!;
  expect(shaOf.has(newest.id), `run ${writes} made no new point\n${logText(s)}`).toBe(false);
  shaOf.set(newest.id, h.expectedSha());
  return s;
}

/** The maintenance steps the session's tasks recorded (the committing task keeps its last one). */
function stepsOf(s: SessionJson): Array<{ name: string; bytesDone: number; bytesTotal: number }> {
  return s.tasks.flatMap((t) => {
    const step = (t.progress as { step?: { name: string; bytesDone: number; bytesTotal: number } }).step;
    return step ? [step] : [];
  });
}

/** The session's one recorded step is `name`, done to the end of the VM's disk (8 MiB). */
function expectStep(s: SessionJson, name: string): void {
  expect(stepsOf(s), JSON.stringify(s.tasks)).toEqual([{ name, bytesDone: 8 * MiB, bytesTotal: 8 * MiB }]);
}

const run = (job: string) => async () => (await h.api<{ sessionId: string }>('POST', `/jobs/${job}/run`, {})).sessionId;

/** SHA-256 of a point's disk read from the repository agent's folder (the shared file system here). */
async function readSha(pointId: string, password?: string): Promise<string> {
  const point = await (await openRepository(h.repoDir)).openRestorePoint(pointId, password === undefined ? {} : { password });
  try {
    const disk = point.openDisk('vda');
    return createHash('sha256').update(await disk.read(0, h.expected.length)).digest('hex');
  } finally {
    await point.close();
  }
}

/** Every kept point reads bit-exact; the newest is also restored through the server by the repository agent. */
async function everyPointBitExact(job: string): Promise<number> {
  const kept = await points(job);
  for (const p of kept) expect(await readSha(p.id), `point ${p.id} (${p.kind})`).toBe(shaOf.get(p.id));
  expect(await h.restoredSha(kept.at(-1)!.id)).toBe(shaOf.get(kept.at(-1)!.id));
  return kept.length;
}

/** The catalog's points of the job are the folder's. */
async function catalogFollows(job: string): Promise<void> {
  const listed = (await h.api<{ items: Array<{ id: string; job: string | null; type: string }> }>('GET', `/restore-points?vm=${VM}`)).items.filter((p) => p.job === job);
  expect(listed.map((p) => p.id).sort()).toEqual((await points(job)).map((p) => p.id).sort());
}

describe.skipIf(skipReason !== '')(`backup methods on a remote repository${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  beforeAll(async () => {
    const disk = Buffer.alloc(8 * MiB);
    disk.fill(0x5a, 0, MiB);
    randomBytes(2 * MiB).copy(disk, 2 * MiB);
    h = await MultiHost.start({ vm: VM, disk });
    const job = (name: string, extra: Record<string, unknown>) =>
      h.api('POST', '/jobs', { name, vms: [VM], repository: 'remote-repo', retries: { count: 0, waitMinutes: 0 }, blockSize: 262144, ...extra });
    await job('ff', { method: 'forever-forward', retention: { points: 3 }, compact: { weekdays: allDays } });
    await job('rev', { method: 'reverse', retention: { points: 2 } });
    await job('hc', { method: 'forever-forward', retention: { points: 7 }, healthCheck: { weekdays: allDays } });
    // Forward: a synthetic full on the server's tomorrow, an active full the day after (the test moves the server's clock).
    const weekday = (days: number) => allDays[(h.serverNow().getUTCDay() + 6 + days) % 7]!;
    await job('fwd', { method: 'forward', retention: { points: 7 }, syntheticFull: { weekdays: [weekday(1)] }, activeFull: { weekdays: [weekday(2)] } });
  }, 120_000);

  afterAll(() => {
    if (h) expect(h.close()).toBe('');
  });

  it('forever forward, retention 3, 5 runs (one a quick backup): one full + 2 increments, merged on the repository agent; all bit-exact', async () => {
    const logs: string[] = [];
    for (let i = 0; i < 5; i++) {
      const quick = i === 3;
      const s = await backup('ff', quick ? async () => (await h.api<{ sessionId: string }>('POST', '/backup/quick', { vm: VM, job: 'ff' })).sessionId : run('ff'));
      logs.push(logText(s));
      // The repository agent's live maintenance progress reached the session: compaction (due
      // every day) is each run's last step; a quick backup has no maintenance days, its merge is.
      expectStep(s, quick ? 'merge' : 'compact');
    }
    expect(logs[0]).toMatch(/this run: full/);
    expect(logs[1]).toMatch(/this run: incremental/);
    expect(logs[3]).toMatch(/quick backup of VM mhm-vm/);
    expect(logs[3]).toMatch(/retention: merged increment/);
    expect(logs[4]).toMatch(/retention: merged increment/);
    expect(logs[4]).toMatch(/compacted the full \S+\.vbk: \d+ -> \d+ bytes; repository I\/O: \d+ bytes read, \d+ written/);
    // The merge's repository bytes (read, written) are in its line.
    expect(logs[4]).toMatch(/retention removed 1 restore point\(s\): \S+; repository I\/O: [1-9]\d* bytes read, [1-9]\d* written/);
    const kept = await points('ff');
    expect(kept.map((p) => p.kind)).toEqual(['full', 'incremental', 'incremental']);
    expect((await files('ff')).map((f) => f.slice(-3))).toEqual(['vbk', 'vib', 'vib']);
    expect(await everyPointBitExact('ff')).toBe(3);
    await catalogFollows('ff');
  }, 120_000);

  it('reverse incremental, 3 runs: the newest is the full, older points are .vrb files (the oldest deleted by retention 2); all bit-exact', async () => {
    const logs: string[] = [];
    for (let i = 0; i < 3; i++) {
      const s = await backup('rev', run('rev'));
      logs.push(logText(s));
      // The injection's .vrb step at the commit, on the repository agent (a full has none).
      if (i === 0) expect(stepsOf(s)).toEqual([]);
      else expectStep(s, 'inject');
    }
    expect(logs[0]).toMatch(/this run: full/);
    expect(logs[1]).toMatch(/this run: reverse/);
    expect(logs[2]).toMatch(/retention: deleted reverse point/);
    const kept = await points('rev');
    expect(kept.map((p) => p.kind)).toEqual(['reverse', 'full']);
    expect((await files('rev')).map((f) => f.slice(-3)).sort()).toEqual(['vbk', 'vrb']);
    expect(await everyPointBitExact('rev')).toBe(2);
    await catalogFollows('rev');
  }, 120_000);

  it('a health check on the remote repository names a flipped byte; the next run repairs it and restores bit-exact', async () => {
    const first = logText(await backup('hc', run('hc')));
    // The check due on every day runs after the backup, on the repository agent.
    expect(first).toMatch(/health check of VM mhm-vm: the latest point \S+ verified, \d+ block\(s\), no damage/);
    const full = (await points('hc')).at(-1)!;
    const size = (await stat(full.file)).size;
    const f = await open(full.file, 'r+');
    try {
      const at = 4096 + Math.floor((size - 8192) / 2);
      const b = Buffer.alloc(1);
      await f.read(b, 0, 1, at);
      b[0] = b[0]! ^ 0x5a;
      await f.write(b, 0, 1, at);
    } finally {
      await f.close();
    }
    const health = async () => h.waitSession((await h.api<{ sessionId: string }>('POST', '/jobs/hc/health-check', {})).sessionId);
    const check = await health();
    expect(check.state, logText(check)).toBe('warning');
    const named = /damaged block (\d+) of disk vda \(disk offset \d+\) in (\S+), read by point/.exec(logText(check));
    expect(named, logText(check)).not.toBeNull();
    expect(named![2]).toBe(full.file);

    const repaired = logText(await backup('hc', run('hc')));
    expect(repaired).toMatch(new RegExp(`repair: re-reading vda blocks [0-9, ]*\\b${named![1]}\\b`));
    const latest = (await points('hc')).at(-1)!;
    expect(latest.kind).toBe('incremental');
    expect(await h.restoredSha(latest.id)).toBe(shaOf.get(latest.id));
    const clean = await health();
    expect(clean.state, logText(clean)).toBe('success');
    // The check's byte progress reached the session from the repository agent: the latest point's disk, whole.
    const task = clean.tasks[0] as unknown as { progress: { bytesRead: number; percent: number } };
    expect(task.progress).toMatchObject({ bytesRead: h.expected.length, percent: 100 });
    expect((clean as unknown as { progress: { percent: number } }).progress.percent).toBe(100);
  }, 120_000);

  it('a changed job password: the next increment continues the old chain with its password, --full starts one with the new; each point restores bit-exact with its own', async () => {
    const A = 'first-password-Aa1';
    const B = 'second-password-Bb2';
    await h.api('POST', '/jobs', { name: 'pw', vms: [VM], repository: 'remote-repo', retries: { count: 0, waitMinutes: 0 }, blockSize: 262144, method: 'forever-forward', retention: { points: 7 } });
    await h.api('POST', '/jobs/pw/encryption', { password: A, hint: 'the first' });
    const first = logText(await backup('pw', run('pw')));
    expect(first).toMatch(/this run: full/);
    await h.api('POST', '/jobs/pw/encryption', { password: B, hint: 'the second' });
    // The repository agent finds A (sent among the job's known passwords) opens the chain: an increment of it.
    const second = logText(await backup('pw', run('pw')));
    expect(second).toMatch(/the latest chain of VM mhm-vm is encrypted with the job's earlier password: its increments keep that/);
    expect(second).toMatch(/this run: incremental/);
    // A health check on the repository agent reads A's chain with A too.
    const check = await h.waitSession((await h.api<{ sessionId: string }>('POST', '/jobs/pw/health-check', {})).sessionId);
    expect(check.state, logText(check)).toBe('success');
    expect(logText(check)).toMatch(/health check of VM mhm-vm: the latest point \S+ verified/);
    const third = logText(await backup('pw', async () => (await h.api<{ sessionId: string }>('POST', '/jobs/pw/run', { full: true })).sessionId));
    expect(third).toMatch(/this run: full/);
    const kept = await points('pw');
    expect(kept.map((p) => [p.kind, p.encrypted])).toEqual([['full', true], ['incremental', true], ['full', true]]);
    expect(kept[1]!.chainId).toBe(kept[0]!.chainId);
    expect(kept[2]!.chainId).not.toBe(kept[0]!.chainId);
    const repository = await openRepository(h.repoDir);
    for (const [p, own, other] of [[kept[0]!, A, B], [kept[1]!, A, B], [kept[2]!, B, A]] as const) {
      expect(await readSha(p.id, own), `point ${p.id} with its password`).toBe(shaOf.get(p.id));
      await expect(repository.openRestorePoint(p.id, { password: other })).rejects.toMatchObject({ kind: 'unauthorized' });
    }
    // Restored by the repository agent through the server: it knows each chain's password.
    expect(await h.restoredSha(kept[1]!.id)).toBe(shaOf.get(kept[1]!.id));
    expect(await h.restoredSha(kept[2]!.id)).toBe(shaOf.get(kept[2]!.id));
  }, 120_000);

  it('forward on the server\'s days: a synthetic full built on the repository agent, then an active full; all bit-exact', async () => {
    const logs = [logText(await backup('fwd', run('fwd')))];
    await h.advanceDays(1);
    const synthetic = await backup('fwd', run('fwd'));
    expectStep(synthetic, 'synthetic-full');
    logs.push(logText(synthetic));
    await h.advanceDays(1);
    logs.push(logText(await backup('fwd', run('fwd'))));
    expect(logs[0]).toMatch(/this run: full/);
    expect(logs[1]).toMatch(/this run: synthetic-full \(synthetic full scheduled on/);
    expect(logs[1]).toMatch(/synthetic full built from the chain: point \S+ is now a full \(\d+ bytes, nothing read from the source\)/);
    expect(logs[2]).toMatch(/this run: full \(active full/);
    expect((await points('fwd')).map((p) => p.kind)).toEqual(['full', 'full', 'full']);
    expect(await everyPointBitExact('fwd')).toBe(3);
    await catalogFollows('fwd');
  }, 120_000);
});
