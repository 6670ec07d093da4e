// Restores and instant recoveries are sessions (kind, VM, point, agent, state, log) beside job
// runs (migration 202611290100_session_kind): a VM restore and a disk restore recorded from start
// to end with their log;
// a refused one and an instant recovery that did not start recorded as failed; `GET /sessions`
// filters by kind and keeps the new fields; a restarting server settles what its previous process
// left open (a VM restore failed, an instant recovery it ran itself stopped, one on an agent left
// to the agent's listing), and the job engine's interrupted-session recovery leaves them alone.
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ConfigDatabase } from '../db/connect.js';
import type { ServiceContext } from '../services/common.js';
import { DatabaseJobEngineStore } from '../services/engine-stores.js';
import type { Session } from '../services/model.js';
import { createRestoreSession, failInterruptedSessions, getSession, listSessions, SessionEvents } from '../services/sessions.js';
import { buildApi } from './app.js';
import { RecoveryService } from './recovery.js';
import { restorePlugin } from './restore.js';
import { seedQemuVmPoint } from './recovery-test-point.js';

let dir = '';
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let pointId = '';
let app: FastifyInstance;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bw-rec-sessions-'));
  ({ cdb, ctx, pointId } = await seedQemuVmPoint(dir));
  const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
  app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't', plugins: [restorePlugin(ctx)] });
});
afterAll(async () => {
  await app?.close();
  await cdb?.close();
  await rm(dir, { recursive: true, force: true });
});

async function waitEnded(id: string): Promise<Session> {
  for (let i = 0; i < 300; i++) {
    const s = await getSession(ctx, id);
    if (s.state !== 'running' && s.state !== 'queued') return s;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`session ${id} did not end`);
}

