// The server on PostgreSQL (`--db postgres://…`): start, edit, configuration backup with pg_dump
// and restore with psql in one transaction, a job run through the engine.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, inject } from 'vitest';
import { startServer, type RunningServer } from '../../src/server/main.js';
import { createTestDatabase } from '../fixtures/postgres.js';
import { call } from './http.js';

const tmp = mkdtempSync(join(tmpdir(), 'bulwark-server-pg-'));

describe('server on PostgreSQL', () => {
  let server: RunningServer;
  beforeAll(async () => {
    const db = await createTestDatabase(inject('postgresUrl'));
    server = await startServer({ dataDir: join(tmp, 'data'), db, listen: 'none', configBackupAt: false, simulate: true, print: () => undefined });
  });
  afterAll(async () => {
    await server?.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  it('uses PostgreSQL, backs the configuration up with pg_dump and restores it', async () => {
    expect(server.database.engine).toBe('postgres');
    const sock = { socketPath: server.socketPath };
    expect((await call(sock, 'POST', '/api/v1/repositories', { name: 'main', path: join(tmp, 'repo') })).status).toBe(201);
    expect((await call(sock, 'POST', '/api/v1/jobs', { name: 'nightly', vms: ['vm1'], repository: 'main' })).status).toBe(201);
    const b = await call(sock, 'POST', '/api/v1/config/backup', {});
    expect(b.status, b.body).toBe(200);
    const path = b.json<{ path: string }>().path;
    expect(path).toMatch(/config-backup\/bulwark-config-.*\.sql$/);
    expect(readFileSync(path, 'utf8')).toContain('PostgreSQL database dump');

    expect((await call(sock, 'DELETE', '/api/v1/jobs/nightly')).status).toBe(204);
    expect((await call(sock, 'POST', '/api/v1/users', { name: 'late', password: 'password-1', role: 'viewer' })).status).toBe(201);
    const r = await call(sock, 'POST', '/api/v1/config/restore', { path });
    expect(r.status, r.body).toBe(200);
    const jobs = (await call(sock, 'GET', '/api/v1/jobs')).json<{ items: Array<{ name: string }> }>().items;
    expect(jobs.map((j) => j.name)).toEqual(['nightly']);
    const users = (await call(sock, 'GET', '/api/v1/users')).json<{ items: Array<{ name: string }> }>().items;
    expect(users.map((u) => u.name)).toEqual(['admin']);
  });

  it('runs a job through the engine on PostgreSQL', async () => {
    const sock = { socketPath: server.socketPath };
    const run = await call(sock, 'POST', '/api/v1/jobs/nightly/run', {});
    expect(run.status, run.body).toBe(202);
    const { sessionId } = run.json<{ sessionId: string }>();
    await call(sock, 'GET', `/api/v1/sessions/${sessionId}/events`); // returns when the session ends
    const s = (await call(sock, 'GET', `/api/v1/sessions/${sessionId}`)).json<{ state: string; tasks: unknown[]; log: Array<{ message: string }> }>();
    expect(s.state).toBe('success');
    expect(s.tasks).toHaveLength(1);
    expect(s.log.some((l) => l.message.includes('simulated: no data moved'))).toBe(true);
  });
});
