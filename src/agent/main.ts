// The agent role (`bulwark agent`): enrolls once with a one-time token, then keeps a mutually
// authenticated TLS link to the backup server and sends heartbeats with its health (version,
// CPU cores, free space of its repository folders). Protocol: docs/formats/agent-link.md.
import { X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, readFile, statfs } from 'node:fs/promises';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BulwarkError, describeError, errorKindOfStatus } from '../common/errors.js';
import { logger } from '../common/log.js';
import { createAgentKey, createCsr, fingerprintOfPem } from './identity.js';
import { AgentTaskRunner } from './remote/task-runner.js';
import { writeFileAtomic as writeAtomically } from '../storage/local-fs.js';

const log = logger('agent');

export interface RunAgentOptions {
  /** The backup server, `https://host:port`. */
  serverUrl?: string | undefined;
  /** Alias of serverUrl (what the console passes). */
  server?: string | undefined;
  /** One-time token from `bulwark agent token`; needed on the first start only. */
  enrollToken?: string | undefined;
  dataDir: string;
  /** Name to enroll under (default: this host's name). */
  name?: string | undefined;
  /** Repository folders to report free space of, besides those the server names. */
  repositoryPaths?: string[] | undefined;
  /** Overrides the server's heartbeat interval (tests). */
  heartbeatIntervalMs?: number | undefined;
  /** Backoff after a failed heartbeat: first wait and cap (default 1 s, 60 s). */
  backoff?: { initialMs: number; maxMs: number } | undefined;
  /** Take tasks from the server (long poll; default true). */
  tasks?: boolean | undefined;
  /** Data-mover listener for backups this agent receives, `HOST:PORT` (default 0.0.0.0, any free port). */
  dataListen?: string | undefined;
  /** Address sources use to reach the data-mover listener (default: the address the server sees). */
  dataAdvertise?: string | undefined;
  /** How long a data stream may stay down before a transfer fails (default 30 s). */
  resumeWindowMs?: number | undefined;
}

export type HeartbeatOutcome = { ok: true; at: Date } | { ok: false; at: Date; error: BulwarkError };

export interface RunningAgent {
  name: string;
  /** The CA fingerprint the agent trusts (`AB:CD:…`). */
  caFingerprint: string;
  /** Sends a heartbeat now (besides the periodic ones). */
  heartbeatNow(): Promise<HeartbeatOutcome>;
  /** Resolves with the outcome of the next heartbeat attempt. */
  nextHeartbeat(): Promise<HeartbeatOutcome>;
  status(): { lastOk?: Date | undefined; lastError?: string | undefined; consecutiveFailures: number };
  /** Stops heartbeats and closes connections. */
  close(): Promise<void>;
}

/** Files in `<data>/agent/`. */
export const agentFiles = { key: 'agent.key', cert: 'agent.crt', ca: 'ca.crt', state: 'agent.json' } as const;

interface AgentState {
  format: 1;
  name: string;
  serverUrl: string;
  caFingerprint: string;
  enrolledAt: string;
}

interface Identity {
  state: AgentState;
  keyPem: string;
  certPem: string;
  caCertPem: string;
}

/**
 * Starts the agent: enrolls on first start (with `enrollToken`), then heartbeats until closed.
 * Rejects when enrollment fails; later connection problems are retried with backoff.
 */
