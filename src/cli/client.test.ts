import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ApiClient, ApiError, errorOfReply, normaliseFingerprint, normaliseOrigin, Reconnect, resolveServer } from './client.js';
import { saveLogin } from './credentials.js';

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'bulwark-cli-client-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

/** A stand-in HTTP peer on a unix socket: records requests, answers with `reply`. */
async function peer(reply: (req: http.IncomingMessage, body: string, res: http.ServerResponse) => void): Promise<{ socket: string; requests: Array<{ method: string; url: string; body: string; headers: http.IncomingHttpHeaders }>; close(): Promise<void> }> {
  const socket = join(dir, 'bulwark.sock');
  const requests: Array<{ method: string; url: string; body: string; headers: http.IncomingHttpHeaders }> = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      requests.push({ method: req.method!, url: req.url!, body, headers: req.headers });
      reply(req, body, res);
    });
  });
  await new Promise<void>((r) => server.listen(socket, r));
  return {
    socket,
    requests,
    close: () => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }),
  };
}

describe('resolveServer', () => {
  const login = { url: 'https://saved.example:9392', caPem: 'PEM', caFingerprint: 'AA', token: 't0k', user: 'admin' };

  it('follows --server, $BULWARK_SERVER, the data socket, then the saved login', async () => {
    const data = join(dir, 'data');
    const config = join(dir, 'config');
    await saveLogin(join(config, 'credentials.json'), login);
    const env = { BULWARK_DATA: data, BULWARK_CONFIG: config };
    expect(await resolveServer({ env })).toMatchObject({ kind: 'tcp', origin: login.url, token: 't0k', caPem: 'PEM' });
    const { mkdirSync } = await import('node:fs');
    mkdirSync(data);
    writeFileSync(join(data, 'bulwark.sock'), ''); // existence is what counts
    expect(await resolveServer({ env })).toMatchObject({ kind: 'unix', socketPath: join(data, 'bulwark.sock') });
    expect(await resolveServer({ env: { ...env, BULWARK_SERVER: 'unix:/x.sock' } })).toMatchObject({ kind: 'unix', socketPath: '/x.sock' });
    // --server beats the environment; the saved token goes only to the server it belongs to.
    expect(await resolveServer({ env: { ...env, BULWARK_SERVER: 'unix:/x.sock' }, server: 'saved.example:9392' })).toMatchObject({ kind: 'tcp', origin: login.url, token: 't0k' });
    expect(await resolveServer({ env, server: 'https://other:1' })).toEqual({ kind: 'tcp', origin: 'https://other:1', source: '--server' });
  });

  it('says how to start or reach a server when there is none', async () => {
    const err = await resolveServer({ env: { BULWARK_DATA: join(dir, 'none'), BULWARK_CONFIG: join(dir, 'none') } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as ApiError).message).toContain(join(dir, 'none', 'bulwark.sock'));
    expect((err as ApiError).hint).toContain('bulwark login');
  });
});

describe('addresses and fingerprints', () => {
  it('normalises origins', () => {
    expect(normaliseOrigin('host:9392')).toBe('https://host:9392');
    expect(normaliseOrigin('https://host:9392/api/v1')).toBe('https://host:9392');
    expect(() => normaliseOrigin('ftp://x')).toThrow(/not a server address/);
  });
  it('normalises fingerprints however they were copied', () => {
    expect(normaliseFingerprint('sha256=ab:cd:0f')).toBe('AB:CD:0F');
    expect(normaliseFingerprint('abcd0f')).toBe('AB:CD:0F');
  });
});

