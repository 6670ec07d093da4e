import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ALL_VMS, openRepository, startJobRestorePoint, type Repository } from '../../repository/index.js';
import { patterned } from '../../repository/test-helpers.js';
import { methodSettings } from './chain-policy.js';
import { latestChainPassword, maintainAfterBackup, planVmBackup, sweepRemovedVms, type ChainRunContext, type MaintenanceProgress } from './chain-run.js';

const BS = 262144;
const DAY = 86_400_000;
const t0 = new Date('2026-11-20T10:00:00Z');

let dir: string;
let repository: Repository;
beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-chain-run-'));
  repository = await openRepository(dir, { create: true });
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** One point of `vm` (a full when the folder is empty, else an increment) with block 0 tagged `tag`. */
async function point(vm: string, time: Date, tag: number): Promise<string> {
  const full = (await repository.listRestorePoints({ job: 'j', vm })).length === 0;
  const w = await repository.startRestorePoint({ job: 'j', vm, kind: full ? 'full' : 'incremental', ...(full ? { blockSize: BS } : {}), time, threads: 0, disks: [{ name: 'vda', size: 2 * BS }] });
  await w.writeDisk('vda', (async function* () {
    yield { index: 0, data: patterned(BS, 0, tag) };
  })());
  return (await w.commit()).id;
}

function context(vm: string, settings: Record<string, unknown>, now: Date, lines: string[]): ChainRunContext {
  return { repository, job: 'j', vm, settings: methodSettings(settings), now, say: (level, message) => lines.push(`${level}: ${message}`) };
}

