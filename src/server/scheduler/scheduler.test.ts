import { describe, expect, it } from 'vitest';
import { JobEngine } from '../jobs/engine.js';
import { FakeDiskResolver, FakeTaskExecutor } from '../jobs/fake-executor.js';
import { InMemoryJobEngineStore } from '../jobs/memory-store.js';
import type { JobDefinition, SessionRecord } from '../jobs/ports.js';
import { ManualClock } from './clock.js';
import { Scheduler, findAfterJobCycle, type ScheduledJob } from './scheduler.js';

function jobDef(id: string): JobDefinition {
  return { id, name: id, vms: ['vm1'], repository: 'r', retry: { count: 0, waitSeconds: 0 } };
}

function setup(jobs: ScheduledJob[], opts: { durationMs?: number; fail?: string[]; start?: string } = {}) {
  const clock = new ManualClock(opts.start ?? '2026-03-02T12:00:00Z');
  const store = new InMemoryJobEngineStore();
  for (const j of jobs) store.putJob(jobDef(j.id));
  const executor = new FakeTaskExecutor({
    clock,
    durationMs: opts.durationMs ?? 1000,
    steps: 1,
    fail: (t) => (opts.fail?.includes(t.job.id) ? 'boom' : undefined),
  });
  const engine = new JobEngine({ store, executor, disks: new FakeDiskResolver(), clock });
  const configBackups: string[] = [];
  const scheduler = new Scheduler({
    engine,
    store: { listScheduledJobs: async () => jobs },
    clock,
    timeZone: 'UTC',
    configBackup: { at: '03:00', run: async () => void configBackups.push(clock.now().toISOString()) },
  });
  const sessions = (): Array<Pick<SessionRecord, 'jobName' | 'trigger' | 'state'> & { at: string }> =>
    [...store.sessions.values()]
      .sort((a, b) => a.startedAt.getTime() - b.startedAt.getTime())
      .map((s) => ({ jobName: s.jobName, trigger: s.trigger, state: s.state, at: s.startedAt.toISOString() }));
  return { clock, store, engine, scheduler, sessions, configBackups };
}

const since = new Date('2026-03-01T00:00:00Z');

