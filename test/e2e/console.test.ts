// The console end to end: the real `bulwark` program against a real `bulwark server`, locally
// over the unix socket and remotely after `bulwark login` over TCP+TLS from another data and config
// directory. What this file tests is the console's side: parsing, output, login, TLS, following a
// session. Its jobs name VMs that do not exist, so the server runs in its declared simulation mode
// (BULWARK_SIMULATE_DATA_PATH=1: every session log starts with "simulated: no data moved"). The
// real data path through the shipped program, with a running guest, is e2e/one-host-backup.test.ts.
import { spawn } from 'node:child_process';
import { connect, createServer, type Socket } from 'node:net';
import { request } from 'node:https';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bulwark, ensureBuilt, program, startServerProcess, type ServerProcess } from './program.js';

let tmp: string;
let server: ServerProcess;
/** The local administrator: the server's data directory, so the console uses its socket. */
let local: Record<string, string>;
/** A remote console: its own (empty) data and config directories. */
let remote: Record<string, string>;

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'bulwark-e2e-console-'));
  await ensureBuilt();
  server = await startServerProcess(join(tmp, 'data'));
  local = { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: join(tmp, 'local-config'), HOME: tmp };
  mkdirSync(join(tmp, 'other-data'));
  remote = { BULWARK_DATA: join(tmp, 'other-data'), BULWARK_CONFIG: join(tmp, 'remote-config'), HOME: tmp };
}, 240_000);

