// The job engine's, scheduler's and agent link's store ports over the configuration database,
// the same bodies on SQLite and PostgreSQL, driven by the real JobEngine with the fake executor.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { JobEngine } from '../../src/server/jobs/engine.js';
import { FakeDiskResolver, FakeTaskExecutor } from '../../src/server/jobs/fake-executor.js';
import { DatabaseAgentLinkStore, DatabaseJobEngineStore, DatabaseSchedulerStore } from '../../src/server/services/engine-stores.js';
import * as infra from '../../src/server/services/infrastructure.js';
import * as jobs from '../../src/server/services/jobs.js';
import { getSession } from '../../src/server/services/sessions.js';
import { engines, openTestContext } from './engines.js';

describe.each(engines)('engine stores on %s', (engine) => {
  let t: Awaited<ReturnType<typeof openTestContext>>;
  beforeAll(async () => {
    t = await openTestContext(engine);
    await infra.createRepository(t.ctx, { name: 'main', path: '/srv/main' });
    await jobs.createJob(t.ctx, {
      name: 'nightly',
      vms: ['web1', 'db1'],
      repository: 'main',
      retries: { count: 1, waitMinutes: 2 },
      schedule: { kind: 'periodic', every: 2, unit: 'hours' },
      window: { allow: [{ from: '20:00', to: '06:00' }] },
    });
  });
  afterAll(async () => {
    await t?.close();
  });

  it('loads a job as the engine sees it', async () => {
    const store = new DatabaseJobEngineStore(t.ctx);
    const job = await store.loadJob('nightly');
    expect(job).toMatchObject({
      name: 'nightly',
      vms: ['web1', 'db1'],
      repository: 'main',
      retry: { count: 1, waitSeconds: 120 },
      window: { allow: [{ from: '20:00', to: '06:00' }] },
      settings: { method: 'forever-forward', blockSize: 1048576, compression: 'zstd', retention: { points: 7 } },
    });
    expect(await store.loadJob(job!.id)).toEqual(job);
    expect(await store.loadJob('ghost')).toBeUndefined();
  });

  it('the real engine runs a job through the store; the API view shows the result', async () => {
    const store = new DatabaseJobEngineStore(t.ctx, 'simulated: no data moved');
    const eng = new JobEngine({ store, executor: new FakeTaskExecutor({ durationMs: 40, steps: 2 }), disks: new FakeDiskResolver({ defaultDiskBytes: 3 * 2 ** 30 }) });
    const changes: string[] = [];
    eng.subscribe((e) => changes.push(e.state));
    const { sessionId } = await eng.runNow('nightly', { full: true, trigger: 'manual' });
    expect(await eng.waitForEnd(sessionId)).toBe('success');
    const s = await getSession(t.ctx, sessionId);
    expect(s).toMatchObject({ jobName: 'nightly', state: 'success', full: true, progress: { percent: 100, bytesRead: 6 * 2 ** 30 } });
    expect(s.tasks.map((x) => [x.vm, x.disk, x.state, x.progress.percent])).toEqual([
      ['db1', 'vda', 'success', 100],
      ['web1', 'vda', 'success', 100],
    ]);
    expect(s.log[0]).toMatchObject({ level: 'warning', message: 'simulated: no data moved' });
    expect(changes.at(-1)).toBe('success');
    const records = await store.listTasks(sessionId);
    expect(records.every((r) => r.attempt === 1 && r.progress.total === 3 * 2 ** 30)).toBe(true);
    expect((await store.loadSession(sessionId))?.trigger).toBe('manual');

    // A session a crash left running is closed by recovery.
    const orphan = await store.createSession({ jobId: s.jobId!, jobName: 'nightly', state: 'running', trigger: 'schedule', full: false, startedAt: new Date(), progress: s.progress });
    expect((await store.listSessionsInState(['running'])).map((x) => x.id)).toEqual([orphan]);
    expect(await eng.recoverInterruptedSessions()).toBe(1);
    expect((await getSession(t.ctx, orphan)).state).toBe('failed');
  });

  it('the scheduler store lists jobs with schedule, last run and origin', async () => {
    const list = await new DatabaseSchedulerStore(t.ctx).listScheduledJobs();
    expect(list).toHaveLength(1);
    expect(list[0]).toMatchObject({ name: 'nightly', enabled: true, schedule: { kind: 'periodic', every: 2, unit: 'hours' } });
    expect(list[0]!.lastRunAt).toBeInstanceOf(Date);
    expect(list[0]!.scheduledSince.toISOString()).toBe('2026-11-25T10:00:00.000Z');
  });

  it('the agent link store: one-time tokens, enrollment, heartbeats with health', async () => {
    const s = new DatabaseAgentLinkStore(t.ctx);
    const now = t.clock.now();
    await s.saveEnrollmentToken({ id: '0123456789abcdef', tokenHash: 'ff'.repeat(32), expiresAt: new Date(now.getTime() + 60_000), createdAt: now, agentName: 'proxy1' });
    expect(await s.findEnrollmentToken('0123456789abcdef')).toMatchObject({ tokenHash: 'ff'.repeat(32), agentName: 'proxy1', usedAt: undefined });
    expect(await s.markEnrollmentTokenUsed('0123456789abcdef', now)).toBe(true);
    expect(await s.markEnrollmentTokenUsed('0123456789abcdef', now)).toBe(false);
    expect(await s.findAgent('proxy1')).toBeUndefined();
    await s.saveEnrolledAgent({ name: 'proxy1', certFingerprint: 'AA:BB', certSerial: '01', hostname: 'p1', version: '0.1.0', cores: 4, enrolledAt: now, replaceExisting: false });
    expect(await s.findAgent('proxy1')).toEqual({ name: 'proxy1', certFingerprint: 'AA:BB', state: 'online' });
    await infra.updateRepository(t.ctx, 'main', { version: 1, agent: 'proxy1' });
    expect(await s.repositoryPathsOf('proxy1')).toEqual(['/srv/main']);
    await s.recordHeartbeat('proxy1', { version: '0.1.1', hostname: 'p1', cores: 6, uptimeSeconds: 99, repositories: [{ path: '/srv/main', freeBytes: 5e12, totalBytes: 8e12 }] }, now);
    expect(await infra.getAgent(t.ctx, 'proxy1')).toMatchObject({
      agentVersion: '0.1.1',
      cores: 6,
      state: 'online',
      uptimeSeconds: 99,
      repositories: [{ path: '/srv/main', freeBytes: 5e12, totalBytes: 8e12 }],
      version: 1, // heartbeats are not edits
    });
    // A token not bound to this name cannot take an existing agent's place (two enrollments racing).
    await expect(
      s.saveEnrolledAgent({ name: 'proxy1', certFingerprint: 'EE:FF', certSerial: '03', hostname: 'p2', version: '0.1.0', cores: 2, enrolledAt: now, replaceExisting: false }),
    ).rejects.toThrow(/already registered/);
    expect(await infra.getAgent(t.ctx, 'proxy1')).toMatchObject({ certFingerprint: 'AA:BB' });
    // Re-enrollment replaces the certificate and counts as an edit.
    await s.saveEnrolledAgent({ name: 'proxy1', certFingerprint: 'CC:DD', certSerial: '02', hostname: 'p1', version: '0.1.1', cores: 6, enrolledAt: now, replaceExisting: true });
    expect(await infra.getAgent(t.ctx, 'proxy1')).toMatchObject({ certFingerprint: 'CC:DD', version: 2 });
  });
});