describe('restores as sessions', () => {
  it('a VM restore is a restore-vm session: VM, point, state from running to success, its log; a refused one is recorded failed', async () => {
    const service = new RecoveryService({ ctx, dataDir: path.join(dir, 'data') });
    try {
      const started = await service.startRestoreVm(pointId, { name: 'vm1-copy', storage: path.join(dir, 'out', 'vm1-copy'), format: 'raw' });
      expect(started.sessionId).toBeDefined();
      const s = await waitEnded(started.sessionId!);
      expect(s).toMatchObject({ kind: 'restore-vm', vm: 'vm1-copy', point: pointId, state: 'success', jobName: '', ref: started.id });
      expect(s.agent).toBeUndefined();
      expect(s.endedAt).toBeDefined();
      expect(s.log.map((l) => l.message).join('\n')).toMatch(new RegExp(`restore of point ${pointId} \\(VM vm1\\) as new VM vm1-copy on host kvm1 started[\\s\\S]*VM vm1-copy restored: vda → ${path.join(dir, 'out', 'vm1-copy')}`));

      // The same name again: refused before any data moves, and on record.
      await expect(service.startRestoreVm(pointId, { name: 'vm1-copy', storage: path.join(dir, 'out', 'vm1-copy2'), format: 'raw' })).rejects.toThrow();
      const failed = (await listSessions(ctx, { kind: 'restore-vm' })).find((x) => x.id !== started.sessionId);
      expect(failed).toMatchObject({ kind: 'restore-vm', vm: 'vm1-copy', state: 'failed' });
      expect((await getSession(ctx, failed!.id)).log.some((l) => l.level === 'error' && l.message.startsWith('restore failed:'))).toBe(true);
    } finally {
      await service.close();
    }
  });

  it('an instant recovery that does not start is an instant-recovery session, failed, naming why', async () => {
    const service = new RecoveryService({ ctx, dataDir: path.join(dir, 'data') });
    try {
      await expect(service.startInstant({ point: 'no-such-point', name: 'x-ir' })).rejects.toThrow(/no-such-point/);
      const [s] = await listSessions(ctx, { kind: 'instant-recovery' });
      expect(s).toMatchObject({ kind: 'instant-recovery', vm: 'x-ir', point: 'no-such-point', state: 'failed', runningFromBackup: false });
      expect((await getSession(ctx, s!.id)).log[0]?.message).toMatch(/instant recovery of restore point no-such-point did not start: .*no-such-point/);
    } finally {
      await service.close();
    }
  });

  it('a disk restore is a restore-disk session (success with where it went; a refused overwrite failed)', async () => {
    const to = path.join(dir, 'out', 'vda.raw');
    const ok = await app.inject({ method: 'POST', url: `/api/v1/restore-points/${pointId}/restore-disk`, payload: { disk: 'vda', to, format: 'raw' } });
    expect(ok.statusCode, ok.body).toBe(200);
    const again = await app.inject({ method: 'POST', url: `/api/v1/restore-points/${pointId}/restore-disk`, payload: { disk: 'vda', to, format: 'raw' } });
    expect(again.statusCode).toBe(409);
    const list = await app.inject({ method: 'GET', url: '/api/v1/sessions?kind=restore-disk' });
    const [failed, done] = list.json<{ items: Session[] }>().items;
    expect(done).toMatchObject({ kind: 'restore-disk', vm: 'vm1', point: pointId, state: 'success' });
    expect(failed).toMatchObject({ kind: 'restore-disk', vm: 'vm1', point: pointId, state: 'failed' });
    expect((await getSession(ctx, done!.id)).log.map((l) => l.message)).toEqual([
      `restore of disk vda of restore point ${pointId} (VM vm1) to ${to} started`,
      expect.stringMatching(new RegExp(`^disk vda restored to ${to} \\(raw, \\d+ bytes written\\)$`)),
    ]);
  });

  it('GET /sessions lists them beside job runs, filtered by kind, with kind, VM, status and "from backup"', async () => {
    const ir = await createRestoreSession(ctx, { kind: 'instant-recovery', vm: 'web1-ir', point: pointId, agent: 'dst1', status: 'running-from-backup', ref: 'ir-0000000a' });
    const all = await app.inject({ method: 'GET', url: '/api/v1/sessions?kind=instant-recovery' });
    expect(all.statusCode, all.body).toBe(200);
    const items = all.json<{ items: Session[] }>().items;
    expect(items.every((x) => x.kind === 'instant-recovery')).toBe(true);
    expect(items.find((x) => x.id === ir)).toMatchObject({ kind: 'instant-recovery', vm: 'web1-ir', point: pointId, agent: 'dst1', status: 'running-from-backup', runningFromBackup: true, state: 'running', ref: 'ir-0000000a' });
    const backups = await app.inject({ method: 'GET', url: '/api/v1/sessions?kind=backup' });
    expect(backups.json<{ items: Session[] }>().items).toEqual([]);
    const bad = await app.inject({ method: 'GET', url: '/api/v1/sessions?kind=nonsense' });
    expect(bad.statusCode).toBe(400);
    expect(bad.body).toMatch(/kind.*backup, health-check, restore-vm/);
  });

  it('a restarting server settles what its previous process left open; the job engine leaves them alone', async () => {
    const local = await createRestoreSession(ctx, { kind: 'instant-recovery', vm: 'l-ir', point: pointId, status: 'running-from-backup', ref: 'ir-0000000b' });
    const remote = await createRestoreSession(ctx, { kind: 'instant-recovery', vm: 'r-ir', point: pointId, agent: 'dst1', status: 'running-from-backup', ref: 'ir-0000000c' });
    const restore = await createRestoreSession(ctx, { kind: 'restore-vm', vm: 'vm1-x', point: pointId, ref: 'vr-0000000d' });
    // Job engine recovery at start: restores are not job sessions.
    expect((await new DatabaseJobEngineStore(ctx).listSessionsInState(['queued', 'running'])).map((s) => s.id)).toEqual([]);
    await failInterruptedSessions(ctx);
    expect((await getSession(ctx, local)).state).toBe('running');

    const service = new RecoveryService({ ctx, dataDir: path.join(dir, 'data') });
    try {
      expect(await service.settleSessions()).toBeGreaterThanOrEqual(2);
    } finally {
      await service.close();
    }
    expect(await getSession(ctx, local)).toMatchObject({ state: 'stopped', status: 'stopped', runningFromBackup: false });
    expect((await getSession(ctx, local)).log.at(-1)?.message).toMatch(/server stopped while the VM ran from the backup/);
    expect(await getSession(ctx, restore)).toMatchObject({ state: 'failed', reason: 'the server stopped while the restore ran' });
    // On an agent: left to that agent's listing.
    expect(await getSession(ctx, remote)).toMatchObject({ state: 'running', status: 'running-from-backup', runningFromBackup: true });
  });
});
