import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { ManualClock } from '../scheduler/clock.js';
import { JobEngine, asJobRunner, type SessionEvent } from './engine.js';
import { FakeDiskResolver, FakeTaskExecutor, type FakeTaskExecutorOptions } from './fake-executor.js';
import { InMemoryJobEngineStore } from './memory-store.js';
import type { JobDefinition, SlotLease, SlotRequest, TaskSlots } from './ports.js';

const MiB = 1024 * 1024;

function job(over: Partial<JobDefinition> = {}): JobDefinition {
  return {
    id: 'job-1',
    name: 'nightly',
    vms: ['web', 'db'],
    repository: 'repo-1',
    retry: { count: 0, waitSeconds: 0 },
    settings: { disks: { web: [{ name: 'vda', sizeBytes: 10 * MiB }], db: [{ name: 'vda', sizeBytes: 20 * MiB }, { name: 'vdb', sizeBytes: 30 * MiB }] } },
    ...over,
  };
}

function setup(j: JobDefinition = job(), exec: FakeTaskExecutorOptions = {}, slots?: TaskSlots) {
  const clock = new ManualClock('2026-03-02T10:00:00Z');
  const store = new InMemoryJobEngineStore();
  store.putJob(j);
  const executor = new FakeTaskExecutor({ clock, durationMs: 1000, steps: 4, ...exec });
  const events: SessionEvent[] = [];
  const engine = new JobEngine({ store, executor, disks: new FakeDiskResolver(), clock, progressIntervalMs: 0, slots, timeZone: 'UTC' });
  engine.subscribe((e) => events.push(e));
  return { clock, store, executor, engine, events };
}

async function tasksOf(store: InMemoryJobEngineStore, sessionId: string) {
  return (await store.listTasks(sessionId)).map((t) => `${t.vm}/${t.disk} ${t.state} #${t.attempt}${t.message ? ` ${t.message}` : ''}`).sort();
}

