// The REST API through fastify.inject, per transport: validation names fields, 404 names the name,
// stale PATCH -> 409, refused deletes -> 409 with the reason, roles, tokens, SSE.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FastifyInstance } from 'fastify';
import { createEnrollmentToken as createAgentToken } from '../../src/server/api/agent-link.js';
import { buildApi } from '../../src/server/api/app.js';
import { JobEngine } from '../../src/server/jobs/engine.js';
import { FakeDiskResolver, FakeTaskExecutor } from '../../src/server/jobs/fake-executor.js';
import { DatabaseAgentLinkStore, DatabaseJobEngineStore, EngineJobRunner } from '../../src/server/services/engine-stores.js';
import { recordRestorePoint, SessionEvents } from '../../src/server/services/sessions.js';
import { createUser } from '../../src/server/services/users.js';
import { openTestContext } from './engines.js';

let t: Awaited<ReturnType<typeof openTestContext>>;
let socketApp: FastifyInstance;
let tcpApp: FastifyInstance;
let runner: EngineJobRunner;
const v1 = '/api/v1';

beforeAll(async () => {
  t = await openTestContext('sqlite');
  const events = new SessionEvents();
  const engine = new JobEngine({
    store: new DatabaseJobEngineStore(t.ctx, 'simulated: no data moved'),
    executor: new FakeTaskExecutor({ durationMs: 200, steps: 4 }),
    disks: new FakeDiskResolver(),
  });
  engine.subscribe((e) => events.changed(e.sessionId));
  runner = new EngineJobRunner(engine);
  const agentStore = new DatabaseAgentLinkStore(t.ctx);
  const createEnrollmentToken = async (o: { name?: string | undefined }) => {
    const tok = await createAgentToken(agentStore, { caFingerprint: 'AB:CD' }, o);
    return { token: tok.token, expiresAt: tok.expiresAt.toISOString() };
  };
  socketApp = await buildApi({ ctx: t.ctx, runner, events, transport: 'socket', version: '9.9.9', createEnrollmentToken });
  tcpApp = await buildApi({ ctx: t.ctx, runner, events, transport: 'tcp', version: '9.9.9' });
  await createUser(t.ctx, { name: 'olga', password: 'operator-pw', role: 'operator' });
  await createUser(t.ctx, { name: 'vera', password: 'viewer-pw-1', role: 'viewer' });
  await createUser(t.ctx, { name: 'rita', password: 'restore-pw', role: 'restore-operator' });
});
afterAll(async () => {
  await runner?.close();
  await socketApp?.close();
  await tcpApp?.close();
  await t?.close();
});

const json = (app: FastifyInstance, method: 'GET' | 'POST' | 'PATCH' | 'DELETE', url: string, payload?: unknown, token?: string) =>
  app.inject({ method, url: v1 + url, ...(payload === undefined ? {} : { payload: payload as object }), headers: token ? { authorization: `Bearer ${token}` } : {} });

async function login(user: string, password: string): Promise<string> {
  const r = await json(tcpApp, 'POST', '/auth/login', { user, password });
  expect(r.statusCode).toBe(200);
  return r.json<{ token: string }>().token;
}

