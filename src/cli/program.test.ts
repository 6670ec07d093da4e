// The console's command tree against a stand-in API on a unix socket: exit codes, --json,
// messages for bad fields, unknown names and stale edits, and following a session through a
// dropped connection. The real server is exercised end to end in test/e2e/console.test.ts.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultJobBackupOptions, type Job } from '../server/services/model.js';
import type { CliContext } from './context.js';
import { runConsole } from './program.js';

let dir: string;
let server: http.Server;
let eventCalls = 0;
const job: Job = { id: 'j1', name: 'nightly', version: 2, vms: ['web'], repository: 'main', method: 'forever-forward', retention: { points: 7 }, blockSize: 1048576, compression: 'zstd', schedule: null, enabled: true, retries: { count: 0, waitMinutes: 10 }, window: null, requireGuestProcessing: false, proxy: null, ...defaultJobBackupOptions, running: false, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z' };
const session = (state: string, percent: number): object => ({
  id: 's1', jobName: 'nightly', jobId: 'j1', state, full: false, startedAt: new Date(Date.now() - 5000).toISOString(),
  ...(state === 'success' ? { endedAt: new Date().toISOString() } : {}),
  progress: { percent, bytesRead: percent * 1024 * 1024, bytesTransferred: 0, bytesStored: 0, processingRate: 1 << 20 },
  tasks: [], log: [{ time: new Date().toISOString(), level: 'info', message: `at ${percent}%` }],
});

function reply(res: http.ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'bulwark-cli-program-'));
  server = http.createServer((req, res) => {
    let text = '';
    req.on('data', (c: Buffer) => (text += c.toString()));
    req.on('end', () => {
      const body = text ? (JSON.parse(text) as Record<string, unknown>) : {};
      const route = `${req.method} ${req.url}`;
      if (route === 'GET /api/v1/jobs') return reply(res, 200, { items: [job] });
      if (route === 'GET /api/v1/jobs/nightly') return reply(res, 200, job);
      if (route === 'GET /api/v1/jobs/nightly/encryption') return reply(res, 500, { error: { kind: 'internal', message: 'the password store is unreadable' } });
      if (route === 'GET /api/v1/jobs/nope') return reply(res, 404, { error: { kind: 'not-found', message: 'job "nope" not found' } });
      if (route === 'PATCH /api/v1/jobs/nightly') {
        if (body.version !== job.version) return reply(res, 409, { error: { kind: 'conflict', message: 'job "nightly" was changed by someone else since you read it: reload' } });
        return reply(res, 200, { ...job, ...body, version: job.version + 1 });
      }
      if (route === 'POST /api/v1/jobs') return reply(res, 400, { error: { kind: 'invalid', message: 'must be one of the listed repositories', field: 'repository' } });
      if (route === 'POST /api/v1/jobs/nightly/run') return reply(res, 200, { sessionId: 's1' });
      if (route === 'GET /api/v1/sessions/s1') return reply(res, 200, session(eventCalls >= 2 ? 'success' : 'running', eventCalls >= 2 ? 100 : 10));
      if (route === 'GET /api/v1/sessions/s1/events') {
        eventCalls++;
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write(`event: session\ndata: ${JSON.stringify(session('running', 40))}\n\n`);
        // The first stream breaks off mid-session (a lost connection); the second one finishes.
        if (eventCalls === 1) setTimeout(() => res.destroy(), 20);
        else res.end(`event: session\ndata: ${JSON.stringify(session('success', 100))}\n\n`);
        return;
      }
      reply(res, 404, { error: { kind: 'not-found', message: `no route ${route}` } });
    });
  });
  await new Promise<void>((r) => server.listen(join(dir, 'bulwark.sock'), r));
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise<void>((r) => server.close(() => r()));
  rmSync(dir, { recursive: true, force: true });
});

async function run(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const ctx: CliContext = {
    output: { out: (s) => (out += s), err: (s) => (err += s) },
    env: { BULWARK_DATA: dir, BULWARK_CONFIG: join(dir, 'config') },
    tty: false,
    reconnectLimitMs: 5000,
    exitCode: 0,
  };
  const code = await runConsole(ctx, argv);
  return { code, out, err };
}

describe('exit codes and usage errors', () => {
  it('help is 0; unknown options, missing subcommands and bad option values are 2', async () => {
    expect((await run('--help')).code).toBe(0);
    const v = await run('--version');
    expect(v).toMatchObject({ code: 0, out: `${(JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version}\n` });
    expect((await run('help', 'job')).code).toBe(0);
    expect((await run('job')).code).toBe(2);
    expect((await run('job', 'list', '--bogus')).code).toBe(2);
    expect((await run('frobnicate')).code).toBe(2);
    const bad = await run('job', 'create', 'x', '--vm', 'web', '--repo', 'main', '--keep', 'lots');
    expect(bad.code).toBe(2);
    expect(bad.err).toContain('--keep');
    expect((await run('job', 'create', 'x', '--repo', 'main')).err).toContain('--vm');
    // A password option without --encrypt is a usage error, never a silently unencrypted export.
    const unencrypted = await run('export', 'web', '--repo', 'main', '--password-file', join(dir, 'pw'), '--password-hint', 'usual');
    expect(unencrypted.code).toBe(2);
    expect(unencrypted.err).toContain('--password-file, --password-hint goes with --encrypt');
  });
});

describe('against the API', () => {
  it('lists as a table, or as the exact API objects with --json', async () => {
    const table = await run('job', 'list');
    expect(table.code).toBe(0);
    expect(table.out.split('\n')[0]).toMatch(/^NAME\s+VMS\s+REPOSITORY\s+METHOD/);
    expect(table.out).toContain('7 points');
    const json = await run('job', 'list', '--json');
    expect(JSON.parse(json.out)).toEqual([job]);
  });

  it('names the unknown job, the bad field, and says to reload after a stale edit', async () => {
    // A part that cannot be read is shown as unknown with the server's reason, not hidden.
    const shown = await run('job', 'show', 'nightly');
    expect(shown.code, shown.err).toBe(0);
    expect(shown.out).toMatch(/^encryption:\s+unknown \(the password store is unreadable\)$/m);
    const missing = await run('job', 'show', 'nope');
    expect(missing).toMatchObject({ code: 1, out: '' });
    expect(missing.err).toBe('bulwark: job "nope" not found\n');
    const field = await run('job', 'create', 'x', '--vm', 'web', '--repo', 'zzz');
    expect(field.code).toBe(2);
    expect(field.err).toContain('(field repository)');
    expect((await run('job', 'edit', 'nightly', '--keep', '3')).code).toBe(0);
    const stale = await run('job', 'edit', 'nightly', '--keep', '3', '--expect-version', '1');
    expect(stale.code).toBe(1);
    expect(stale.err).toContain('changed by someone else since you read it: reload');
    expect(stale.err).not.toMatch(/\n\s+at /); // no stack trace
  });

  it('job run --wait follows the session through a dropped connection to its end', async () => {
    const r = await run('job', 'run', 'nightly', '--wait');
    expect(r.err).toContain('lost the server');
    expect(r.out).toContain('session s1 (job nightly): running');
    expect(r.out).toMatch(/session s1 \(job nightly\): success after \d+s; read 100 MiB/);
    expect(r.code).toBe(0);
    expect(eventCalls).toBe(2);
  });
});