export async function runAgent(opts: RunAgentOptions): Promise<RunningAgent> {
  const serverUrl = opts.serverUrl ?? opts.server;
  const dir = path.join(opts.dataDir, 'agent');
  let identity = await loadIdentity(dir);
  if (identity === undefined) {
    if (serverUrl === undefined) throw new BulwarkError('the agent needs the server address (--server URL) to enroll', { kind: 'invalid', context: { field: 'server' } });
    if (opts.enrollToken === undefined) {
      throw new BulwarkError(`this agent is not enrolled yet (no ${path.join(dir, agentFiles.state)})`, {
        kind: 'invalid',
        context: { field: 'enroll' },
        hint: 'start it once with --enroll TOKEN (create a token on the server with `bulwark agent token`)',
      });
    }
    identity = await enroll(dir, serverUrl, opts.enrollToken, opts.name ?? defaultAgentName());
  } else if (opts.enrollToken !== undefined) {
    log.info({ agent: identity.state.name }, 'already enrolled; the enrollment token is not used');
  }
  const url = serverUrl ?? identity.state.serverUrl;
  const running = startHeartbeats(identity, url, opts);
  if (opts.tasks === false) return running;
  // Tasks use their own connections: a long poll must never hold up a heartbeat.
  const taskAgent = new https.Agent({ keepAlive: true, maxSockets: 4, key: identity.keyPem, cert: identity.certPem, ca: identity.caCertPem });
  const runner = new AgentTaskRunner({
    name: identity.state.name,
    tls: { key: identity.keyPem, cert: identity.certPem, ca: identity.caCertPem },
    httpsAgent: taskAgent,
    request: <T,>(method: 'POST', route: string, body: unknown, agent: https.Agent, timeoutMs: number) => requestJson<T>(url, method, route, body, { agent }, timeoutMs),
    dataListen: opts.dataListen !== undefined ? parseHostPort(opts.dataListen) : undefined,
    dataAdvertise: opts.dataAdvertise,
    resumeWindowMs: opts.resumeWindowMs,
    dataDir: opts.dataDir,
  });
  runner.start();
  return {
    ...running,
    async close() {
      await runner.close();
      taskAgent.destroy();
      await running.close();
    },
  };
}

function parseHostPort(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(text);
  if (!m || Number(m[3]) > 65535) throw new BulwarkError(`--data-listen "${text}" is not HOST:PORT`, { kind: 'invalid', context: { field: 'dataListen' } });
  return { host: m[1] || m[2] || '0.0.0.0', port: Number(m[3]) };
}

// ---------------------------------------------------------------------------------------------
// Enrollment

async function enroll(dir: string, serverUrl: string, token: string, name: string): Promise<Identity> {
  const parsed = parseToken(token);
  await mkdir(dir, { recursive: true, mode: 0o700 });

  // 1. The CA, fetched unverified, then checked against the fingerprint the token carries.
  const caReply = await requestJson<{ caCertPem: string }>(serverUrl, 'GET', '/api/v1/agents/ca', undefined, { rejectUnauthorized: false });
  const caCertPem = caReply.caCertPem;
  let fingerprint: string;
  try {
    fingerprint = fingerprintOfPem(caCertPem);
  } catch (cause) {
    throw new BulwarkError(`the server at ${serverUrl} sent no readable CA certificate`, { kind: 'unavailable', cause });
  }
  if (fingerprint !== parsed.caFingerprint) {
    throw new BulwarkError(`the server's CA does not match the enrollment token (server ${fingerprint}, token ${parsed.caFingerprint})`, {
      kind: 'unauthorized',
      context: { server: serverUrl },
      hint: 'check the server address; if it is right, someone may be intercepting the connection',
    });
  }

  // 2. The key (kept if an earlier attempt wrote it), a CSR, and the enrollment itself.
  const keyFile = path.join(dir, agentFiles.key);
  let keyPem: string;
  if (existsSync(keyFile)) {
    keyPem = await readFile(keyFile, 'utf8');
  } else {
    keyPem = await createAgentKey();
    await writeFileAtomic(keyFile, keyPem, 0o600);
  }
  const reply = await requestJson<{ name: string; certificate: string; caCertificate: string }>(
    serverUrl,
    'POST',
    '/api/v1/agents/enroll',
    { token, name, csr: await createCsr(keyPem, name), hostname: os.hostname(), version: agentVersion(), cores: os.cpus().length },
    { ca: caCertPem },
  );
  if (!new X509Certificate(reply.certificate).checkIssued(new X509Certificate(caCertPem))) {
    throw new BulwarkError('the server returned a certificate not issued by its CA', { kind: 'unavailable', context: { server: serverUrl } });
  }
  const state: AgentState = { format: 1, name: reply.name, serverUrl, caFingerprint: fingerprint, enrolledAt: new Date().toISOString() };
  await writeFileAtomic(path.join(dir, agentFiles.cert), reply.certificate, 0o644);
  await writeFileAtomic(path.join(dir, agentFiles.ca), caCertPem, 0o644);
  await writeFileAtomic(path.join(dir, agentFiles.state), JSON.stringify(state, null, 2) + '\n', 0o644);
  log.info({ agent: state.name, server: serverUrl }, 'enrolled with the backup server');
  return { state, keyPem, certPem: reply.certificate, caCertPem };
}