describe('REST API', () => {
  it('health and docs answer without a token; everything else over TCP needs one', async () => {
    const h = await json(tcpApp, 'GET', '/health');
    expect(h.json()).toEqual({ status: 'ok', version: '9.9.9' });
    const spec = await tcpApp.inject({ url: '/api/v1/openapi.json' });
    expect(spec.statusCode).toBe(200);
    expect(Object.keys(spec.json<{ paths: object }>().paths)).toContain('/api/v1/jobs/{name}/run');
    expect((await tcpApp.inject({ url: '/api/docs' })).statusCode).toBeLessThan(400);
    const denied = await json(tcpApp, 'GET', '/jobs');
    expect(denied.statusCode).toBe(401);
    expect(denied.json().error.kind).toBe('unauthorized');
    expect((await json(tcpApp, 'GET', '/jobs', undefined, 'not-a-token')).statusCode).toBe(401);
    expect((await json(tcpApp, 'GET', '/no-such-route')).statusCode).toBe(401);
    // The socket is the local administrator.
    expect((await json(socketApp, 'GET', '/auth/whoami')).json()).toEqual({ user: 'local-administrator', role: 'administrator', via: 'socket' });
  });

  it('creates a repository and a job, and reports validation errors by field', async () => {
    const repo = await json(socketApp, 'POST', '/repositories', { name: 'main', path: '/srv/bk', maxTasks: 2 });
    expect(repo.statusCode).toBe(201);
    expect(repo.json()).toMatchObject({ name: 'main', version: 1, maxTasks: 2 });

    const missing = await json(socketApp, 'POST', '/jobs', { name: 'nightly', repository: 'main' });
    expect(missing.statusCode).toBe(400);
    expect(missing.json().error).toMatchObject({ kind: 'invalid', field: 'vms' });
    expect(missing.json().error.message).toMatch(/^vms: /);

    const wrongType = await json(socketApp, 'POST', '/jobs', { name: 'nightly', vms: ['a'], repository: 'main', retries: { count: 'x', waitMinutes: 1 } });
    expect(wrongType.json().error.field).toBe('retries.count');

    const unknownField = await json(socketApp, 'POST', '/jobs', { name: 'nightly', vms: ['a'], repository: 'main', colour: 'red' });
    expect(unknownField.json().error).toMatchObject({ field: 'colour', message: 'colour: is not a known field' });

    const badMethod = await json(socketApp, 'POST', '/jobs', { name: 'nightly', vms: ['a'], repository: 'main', method: 'sideways' });
    expect(badMethod.json().error.field).toBe('method');
    expect(badMethod.json().error.message).toContain('"forever-forward"');

    const badBlock = await json(socketApp, 'POST', '/jobs', { name: 'nightly', vms: ['a'], repository: 'main', blockSize: 12345 });
    expect(badBlock.statusCode).toBe(400);
    expect(badBlock.json().error.field).toBe('blockSize');
    // 8 MiB was accepted here while the backup file format allows at most 4 MiB: every run failed.
    const tooBig = await json(socketApp, 'POST', '/jobs', { name: 'nightly', vms: ['a'], repository: 'main', blockSize: 8 * 1024 * 1024 });
    expect(tooBig.statusCode).toBe(400);
    expect(tooBig.json().error).toMatchObject({ field: 'blockSize', message: 'blockSize: 8388608 is not supported: use one of 262144, 524288, 1048576, 4194304 bytes' });

    const noRepo = await json(socketApp, 'POST', '/jobs', { name: 'nightly', vms: ['a'], repository: 'elsewhere' });
    expect(noRepo.statusCode).toBe(404);
    expect(noRepo.json().error.message).toContain('"elsewhere"');

    const ok = await json(socketApp, 'POST', '/jobs', { name: 'nightly', vms: ['web1', 'db1'], repository: 'main', schedule: { kind: 'daily', at: '22:00' } });
    expect(ok.statusCode).toBe(201);
    const list = await json(socketApp, 'GET', '/jobs');
    expect(list.json<{ items: Array<{ name: string }> }>().items.map((j) => j.name)).toEqual(['nightly']);
  });

  it('404 names the name', async () => {
    const r = await json(socketApp, 'GET', '/jobs/ghost');
    expect(r.statusCode).toBe(404);
    expect(r.json().error).toMatchObject({ kind: 'not-found', message: 'job "ghost" not found' });
    expect((await json(socketApp, 'GET', '/no-such-thing')).statusCode).toBe(404);
  });

  it('a second, stale PATCH of a job gets 409', async () => {
    const read = (await json(socketApp, 'GET', '/jobs/nightly')).json<{ version: number }>();
    const first = await json(socketApp, 'PATCH', '/jobs/nightly', { version: read.version, compression: 'lz4' });
    expect(first.statusCode).toBe(200);
    expect(first.json().version).toBe(read.version + 1);
    const second = await json(socketApp, 'PATCH', '/jobs/nightly', { version: read.version, compression: 'none' });
    expect(second.statusCode).toBe(409);
    expect(second.json().error.message).toContain('changed by someone else since you read it');
    const noVersion = await json(socketApp, 'PATCH', '/jobs/nightly', { compression: 'none' });
    expect(noVersion.json().error.field).toBe('version');
  });

  it('roles: viewer reads, operator runs, restore-operator sees restore points only', async () => {
    const viewer = await login('vera', 'viewer-pw-1');
    const operator = await login('olga', 'operator-pw');
    const restorer = await login('rita', 'restore-pw');
    expect((await json(tcpApp, 'GET', '/jobs', undefined, viewer)).statusCode).toBe(200);
    expect((await json(tcpApp, 'POST', '/jobs/nightly/run', {}, viewer)).statusCode).toBe(403);
    expect((await json(tcpApp, 'POST', '/repositories', { name: 'r2', path: '/x' }, operator)).statusCode).toBe(403);
    expect((await json(tcpApp, 'GET', '/jobs', undefined, restorer)).statusCode).toBe(403);
    expect((await json(tcpApp, 'GET', '/restore-points', undefined, restorer)).statusCode).toBe(200);
    expect((await json(tcpApp, 'GET', '/users', undefined, operator)).statusCode).toBe(403);
    expect((await json(tcpApp, 'GET', '/auth/whoami', undefined, restorer)).json()).toEqual({ user: 'rita', role: 'restore-operator', via: 'token' });
    const wrong = await json(tcpApp, 'POST', '/auth/login', { user: 'olga', password: 'nope' });
    expect(wrong.statusCode).toBe(401);
    expect((await json(tcpApp, 'POST', '/auth/logout', undefined, viewer)).statusCode).toBe(204);
    expect((await json(tcpApp, 'GET', '/jobs', undefined, viewer)).statusCode).toBe(401);
  });

  it('runs a job (simulated, and says so), streams the session as SSE, refuses deleting it while it runs', async () => {
    const operator = await login('olga', 'operator-pw');
    const run = await json(tcpApp, 'POST', '/jobs/nightly/run', { full: true }, operator);
    expect(run.statusCode).toBe(202);
    const { sessionId } = run.json<{ sessionId: string }>();
    const del = await json(socketApp, 'DELETE', '/jobs/nightly');
    // Either still running (409), or already done: the simulation is fast, so check both honestly.
    if (del.statusCode !== 409) throw new Error(`expected 409 while running, got ${del.statusCode}`);
    expect(del.json().error.message).toContain('is running');
    const again = await json(socketApp, 'POST', '/jobs/nightly/run', {});
    expect(again.statusCode).toBe(409);

    const sse = await socketApp.inject({ url: `${v1}/sessions/${sessionId}/events` });
    expect(sse.headers['content-type']).toBe('text/event-stream');
    const events = sse.body
      .split('\n\n')
      .filter((b) => b.startsWith('event: session'))
      .map((b) => JSON.parse(b.split('\ndata: ')[1]!) as { state: string; full: boolean; log: Array<{ message: string }> });
    expect(events.length).toBeGreaterThan(1);
    const last = events.at(-1)!;
    expect(last.state).toBe('success');
    expect(last.full).toBe(true);
    expect(last.log.map((l) => l.message).join('\n')).toContain('simulated: no data moved');

    const one = await json(socketApp, 'GET', `/sessions/${sessionId}`);
    expect(one.json()).toMatchObject({ id: sessionId, jobName: 'nightly', state: 'success', tasks: [{ vm: 'db1', disk: 'vda' }, { vm: 'web1', disk: 'vda' }] });
    const list = await json(socketApp, 'GET', '/sessions?job=nightly&limit=5');
    expect(list.json<{ items: Array<{ id: string }> }>().items.map((s) => s.id)).toEqual([sessionId]);
    expect((await json(socketApp, 'GET', '/sessions?limit=0')).json().error.field).toBe('limit');
  });

  it('refuses to delete a repository that holds restore points, with the reason', async () => {
    const repo = (await json(socketApp, 'GET', '/repositories/main')).json<{ id: string }>();
    await recordRestorePoint(t.ctx, { vm: 'web1', disks: [{ name: 'vda', size: 1 }], time: t.clock.now().toISOString(), type: 'full', chainId: 'c', size: 1, repositoryId: repo.id });
    expect((await json(socketApp, 'DELETE', '/jobs/nightly')).statusCode).toBe(204);
    const r = await json(socketApp, 'DELETE', '/repositories/main');
    expect(r.statusCode).toBe(409);
    expect(r.json().error.message).toContain('holds 1 restore point');
    const points = await json(socketApp, 'GET', '/restore-points?vm=web1');
    expect(points.json().items).toHaveLength(1);
  });

  it('job enable, disable, clone; enrollment tokens', async () => {
    await json(socketApp, 'POST', '/jobs', { name: 'weekly', vms: ['a'], repository: 'main' });
    expect((await json(socketApp, 'POST', '/jobs/weekly/disable')).json().enabled).toBe(false);
    expect((await json(socketApp, 'POST', '/jobs/weekly/enable')).json().enabled).toBe(true);
    const clone = await json(socketApp, 'POST', '/jobs/weekly/clone', { name: 'weekly-2' });
    expect(clone.statusCode).toBe(201);
    expect(clone.json()).toMatchObject({ name: 'weekly-2', vms: ['a'], enabled: false });
    const run = (await json(socketApp, 'POST', '/jobs/weekly/run')).json<{ sessionId: string }>();
    const stopped = await json(socketApp, 'POST', `/sessions/${run.sessionId}/stop`);
    expect(stopped.statusCode).toBe(200);
    expect(stopped.json()).toMatchObject({ state: 'stopped', reason: expect.stringContaining('local-administrator') });
    expect((await json(socketApp, 'POST', `/sessions/${run.sessionId}/stop`)).statusCode).toBe(409);
    const dup = await json(socketApp, 'POST', '/jobs/weekly/clone', { name: 'weekly-2' });
    expect(dup.statusCode).toBe(409);
    const tok = await json(socketApp, 'POST', '/agents/tokens');
    expect(tok.statusCode, tok.body).toBe(201);
    expect(tok.json().token).toMatch(/^bwe1\./);
    const stored = await t.ctx.db.selectFrom('enrollment_tokens').selectAll().execute();
    expect(stored).toHaveLength(1);
    expect(tok.json().token).not.toContain(stored[0]!.token_hash);
    expect((await json(tcpApp, 'POST', '/agents/tokens')).statusCode).toBe(401);
  });
});
