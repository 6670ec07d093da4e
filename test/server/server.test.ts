// The server as the console meets it: startServer, the real unix socket and TLS port, the first
// administrator, and start-up errors that name the thing and change nothing.
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../src/common/errors.js';
import { startServer, type RunningServer } from '../../src/server/main.js';
import { ManualClock } from '../../src/server/scheduler/clock.js';
import { call } from './http.js';

const tmp = mkdtempSync(join(tmpdir(), 'bulwark-server-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function startError(p: Promise<RunningServer>): Promise<BulwarkError> {
  try {
    const s = await p;
    await s.close();
  } catch (err) {
    if (err instanceof BulwarkError) return err;
    throw err;
  }
  throw new Error('expected the server to refuse to start');
}

describe('startServer over the real transports', () => {
  let server: RunningServer;
  const printed: string[] = [];
  const dataDir = join(tmp, 'data');
  beforeAll(async () => {
    server = await startServer({ dataDir, listen: '127.0.0.1:0', print: (l) => printed.push(l), configBackupAt: false, simulate: true });
  });
  afterAll(async () => {
    await server?.close();
  });

  it('first start creates admin, prints how to log in once, writes the password file 0600', async () => {
    expect(server.initialAdminPassword).toBeDefined();
    expect(printed.join('\n')).toContain(server.initialAdminPassword);
    expect(printed.join('\n')).toContain(`bulwark login ${server.url!}`);
    const file = join(dataDir, 'initial-admin-password');
    expect(readFileSync(file, 'utf8').trim()).toBe(server.initialAdminPassword);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(statSync(server.socketPath).mode & 0o777).toBe(0o600);
    expect(existsSync(join(dataDir, 'bulwark.db'))).toBe(true);
    // The one-host install's default repository.
    const repos = (await call({ socketPath: server.socketPath }, 'GET', '/api/v1/repositories')).json<{ items: Array<{ name: string; path: string }> }>().items;
    expect(repos).toMatchObject([{ name: 'default', path: join(dataDir, 'repository') }]);
    expect(statSync(join(dataDir, 'repository')).isDirectory()).toBe(true);
    // The one-host install's local agent enrolled through the agent link and is online.
    const agents = (await call({ socketPath: server.socketPath }, 'GET', '/api/v1/agents')).json<{ items: Array<{ name: string; state: string; certFingerprint: string | null }> }>().items;
    expect(agents).toMatchObject([{ name: 'local', state: 'online' }]);
    expect(agents[0]!.certFingerprint).toMatch(/^[0-9A-F:]{95}$/);
  });

  it('the unix socket is the local administrator; TLS TCP needs a token', async () => {
    const sock = { socketPath: server.socketPath };
    const tls = { url: server.url!, ca: server.caCertPem };
    expect((await call(sock, 'GET', '/api/v1/auth/whoami')).json()).toMatchObject({ role: 'administrator', via: 'socket' });
    expect((await call(tls, 'GET', '/api/v1/health')).json()).toMatchObject({ status: 'ok' });
    const denied = await call(tls, 'GET', '/api/v1/jobs');
    expect(denied.status).toBe(401);
    expect(denied.json().error.kind).toBe('unauthorized');
    const login = await call(tls, 'POST', '/api/v1/auth/login', { user: 'admin', password: server.initialAdminPassword });
    expect(login.status).toBe(200);
    const { token } = login.json<{ token: string }>();
    expect((await call(tls, 'GET', '/api/v1/jobs', undefined, token)).json()).toEqual({ items: [] });

    // A stale PATCH over the wire.
    expect((await call(tls, 'POST', '/api/v1/repositories', { name: 'main', path: join(tmp, 'repo') }, token)).status).toBe(201);
    expect((await call(sock, 'POST', '/api/v1/jobs', { name: 'nightly', vms: ['vm1'], repository: 'main' })).status).toBe(201);
    expect((await call(tls, 'PATCH', '/api/v1/jobs/nightly', { version: 1, enabled: false }, token)).status).toBe(200);
    const stale = await call(sock, 'PATCH', '/api/v1/jobs/nightly', { version: 1, compression: 'lz4' });
    expect(stale.status).toBe(409);
    expect(stale.json().error.message).toContain('changed by someone else since you read it');
  });

  it('config backup writes a consistent copy into the repository; restore brings the database back', async () => {
    const sock = { socketPath: server.socketPath };
    const b = await call(sock, 'POST', '/api/v1/config/backup', { repository: 'main' });
    expect(b.status).toBe(200);
    const path = b.json<{ path: string }>().path;
    expect(path.startsWith(join(tmp, 'repo', 'config-backup', 'bulwark-config-'))).toBe(true);
    expect(readFileSync(path).subarray(0, 15).toString()).toBe('SQLite format 3');
    // Change something, then restore: the change is gone, the backup's state is back.
    expect((await call(sock, 'DELETE', '/api/v1/jobs/nightly')).status).toBe(204);
    expect((await call(sock, 'POST', '/api/v1/repositories', { name: 'second', path: '/srv/second' })).status).toBe(201);
    const r = await call(sock, 'POST', '/api/v1/config/restore', { path });
    expect(r.status).toBe(200);
    const jobs = (await call(sock, 'GET', '/api/v1/jobs')).json<{ items: Array<{ name: string; enabled: boolean }> }>().items;
    expect(jobs.map((j) => [j.name, j.enabled])).toEqual([['nightly', false]]);
    const repos = (await call(sock, 'GET', '/api/v1/repositories')).json<{ items: Array<{ name: string }> }>().items;
    expect(repos.map((x) => x.name)).toEqual(['default', 'main']);
    const bad = await call(sock, 'POST', '/api/v1/config/restore', { path: join(tmp, 'nope.sqlite') });
    expect(bad.status).toBe(400);
    expect(bad.json().error.field).toBe('path');
  });

  it('runs a job through the job engine (fake executor, saying so) and streams it as SSE', async () => {
    const sock = { socketPath: server.socketPath };
    const tls = { url: server.url!, ca: server.caCertPem };
    const { token } = (await call(tls, 'POST', '/api/v1/auth/login', { user: 'admin', password: server.initialAdminPassword })).json<{ token: string }>();
    const run = await call(tls, 'POST', '/api/v1/jobs/nightly/run', { full: true }, token);
    expect(run.status).toBe(202);
    const { sessionId } = run.json<{ sessionId: string }>();
    expect((await call(sock, 'POST', '/api/v1/jobs/nightly/run', {})).status).toBe(409);
    expect((await call(sock, 'DELETE', '/api/v1/jobs/nightly')).status).toBe(409);
    const sse = await call(sock, 'GET', `/api/v1/sessions/${sessionId}/events`);
    const events = sse.body
      .split('\n\n')
      .filter((b) => b.startsWith('event: session'))
      .map((b) => JSON.parse(b.split('\ndata: ')[1]!) as { state: string; progress: { percent: number }; log: Array<{ message: string }>; tasks: Array<{ vm: string; disk: string; state: string }> });
    expect(events.length).toBeGreaterThan(2);
    const last = events.at(-1)!;
    expect(last.state).toBe('success');
    expect(last.progress.percent).toBe(100);
    expect(last.tasks).toMatchObject([{ vm: 'vm1', disk: 'vda', state: 'success' }]);
    expect(last.log[0]!.message).toContain('simulated: no data moved');
    const s = (await call(sock, 'GET', `/api/v1/sessions/${sessionId}`)).json<{ state: string; full: boolean }>();
    expect(s).toMatchObject({ state: 'success', full: true });
  });

  it('agent enrollment tokens come from the agent link; its public routes answer without a token', async () => {
    const tls = { url: server.url!, ca: server.caCertPem };
    const tok = await call({ socketPath: server.socketPath }, 'POST', '/api/v1/agents/tokens', { name: 'proxy1' });
    expect(tok.status).toBe(201);
    expect(tok.json<{ token: string }>().token).toMatch(/^bwe1\./);
    const ca = await call(tls, 'GET', '/api/v1/agents/ca');
    expect(ca.status).toBe(200);
    expect(ca.json<{ caFingerprint: string }>().caFingerprint).toBe(server.caFingerprint);
    expect((await call(tls, 'POST', '/api/v1/agents/tokens', {})).status).toBe(401);
  });

  it('a second server on the same data directory is refused with the reason', async () => {
    const err = await startError(startServer({ dataDir, listen: '127.0.0.1:0', configBackupAt: false }));
    expect(err.message).toContain('locked by another process');
    expect(err.hint).toContain('another bulwark server');
    // The running server still answers on its socket.
    expect((await call({ socketPath: server.socketPath }, 'GET', '/api/v1/health')).status).toBe(200);
  });
});

describe('the daily configuration backup', () => {
  it('runs at the configured time on the scheduler clock into the first repository', async () => {
    const clock = new ManualClock('2026-11-25T03:00:00Z');
    const dataDir = join(tmp, 'daily');
    const server = await startServer({ dataDir, listen: 'none', clock, timeZone: 'UTC', configBackupAt: '03:30', print: () => undefined });
    try {
      const folder = join(dataDir, 'repository', 'config-backup');
      await clock.advanceTo('2026-11-25T03:29:00Z');
      expect(existsSync(folder)).toBe(false);
      // To the due time exactly: the file is stamped with the clock's time when the backup runs.
      await clock.advanceTo('2026-11-25T03:30:00Z');
      // The backup itself is real file I/O: wait for its outcome (not for a time).
      for (let i = 0; i < 100 && !(existsSync(folder) && readdirSync(folder).some((n) => n.endsWith('.sqlite'))); i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      expect(readdirSync(folder)).toEqual(['bulwark-config-2026-11-25T03-30-00-000Z.sqlite']);
    } finally {
      await server.close();
    }
  });
});

describe('start-up errors change nothing', () => {
  it('port in use', async () => {
    const blocker: Server = createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r));
    const port = (blocker.address() as { port: number }).port;
    const dataDir = join(tmp, 'port');
    try {
      const err = await startError(startServer({ dataDir, listen: `127.0.0.1:${port}`, configBackupAt: false }));
      expect(err.message).toBe(`port 127.0.0.1:${port} is in use`);
      expect(err.hint).toContain('--listen');
      expect(readdirSync(dataDir)).toEqual([]);
    } finally {
      await new Promise((r) => blocker.close(r));
    }
  });

  it('unwritable data directory', async () => {
    const parent = join(tmp, 'ro');
    mkdirSync(parent);
    writeFileSync(join(parent, 'file'), 'x');
    // A path below a regular file can never be created, even by root.
    const err = await startError(startServer({ dataDir: join(parent, 'file', 'data'), listen: 'none', configBackupAt: false }));
    expect(err.message).toContain(join(parent, 'file', 'data'));
    expect(err.message).toContain('not writable');
    expect(err.hint).toContain('--data');
    if (process.getuid?.() !== 0) {
      chmodSync(parent, 0o500);
      const e2 = await startError(startServer({ dataDir: parent, listen: 'none', configBackupAt: false }));
      expect(e2.message).toContain('not writable');
      chmodSync(parent, 0o700);
    }
  });

  it('corrupt database file', async () => {
    const dataDir = join(tmp, 'corrupt');
    mkdirSync(dataDir);
    const junk = Buffer.from('this is not an SQLite database, it is a shopping list\n'.repeat(100));
    writeFileSync(join(dataDir, 'bulwark.db'), junk);
    const err = await startError(startServer({ dataDir, listen: 'none', configBackupAt: false }));
    expect(err.kind).toBe('corrupt');
    expect(err.message).toContain(join(dataDir, 'bulwark.db'));
    expect(err.hint).toContain('config');
    expect(readFileSync(join(dataDir, 'bulwark.db')).equals(junk)).toBe(true);
    expect(readdirSync(dataDir).sort()).toEqual(['bulwark.db']);
  });

  it('bad --listen names the option', async () => {
    const err = await startError(startServer({ dataDir: join(tmp, 'listen'), listen: 'localhost', configBackupAt: false }));
    expect(err.kind).toBe('invalid');
    expect(err.message).toContain('--listen');
  });
});
