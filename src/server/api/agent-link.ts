// The server's end of the agent link (docs/formats/agent-link.md): one-time enrollment tokens,
// `POST /agents/enroll` (token + CSR -> certificate from the server CA) and heartbeats over
// mutually authenticated TLS. A Fastify plugin registered under /api/v1; persistence is the
// AgentLinkStore port, which the server implements over its database.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import { Type, type Static } from '@sinclair/typebox';
import type { FastifyPluginAsync, FastifyRequest } from 'fastify';
import { BulwarkError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { assertAgentName, issueAgentCertificate, type ServerPki } from '../pki/index.js';

const log = logger('agent-link');

// ---------------------------------------------------------------------------------------------
// Port

export interface EnrollmentTokenRecord {
  id: string;
  /** SHA-256 of the token's secret part, lower-case hex. */
  tokenHash: string;
  expiresAt: Date;
  createdAt: Date;
  usedAt?: Date | undefined;
  /** When set, only this agent name may enroll with the token (and may replace an agent of that name). */
  agentName?: string | undefined;
}

export type AgentLinkState = 'pending' | 'online' | 'offline' | 'revoked';

export interface RegisteredAgent {
  name: string;
  /** SHA-256 of the agent's current certificate (`AB:CD:…`); null for an agent without one. */
  certFingerprint: string | null;
  state: AgentLinkState;
}

export interface EnrolledAgent {
  name: string;
  certFingerprint: string;
  certSerial: string;
  hostname: string;
  version: string;
  cores: number;
  enrolledAt: Date;
  /**
   * True when the token was made for this agent's name (re-enrollment): an existing agent of that
   * name is replaced. Otherwise the store must refuse a name that exists (two agents enrolling one
   * new name at once: the second is refused, never silently takes the first one's place).
   */
  replaceExisting: boolean;
}

/** The error a store throws when an unbound enrollment meets an existing agent name. */
export function agentNameTaken(name: string): BulwarkError {
  return new BulwarkError(`an agent named ${name} is already registered`, {
    kind: 'conflict',
    context: { agent: name },
    hint: `choose another name, or re-enroll it with a token made by \`bulwark agent token --name ${name}\``,
  });
}

export interface RepositorySpace {
  path: string;
  freeBytes?: number | undefined;
  totalBytes?: number | undefined;
  /** Why the agent could not measure the path. */
  error?: string | undefined;
}

export interface AgentHealthReport {
  version: string;
  hostname: string;
  cores: number;
  uptimeSeconds?: number | undefined;
  repositories: RepositorySpace[];
}

/** What the agent link needs from the configuration database. */
export interface AgentLinkStore {
  saveEnrollmentToken(token: EnrollmentTokenRecord): Promise<void>;
  findEnrollmentToken(id: string): Promise<EnrollmentTokenRecord | undefined>;
  /** Marks the token used if it is not yet; false when it already was. Must be atomic. */
  markEnrollmentTokenUsed(id: string, usedAt: Date): Promise<boolean>;
  findAgent(name: string): Promise<RegisteredAgent | undefined>;
  /** Creates the agent, or (re-enrollment with a token bound to its name) replaces its certificate. State becomes online. */
  saveEnrolledAgent(agent: EnrolledAgent): Promise<void>;
  /** Records health and last-seen time; state becomes online (unless revoked). */
  recordHeartbeat(name: string, report: AgentHealthReport, seenAt: Date): Promise<void>;
  /** Folders of the repositories this agent owns (it reports their free space). */
  repositoryPathsOf(name: string): Promise<string[]>;
}

// ---------------------------------------------------------------------------------------------
// Tokens

export const enrollmentTokenPrefix = 'bwe1';
const defaultTokenTtlSeconds = 24 * 3600;

export interface CreatedEnrollmentToken {
  /** The text to give the agent: `bwe1.<id>.<secret>.<ca fingerprint hex>`. Shown once. */
  token: string;
  id: string;
  expiresAt: Date;
  name?: string | undefined;
}

/**
 * Creates a one-time enrollment token (the body of `POST /agents/tokens`). The store keeps only
 * a hash of the secret.
 */
export async function createEnrollmentToken(
  store: Pick<AgentLinkStore, 'saveEnrollmentToken'>,
  pki: Pick<ServerPki, 'caFingerprint'>,
  opts: { name?: string | undefined; ttlSeconds?: number | undefined; now?: Date | undefined } = {},
): Promise<CreatedEnrollmentToken> {
  if (opts.name !== undefined) assertAgentName(opts.name);
  const now = opts.now ?? new Date();
  const ttl = opts.ttlSeconds ?? defaultTokenTtlSeconds;
  if (!(ttl > 0)) throw new BulwarkError(`token lifetime ${ttl} s is not positive`, { kind: 'invalid', context: { field: 'ttlSeconds' } });
  const id = randomBytes(8).toString('hex');
  const secret = randomBytes(32).toString('base64url');
  const expiresAt = new Date(now.getTime() + ttl * 1000);
  await store.saveEnrollmentToken({ id, tokenHash: sha256Hex(secret), expiresAt, createdAt: now, agentName: opts.name });
  const ca = pki.caFingerprint.replaceAll(':', '').toLowerCase();
  return { token: `${enrollmentTokenPrefix}.${id}.${secret}.${ca}`, id, expiresAt, name: opts.name };
}

export interface ParsedEnrollmentToken {
  id: string;
  secret: string;
  /** The CA fingerprint in `AB:CD:…` form. */
  caFingerprint: string;
}

/** Splits a token into its parts; throws `unauthorized` naming what is wrong. */
export function parseEnrollmentToken(token: string): ParsedEnrollmentToken {
  const m = /^bwe1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\.([0-9a-f]{64})$/.exec(token.trim());
  if (!m) {
    throw new BulwarkError('the enrollment token is malformed', {
      kind: 'unauthorized',
      hint: 'copy the whole token printed by `bulwark agent token` (it starts with "bwe1.")',
    });
  }
  return { id: m[1]!, secret: m[2]!, caFingerprint: m[3]!.toUpperCase().match(/../g)!.join(':') };
}

// ---------------------------------------------------------------------------------------------
// TLS

/**
 * TLS options for the server's TCP listener so agents can authenticate with their certificates
 * while consoles connect without one: the client certificate is requested, not required; the
 * heartbeat route checks it.
 */
export function agentLinkTlsOptions(pki: Pick<ServerPki, 'serverKeyPem' | 'serverCertPem' | 'caCertPem'>): {
  key: string;
  cert: string;
  ca: string[];
  requestCert: true;
  rejectUnauthorized: false;
} {
  return { key: pki.serverKeyPem, cert: pki.serverCertPem, ca: [pki.caCertPem], requestCert: true, rejectUnauthorized: false };
}

// ---------------------------------------------------------------------------------------------
// Plugin

export interface AgentLinkOptions {
  store: AgentLinkStore;
  pki: Pick<ServerPki, 'caCertPem' | 'caKeyPem' | 'caFingerprint'>;
  /** How often agents send heartbeats (default 30). */
  heartbeatSeconds?: number | undefined;
  now?: (() => Date) | undefined;
}

const ErrorBody = Type.Object({ error: Type.Object({ kind: Type.String(), message: Type.String(), hint: Type.Optional(Type.String()), field: Type.Optional(Type.String()) }) });
const errorReplies = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 409: ErrorBody };

