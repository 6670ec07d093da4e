// A task's maintenance step (TransferProgress.step: merge, synthetic-full, compact, inject,
// health-check with disk bytes done of total) goes through the engine's store into the task's
// `step` column and back out through the REST API's session (the response schema keeps it), and
// goes away when a report without one follows.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { buildApi } from '../api/app.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import type { Session } from './model.js';
import { DatabaseJobEngineStore } from './engine-stores.js';
import { createRepository } from './infrastructure.js';
import { SessionEvents, taskStepOf } from './sessions.js';
import { systemClock, type ServiceContext } from './common.js';

let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let app: FastifyInstance;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'bulwark-session-step-'));
  cdb = await openDatabase({ target: join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
  app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't' });
});
afterAll(async () => {
  await app?.close();
  await cdb?.close();
  rmSync(dir, { recursive: true, force: true });
});

it('a task shows its maintenance step through the store and the API, and loses it with a report without one', async () => {
  const store = new DatabaseJobEngineStore(ctx);
  await createRepository(ctx, { name: 'main', path: join(dir, 'repo') });
  const job = await app.inject({ method: 'POST', url: '/api/v1/jobs', payload: { name: 'nightly', vms: ['web1'], repository: 'main' } });
  expect(job.statusCode, job.body).toBe(201);
  const sessionId = await store.createSession({
    jobId: job.json<{ id: string }>().id, jobName: 'nightly', state: 'running', trigger: 'manual', full: false, startedAt: new Date(),
    progress: { percent: 0, bytesRead: 0, bytesTransferred: 0, bytesStored: 0, processingRate: 0 },
  });
  const [taskId] = await store.createTasks(sessionId, [{ vm: 'web1', disk: 'vda', state: 'running', attempt: 1, progress: { bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 100 } }]);
  const show = async (): Promise<Session> => {
    const r = await app.inject({ method: 'GET', url: `/api/v1/sessions/${sessionId}` });
    expect(r.statusCode, r.body).toBe(200);
    return r.json<Session>();
  };
  expect((await show()).tasks[0]!.progress.step).toBeUndefined();

  const step = { name: 'merge', bytesDone: 3 * 1048576, bytesTotal: 8 * 1048576 };
  await store.updateTask(taskId!, { progress: { bytesRead: 100, bytesTransferred: 100, bytesStored: 40, total: 100, step } });
  const task = (await show()).tasks[0]!;
  expect(task.progress).toMatchObject({ bytesRead: 100, bytesStored: 40, step });
  expect((await store.listTasks(sessionId))[0]!.progress.step).toEqual(step);

  await store.updateTask(taskId!, { progress: { bytesRead: 100, bytesTransferred: 100, bytesStored: 40, total: 100 } });
  expect((await show()).tasks[0]!.progress.step).toBeUndefined();
});

it('taskStepOf reads only a whole step', () => {
  expect(taskStepOf(null)).toEqual({});
  expect(taskStepOf(JSON.stringify({ name: 'compact', bytesDone: 1 }))).toEqual({});
  expect(taskStepOf(JSON.stringify({ name: 'inject', bytesDone: 1, bytesTotal: 2, extra: true }))).toEqual({ step: { name: 'inject', bytesDone: 1, bytesTotal: 2 } });
});