async function loadIdentity(dir: string): Promise<Identity | undefined> {
  const stateFile = path.join(dir, agentFiles.state);
  if (!existsSync(stateFile)) return undefined;
  try {
    const state = JSON.parse(await readFile(stateFile, 'utf8')) as AgentState;
    if (state.format !== 1) throw new Error(`unknown format ${String(state.format)}`);
    return {
      state,
      keyPem: await readFile(path.join(dir, agentFiles.key), 'utf8'),
      certPem: await readFile(path.join(dir, agentFiles.cert), 'utf8'),
      caCertPem: await readFile(path.join(dir, agentFiles.ca), 'utf8'),
    };
  } catch (cause) {
    throw new BulwarkError(`the agent's enrollment in ${dir} cannot be read`, {
      kind: 'corrupt',
      context: { path: dir },
      cause,
      hint: `remove ${dir} and enroll again with a new token`,
    });
  }
}

function parseToken(token: string): { caFingerprint: string } {
  const m = /^bwe1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}\.([0-9a-f]{64})$/.exec(token.trim());
  if (!m) {
    throw new BulwarkError('the enrollment token is malformed', {
      kind: 'invalid',
      context: { field: 'enroll' },
      hint: 'copy the whole token printed by `bulwark agent token` (it starts with "bwe1.")',
    });
  }
  return { caFingerprint: m[1]!.toUpperCase().match(/../g)!.join(':') };
}

// ---------------------------------------------------------------------------------------------
// Heartbeats

function startHeartbeats(identity: Identity, serverUrl: string, opts: RunAgentOptions): RunningAgent {
  const name = identity.state.name;
  const tls = { key: identity.keyPem, cert: identity.certPem, ca: identity.caCertPem };
  const httpsAgent = new https.Agent({ keepAlive: true, maxSockets: 1, ...tls });
  const backoff = opts.backoff ?? { initialMs: 1000, maxMs: 60_000 };
  let intervalMs = opts.heartbeatIntervalMs ?? 30_000;
  let serverPaths: string[] = [];
  let failures = 0;
  let lastOk: Date | undefined;
  let lastError: string | undefined;
  let timer: NodeJS.Timeout | undefined;
  let closed = false;
  let inFlight: Promise<HeartbeatOutcome> | undefined;
  const waiters: Array<(o: HeartbeatOutcome) => void> = [];

  const beat = async (): Promise<HeartbeatOutcome> => {
    const at = new Date();
    let outcome: HeartbeatOutcome;
    try {
      const paths = [...new Set([...(opts.repositoryPaths ?? []), ...serverPaths])];
      const reply = await requestJson<{ heartbeatSeconds: number; repositoryPaths: string[] }>(
        serverUrl,
        'POST',
        '/api/v1/agents/heartbeat',
        { version: agentVersion(), hostname: os.hostname(), cores: os.cpus().length, uptimeSeconds: Math.round(process.uptime()), repositories: await measure(paths) },
        { agent: httpsAgent },
      );
      serverPaths = reply.repositoryPaths;
      if (opts.heartbeatIntervalMs === undefined) intervalMs = reply.heartbeatSeconds * 1000;
      if (failures > 0) log.info({ agent: name, server: serverUrl }, 'connected to the backup server again');
      failures = 0;
      lastOk = at;
      lastError = undefined;
      outcome = { ok: true, at };
    } catch (err) {
      const error = err instanceof BulwarkError ? err : new BulwarkError(describeError(err), { kind: 'unavailable', cause: err });
      failures++;
      lastError = describeError(error);
      log.error({ agent: name, server: serverUrl, failures, err: lastError }, 'heartbeat failed');
      outcome = { ok: false, at, error };
    }
    for (const w of waiters.splice(0)) w(outcome);
    return outcome;
  };

  const schedule = (): void => {
    if (closed) return;
    const delay = failures === 0 ? intervalMs : Math.min(backoff.maxMs, backoff.initialMs * 2 ** (failures - 1));
    timer = setTimeout(() => {
      void runBeat().then(schedule);
    }, delay);
  };

  const runBeat = (): Promise<HeartbeatOutcome> => {
    inFlight ??= beat().finally(() => (inFlight = undefined));
    return inFlight;
  };

  void runBeat().then(schedule);

  return {
    name,
    caFingerprint: identity.state.caFingerprint,
    heartbeatNow: runBeat,
    nextHeartbeat: () => new Promise<HeartbeatOutcome>((resolve) => waiters.push(resolve)),
    status: () => ({ lastOk, lastError, consecutiveFailures: failures }),
    async close() {
      closed = true;
      if (timer !== undefined) clearTimeout(timer);
      await inFlight?.catch(() => undefined);
      if (timer !== undefined) clearTimeout(timer);
      httpsAgent.destroy();
    },
  };
}