describe('JobEngine', () => {
  it('runs one task per VM disk and ends in success with full progress', async () => {
    const { clock, store, engine, events, executor } = setup();
    const { sessionId, coalesced } = await engine.runNow('nightly');
    expect(coalesced).toBe(false);
    expect(engine.runningSessionOf('job-1')).toBe(sessionId);
    await clock.advance(1000);
    expect(await engine.waitForEnd(sessionId)).toBe('success');
    expect(await tasksOf(store, sessionId)).toEqual(['db/vda success #1', 'db/vdb success #1', 'web/vda success #1']);
    const s = (await store.loadSession(sessionId))!;
    expect(s.state).toBe('success');
    expect(s.endedAt?.toISOString()).toBe('2026-03-02T10:00:01.000Z');
    expect(s.progress).toMatchObject({ percent: 100, bytesRead: 60 * MiB, bytesTransferred: 30 * MiB, bytesStored: 20 * MiB });
    expect(s.progress.processingRate).toBe(60 * MiB);
    expect(executor.maxRunning).toBe(3);
    expect(store.logText(sessionId)).toContain('info: web/vda: simulated backup (fake executor): no data is read or stored');
    expect(events.at(-1)).toMatchObject({ type: 'ended', sessionId, state: 'success' });
    expect(events.some((e) => e.type === 'changed' && e.state === 'running')).toBe(true);
    expect(engine.runningSessions()).toEqual([]);
  });

  it('refuses a second start of a running job, or coalesces it when asked', async () => {
    const { clock, engine } = setup();
    const [first, second] = await Promise.allSettled([engine.runNow('nightly'), engine.runNow('job-1')]);
    expect(first.status).toBe('fulfilled');
    expect(second.status).toBe('rejected');
    const err = (second as PromiseRejectedResult).reason as BulwarkError;
    const id = (first as PromiseFulfilledResult<{ sessionId: string }>).value.sessionId;
    expect(err.kind).toBe('conflict');
    expect(err.message).toBe(`job nightly is already running (session ${id})`);
    const again = await engine.runNow('nightly', { ifRunning: 'coalesce', trigger: 'schedule' });
    expect(again).toEqual({ sessionId: id, coalesced: true, reason: `job nightly is already running (session ${id})` });
    await clock.advance(1000);
    expect(await engine.waitForEnd(id)).toBe('success');
    // Once ended, the job may start again.
    const third = await engine.runNow('nightly');
    expect(third.sessionId).not.toBe(id);
    await clock.advance(1000);
  });

  it('retries only failed tasks after the wait, and succeeds when a retry does', async () => {
    const { clock, store, engine, executor } = setup(job({ retry: { count: 2, waitSeconds: 60 } }), {
      fail: (t) => (t.vm === 'web' && t.attempt === 1 ? 'source unreachable' : undefined),
    });
    const { sessionId } = await engine.runNow('nightly');
    await clock.advance(1000);
    expect(await tasksOf(store, sessionId)).toContain('web/vda failed #1 source unreachable');
    await clock.advance(59_000);
    expect(executor.started).toHaveLength(3);
    await clock.advance(1000 + 1000);
    expect(await engine.waitForEnd(sessionId)).toBe('success');
    expect(executor.started.map((t) => `${t.vm}/${t.disk.name}#${t.attempt}`)).toEqual(['web/vda#1', 'db/vda#1', 'db/vdb#1', 'web/vda#2']);
    expect(await tasksOf(store, sessionId)).toEqual(['db/vda success #1', 'db/vdb success #1', 'web/vda success #2']);
    expect(store.logText(sessionId)).toContain('info: Retrying 1 failed task(s) in 60 s (retry 1 of 2)');
  });

  it('fails the session after the last retry, naming the task and the error', async () => {
    const { clock, store, engine } = setup(job({ retry: { count: 2, waitSeconds: 10 } }), {
      fail: (t) => (t.disk.name === 'vdb' ? 'read error at offset 4096' : undefined),
    });
    const { sessionId } = await engine.runNow('nightly');
    await clock.advance(60_000);
    expect(await engine.waitForEnd(sessionId)).toBe('failed');
    const s = (await store.loadSession(sessionId))!;
    // db/vda wrote its disk into db's restore point each time, but the point was never committed.
    expect(s.reason).toBe('2 of 3 task(s) failed; db/vdb: read error at offset 4096');
    expect(await tasksOf(store, sessionId)).toEqual([
      'db/vda failed #3 restore point of VM db not committed: disk vdb failed',
      'db/vdb failed #3 read error at offset 4096',
      'web/vda success #1',
    ]);
  });

  describe('a disk task whose sibling of the same restore point failed does not stay success', () => {
    const vdbFails = (t: { vm: string; disk: { name: string }; attempt: number }) => (t.vm === 'db' && t.disk.name === 'vdb' ? 'read error at offset 4096' : undefined);
    const cases: Array<{
      name: string;
      settings?: Record<string, unknown>;
      vms?: string[];
      retry?: number;
      fail?: (t: { vm: string; disk: { name: string }; attempt: number }) => string | undefined;
      warn?: (t: { vm: string; disk: { name: string } }) => string | undefined;
      state: string;
      reason: string;
      tasks: string[];
    }> = [
      {
        name: 'per VM: the failed disk fails its VM\'s other disk, not the other VM',
        fail: vdbFails,
        state: 'failed',
        reason: '2 of 3 task(s) failed; db/vdb: read error at offset 4096',
        tasks: ['db/vda failed #1 restore point of VM db not committed: disk vdb failed', 'db/vdb failed #1 read error at offset 4096', 'web/vda success #1'],
      },
      {
        name: 'per VM: a sibling that ended with a warning fails too',
        fail: vdbFails,
        warn: (t) => (t.vm === 'db' && t.disk.name === 'vda' ? 'guest not quiesced' : undefined),
        state: 'failed',
        reason: '2 of 3 task(s) failed; db/vdb: read error at offset 4096',
        tasks: ['db/vda failed #1 restore point of VM db not committed: disk vdb failed', 'db/vdb failed #1 read error at offset 4096', 'web/vda success #1'],
      },
      {
        name: 'per job: one point holds every VM, so every other task fails',
        settings: { storage: 'per-job' },
        fail: vdbFails,
        state: 'failed',
        reason: '3 of 3 task(s) failed; db/vdb: read error at offset 4096',
        tasks: [
          'db/vda failed #1 restore point of job nightly (all its VMs) not committed: VM db disk vdb failed',
          'db/vdb failed #1 read error at offset 4096',
          'web/vda failed #1 restore point of job nightly (all its VMs) not committed: VM db disk vdb failed',
        ],
      },
      {
        name: 'a retry round runs the whole VM again; its success is every disk\'s',
        retry: 1,
        fail: (t) => (vdbFails(t) !== undefined && t.attempt === 1 ? 'read error at offset 4096' : undefined),
        state: 'success',
        reason: '',
        tasks: ['db/vda success #2', 'db/vdb success #2', 'web/vda success #1'],
      },
      {
        name: 'health checks check each disk on its own',
        settings: { operation: 'health-check' },
        fail: vdbFails,
        state: 'failed',
        reason: '1 of 3 task(s) failed; db/vdb: read error at offset 4096',
        tasks: ['db/vda success #1', 'db/vdb failed #1 read error at offset 4096', 'web/vda success #1'],
      },
      {
        name: 'nothing failed: nothing changes',
        state: 'success',
        reason: '',
        tasks: ['db/vda success #1', 'db/vdb success #1', 'web/vda success #1'],
      },
    ];
    for (const c of cases) {
      it(c.name, async () => {
        const base = job();
        const { clock, store, engine } = setup(
          job({ ...(c.vms ? { vms: c.vms } : {}), retry: { count: c.retry ?? 0, waitSeconds: 1 }, settings: { ...base.settings, ...(c.settings ?? {}) } }),
          { fail: c.fail, warn: c.warn },
        );
        const { sessionId } = await engine.runNow('nightly');
        await clock.advance(10_000);
        expect(await engine.waitForEnd(sessionId)).toBe(c.state);
        expect((await store.loadSession(sessionId))!.reason ?? '').toBe(c.reason);
        expect(await tasksOf(store, sessionId)).toEqual(c.tasks);
      });
    }
  });

  it('ends in warning when a task warns', async () => {
    const { clock, store, engine } = setup(job(), { warn: (t) => (t.vm === 'db' && t.disk.name === 'vda' ? 'guest not quiesced' : undefined) });
    const { sessionId } = await engine.runNow('nightly');
    await clock.advance(1000);
    expect(await engine.waitForEnd(sessionId)).toBe('warning');
    expect((await store.loadSession(sessionId))!.reason).toBe('1 of 3 task(s) ended with warnings; db/vda: guest not quiesced');
    expect(store.logText(sessionId)).toContain('warning: db/vda: guest not quiesced');
  });

  it('stops a running session on request; running tasks end stopped', async () => {
    const { clock, store, engine } = setup();
    const { sessionId } = await engine.runNow('nightly');
    await clock.advance(500);
    await engine.stop(sessionId, { by: 'alice' });
    expect(await engine.waitForEnd(sessionId)).toBe('stopped');
    expect(await tasksOf(store, sessionId)).toEqual([
      'db/vda stopped #1 stopped by alice',
      'db/vdb stopped #1 stopped by alice',
      'web/vda stopped #1 stopped by alice',
    ]);
    expect((await store.loadSession(sessionId))!.reason).toBe('stopped by alice');
    await expect(engine.stop(sessionId)).rejects.toThrow(/is not running \(it is stopped\)/);
    await expect(engine.stop('nope')).rejects.toThrow(/there is no session nope/);
  });

  it('serves as the API job runner: run, stop with a reason, close', async () => {
    const { clock, store, engine } = setup();
    const runner = asJobRunner(engine);
    const { sessionId } = await runner.run('nightly', { full: true });
    expect((await store.loadSession(sessionId))!).toMatchObject({ full: true, trigger: 'manual' });
    await runner.stop(sessionId, 'stopped by admin via the API');
    expect(await engine.waitForEnd(sessionId)).toBe('stopped');
    expect((await store.loadSession(sessionId))!.reason).toBe('stopped by admin via the API');
    const second = await runner.run('nightly', { full: false });
    await clock.advance(100);
    await runner.close();
    expect((await store.loadSession(second.sessionId))!).toMatchObject({ state: 'stopped', reason: 'the server shut down' });
  });

  it('stops a session still running when its backup window ends', async () => {
    const { clock, store, engine } = setup(job({ window: { allow: [{ from: '22:00', to: '10:05' }] } }), { durationMs: 10 * 60_000 });
    const { sessionId } = await engine.runNow('nightly', { trigger: 'schedule' });
    await clock.advance(4 * 60_000);
    expect(engine.runningSessionOf('job-1')).toBe(sessionId);
    await clock.advance(2 * 60_000);
    expect(await engine.waitForEnd(sessionId)).toBe('stopped');
    const s = (await store.loadSession(sessionId))!;
    expect(s.reason).toBe('stopped at the end of the backup window (2026-03-02T10:05:00.000Z)');
    expect(s.endedAt?.toISOString()).toBe('2026-03-02T10:05:00.000Z');
  });

  it('does not let the window stop a run started by hand outside it', async () => {
    const { clock, store, engine } = setup(job({ window: { allow: [{ from: '22:00', to: '06:00' }] } }));
    const { sessionId } = await engine.runNow('nightly', { trigger: 'manual' });
    await clock.advance(1000);
    expect(await engine.waitForEnd(sessionId)).toBe('success');
    expect(store.logText(sessionId)).toContain('info: Started by hand outside the backup window: the window will not stop it');
  });

  it('fails a VM whose disks cannot be listed and still backs up the others', async () => {
    const { clock, store, engine } = setup(job({ vms: ['web', 'ghost'], retry: { count: 1, waitSeconds: 1 } }));
    const { sessionId } = await engine.runNow('nightly');
    await clock.advance(5000);
    expect(await engine.waitForEnd(sessionId)).toBe('failed');
    expect(await tasksOf(store, sessionId)).toEqual(['ghost/* failed #1 cannot list the disks of VM ghost: VM ghost is not known', 'web/vda success #1']);
  });

  it('fails a job without VMs, and refuses an unknown job', async () => {
    const { engine, store } = setup(job({ vms: [] }));
    const { sessionId } = await engine.runNow('nightly');
    expect(await engine.waitForEnd(sessionId)).toBe('failed');
    expect((await store.loadSession(sessionId))!.reason).toBe('the job has no VMs to back up');
    await expect(engine.runNow('weekly')).rejects.toMatchObject({ kind: 'not-found', message: 'there is no job weekly' });
  });

  it('waits for a task slot before each task', async () => {
    const grants: string[] = [];
    let free = 1;
    const waiting: Array<() => void> = [];
    const oneAtATime: TaskSlots = {
      async acquire(req: SlotRequest): Promise<SlotLease> {
        while (free === 0) await new Promise<void>((r) => waiting.push(r));
        free--;
        grants.push(`${req.vm}/${req.disk.name}@${req.repository}`);
        return { proxy: 'proxy-a', release: () => { free++; waiting.shift()?.(); } };
      },
    };
    const { clock, store, engine, executor } = setup(job(), {}, oneAtATime);
    const { sessionId } = await engine.runNow('nightly');
    await clock.advance(3000);
    expect(await engine.waitForEnd(sessionId)).toBe('success');
    expect(executor.maxRunning).toBe(1);
    expect(grants).toEqual(['web/vda@repo-1', 'db/vda@repo-1', 'db/vdb@repo-1']);
    expect((await store.listTasks(sessionId)).every((t) => t.proxy === 'proxy-a')).toBe(true);
  });

  it('marks sessions a crash left running as failed at start-up', async () => {
    const { store, engine } = setup();
    const id = await store.createSession({ jobId: 'job-1', jobName: 'nightly', state: 'running', trigger: 'schedule', full: false, startedAt: new Date('2026-03-01T00:00:00Z'), progress: { percent: 0, bytesRead: 0, bytesTransferred: 0, bytesStored: 0, processingRate: 0 } });
    await store.createTasks(id, [
      { vm: 'web', disk: 'vda', state: 'success', attempt: 1, progress: { bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 } },
      { vm: 'db', disk: 'vda', state: 'running', attempt: 1, progress: { bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 } },
    ]);
    expect(await engine.recoverInterruptedSessions()).toBe(1);
    const s = (await store.loadSession(id))!;
    expect(s.state).toBe('failed');
    expect(s.reason).toBe('the server stopped while this session was running (crash or restart)');
    expect(await tasksOf(store, id)).toEqual(['db/vda failed #1 the server stopped while this task was running', 'web/vda success #1']);
    expect(await engine.recoverInterruptedSessions()).toBe(0);
  });

  it('runs tasks one at a time when the sequential setting is on', async () => {
    const clock = new ManualClock('2026-03-02T10:00:00Z');
    const store = new InMemoryJobEngineStore();
    store.putJob(job());
    const executor = new FakeTaskExecutor({ clock, durationMs: 1000, steps: 2 });
    const engine = new JobEngine({ store, executor, disks: new FakeDiskResolver(), clock, sequential: () => true });
    const { sessionId } = await engine.runNow('nightly', { full: true });
    await clock.advance(3000);
    expect(await engine.waitForEnd(sessionId)).toBe('success');
    expect(executor.maxRunning).toBe(1);
    expect(executor.started.every((t) => t.full)).toBe(true);
  });
});