describe('chain-run', () => {
  it('before: a full for an empty folder, then incrementals; a quick backup is named; --full asked for is a full', async () => {
    const lines: string[] = [];
    expect((await planVmBackup(context('web1', {}, t0, lines), false)).plan.kind).toBe('full');
    await point('web1', t0, 1);
    const next = await planVmBackup(context('web1', { operation: 'quick' }, t0, lines), true);
    expect(next).toMatchObject({ plan: { kind: 'incremental', chainMethod: 'forward' }, repair: [] });
    expect((await planVmBackup(context('web1', {}, t0, lines), true)).plan.kind).toBe('full');
    expect((await planVmBackup(context('web1', { method: 'reverse' }, t0, lines), true)).plan.chainMethod).toBe('reverse');
    expect(lines.join('\n')).toMatch(/this run: full \(.+\)\n.*quick backup of VM web1.*\n.*this run: incremental/);
  });

  it('maintenance reports live progress: a health check from 0 to every disk byte of its points, a merge through the increment\'s disks to its end with its I/O', async () => {
    const ids = [await point('web1', t0, 1), await point('web1', new Date(t0.getTime() + DAY), 2), await point('web1', new Date(t0.getTime() + 2 * DAY), 3)];
    const lines: string[] = [];
    const seen: MaintenanceProgress[] = [];
    const c = { ...context('web1', { retention: { points: 2 }, healthCheck: { weekdays: ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'], wholeChain: true } }, new Date(t0.getTime() + 2 * DAY), lines), progress: (p: MaintenanceProgress) => void seen.push(p) };
    expect(await maintainAfterBackup(c, { kind: 'incremental', reason: 'test', chainMethod: 'forward', parent: ids[1]! }, ids[2]!)).toEqual([]);
    const merge = seen.filter((p) => p.step === 'merge');
    // Start and end at least (one 2-block disk: no report between under the default throttle).
    expect(merge.length).toBeGreaterThanOrEqual(2);
    expect(merge[0]).toMatchObject({ bytesDone: 0, bytesTotal: 2 * BS });
    const end = merge.at(-1)!;
    expect(end).toMatchObject({ bytesDone: 2 * BS, bytesTotal: 2 * BS });
    expect(end.bytesRead).toBeGreaterThan(0);
    expect(end.bytesWritten).toBeGreaterThan(0);
    // The end's I/O is the step's, as its session line says.
    expect(lines.join('\n')).toMatch(new RegExp(`retention removed 1 restore point\\(s\\): ${ids[0]}; repository I/O: ${end.bytesRead} bytes read, ${end.bytesWritten} written`));
    // The whole chain after the merge: 2 points of 2 blocks each.
    const check = seen.filter((p) => p.step === 'health-check');
    expect(check[0]).toEqual({ step: 'health-check', bytesDone: 0, bytesTotal: 4 * BS, bytesRead: 0, bytesWritten: 0 });
    expect(check.at(-1)).toEqual({ step: 'health-check', bytesDone: 4 * BS, bytesTotal: 4 * BS, bytesRead: 4 * BS, bytesWritten: 0 });
    for (let i = 1; i < check.length; i++) expect(check[i]!.bytesDone).toBeGreaterThanOrEqual(check[i - 1]!.bytesDone);
    // The steps in their order: the merge ends before the check starts.
    expect(seen.findIndex((p) => p.step === 'health-check')).toBeGreaterThan(seen.lastIndexOf(end));
  });

  it('after: retention of 2 points merges the oldest increment into the full and says so', async () => {
    const ids = [await point('web1', t0, 1), await point('web1', new Date(t0.getTime() + DAY), 2), await point('web1', new Date(t0.getTime() + 2 * DAY), 3)];
    const lines: string[] = [];
    const c = context('web1', { retention: { points: 2 } }, new Date(t0.getTime() + 2 * DAY), lines);
    const warnings = await maintainAfterBackup(c, { kind: 'incremental', reason: 'test', chainMethod: 'forward', parent: ids[1]! }, ids[2]!);
    expect(warnings).toEqual([]);
    expect(lines.join('\n')).toContain(`retention: merged increment ${ids[1]} into the full (point ${ids[0]} removed)`);
    expect((await repository.listRestorePoints({ job: 'j', vm: 'web1' })).map((p) => [p.id, p.kind])).toEqual([
      [ids[1], 'full'],
      [ids[2], 'incremental'],
    ]);
  });

  it('removed-VM sweep: a VM no longer in the job loses its points once its days after the newest are over; the others keep theirs', async () => {
    await point('kept', t0, 1);
    const gone = [await point('gone', t0, 1), await point('gone', new Date(t0.getTime() + DAY), 2)];
    const o = { job: 'j', method: 'forever-forward' as const, vms: ['kept'], days: 2 };
    expect(await sweepRemovedVms(repository, { ...o, now: new Date(t0.getTime() + 2 * DAY) })).toEqual([]);
    const swept = await sweepRemovedVms(repository, { ...o, now: new Date(t0.getTime() + 3 * DAY + 1) });
    expect(swept).toEqual([{ vm: 'gone', removedPoints: expect.arrayContaining(gone) as unknown, points: [] }]);
    expect(swept[0]!.removedPoints).toHaveLength(2);
    expect(await repository.listRestorePoints({ job: 'j', vm: 'kept' })).toHaveLength(1);
  });

  it("removed-VM sweep leaves the job's per-job set (_all) alone, however old its newest point", async () => {
    const w = await startJobRestorePoint(repository, { job: 'j', kind: 'full', blockSize: BS, time: t0, threads: 0, vms: [{ name: 'web1', disks: [{ name: 'vda', size: BS }] }] });
    await w.writeDisk('web1', 'vda', (async function* () {
      yield { index: 0, data: patterned(BS, 0, 1) };
    })());
    await w.commit();
    expect(await sweepRemovedVms(repository, { job: 'j', method: 'forever-forward', vms: ['web1'], days: 0, now: new Date(t0.getTime() + 100 * DAY) })).toEqual([]);
    expect(await repository.listRestorePoints({ job: 'j', vm: ALL_VMS })).toHaveLength(1);
  });

  it("latest chain's password: the candidate that opens the latest chain (a changed job password keeps the chain's); undefined for a plain chain, null when none opens it", async () => {
    expect(await latestChainPassword(repository, 'j', 'web1', ['new-pw-22'])).toBe('new-pw-22'); // no chain yet: the current one
    await point('plain', t0, 1);
    expect(await latestChainPassword(repository, 'j', 'plain', ['new-pw-22'])).toBeUndefined();
    const w = await repository.startRestorePoint({ job: 'j', vm: 'enc', kind: 'full', blockSize: BS, time: t0, threads: 0, encryption: { password: 'old-pw-11', log2N: 10 }, disks: [{ name: 'vda', size: BS }] });
    await w.writeDisk('vda', (async function* () {
      yield { index: 0, data: patterned(BS, 0, 1) };
    })());
    await w.commit();
    expect(await latestChainPassword(repository, 'j', 'enc', ['new-pw-22', 'old-pw-11'])).toBe('old-pw-11');
    expect(await latestChainPassword(repository, 'j', 'enc', ['old-pw-11'])).toBe('old-pw-11');
    expect(await latestChainPassword(repository, 'j', 'enc', ['new-pw-22'])).toBeNull();
    expect(await latestChainPassword(repository, 'j', 'enc', [])).toBeNull();
  });
});