export const CaReply = Type.Object({ caCertPem: Type.String(), caFingerprint: Type.String() });
export const EnrollRequest = Type.Object(
  {
    token: Type.String({ minLength: 1, maxLength: 512 }),
    name: Type.String({ minLength: 1, maxLength: 63 }),
    csr: Type.String({ minLength: 1, maxLength: 16384 }),
    hostname: Type.Optional(Type.String({ maxLength: 255 })),
    version: Type.Optional(Type.String({ maxLength: 64 })),
    cores: Type.Optional(Type.Integer({ minimum: 0, maximum: 65536 })),
  },
  { additionalProperties: false },
);
export const EnrollReply = Type.Object({
  name: Type.String(),
  certificate: Type.String(),
  caCertificate: Type.String(),
  caFingerprint: Type.String(),
  heartbeatSeconds: Type.Integer(),
});
export const HeartbeatRequest = Type.Object(
  {
    version: Type.String({ maxLength: 64 }),
    hostname: Type.String({ maxLength: 255 }),
    cores: Type.Integer({ minimum: 0, maximum: 65536 }),
    uptimeSeconds: Type.Optional(Type.Number({ minimum: 0 })),
    repositories: Type.Array(
      Type.Object(
        {
          path: Type.String({ maxLength: 4096 }),
          freeBytes: Type.Optional(Type.Number({ minimum: 0 })),
          totalBytes: Type.Optional(Type.Number({ minimum: 0 })),
          error: Type.Optional(Type.String({ maxLength: 1024 })),
        },
        { additionalProperties: false },
      ),
      { maxItems: 256 },
    ),
  },
  { additionalProperties: false },
);
export const HeartbeatReply = Type.Object({ heartbeatSeconds: Type.Integer(), repositoryPaths: Type.Array(Type.String()), serverTime: Type.String() });