/** Free and total bytes of each folder (statfs), or the error that prevented measuring it. */
async function measure(paths: string[]): Promise<Array<{ path: string; freeBytes?: number; totalBytes?: number; error?: string }>> {
  return Promise.all(
    paths.map(async (p) => {
      try {
        const s = await statfs(p);
        return { path: p, freeBytes: s.bavail * s.bsize, totalBytes: s.blocks * s.bsize };
      } catch (err) {
        return { path: p, error: describeError(err) };
      }
    }),
  );
}

// ---------------------------------------------------------------------------------------------
// HTTP

type TlsOptions = { rejectUnauthorized: false } | { ca: string } | { agent: https.Agent };

async function requestJson<T>(serverUrl: string, method: 'GET' | 'POST', route: string, body: unknown, tls: TlsOptions, timeoutMs = 30_000): Promise<T> {
  let url: URL;
  try {
    url = new URL(route, serverUrl);
  } catch (cause) {
    throw new BulwarkError(`the server address ${serverUrl} is not a URL`, { kind: 'invalid', context: { field: 'server' }, cause });
  }
  if (url.protocol !== 'https:') {
    throw new BulwarkError(`the server address ${serverUrl} must start with https://`, { kind: 'invalid', context: { field: 'server' } });
  }
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise<T>((resolve, reject) => {
    const req = https.request(
      url,
      {
        method,
        ...('agent' in tls ? { agent: tls.agent } : { agent: false, ...tls }),
        headers: { accept: 'application/json', ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}) },
        timeout: timeoutMs,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', reject);
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json: unknown;
          try {
            json = text === '' ? undefined : JSON.parse(text);
          } catch {
            json = undefined;
          }
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) return resolve(json as T);
          const error = (json as { error?: { kind?: string; message?: string; hint?: string } } | undefined)?.error;
          reject(
            new BulwarkError(`the server refused ${method} ${route}: ${error?.message ?? `HTTP ${status}`}`, {
              kind: errorKindOfStatus(status),
              context: { server: serverUrl, status },
              hint: error?.hint,
            }),
          );
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`no answer within ${Math.round(timeoutMs / 1000)} s`)));
    req.on('error', (cause) =>
      reject(new BulwarkError(`cannot reach the backup server at ${serverUrl}: ${describeError(cause)}`, { kind: 'unavailable', context: { server: serverUrl }, cause })),
    );
    req.end(payload);
  });
}


// ---------------------------------------------------------------------------------------------
// Small things

/** This host's name, trimmed to what an agent name allows. */
function defaultAgentName(): string {
  const name = os.hostname().split('.')[0]!.replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 63);
  return name === '' ? 'agent' : name;
}

let cachedVersion: string | undefined;
/** The version in Bulwark's package.json (searched upwards from this module). */
function agentVersion(): string {
  if (cachedVersion !== undefined) return cachedVersion;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    try {
      const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'bulwark' && typeof pkg.version === 'string') return (cachedVersion = pkg.version);
    } catch {
      // not here: look one level up
    }
    dir = path.dirname(dir);
  }
  return (cachedVersion = '0.0.0');
}

async function writeFileAtomic(file: string, data: string, mode: number): Promise<void> {
  try {
    await writeAtomically(file, data, { mode });
  } catch (cause) {
    throw new BulwarkError(`cannot write ${file}`, { kind: 'unavailable', context: { path: file }, cause });
  }
}
