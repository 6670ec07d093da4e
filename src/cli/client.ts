// The console's REST client: finds the server (flag, environment, local socket, saved login),
// talks JSON to /api/v1 over the unix socket or TCP+TLS with a Bearer token, turns the server's
// error bodies into BulwarkErrors that keep its message, hint and field, and streams
// server-sent events. Connection losses are marked so long waits can retry for 5 minutes.
import { X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { isIP } from 'node:net';
import tls from 'node:tls';
import { BulwarkError, describeError, errorKindOfStatus, type ErrorKind } from '../common/errors.js';
import { loadLogin, type SavedLogin } from './credentials.js';
import { caPath, configDirectory, credentialsPath, dataDirectory, socketPath, type Env } from './paths.js';
import { SseParser, type ServerSentEvent } from './sse.js';

export const apiBase = '/api/v1';

/** How the console reaches a server, and why it chose it (for messages). */
export type ServerAddress =
  | { kind: 'unix'; socketPath: string; source: string }
  | { kind: 'tcp'; origin: string; caPem?: string; token?: string; source: string };

export interface ResolveOptions {
  /** `--server URL|unix:PATH`. */
  server?: string | undefined;
  /** `--data DIR`. */
  data?: string | undefined;
  env?: Env;
}

/**
 * The server to talk to, in the order of ARCHITECTURE.md: `--server URL|unix:PATH`,
 * $BULWARK_SERVER, the socket of the data directory, else the server saved by `bulwark login`.
 */
export async function resolveServer(options: ResolveOptions = {}): Promise<ServerAddress> {
  const env = options.env ?? process.env;
  const dataDir = dataDirectory(options.data, env);
  const login = await loadLogin(credentialsPath(configDirectory(env)));
  const named = options.server ? { value: options.server, source: '--server' } : env.BULWARK_SERVER
    ? { value: env.BULWARK_SERVER, source: '$BULWARK_SERVER' }
    : undefined;
  if (named) return addressOf(named.value, named.source, dataDir, login);
  const sock = socketPath(dataDir);
  if (existsSync(sock)) return { kind: 'unix', socketPath: sock, source: `the data directory ${dataDir}` };
  if (login) {
    return { kind: 'tcp', origin: login.url, caPem: login.caPem, token: login.token, source: 'bulwark login' };
  }
  throw new BulwarkError(`no Bulwark server found: there is no socket ${sock} and no saved login`, {
    kind: 'unavailable',
    hint: 'start one with `bulwark server`, pass --data DIR or --server URL, or run `bulwark login URL`',
  });
}

function addressOf(value: string, source: string, dataDir: string, login: SavedLogin | undefined): ServerAddress {
  if (value.startsWith('unix:')) return { kind: 'unix', socketPath: value.slice('unix:'.length), source };
  const origin = normaliseOrigin(value);
  const address: ServerAddress = { kind: 'tcp', origin, source };
  if (login && login.url === origin) {
    address.caPem = login.caPem;
    address.token = login.token;
  } else if (existsSync(caPath(dataDir))) {
    address.caPem = readFileSync(caPath(dataDir), 'utf8');
  }
  return address;
}

/** "host:9392" or "https://host:9392/api/v1" -> "https://host:9392". */
export function normaliseOrigin(value: string): string {
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(value) ? value : `https://${value}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch (err) {
    throw new BulwarkError(`not a server address: ${value}`, {
      kind: 'invalid',
      cause: err,
      hint: 'use https://HOST:PORT or unix:/path/to/bulwark.sock',
    });
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new BulwarkError(`not a server address: ${value} (scheme ${url.protocol})`, {
      kind: 'invalid',
      hint: 'use https://HOST:PORT or unix:/path/to/bulwark.sock',
    });
  }
  return url.origin;
}

/** An error reply of the API, or a failure to reach it. */
export class ApiError extends BulwarkError {
  /** HTTP status; 0 when the server could not be reached. */
  readonly status: number;
  /** The request field the server named, for validation errors. */
  readonly field: string | undefined;
  /** True when the connection failed or broke (worth retrying while waiting). */
  readonly connectionLost: boolean;

  constructor(
    message: string,
    opts: { status: number; kind: ErrorKind; hint?: string | undefined; field?: string | undefined; cause?: unknown; connectionLost?: boolean },
  ) {
    super(message, { kind: opts.kind, hint: opts.hint, cause: opts.cause });
    this.name = 'ApiError';
    this.status = opts.status;
    this.field = opts.field;
    this.connectionLost = opts.connectionLost ?? false;
  }
}

const kinds: readonly ErrorKind[] = ['invalid', 'unauthorized', 'forbidden', 'not-found', 'conflict', 'unavailable', 'corrupt', 'internal'];


const connectionCodes = new Set(['ECONNREFUSED', 'ECONNRESET', 'ENOENT', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ECONNABORTED', 'UND_ERR_SOCKET']);

export interface RequestOptions {
  query?: Record<string, string | number | boolean | undefined> | undefined;
  body?: unknown;
  /** Sent instead of the saved token (used by `login` before there is one). */
  token?: string | undefined;
}

export class ApiClient {
  readonly address: ServerAddress;

  constructor(address: ServerAddress) {
    this.address = address;
  }

  /** What the console is talking to, for messages: "unix:/…/bulwark.sock" or the URL. */
  get target(): string {
    return this.address.kind === 'unix' ? `unix:${this.address.socketPath}` : this.address.origin;
  }

  get<T>(path: string, query?: RequestOptions['query']): Promise<T> {
    return this.request<T>('GET', path, { query });
  }

  post<T>(path: string, body: unknown = {}): Promise<T> {
    return this.request<T>('POST', path, { body });
  }

  patch<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('PATCH', path, { body });
  }

  delete<T>(path: string): Promise<T> {
    return this.request<T>('DELETE', path, {});
  }

  /** One JSON request; resolves with the parsed reply (undefined for an empty body). */
  async request<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    const body = options.body === undefined ? undefined : Buffer.from(JSON.stringify(options.body));
    const res = await this.#send(method, path, options, body, 'application/json');
    const text = await readAll(res, method, path, this.target);
    const status = res.statusCode ?? 0;
    if (status >= 400) throw errorOfReply(status, text, method, path);
    if (text.trim() === '') return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch (err) {
      throw new ApiError(`${method} ${path}: the server sent a reply that is not JSON`, {
        status,
        kind: 'internal',
        cause: err,
      });
    }
  }

  /**
   * Streams server-sent events from `path` to `onEvent` until the server ends the stream or
   * `signal` aborts. Rejects with a connectionLost ApiError when the connection breaks.
   */
  async events(path: string, onEvent: (event: ServerSentEvent) => void, signal?: AbortSignal): Promise<void> {
    const res = await this.#send('GET', path, { token: undefined }, undefined, 'text/event-stream', signal);
    const status = res.statusCode ?? 0;
    if (status >= 400) throw errorOfReply(status, await readAll(res, 'GET', path, this.target), 'GET', path);
    const parser = new SseParser();
    res.setEncoding('utf8');
    await new Promise<void>((resolve, reject) => {
      let done = false;
      const finish = (err?: unknown): void => {
        if (done) return;
        done = true;
        if (err === undefined) resolve();
        else reject(err instanceof Error ? err : new Error(describeError(err)));
      };
      res.on('data', (chunk: string) => {
        try {
          for (const event of parser.push(chunk)) onEvent(event);
        } catch (err) {
          res.destroy();
          finish(err);
        }
      });
      res.on('end', () => finish());
      res.on('aborted', () => finish(lost('GET', path, this.target, new Error('the server closed the stream'))));
      res.on('error', (err) => finish(signal?.aborted ? undefined : lost('GET', path, this.target, err)));
      res.on('close', () => finish(res.complete ? undefined : lost('GET', path, this.target, new Error('the stream broke off'))));
    });
  }

  #send(
    method: string,
    path: string,
    options: RequestOptions,
    body: Buffer | undefined,
    accept: string,
    signal?: AbortSignal,
  ): Promise<http.IncomingMessage> {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(options.query ?? {})) if (v !== undefined) query.set(k, String(v));
    const fullPath = apiBase + path + (query.size > 0 ? `?${query.toString()}` : '');
    const headers: http.OutgoingHttpHeaders = { accept };
    if (body) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = body.length;
    }
    const address = this.address;
    let req: http.ClientRequest;
    if (address.kind === 'unix') {
      req = http.request({ socketPath: address.socketPath, path: fullPath, method, headers, agent: false, signal });
    } else {
      const url = new URL(address.origin);
      const token = options.token ?? address.token;
      if (token) headers.authorization = `Bearer ${token}`;
      const common = { host: url.hostname, port: url.port || undefined, path: fullPath, method, headers, agent: false as const, signal };
      req =
        url.protocol === 'http:'
          ? http.request(common)
          : https.request({
              ...common,
              ...(address.caPem ? { ca: address.caPem } : {}),
              ...(isIP(url.hostname.replace(/^\[|\]$/g, '')) ? {} : { servername: url.hostname }),
            });
    }
    return new Promise((resolve, reject) => {
      req.on('response', resolve);
      req.on('error', (err) => reject(this.#connectError(err, method, path)));
      req.end(body);
    });
  }

  #connectError(err: Error, method: string, path: string): ApiError {
    const code = (err as NodeJS.ErrnoException).code ?? '';
    if (err.name === 'AbortError') return new ApiError(`${method} ${path}: aborted`, { status: 0, kind: 'internal', cause: err });
    if (code.startsWith('ERR_TLS') || /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|SIGNATURE/.test(code)) {
      return new ApiError(`the TLS certificate of ${this.target} is not trusted (${code})`, {
        status: 0,
        kind: 'unauthorized',
        cause: err,
        hint:
          this.address.kind === 'tcp' && this.address.caPem
            ? 'the server is not signed by the CA you trusted: if its CA changed on purpose, check the new fingerprint and run `bulwark login URL` again'
            : 'run `bulwark login URL` to check and trust the server\'s CA',
      });
    }
    return lost(method, path, this.target, err);
  }
}

function lost(method: string, path: string, target: string, cause: unknown): ApiError {
  const code = (cause as NodeJS.ErrnoException).code;
  const hint =
    code === 'ENOENT' || code === 'ECONNREFUSED'
      ? 'is the server running? start it with `bulwark server`'
      : 'check that the server is running and reachable';
  return new ApiError(`cannot reach the Bulwark server at ${target} (${method} ${path}: ${code ?? (cause as Error).message})`, {
    status: 0,
    kind: 'unavailable',
    hint,
    cause,
    connectionLost: code === undefined || connectionCodes.has(code),
  });
}

function readAll(res: http.IncomingMessage, method: string, path: string, target: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    res.on('data', (c: Buffer) => chunks.push(c));
    res.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    res.on('error', (err) => reject(lost(method, path, target, err)));
  });
}

interface ErrorBody {
  error?: { kind?: string; message?: string; hint?: string; field?: string };
  message?: string;
}

/** The server's error reply as an ApiError: its message, hint and field, kind from the body. */
export function errorOfReply(status: number, text: string, method: string, path: string): ApiError {
  let body: ErrorBody = {};
  try {
    body = JSON.parse(text) as ErrorBody;
  } catch {
    // not JSON: fall back to the status line
  }
  const e = body.error;
  const claimed = e?.kind as ErrorKind | undefined;
  const kind = claimed && kinds.includes(claimed) ? claimed : errorKindOfStatus(status);
  const message = e?.message ?? body.message ?? (text.trim().slice(0, 200) || `${method} ${path} failed with HTTP ${status}`);
  let hint = e?.hint;
  if (status === 401) hint ??= 'log in with `bulwark login URL` (sessions expire; log in again when yours has)';
  if (status === 409 && /changed by someone else/i.test(message)) hint ??= 'show it again to get the current version, then repeat your edit';
  return new ApiError(message, { status, kind, hint, field: e?.field });
}

/** What `bulwark login` learns about a server's certificate before trusting it. */
export interface PeerCa {
  /** PEM of the CA that issued the server's certificate (the top of the chain it sent). */
  caPem: string;
  caFingerprint: string;
  subject: string;
}

/**
 * Reads the CA of a server before trusting it: the top of the certificate chain the server sends
 * when it sends its CA, else the CA from `GET /api/v1/agents/ca` (public, also used by agents),
 * accepted only when it really issued the certificate the server presented. The caller compares
 * the fingerprint (computed here, never taken from the server) with what the user expects; after
 * that every connection verifies against this CA.
 */
export async function fetchPeerCa(origin: string, timeoutMs = 15_000): Promise<PeerCa> {
  const url = new URL(origin);
  if (url.protocol !== 'https:') {
    throw new BulwarkError(`${origin} is not an https:// URL`, { kind: 'invalid', hint: 'the TCP API always uses TLS: use https://HOST:PORT' });
  }
  const host = url.hostname.replace(/^\[|\]$/g, '');
  const unreachable = (err: unknown): BulwarkError =>
    err instanceof BulwarkError ? err : new BulwarkError(`cannot reach ${origin}`, { kind: 'unavailable', cause: err, hint: 'check the URL and that the server listens there' });
  const reply = await new Promise<{ chain: X509Certificate[]; body: string; status: number }>((resolve, reject) => {
    const req = https.request({
      host,
      port: Number(url.port || 443),
      path: `${apiBase}/agents/ca`,
      method: 'GET',
      agent: false,
      rejectUnauthorized: false, // nothing is trusted from this reply until checked below
      timeout: timeoutMs,
      ...(isIP(host) ? {} : { servername: host }),
    });
    req.on('timeout', () => req.destroy(new Error(`no reply within ${timeoutMs / 1000} s`)));
    req.on('error', (err) => reject(unreachable(err)));
    req.on('response', (res) => {
      const chain: X509Certificate[] = [];
      let cert: tls.DetailedPeerCertificate | undefined = (res.socket as tls.TLSSocket).getPeerCertificate(true);
      const seen = new Set<string>();
      while (cert?.raw && !seen.has(cert.fingerprint256)) {
        seen.add(cert.fingerprint256);
        chain.push(new X509Certificate(cert.raw));
        cert = cert.issuerCertificate;
      }
      readAll(res, 'GET', '/agents/ca', origin).then((body) => resolve({ chain, body, status: res.statusCode ?? 0 }), reject);
    });
    req.end();
  });
  const leaf = reply.chain[0];
  if (!leaf) throw new BulwarkError(`${origin} presented no certificate`, { kind: 'unavailable' });
  const top = reply.chain.at(-1)!;
  let ca: X509Certificate | undefined = reply.chain.length > 1 && top.ca ? top : undefined;
  if (!ca && reply.status === 200) {
    try {
      ca = new X509Certificate((JSON.parse(reply.body) as { caCertPem: string }).caCertPem);
    } catch {
      ca = undefined;
    }
  }
  if (!ca) {
    throw new BulwarkError(`${origin} did not send the CA that issued its certificate`, {
      kind: 'unavailable',
      hint: 'is this a Bulwark server? Its CA is <data>/pki/ca.crt on the server host',
    });
  }
  if (!ca.ca || !leaf.checkIssued(ca) || !leaf.verify(ca.publicKey)) {
    throw new BulwarkError(`the certificate of ${origin} was not issued by the CA it offers (${ca.subject.replace(/\n/g, ', ')})`, {
      kind: 'forbidden',
      hint: 'someone may be intercepting the connection; do not log in',
    });
  }
  return { caPem: ca.toString(), caFingerprint: ca.fingerprint256, subject: ca.subject.replace(/\n/g, ', ') };
}

