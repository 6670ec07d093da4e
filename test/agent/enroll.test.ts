// Agent enrollment and heartbeats end to end over real TLS: a Fastify server with the agent-link
// plugin (in-memory store) and runAgent in the same process.
import { mkdtemp, rm, stat, readFile } from 'node:fs/promises';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createAgentKeyAndCsr } from '../../src/agent/identity.js';
import { isAgentEnrolled, runLocalAgent } from '../../src/agent/local.js';
import { agentFiles, runAgent, type RunningAgent } from '../../src/agent/main.js';
import { BulwarkError } from '../../src/common/errors.js';
import { logger } from '../../src/common/log.js';
import { agentLinkPlugin, agentLinkTlsOptions, createEnrollmentToken, InMemoryAgentLinkStore } from '../../src/server/api/agent-link.js';
import { makeErrorHandler } from '../../src/server/api/errors.js';
import { ensureServerPki, issueAgentCertificate, type ServerPki } from '../../src/server/pki/index.js';

let tmp: string;
let pki: ServerPki;
let otherPki: ServerPki;
let store: InMemoryAgentLinkStore;
let app: FastifyInstance;
let serverUrl: string;
const agents: RunningAgent[] = [];

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'bulwark-enroll-'));
  pki = await ensureServerPki(path.join(tmp, 'server'), { hostnames: [] });
  otherPki = await ensureServerPki(path.join(tmp, 'other'), { hostnames: [] });
  store = new InMemoryAgentLinkStore();
  app = Fastify({ https: agentLinkTlsOptions(pki) });
  app.setErrorHandler(makeErrorHandler(logger('test')));
  await app.register(agentLinkPlugin({ store, pki, heartbeatSeconds: 30 }), { prefix: '/api/v1' });
  await app.listen({ host: '127.0.0.1', port: 0 });
  serverUrl = `https://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  for (const a of agents) await a.close();
  await app.close();
  await rm(tmp, { recursive: true, force: true });
});

async function start(dataDir: string, opts: { token?: string; name?: string; paths?: string[] } = {}): Promise<RunningAgent> {
  const agent = await runAgent({
    serverUrl,
    dataDir: path.join(tmp, dataDir),
    enrollToken: opts.token,
    name: opts.name,
    repositoryPaths: opts.paths,
    heartbeatIntervalMs: 60_000,
  });
  agents.push(agent);
  return agent;
}

/** A heartbeat made by hand with the given client key and certificate. */
async function heartbeatWith(key: string, cert: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = https.request(
      `${serverUrl}/api/v1/agents/heartbeat`,
      { method: 'POST', key, cert, ca: pki.caCertPem, agent: false, headers: { 'content-type': 'application/json' } },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      },
    );
    req.on('error', reject);
    req.end(JSON.stringify({ version: 'x', hostname: 'h', cores: 1, repositories: [] }));
  });
}

describe('agent enrollment over TLS', () => {
  it('enrolls with a one-time token, keeps its identity, and reports its health by heartbeat', async () => {
    const { token } = await createEnrollmentToken(store, pki);
    const agent = await start('a1', { token, name: 'proxy-1', paths: [tmp] });
    expect(agent.name).toBe('proxy-1');
    expect(agent.caFingerprint).toBe(pki.caFingerprint);
    expect((await agent.heartbeatNow()).ok).toBe(true);

    const rec = store.agents.get('proxy-1')!;
    expect(rec.state).toBe('online');
    expect(rec.health?.cores).toBe(os.cpus().length);
    expect(rec.health?.hostname).toBe(os.hostname());
    expect(rec.health?.version).toMatch(/^\d+\.\d+\.\d+/);
    const space = rec.health?.repositories[0];
    expect(space?.path).toBe(tmp);
    expect(space?.freeBytes).toBeGreaterThan(0);
    expect(space?.totalBytes).toBeGreaterThanOrEqual(space!.freeBytes!);
    expect(rec.lastSeenAt).toBeInstanceOf(Date);

    const dir = path.join(tmp, 'a1', 'agent');
    expect((await stat(path.join(dir, agentFiles.key))).mode & 0o777).toBe(0o600);
    expect(JSON.parse(await readFile(path.join(dir, agentFiles.state), 'utf8'))).toMatchObject({ format: 1, name: 'proxy-1', serverUrl, caFingerprint: pki.caFingerprint });

    // The server names a repository folder of this agent; the next heartbeat measures it.
    store.repositoryPaths.set('proxy-1', [path.join(tmp, 'missing-repo')]);
    await agent.heartbeatNow();
    expect((await agent.heartbeatNow()).ok).toBe(true);
    expect(store.agents.get('proxy-1')!.health?.repositories.map((r) => [r.path, r.error?.includes('ENOENT') ?? false])).toEqual([
      [tmp, false],
      [path.join(tmp, 'missing-repo'), true],
    ]);
    await agent.close();

    // A restart needs no token: the identity is on disk.
    const again = await start('a1');
    expect(again.name).toBe('proxy-1');
    expect((await again.heartbeatNow()).ok).toBe(true);
    await again.close();
  });

  it('refuses a token that was already used', async () => {
    const { token } = await createEnrollmentToken(store, pki);
    await (await start('b1', { token, name: 'proxy-b1' })).close();
    const err = await start('b2', { token, name: 'proxy-b2' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect((err as BulwarkError).kind).toBe('unauthorized');
    expect((err as BulwarkError).message).toMatch(/^the server refused POST \/api\/v1\/agents\/enroll: the enrollment token was already used/);
    expect(store.agents.has('proxy-b2')).toBe(false);
  });

  it('refuses an expired token, an unknown one, and a name already taken', async () => {
    const expired = await createEnrollmentToken(store, pki, { ttlSeconds: 60, now: new Date(Date.now() - 3600_000) });
    await expect(start('c1', { token: expired.token, name: 'proxy-c1' })).rejects.toThrow(/the enrollment token expired at/);
    const forged = (await createEnrollmentToken({ saveEnrollmentToken: async () => undefined }, pki)).token;
    await expect(start('c2', { token: forged, name: 'proxy-c2' })).rejects.toThrow(/the enrollment token is not known to this server/);
    const fresh = await createEnrollmentToken(store, pki);
    await expect(start('c3', { token: fresh.token, name: 'proxy-1' })).rejects.toThrow(/an agent named proxy-1 is already registered/);
    // Refusals before the certificate is issued do not spend the token.
    await (await start('c4', { token: fresh.token, name: 'proxy-c4' })).close();
  });

  it('does not enroll with a server whose CA differs from the one in the token', async () => {
    const { token } = await createEnrollmentToken(store, otherPki);
    const err = (await start('d1', { token, name: 'proxy-d1' }).catch((e: unknown) => e)) as BulwarkError;
    expect(err.kind).toBe('unauthorized');
    expect(err.message).toContain("the server's CA does not match the enrollment token");
  });

  it('refuses heartbeats with a certificate from another CA, or without one', async () => {
    const { keyPem, csrPem } = await createAgentKeyAndCsr('proxy-1');
    const foreign = await issueAgentCertificate(otherPki, csrPem, 'proxy-1');
    const reply = await heartbeatWith(keyPem, foreign.certPem);
    expect(reply.status).toBe(401);
    expect(reply.body).toContain('the agent certificate was not issued by this server');
    const anonymous = await heartbeatWith(undefined as unknown as string, undefined as unknown as string);
    expect(anonymous.status).toBe(401);
    expect(anonymous.body).toContain('no agent certificate was presented');
  });

  it('re-enrolls a host with a token bound to its name; the old certificate is refused afterwards', async () => {
    const first = await createEnrollmentToken(store, pki);
    const old = await start('e1', { token: first.token, name: 'proxy-e' });
    expect((await old.heartbeatNow()).ok).toBe(true);
    const bound = await createEnrollmentToken(store, pki, { name: 'proxy-e' });
    await expect(start('e2', { token: bound.token, name: 'other-name' })).rejects.toThrow(/the enrollment token is for agent proxy-e, not other-name/);
    const fresh = await start('e2', { token: bound.token, name: 'proxy-e' });
    expect((await fresh.heartbeatNow()).ok).toBe(true);
    const refused = await old.heartbeatNow();
    expect(refused.ok).toBe(false);
    expect(!refused.ok && refused.error.kind).toBe('forbidden');
    expect(!refused.ok && refused.error.message).toContain('presented a certificate that is no longer its own');
    expect(old.status().consecutiveFailures).toBe(1);
    store.agents.get('proxy-e')!.state = 'revoked';
    const revoked = await fresh.heartbeatNow();
    expect(!revoked.ok && revoked.error.message).toContain('agent proxy-e is revoked');
  });

  it('runs the one-host install\'s local agent, asking for a token only the first time', async () => {
    const dataDir = path.join(tmp, 'local');
    const asked: string[] = [];
    const createToken = async (name: string) => {
      asked.push(name);
      return (await createEnrollmentToken(store, pki, { name })).token;
    };
    expect(isAgentEnrolled(dataDir)).toBe(false);
    const first = await runLocalAgent({ serverUrl, dataDir, createToken, heartbeatIntervalMs: 60_000 });
    agents.push(first);
    expect((await first.heartbeatNow()).ok).toBe(true);
    await first.close();
    expect(isAgentEnrolled(dataDir)).toBe(true);
    const second = await runLocalAgent({ serverUrl, dataDir, createToken, heartbeatIntervalMs: 60_000 });
    agents.push(second);
    expect((await second.heartbeatNow()).ok).toBe(true);
    expect(asked).toEqual(['local']);
    expect(store.agents.get('local')?.state).toBe('online');
  });

  it('retries with backoff while the server is unreachable, and tells what it cannot reach', async () => {
    const { token } = await createEnrollmentToken(store, pki);
    const dataDir = path.join(tmp, 'f1');
    await (await start('f1', { token, name: 'proxy-f' })).close();
    const agent = await runAgent({ serverUrl: 'https://127.0.0.1:1', dataDir, heartbeatIntervalMs: 60_000, backoff: { initialMs: 5, maxMs: 10 } });
    agents.push(agent);
    let outcome = await agent.nextHeartbeat();
    while (agent.status().consecutiveFailures < 3) outcome = await agent.nextHeartbeat();
    expect(outcome.ok).toBe(false);
    expect(!outcome.ok && outcome.error.message).toMatch(/^cannot reach the backup server at https:\/\/127\.0\.0\.1:1: .*ECONNREFUSED/);
    await agent.close();
  });
});