describe('Scheduler', () => {
  it('runs a daily job at its time, every day', async () => {
    const { clock, scheduler, sessions } = setup([
      { id: 'a', name: 'a', enabled: true, schedule: { kind: 'daily', at: '22:00' }, scheduledSince: new Date('2026-03-02T11:00:00Z') },
    ]);
    await scheduler.start();
    expect(scheduler.upcoming()).toEqual([{ jobId: 'a', jobName: 'a', at: new Date('2026-03-02T22:00:00Z') }]);
    await clock.advanceTo('2026-03-04T23:00:00Z');
    expect(sessions()).toEqual([
      { jobName: 'a', trigger: 'schedule', state: 'success', at: '2026-03-02T22:00:00.000Z' },
      { jobName: 'a', trigger: 'schedule', state: 'success', at: '2026-03-03T22:00:00.000Z' },
      { jobName: 'a', trigger: 'schedule', state: 'success', at: '2026-03-04T22:00:00.000Z' },
    ]);
    scheduler.stop();
  });

  it('runs a missed run once after start-up, then keeps the schedule', async () => {
    const { clock, scheduler, sessions } = setup([
      { id: 'a', name: 'a', enabled: true, schedule: { kind: 'daily', at: '01:00' }, lastRunAt: new Date('2026-02-27T01:00:00Z'), scheduledSince: since },
      { id: 'b', name: 'b', enabled: true, schedule: { kind: 'daily', at: '13:00' }, lastRunAt: new Date('2026-03-01T13:00:00Z'), scheduledSince: since },
      { id: 'c', name: 'c', enabled: false, schedule: { kind: 'daily', at: '01:00' }, scheduledSince: since },
    ]);
    await scheduler.start();
    await clock.advance(5000);
    expect(sessions()).toEqual([{ jobName: 'a', trigger: 'missed-run', state: 'success', at: '2026-03-02T12:00:00.000Z' }]);
    await clock.advanceTo('2026-03-03T02:00:00Z');
    expect(sessions().map((s) => `${s.jobName} ${s.trigger} ${s.at}`)).toEqual([
      'a missed-run 2026-03-02T12:00:00.000Z',
      'b schedule 2026-03-02T13:00:00.000Z',
      'a schedule 2026-03-03T01:00:00.000Z',
    ]);
    scheduler.stop();
  });

  it('chains "after job X" on success or warning, not on failure', async () => {
    const today = new Date('2026-03-02T11:00:00Z');
    const jobs: ScheduledJob[] = [
      { id: 'x', name: 'x', enabled: true, schedule: { kind: 'daily', at: '20:00' }, scheduledSince: today },
      { id: 'y', name: 'y', enabled: true, schedule: { kind: 'after-job', job: 'x' }, scheduledSince: today },
      { id: 'z', name: 'z', enabled: true, schedule: { kind: 'after-job', job: 'y' }, scheduledSince: today },
      { id: 'w', name: 'w', enabled: true, schedule: { kind: 'daily', at: '21:00' }, scheduledSince: today },
      { id: 'v', name: 'v', enabled: true, schedule: { kind: 'after-job', job: 'w' }, scheduledSince: today },
    ];
    const { clock, scheduler, sessions } = setup(jobs, { fail: ['w'] });
    await scheduler.start();
    await clock.advanceTo('2026-03-02T21:30:00Z');
    expect(sessions().map((s) => `${s.jobName} ${s.trigger} ${s.state} ${s.at.slice(11, 19)}`)).toEqual([
      'x schedule success 20:00:00',
      'y after-job success 20:00:01',
      'z after-job success 20:00:02',
      'w schedule failed 21:00:00',
    ]);
    scheduler.stop();
  });

  it('stops a cycle of "after job" schedules after one round', async () => {
    const today = new Date('2026-03-02T11:00:00Z');
    const jobs: ScheduledJob[] = [
      { id: 'x', name: 'x', enabled: true, schedule: { kind: 'after-job', job: 'z' }, scheduledSince: today },
      { id: 'y', name: 'y', enabled: true, schedule: { kind: 'after-job', job: 'x' }, scheduledSince: today },
      { id: 'z', name: 'z', enabled: true, schedule: { kind: 'after-job', job: 'y' }, scheduledSince: today },
    ];
    const { clock, engine, scheduler, sessions } = setup(jobs);
    await scheduler.start();
    await engine.runNow('x');
    await clock.advance(10_000);
    expect(sessions().map((s) => `${s.jobName} ${s.trigger}`)).toEqual(['x manual', 'y after-job', 'z after-job']);
    expect(scheduler.skippedRuns().map((r) => r.reason)).toEqual(['"after job" schedules form a cycle: x → y → z → x']);
    // A later manual run starts a fresh chain.
    await engine.runNow('y');
    await clock.advance(10_000);
    expect(sessions().slice(3).map((s) => `${s.jobName} ${s.trigger}`)).toEqual(['y manual', 'z after-job', 'x after-job']);
    scheduler.stop();
  });

  it('finds cycles among "after job" schedules for validation', () => {
    const j = (id: string, after?: string): ScheduledJob => ({
      id,
      name: `job-${id}`,
      enabled: true,
      schedule: after === undefined ? { kind: 'daily', at: '01:00' } : { kind: 'after-job', job: after },
      scheduledSince: since,
    });
    expect(findAfterJobCycle([j('a'), j('b', 'a'), j('c', 'job-b')])).toBeUndefined();
    expect(findAfterJobCycle([j('a', 'c'), j('b', 'a'), j('c', 'job-b')])).toEqual(['job-a', 'job-b', 'job-c', 'job-a']);
    expect(findAfterJobCycle([j('a', 'a')])).toEqual(['job-a', 'job-a']);
    expect(findAfterJobCycle([j('a', 'missing')])).toBeUndefined();
  });

  it('never runs a job twice at once: a due run while it still runs is skipped', async () => {
    const { clock, scheduler, sessions } = setup(
      [{ id: 'p', name: 'p', enabled: true, schedule: { kind: 'periodic', every: 1, unit: 'minutes' }, scheduledSince: new Date('2026-03-02T12:00:00Z') }],
      { durationMs: 90_000 },
    );
    await scheduler.start();
    await clock.advanceTo('2026-03-02T12:06:00Z');
    // Runs at 12:01 (until 12:02:30), 12:02 skipped, 12:03 (until 12:04:30), 12:04 skipped, 12:05 (until 12:06:30), 12:06 skipped.
    expect(sessions().map((s) => s.at.slice(11, 19))).toEqual(['12:01:00', '12:03:00', '12:05:00']);
    expect(scheduler.skippedRuns().map((r) => `${r.at.toISOString().slice(11, 19)} ${r.reason.replace(/session .*\)/, 'session …)')}`)).toEqual([
      '12:02:00 job p is already running (session …)',
      '12:04:00 job p is already running (session …)',
      '12:06:00 job p is already running (session …)',
    ]);
    scheduler.stop();
  });

  it('skips runs that fall due outside the job\'s backup window', async () => {
    const { clock, scheduler, sessions } = setup([
      {
        id: 'p',
        name: 'p',
        enabled: true,
        schedule: { kind: 'periodic', every: 4, unit: 'hours' },
        window: { allow: [{ from: '20:00', to: '06:00' }] },
        scheduledSince: new Date('2026-03-02T12:00:00Z'),
      },
    ]);
    await scheduler.start();
    await clock.advanceTo('2026-03-03T12:30:00Z');
    expect(sessions().map((s) => s.at.slice(5, 16))).toEqual(['03-02T20:00', '03-03T00:00', '03-03T04:00']);
    expect(scheduler.skippedRuns().map((r) => `${r.at.toISOString().slice(5, 16)} ${r.reason}`)).toEqual([
      '03-02T16:00 outside the backup window',
      '03-03T08:00 outside the backup window',
      '03-03T12:00 outside the backup window',
    ]);
    scheduler.stop();
  });

  it('picks up enabled, edited and deleted jobs on reload', async () => {
    const jobs: ScheduledJob[] = [{ id: 'a', name: 'a', enabled: false, schedule: { kind: 'daily', at: '18:00' }, scheduledSince: since }];
    const { clock, scheduler, sessions } = setup(jobs);
    await scheduler.start();
    expect(scheduler.upcoming()).toEqual([]);
    jobs[0] = { ...jobs[0]!, enabled: true };
    await scheduler.reload();
    expect(scheduler.upcoming().map((u) => u.at.toISOString())).toEqual(['2026-03-02T18:00:00.000Z']);
    jobs[0] = { ...jobs[0], schedule: { kind: 'daily', at: '19:00' } };
    await scheduler.reload();
    expect(scheduler.upcoming().map((u) => u.at.toISOString())).toEqual(['2026-03-02T19:00:00.000Z']);
    await clock.advanceTo('2026-03-02T18:30:00Z');
    expect(sessions()).toEqual([]);
    jobs.pop();
    await scheduler.reload();
    expect(scheduler.upcoming()).toEqual([]);
    await clock.advanceTo('2026-03-03T20:00:00Z');
    expect(sessions()).toEqual([]);
    scheduler.stop();
  });

  it('runs the configuration backup daily at its time', async () => {
    const { clock, scheduler, configBackups } = setup([]);
    await scheduler.start();
    await clock.advanceTo('2026-03-05T00:00:00Z');
    expect(configBackups).toEqual(['2026-03-03T03:00:00.000Z', '2026-03-04T03:00:00.000Z']);
    scheduler.stop();
    await clock.advanceTo('2026-03-06T00:00:00Z');
    expect(configBackups).toHaveLength(2);
    expect(clock.pendingTimers).toBe(0);
  });
});