/**
 * Routes `GET /agents/ca`, `POST /agents/enroll`, `POST /agents/heartbeat` (public: they
 * authenticate by token and by client certificate). Register under the `/api/v1` prefix on the
 * TCP listener, whose TLS options must come from {@link agentLinkTlsOptions}.
 */
export function agentLinkPlugin(opts: AgentLinkOptions): FastifyPluginAsync {
  const now = opts.now ?? (() => new Date());
  const heartbeatSeconds = opts.heartbeatSeconds ?? 30;
  const { store, pki } = opts;

  return async (app) => {
    // Fastify config is typed by the server's API module; this plugin only sets `permission`.
    const publicRoute = { permission: 'public' } as Record<string, unknown>;

    app.get('/agents/ca', { config: publicRoute, schema: { tags: ['agents'], security: [], response: { 200: CaReply } } }, async () => ({
      caCertPem: pki.caCertPem,
      caFingerprint: pki.caFingerprint,
    }));

    app.post<{ Body: Static<typeof EnrollRequest> }>(
      '/agents/enroll',
      { config: publicRoute, schema: { tags: ['agents'], security: [], body: EnrollRequest, response: { 200: EnrollReply, ...errorReplies } } },
      async (req) => {
        const body = req.body;
        assertAgentName(body.name);
        const parsed = parseEnrollmentToken(body.token);
        const at = now();
        const record = await store.findEnrollmentToken(parsed.id);
        if (record === undefined || !sameHash(record.tokenHash, sha256Hex(parsed.secret))) {
          throw new BulwarkError('the enrollment token is not known to this server', { kind: 'unauthorized', hint: 'create a new one with `bulwark agent token`' });
        }
        if (record.usedAt !== undefined) {
          throw new BulwarkError(`the enrollment token was already used (${record.usedAt.toISOString()})`, {
            kind: 'unauthorized',
            hint: 'tokens work once; create a new one with `bulwark agent token`',
          });
        }
        if (record.expiresAt.getTime() <= at.getTime()) {
          throw new BulwarkError(`the enrollment token expired at ${record.expiresAt.toISOString()}`, {
            kind: 'unauthorized',
            hint: 'create a new one with `bulwark agent token`',
          });
        }
        if (record.agentName !== undefined && record.agentName !== body.name) {
          throw new BulwarkError(`the enrollment token is for agent ${record.agentName}, not ${body.name}`, {
            kind: 'conflict',
            context: { agent: body.name },
            hint: `enroll with --name ${record.agentName}, or create a token without a name`,
          });
        }
        const existing = await store.findAgent(body.name);
        if (existing !== undefined && record.agentName !== body.name) throw agentNameTaken(body.name);
        // Validate the CSR before spending the token, so a typo does not burn it.
        const issued = await issueAgentCertificate(pki, body.csr, body.name, { now: at });
        if (!(await store.markEnrollmentTokenUsed(record.id, at))) {
          throw new BulwarkError('the enrollment token was already used', { kind: 'unauthorized', hint: 'create a new one with `bulwark agent token`' });
        }
        await store.saveEnrolledAgent({
          name: body.name,
          certFingerprint: issued.fingerprint,
          certSerial: issued.serialNumber,
          hostname: body.hostname ?? '',
          version: body.version ?? '',
          cores: body.cores ?? 0,
          enrolledAt: at,
          replaceExisting: record.agentName === body.name,
        });
        log.info({ agent: body.name, hostname: body.hostname, reenrolled: existing !== undefined }, 'agent enrolled');
        return { name: body.name, certificate: issued.certPem, caCertificate: pki.caCertPem, caFingerprint: pki.caFingerprint, heartbeatSeconds };
      },
    );

    app.post<{ Body: Static<typeof HeartbeatRequest> }>(
      '/agents/heartbeat',
      { config: publicRoute, schema: { tags: ['agents'], security: [], body: HeartbeatRequest, response: { 200: HeartbeatReply, ...errorReplies } } },
      async (req) => {
        const name = await authenticateAgent(store, req);
        const seenAt = now();
        await store.recordHeartbeat(name, req.body, seenAt);
        return { heartbeatSeconds, repositoryPaths: await store.repositoryPathsOf(name), serverTime: seenAt.toISOString() };
      },
    );
  };
}

/**
 * The state to show for an agent: `offline` when an online agent has not been heard from for
 * three heartbeat intervals; otherwise what is stored.
 */