/** "ab cd:EF…" -> "AB:CD:EF…", so fingerprints compare whatever way the user copied them. */
export function normaliseFingerprint(value: string): string {
  const hex = value.replace(/^sha256[:=]/i, '').replace(/[^0-9a-f]/gi, '').toUpperCase();
  return hex.match(/.{1,2}/g)?.join(':') ?? '';
}

export interface ReconnectOptions {
  /** How long a lost connection may last before giving up (the server keeps sessions 5 min). */
  limitMs: number;
  onRetry?: (err: ApiError, delayMs: number) => void;
  sleep?: (ms: number) => Promise<void>;
  now?: () => number;
}

/**
 * Backoff for a console that lost its server: `failed(err)` waits before the next try (0.5 s,
 * doubling up to 15 s) or throws once the connection has been gone for `limitMs`, or at once
 * when the error is not a lost connection; `reachable()` resets after any success.
 */
export class Reconnect {
  readonly #opts: ReconnectOptions;
  #since: number | undefined;
  #delay = 500;

  constructor(opts: ReconnectOptions) {
    this.#opts = opts;
  }

  reachable(): void {
    this.#since = undefined;
    this.#delay = 500;
  }

  async failed(err: unknown): Promise<void> {
    if (!(err instanceof ApiError) || !err.connectionLost) throw err;
    const now = this.#opts.now ?? Date.now;
    this.#since ??= now();
    const left = this.#since + this.#opts.limitMs - now();
    if (left <= 0) {
      throw new ApiError(`lost the connection to the server for ${Math.round(this.#opts.limitMs / 1000)} s: giving up`, {
        status: 0,
        kind: 'unavailable',
        cause: err,
        hint: 'the work goes on on the server; look at it again with `bulwark session list` once it is reachable',
      });
    }
    const wait = Math.min(this.#delay, left);
    this.#opts.onRetry?.(err, wait);
    await (this.#opts.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms))))(wait);
    this.#delay = Math.min(this.#delay * 2, 15_000);
  }
}

/** Runs `attempt` again while it fails with a lost connection, for up to `limitMs`. */
export async function withReconnect<T>(attempt: () => Promise<T>, opts: ReconnectOptions): Promise<T> {
  const reconnect = new Reconnect(opts);
  for (;;) {
    try {
      return await attempt();
    } catch (err) {
      await reconnect.failed(err);
    }
  }
}

/** Resolves the server (see resolveServer) and returns a client for it. */
export async function connect(options: ResolveOptions = {}): Promise<ApiClient> {
  return new ApiClient(await resolveServer(options));
}
