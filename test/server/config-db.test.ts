// The configuration database and its services, the same test bodies on SQLite and PostgreSQL.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sql } from 'kysely';
import { openDatabase } from '../../src/server/db/connect.js';
import { migrate, migrations, type Migration } from '../../src/server/db/migrations.js';
import { dataTables } from '../../src/server/db/schema.js';
import type { ServiceContext } from '../../src/server/services/common.js';
import * as infra from '../../src/server/services/infrastructure.js';
import * as jobs from '../../src/server/services/jobs.js';
import * as sessions from '../../src/server/services/sessions.js';
import * as users from '../../src/server/services/users.js';
import { bulwarkRejection, engines, freshTarget, openTestContext } from './engines.js';

const rejects = bulwarkRejection;

describe.each(engines)('configuration database on %s', (engine) => {
  let t: Awaited<ReturnType<typeof openTestContext>>;
  let ctx: ServiceContext;
  beforeAll(async () => {
    t = await openTestContext(engine);
    ctx = t.ctx;
  });
  afterAll(async () => {
    await t?.close();
  });

  it('creates every table and records the migrations', async () => {
    expect(t.cdb.migrations.applied).toEqual(migrations.map((m) => m.name));
    for (const table of dataTables) {
      const r = await sql<{ n: number }>`select count(*) as n from ${sql.table(table)}`.execute(ctx.db);
      expect(Number(r.rows[0]!.n)).toBe(0);
    }
    // A second run applies nothing.
    expect((await migrate(ctx.db, engine)).applied).toEqual([]);
  });

  it('stores repositories and jobs and reads them back with the same values', async () => {
    const repo = await infra.createRepository(ctx, { name: 'main', path: '/srv/backup', maxTasks: 2, readRateMBps: 120.5 });
    expect(repo).toMatchObject({ name: 'main', path: '/srv/backup', agent: null, maxTasks: 2, readRateMBps: 120.5, writeRateMBps: null, version: 1 });
    const job = await jobs.createJob(ctx, {
      name: 'nightly',
      vms: ['web1', 'db1'],
      repository: 'main',
      retention: { days: 14 },
      schedule: { kind: 'daily', at: '22:00' },
      window: { allow: [{ from: '20:00', to: '06:00' }] },
    });
    expect(job).toMatchObject({
      name: 'nightly',
      vms: ['web1', 'db1'],
      repository: 'main',
      method: 'forever-forward',
      retention: { days: 14 },
      blockSize: 1048576,
      compression: 'zstd',
      schedule: { kind: 'daily', at: '22:00' },
      enabled: true,
      retries: { count: 3, waitMinutes: 10 },
      window: { allow: [{ from: '20:00', to: '06:00' }] },
      requireGuestProcessing: false,
      running: false,
      version: 1,
      createdAt: '2026-11-25T10:00:00.000Z',
    });
    expect(await jobs.getJob(ctx, job.id)).toEqual(job);
    expect((await jobs.listJobs(ctx)).map((j) => j.name)).toEqual(['nightly']);
  });

  it('refuses a stale edit with a conflict that says to reload', async () => {
    const read = await jobs.getJob(ctx, 'nightly');
    t.clock.advance(1000);
    const first = await jobs.updateJob(ctx, 'nightly', { version: read.version, compression: 'lz4' });
    expect(first.version).toBe(read.version + 1);
    expect(first.updatedAt).toBe('2026-11-25T10:00:01.000Z');
    const err = await rejects(jobs.updateJob(ctx, 'nightly', { version: read.version, compression: 'none' }));
    expect(err.kind).toBe('conflict');
    expect(err.message).toContain('changed by someone else since you read it: reload');
    expect((await jobs.getJob(ctx, 'nightly')).compression).toBe('lz4');
  });

  it('names the field in validation errors and the name in not-found errors', async () => {
    const bs = await rejects(jobs.createJob(ctx, { name: 'x', vms: ['a'], repository: 'main', blockSize: 1000 }));
    expect(bs.kind).toBe('invalid');
    expect(bs.message).toMatch(/^blockSize: /);
    const vms = await rejects(jobs.createJob(ctx, { name: 'x', vms: ['a', 'a'], repository: 'main' }));
    expect(vms.message).toMatch(/^vms: .*"a"/);
    const name = await rejects(infra.createRepository(ctx, { name: 'bad name', path: '/x' }));
    expect(name.message).toMatch(/^name: /);
    const path = await rejects(infra.createRepository(ctx, { name: 'rel', path: 'relative/dir' }));
    expect(path.message).toMatch(/^path: /);
    const repo = await rejects(jobs.createJob(ctx, { name: 'x', vms: ['a'], repository: 'nowhere' }));
    expect(repo.kind).toBe('not-found');
    expect(repo.message).toContain('"nowhere"');
    const nf = await rejects(jobs.getJob(ctx, 'ghost'));
    expect(nf.kind).toBe('not-found');
    expect(nf.message).toBe('job "ghost" not found');
    const dup = await rejects(infra.createRepository(ctx, { name: 'main', path: '/y' }));
    expect(dup.kind).toBe('conflict');
    expect(dup.message).toContain('already exists');
  });

  it('refuses to delete a repository with restore points and a running job', async () => {
    const repo = await infra.getRepository(ctx, 'main');
    const job = await jobs.getJob(ctx, 'nightly');
    const sid = await sessions.createSession(ctx, { jobId: job.id, jobName: job.name, full: false, state: 'running' });
    expect((await jobs.getJob(ctx, 'nightly')).running).toBe(true);
    const running = await rejects(jobs.deleteJob(ctx, 'nightly'));
    expect(running.kind).toBe('conflict');
    expect(running.message).toContain('is running');

    const tid = await sessions.addTask(ctx, sid, { vm: 'web1', disk: 'vda' });
    await sessions.updateTask(ctx, tid, { state: 'success', progress: { percent: 100, bytesRead: 2 ** 40 + 7 } });
    await sessions.appendLog(ctx, sid, 'info', 'simulated: no data moved');
    await sessions.appendLog(ctx, sid, 'warning', 'second line');
    await sessions.recordRestorePoint(ctx, {
      vm: 'web1',
      disks: [{ name: 'vda', size: 10 * 2 ** 30 }],
      time: '2026-11-25T10:00:00.000Z',
      type: 'full',
      chainId: 'c1',
      size: 5 * 2 ** 30,
      repositoryId: repo.id,
      jobId: job.id,
      sessionId: sid,
    });
    await sessions.updateSession(ctx, sid, { state: 'success', progress: { percent: 100, bytesRead: 2 ** 40 + 7, processingRate: 1.5e8 } });
    const s = await sessions.getSession(ctx, sid);
    expect(s).toMatchObject({ state: 'success', jobName: 'nightly', progress: { percent: 100, bytesRead: 2 ** 40 + 7, processingRate: 1.5e8 } });
    expect(s.endedAt).toBeDefined();
    expect(s.tasks).toHaveLength(1);
    expect(s.tasks[0]).toMatchObject({ vm: 'web1', disk: 'vda', state: 'success', progress: { bytesRead: 2 ** 40 + 7 } });
    expect(s.log.map((l) => [l.level, l.message])).toEqual([
      ['info', 'simulated: no data moved'],
      ['warning', 'second line'],
    ]);
    expect((await sessions.listSessions(ctx, { job: 'nightly' })).map((x) => x.id)).toEqual([sid]);

    const points = await sessions.listRestorePoints(ctx, { vm: 'web1' });
    expect(points).toHaveLength(1);
    expect(points[0]).toMatchObject({ vm: 'web1', repository: 'main', job: 'nightly', size: 5 * 2 ** 30, disks: [{ name: 'vda', size: 10 * 2 ** 30 }] });

    await jobs.deleteJob(ctx, 'nightly');
    const refused = await rejects(infra.deleteRepository(ctx, 'main'));
    expect(refused.kind).toBe('conflict');
    expect(refused.message).toContain('holds 1 restore point');
    // No command deletes a point: the hint says how points leave the catalog.
    expect(refused.hint).toBe('points leave the catalog through their job\'s retention or `bulwark exports delete` (exports), or when their folder is gone from the repository and `bulwark repo rescan main` runs');
    await sessions.deleteRestorePoint(ctx, points[0]!.id);
    await infra.deleteRepository(ctx, 'main');
    expect(await infra.listRepositories(ctx)).toEqual([]);
  });

  it('hosts and agents reference each other by name', async () => {
    const agent = await infra.registerAgent(ctx, { name: 'proxy1', hostname: 'proxy1.lan', agentVersion: '0.1.0', cores: 8, certFingerprint: 'AB:CD' });
    expect(agent).toMatchObject({ state: 'online', cores: 8, repositories: [], uptimeSeconds: null });
    t.clock.advance(infra.agentOfflineAfterMs + 1);
    expect((await infra.getAgent(ctx, 'proxy1')).state).toBe('offline');
    const host = await infra.createHost(ctx, { name: 'kvm1', kind: 'qemu', uri: '/run/vms/*.qmp', agent: 'proxy1' });
    expect(host).toMatchObject({ kind: 'qemu', agent: 'proxy1' });
    const bad = await rejects(infra.createHost(ctx, { name: 'kvm2', kind: 'libvirt', uri: 'nope' }));
    expect(bad.message).toMatch(/^uri: /);
    const refused = await rejects(infra.deleteAgent(ctx, 'proxy1'));
    expect(refused.message).toContain('host "kvm1"');
    await infra.deleteHost(ctx, 'kvm1');
    await infra.deleteAgent(ctx, 'proxy1');
  });

  it('users log in with an expiring token, stored only as a hash', async () => {
    const pw = await users.ensureInitialAdmin(ctx);
    expect(pw).toMatch(/^[A-Za-z0-9_-]{20,}$/);
    expect(await users.ensureInitialAdmin(ctx)).toBeNull();
    const r = await users.login(ctx, 'admin', pw!);
    expect(r.role).toBe('administrator');
    const stored = await ctx.db.selectFrom('api_tokens').select('token_hash').execute();
    expect(stored.map((s) => s.token_hash)).toEqual([users.hashToken(r.token)]);
    expect((await users.authenticate(ctx, r.token)).user).toBe('admin');
    expect((await rejects(users.login(ctx, 'admin', 'wrong-password'))).kind).toBe('unauthorized');
    expect((await rejects(users.login(ctx, 'nobody', 'wrong-password'))).kind).toBe('unauthorized');
    (t.clock).advance(users.tokenLifetimeMs + 1);
    expect((await rejects(users.authenticate(ctx, r.token))).message).toContain('expired');
    const last = await rejects(users.deleteUser(ctx, 'admin'));
    expect(last.message).toContain('last administrator');
  });
});