afterAll(async () => {
  if (server) expect(await server.stop()).toBe(0); // closes cleanly on SIGTERM
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

const json = <T>(text: string): T => JSON.parse(text) as T;
interface Named {
  id: string;
  name: string;
  version: number;
}
interface SessionJson {
  id: string;
  jobName: string;
  state: string;
  tasks: Array<{ vm: string; state: string }>;
  log: unknown[];
}

describe('bulwark console, local (unix socket)', () => {
  it('adds a repository and a job, lists, runs it with --wait and shows the session', async () => {
    const repo = await bulwark(['repo', 'add', 'main', '--path', join(tmp, 'repo'), '--max-tasks', '2'], local);
    expect(repo).toMatchObject({ code: 0, stderr: '' });
    expect(repo.stdout).toContain('repository main added');

    const created = await bulwark(['job', 'create', 'nightly', '--vm', 'web', 'db', '--repo', 'main', '--keep', '7', '--schedule', 'daily 22:00 mon,fri', '--json'], local);
    expect(created.code).toBe(0);
    expect(json<Named & { vms: string[]; schedule: unknown }>(created.stdout)).toMatchObject({
      name: 'nightly',
      version: 1,
      vms: ['web', 'db'],
      schedule: { kind: 'daily', at: '22:00', days: ['mon', 'fri'] },
    });

    const list = await bulwark(['job', 'list', '--json'], local);
    expect(list.code).toBe(0);
    const jobs = json<Array<Named & { repository: string; retention: unknown }>>(list.stdout);
    expect(jobs.map((j) => [j.name, j.repository, j.retention])).toEqual([['nightly', 'main', { points: 7 }]]);
    const table = await bulwark(['job', 'list'], local);
    expect(table.stdout).toMatch(/^NAME\s+VMS\s+REPOSITORY/);
    expect(table.stdout).toMatch(/nightly\s+web, db\s+main\s+forever-forward\s+7 points\s+daily 22:00 mon,fri/);

    const ran = await bulwark(['job', 'run', 'nightly', '--wait'], local);
    expect(ran.stderr).toBe('');
    expect(ran.code).toBe(0);
    const id = /session (\S+)\n/.exec(ran.stdout)?.[1];
    expect(id).toBeDefined();
    expect(ran.stdout).toMatch(/\(job nightly\): success after \d+/);

    const sessions = await bulwark(['session', 'list'], local);
    expect(sessions.code).toBe(0);
    expect(sessions.stdout).toMatch(new RegExp(`${id}\\s+backup\\s+nightly\\s+success`));
    const filtered = json<SessionJson[]>((await bulwark(['session', 'list', '--job', 'nightly', '--json'], local)).stdout);
    expect(filtered.map((s) => s.id)).toContain(id);

    const shown = await bulwark(['session', 'show', id!, '--json'], local);
    expect(shown.code).toBe(0);
    const s = json<SessionJson>(shown.stdout);
    expect(s).toMatchObject({ id, jobName: 'nightly', state: 'success' });
    expect(s.tasks.map((t) => t.vm).sort()).toEqual(['db', 'web']);
    // The simulation says so first thing, so nobody mistakes it for a backup.
    expect(JSON.stringify(s.log[0])).toContain('simulated: no data moved');

    // Following a finished session returns at once with its outcome.
    const followed = await bulwark(['session', 'show', id!, '--follow'], local);
    expect(followed.code).toBe(0);
    expect(followed.stdout).toContain('success');

    const points = await bulwark(['restore-point', 'list', '--json'], local);
    expect(points.code).toBe(0);
    // ...and stores nothing: no restore point appears.
    expect(json<unknown[]>(points.stdout)).toEqual([]);
  });

  it('refuses a second, stale edit of a job with the reload message', async () => {
    const { version } = json<Named>((await bulwark(['job', 'show', 'nightly', '--json'], local)).stdout);
    const first = await bulwark(['job', 'edit', 'nightly', '--keep', '3', '--expect-version', String(version)], local);
    expect(first).toMatchObject({ code: 0 });
    expect(first.stdout).toContain(`version ${version + 1}`);
    const second = await bulwark(['job', 'edit', 'nightly', '--keep', '4', '--expect-version', String(version)], local);
    expect(second.code).toBe(1);
    expect(second.stderr).toContain('changed by someone else since you read it: reload');
    expect(second.stderr).not.toMatch(/\n\s+at /);
    expect(json<{ retention: unknown }>((await bulwark(['job', 'show', 'nightly', '--json'], local)).stdout).retention).toEqual({ points: 3 });
  });

  it('names the bad field, the bad option and the unknown job', async () => {
    const field = await bulwark(['job', 'create', 'odd', '--vm', 'web', '--repo', 'main', '--block-size', '3M'], local);
    expect(field.code).toBe(2);
    expect(field.stderr).toContain('blockSize');
    const option = await bulwark(['job', 'create', 'odd', '--vm', 'web', '--repo', 'main', '--keep', 'lots'], local);
    expect(option.code).toBe(2);
    expect(option.stderr).toContain('--keep');
    const unknown = await bulwark(['job', 'show', 'no-such-job'], local);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain('job "no-such-job" not found');
    const run = await bulwark(['job', 'run', 'no-such-job', '--wait'], local);
    expect(run.code).toBe(1);
    expect(run.stderr).toContain('no-such-job');
    expect((await bulwark(['job', 'frobnicate'], local)).code).toBe(2);
  });

  it('enrolls an agent with a one-time token; the agent runs until SIGTERM and closes cleanly', async () => {
    const token = await bulwark(['agent', 'token', '--name', 'remote1', '--json'], local);
    expect(token.code).toBe(0);
    const { token: secret } = json<{ token: string }>(token.stdout);
    const agent = spawn(process.execPath, [program, '--data', join(tmp, 'agent-data'), 'agent', '--server', server.url, '--enroll', secret, '--name', 'remote1'], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', BULWARK_LOG_LEVEL: 'warn', HOME: tmp },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let agentErr = '';
    agent.stderr.on('data', (c: Buffer) => (agentErr += c.toString()));
    const exited = new Promise<number | null>((resolve) => agent.once('exit', (code) => resolve(code)));
    try {
      let agents: Array<{ name: string; state: string }> = [];
      for (let i = 0; i < 60 && !agents.some((a) => a.name === 'remote1' && a.state === 'online'); i++) {
        if (agent.exitCode !== null) break;
        await new Promise((r) => setTimeout(r, 500));
        agents = json((await bulwark(['agent', 'list', '--json'], local)).stdout);
      }
      expect(agents, agentErr).toContainEqual(expect.objectContaining({ name: 'remote1', state: 'online' }));
      expect((await bulwark(['agent', 'list'], local)).stdout).toMatch(/remote1\s+online/);
    } finally {
      agent.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
    expect(agentErr).toContain('closing');
  });

  it('writes configuration backups', async () => {
    const backup = await bulwark(['config', 'backup', '--repo', 'main', '--json'], local);
    expect(backup.code).toBe(0);
    const { path } = json<{ path: string }>(backup.stdout);
    expect(statSync(path).size).toBeGreaterThan(0);
  });
});

describe('bulwark console, remote (TCP+TLS after login)', () => {
  it('gets 401 over TCP without a login, and the console says to log in', async () => {
    // The CA is trusted from the server's data directory; no token is sent.
    const status = await new Promise<number>((resolve, reject) => {
      const u = new URL('/api/v1/jobs', server.url);
      request({ host: u.hostname, port: u.port, path: u.pathname, ca: readFileSync(join(server.dataDir, 'pki', 'ca.crt')) }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      })
        .on('error', reject)
        .end();
    });
    expect(status).toBe(401);
    const r = await bulwark(['--server', server.url, 'job', 'list'], { ...remote, BULWARK_DATA: server.dataDir });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('bulwark login');
    const none = await bulwark(['job', 'list'], remote);
    expect(none.code).toBe(1);
    expect(none.stderr).toContain('bulwark login URL');
  });

  it('refuses a server whose CA does not match the expected fingerprint', async () => {
    const wrong = server.caFingerprint.replace(/^[0-9A-F]{2}/, (h) => (h === '00' ? '11' : '00'));
    const r = await bulwark(['login', server.url, '--user', 'admin', '--password-stdin', '--ca-fingerprint', wrong], remote, 'whatever\n');
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(server.caFingerprint);
    expect(() => statSync(join(remote.BULWARK_CONFIG!, 'credentials.json'))).toThrow();
  });

  it('logs in from another data directory, then lists, runs and logs out', async () => {
    const password = readFileSync(join(server.dataDir, 'initial-admin-password'), 'utf8');
    const login = await bulwark(['login', server.url, '--user', 'admin', '--password-stdin', '--ca-fingerprint', server.caFingerprint], remote, password);
    expect(login.stderr).toBe('');
    expect(login.code).toBe(0);
    expect(login.stdout).toContain('logged in to');
    expect(statSync(join(remote.BULWARK_CONFIG!, 'credentials.json')).mode & 0o777).toBe(0o600);

    const whoami = await bulwark(['whoami', '--json'], remote);
    expect(json<{ user: string; role: string; via: string }>(whoami.stdout)).toEqual({ user: 'admin', role: 'administrator', via: 'token' });

    const repos = await bulwark(['repo', 'list', '--json'], remote);
    expect(json<Named[]>(repos.stdout).map((r) => r.name)).toContain('main');
    const created = await bulwark(['job', 'create', 'remote-job', '--vm', 'app', '--repo', 'main'], remote);
    expect(created.code).toBe(0);
    const jobs = json<Named[]>((await bulwark(['job', 'list', '--json'], remote)).stdout);
    expect(jobs.map((j) => j.name).sort()).toEqual(['nightly', 'remote-job']);

    const ran = await bulwark(['job', 'run', 'remote-job', '--wait', '--json'], remote);
    expect(ran.code).toBe(0);
    expect(json<SessionJson>(ran.stdout)).toMatchObject({ jobName: 'remote-job', state: 'success' });
    const sessions = await bulwark(['session', 'list', '--job', 'remote-job'], remote);
    expect(sessions.stdout).toMatch(/remote-job\s+success/);

    const logout = await bulwark(['logout'], remote);
    expect(logout.code).toBe(0);
    const after = await bulwark(['job', 'list'], remote);
    expect(after.code).toBe(1);
    expect(after.stderr).toContain('bulwark login');
  });
});

describe('bulwark console, losing the server', () => {
  it('job run --wait rides out a lost connection and reports how the session ended', async () => {
    // The console reaches the server through a relay on a unix socket that the test cuts for
    // 3 s while the session runs: every connection is dropped and the socket disappears.
    await bulwark(['repo', 'add', 'relay-repo', '--path', join(tmp, 'relay-repo')], local);
    expect((await bulwark(['job', 'create', 'relayed', '--vm', 'r1', 'r2', '--repo', 'relay-repo'], local)).code).toBe(0);
    const relayPath = join(tmp, 'relay.sock');
    const open = new Set<Socket>();
    const relay = createServer((client) => {
      const upstream = connect(join(server.dataDir, 'bulwark.sock'));
      open.add(client).add(upstream);
      const drop = (): void => {
        client.destroy();
        upstream.destroy();
      };
      client.on('error', drop).on('close', drop).pipe(upstream);
      upstream.on('error', drop).on('close', drop).pipe(client);
    });
    const listen = (): Promise<void> => new Promise((r) => relay.listen(relayPath, r));
    await listen();

    const waiting = spawn(process.execPath, [program, '--server', `unix:${relayPath}`, 'job', 'run', 'relayed', '--wait'], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...local },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    waiting.stdout.on('data', (c: Buffer) => (out += c.toString()));
    waiting.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const exited = new Promise<number | null>((resolve) => waiting.once('exit', (code) => resolve(code)));
    try {
      for (let i = 0; i < 300 && !/\): running/.test(out); i++) await new Promise((r) => setTimeout(r, 20));
      expect(out, err).toMatch(/\): running/);
      const closed = new Promise<void>((r) => relay.close(() => r())); // stop accepting…
      for (const s of open) s.destroy(); // …and drop every connection
      await closed;
      await new Promise((r) => setTimeout(r, 3000));
      await listen();
      expect(await exited, `stdout:\n${out}\nstderr:\n${err}`).toBe(0);
    } finally {
      waiting.kill('SIGKILL');
      for (const s of open) s.destroy();
      relay.close();
    }
    expect(err).toContain('lost the server');
    expect(err).toContain('connected to the server again');
    expect(out).toMatch(/\(job relayed\): success after/);
  });
});