describe('errorOfReply', () => {
  it('keeps the server message, hint, field and kind', () => {
    const e = errorOfReply(400, JSON.stringify({ error: { kind: 'invalid', message: 'keep: must be >= 1', field: 'retention', hint: 'h' } }), 'POST', '/jobs');
    expect(e).toMatchObject({ status: 400, kind: 'invalid', message: 'keep: must be >= 1', field: 'retention', hint: 'h' });
  });
  it('tells an unauthenticated console to log in, and a stale editor to reload', () => {
    expect(errorOfReply(401, '{"error":{"kind":"unauthorized","message":"no token"}}', 'GET', '/jobs').hint).toMatch(/bulwark login/);
    const stale = errorOfReply(409, '{"error":{"kind":"conflict","message":"job \\"a\\" was changed by someone else since you read it: reload"}}', 'PATCH', '/jobs/a');
    expect(stale.kind).toBe('conflict');
    expect(stale.message).toContain('changed by someone else since you read it: reload');
  });
  it('falls back to the status when the body is not JSON', () => {
    expect(errorOfReply(503, '', 'GET', '/x')).toMatchObject({ kind: 'unavailable', message: 'GET /x failed with HTTP 503' });
  });
});

describe('ApiClient over a unix socket', () => {
  it('sends JSON to /api/v1 and parses the reply; errors become ApiErrors', async () => {
    const p = await peer((req, _body, res) => {
      if (req.url === '/api/v1/jobs/a%20b?limit=3') {
        res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":{"kind":"not-found","message":"job \\"a b\\" not found"}}');
      } else res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
    });
    try {
      const c = new ApiClient({ kind: 'unix', socketPath: p.socket, source: 'test' });
      expect(await c.post('/repositories', { name: 'r' })).toEqual({ ok: true });
      expect(p.requests[0]).toMatchObject({ method: 'POST', url: '/api/v1/repositories', body: '{"name":"r"}' });
      expect(p.requests[0]!.headers.authorization).toBeUndefined();
      const err = await c.get('/jobs/a%20b', { limit: 3 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ApiError);
      expect(err).toMatchObject({ status: 404, kind: 'not-found', message: 'job "a b" not found' });
    } finally {
      await p.close();
    }
  });

  it('marks a missing server as a lost connection, with a hint to start it', async () => {
    const c = new ApiClient({ kind: 'unix', socketPath: join(dir, 'absent.sock'), source: 'test' });
    const err = (await c.get('/health').catch((e: unknown) => e)) as ApiError;
    expect(err).toMatchObject({ connectionLost: true, kind: 'unavailable', status: 0 });
    expect(err.hint).toContain('bulwark server');
  });

  it('streams server-sent events until the server ends the stream', async () => {
    const p = await peer((_req, _body, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write('event: session\ndata: {"n":1}\n\n');
      setTimeout(() => res.end('event: session\ndata: {"n":2}\n\n'), 10);
    });
    try {
      const c = new ApiClient({ kind: 'unix', socketPath: p.socket, source: 'test' });
      const seen: unknown[] = [];
      await c.events('/sessions/s1/events', (e) => seen.push(JSON.parse(e.data)));
      expect(seen).toEqual([{ n: 1 }, { n: 2 }]);
      expect(p.requests[0]!.headers.accept).toBe('text/event-stream');
    } finally {
      await p.close();
    }
  });
});

describe('Reconnect', () => {
  const lostError = (): ApiError => new ApiError('gone', { status: 0, kind: 'unavailable', connectionLost: true });

  it('backs off while the server is gone, resets when it is back, and gives up after the limit', async () => {
    let now = 0;
    const waits: number[] = [];
    const r = new Reconnect({ limitMs: 10_000, now: () => now, sleep: async (ms) => { waits.push(ms); now += ms; } });
    await r.failed(lostError());
    await r.failed(lostError());
    r.reachable();
    await r.failed(lostError());
    expect(waits).toEqual([500, 1000, 500]);
    for (let i = 0; i < 4; i++) await r.failed(lostError()).catch(() => undefined);
    const err = (await r.failed(lostError()).catch((e: unknown) => e)) as ApiError;
    expect(err.message).toMatch(/lost the connection to the server for 10 s/);
    expect(now).toBe(1500 + 10_000); // counted from the last time the server was reachable
  });

  it('does not retry other errors', async () => {
    const r = new Reconnect({ limitMs: 10_000, sleep: async () => undefined });
    const other = new ApiError('bad', { status: 400, kind: 'invalid' });
    await expect(r.failed(other)).rejects.toBe(other);
  });
});