describe.each(engines)('migration runner on %s', (engine) => {
  const extra = (name: string): Migration => ({ name, up: async () => undefined });

  it('refuses unknown and out-of-order history, and applies nothing', async () => {
    const { target, cleanup } = await freshTarget(engine);
    try {
      const cdb = await openDatabase({ target, migrate: false });
      try {
        const list = [migrations[0]!, extra('202611250002_b'), extra('202611250003_c')];
        expect((await migrate(cdb.db, engine, [list[0]!, list[2]!])).applied).toEqual([list[0]!.name, list[2]!.name]);
        // Now a build that has b before c: c is recorded, b is not → out of order.
        const ooo = await rejects(migrate(cdb.db, engine, list));
        expect(ooo.kind).toBe('corrupt');
        expect(ooo.message).toContain('out of order');
        // A build that does not know c at all → unknown entry.
        const unknown = await rejects(migrate(cdb.db, engine, [list[0]!]));
        expect(unknown.message).toContain('202611250003_c');
        expect(unknown.message).toContain('does not know');
        const recorded = await cdb.db.selectFrom('bulwark_migrations').select('name').orderBy('name').execute();
        expect(recorded.map((r) => r.name)).toEqual([list[0]!.name, list[2]!.name]);
      } finally {
        await cdb.close();
      }
    } finally {
      cleanup();
    }
  });

  // PostgreSQL only: one process holds a SQLite file exclusively (the locked-database test).
  if (engine !== 'sqlite') it('runs concurrent migrations once (the lock)', async () => {
    const { target, cleanup } = await freshTarget(engine);
    try {
      const [a, b] = await Promise.all([openDatabase({ target }), openDatabase({ target })]);
      try {
        expect([...a.migrations.applied, ...b.migrations.applied].sort()).toEqual(migrations.map((m) => m.name));
      } finally {
        await a.close();
        await b.close();
      }
    } finally {
      cleanup();
    }
  });
});

describe('SQLite start-up errors', () => {
  it('a locked database names the file and says what to do', async () => {
    const { target, cleanup } = await freshTarget('sqlite');
    const first = await openDatabase({ target });
    try {
      const err = await rejects(openDatabase({ target }));
      expect(err.kind).toBe('unavailable');
      expect(err.message).toContain(target);
      expect(err.message).toContain('locked');
      expect(err.hint).toContain('another bulwark server');
    } finally {
      await first.close();
      cleanup();
    }
  });

  it('a corrupt file is reported as corrupt and left as it was', async () => {
    const { writeFileSync, readFileSync } = await import('node:fs');
    const { target, cleanup } = await freshTarget('sqlite');
    try {
      const junk = Buffer.alloc(8192, 0x5a);
      writeFileSync(target, junk);
      const err = await rejects(openDatabase({ target }));
      expect(err.kind).toBe('corrupt');
      expect(err.message).toContain(target);
      expect(readFileSync(target).equals(junk)).toBe(true);
    } finally {
      cleanup();
    }
  });
});