export function effectiveAgentState(stored: AgentLinkState, lastSeenAt: Date | null | undefined, now: Date, heartbeatSeconds = 30): AgentLinkState {
  if (stored !== 'online') return stored;
  if (lastSeenAt === null || lastSeenAt === undefined) return 'offline';
  return now.getTime() - lastSeenAt.getTime() > 3 * heartbeatSeconds * 1000 ? 'offline' : 'online';
}

/** The agent name of a request made with a valid, current agent certificate; throws otherwise. */
export async function authenticateAgent(store: Pick<AgentLinkStore, 'findAgent'>, req: FastifyRequest): Promise<string> {
  const socket = req.raw.socket as Partial<TLSSocket>;
  if (typeof socket.getPeerCertificate !== 'function') {
    throw new BulwarkError('agent requests need a TLS connection with the agent certificate', { kind: 'unauthorized' });
  }
  const peer = socket.getPeerCertificate();
  if (peer === null || Object.keys(peer).length === 0) {
    throw new BulwarkError('no agent certificate was presented', { kind: 'unauthorized', hint: 'enroll the agent first' });
  }
  if (socket.authorized !== true) {
    throw new BulwarkError(`the agent certificate was not issued by this server (${String(socket.authorizationError)})`, {
      kind: 'unauthorized',
      hint: 'the agent was enrolled with another server: enroll it again with a token from this one',
    });
  }
  const cn = peer.subject?.CN;
  const name = Array.isArray(cn) ? cn[0] : cn;
  if (name === undefined) throw new BulwarkError('the agent certificate names no agent', { kind: 'unauthorized' });
  const agent = await store.findAgent(name);
  if (agent === undefined) {
    throw new BulwarkError(`agent ${name} is not registered (it was removed)`, { kind: 'forbidden', context: { agent: name }, hint: 'enroll it again' });
  }
  if (agent.state === 'revoked') {
    throw new BulwarkError(`agent ${name} is revoked`, { kind: 'forbidden', context: { agent: name } });
  }
  if (agent.certFingerprint !== peer.fingerprint256) {
    throw new BulwarkError(`agent ${name} presented a certificate that is no longer its own (it was enrolled again)`, {
      kind: 'forbidden',
      context: { agent: name },
    });
  }
  return name;
}

function sha256Hex(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

function sameHash(a: string, b: string): boolean {
  const x = Buffer.from(a, 'hex');
  const y = Buffer.from(b, 'hex');
  return x.length === y.length && x.length > 0 && timingSafeEqual(x, y);
}

// ---------------------------------------------------------------------------------------------
// In-memory store (tests, and the reference for the database implementation)

export class InMemoryAgentLinkStore implements AgentLinkStore {
  readonly tokens = new Map<string, EnrollmentTokenRecord>();
  readonly agents = new Map<string, RegisteredAgent & Partial<EnrolledAgent> & { lastSeenAt?: Date; health?: AgentHealthReport }>();
  readonly repositoryPaths = new Map<string, string[]>();

  async saveEnrollmentToken(token: EnrollmentTokenRecord): Promise<void> {
    this.tokens.set(token.id, { ...token });
  }
  async findEnrollmentToken(id: string): Promise<EnrollmentTokenRecord | undefined> {
    const t = this.tokens.get(id);
    return t === undefined ? undefined : { ...t };
  }
  async markEnrollmentTokenUsed(id: string, usedAt: Date): Promise<boolean> {
    const t = this.tokens.get(id);
    if (t === undefined || t.usedAt !== undefined) return false;
    t.usedAt = usedAt;
    return true;
  }
  async findAgent(name: string): Promise<RegisteredAgent | undefined> {
    const a = this.agents.get(name);
    return a === undefined ? undefined : { name: a.name, certFingerprint: a.certFingerprint, state: a.state };
  }
  async saveEnrolledAgent(agent: EnrolledAgent): Promise<void> {
    if (this.agents.has(agent.name) && !agent.replaceExisting) throw agentNameTaken(agent.name);
    this.agents.set(agent.name, { ...agent, state: 'online' });
  }
  async recordHeartbeat(name: string, report: AgentHealthReport, seenAt: Date): Promise<void> {
    const a = this.agents.get(name);
    if (a === undefined) return;
    this.agents.set(name, { ...a, health: report, lastSeenAt: seenAt, state: a.state === 'revoked' ? 'revoked' : 'online' });
  }
  async repositoryPathsOf(name: string): Promise<string[]> {
    return this.repositoryPaths.get(name) ?? [];
  }
}
