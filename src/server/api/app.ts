// The REST API (/api/v1) as a Fastify instance: TypeBox schemas on every route, OpenAPI at
// /api/v1/openapi.json, browsable docs at /api/docs, authentication per transport and role
// checks per route. Controllers are thin: they call services and map errors.
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import Fastify, { type FastifyInstance, type FastifyPluginAsync, type FastifyRequest } from 'fastify';
import { BulwarkError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { ServiceContext } from '../services/common.js';
import * as infra from '../services/infrastructure.js';
import * as jobs from '../services/jobs.js';
import * as m from '../services/model.js';
import type { JobRunner } from '../services/runner.js';
import * as sessions from '../services/sessions.js';
import * as users from '../services/users.js';
import { errorBody, makeErrorHandler } from './errors.js';

const log = logger('api');

export const apiPrefix = '/api/v1';

/** How the caller reached the server: the unix socket (local administrator) or TCP (token). */
export type Transport = 'socket' | 'tcp';

export interface ConfigBackupApi {
  backup(repository: string | undefined): Promise<{ path: string }>;
  restore(path: string): Promise<{ restoredFrom: string }>;
}

export interface ApiOptions {
  ctx: ServiceContext;
  runner: JobRunner;
  events: sessions.SessionEvents;
  /** The restores this server runs as sessions (`session stop` of a disk restore); absent: refused as not running. */
  restores?: sessions.RunningRestores | undefined;
  transport: Transport;
  version: string;
  configBackup?: ConfigBackupApi | undefined;
  /** Extra plugins registered under /api/v1 (e.g. the agent link). */
  plugins?: FastifyPluginAsync[] | undefined;
  /** TLS options for the TCP transport (key, cert, and the CA to request agent client certificates). */
  https?: { key: string; cert: string; ca?: string[]; requestCert?: boolean; rejectUnauthorized?: boolean } | undefined;
  /** Called after jobs change (create, edit, enable, disable, clone, delete): the scheduler reloads. */
  onJobsChanged?: (() => Promise<void>) | undefined;
  /** Makes a one-time agent enrollment token (the agent link's format); absent: 503. */
  createEnrollmentToken?: ((o: { name?: string | undefined; ttlSeconds?: number | undefined }) => Promise<{ token: string; expiresAt: string; name?: string }>) | undefined;
}

declare module 'fastify' {
  interface FastifyRequest {
    principal?: users.Principal;
  }
  interface FastifyContextConfig {
    /** What the caller's role must allow; `public` = no authentication at all. */
    permission?: users.Permission | 'public' | 'authenticated';
  }
}

const Items = <T extends TSchema>(t: T) => Type.Object({ items: Type.Array(t) });
const NameParam = Type.Object({ name: Type.String({ description: 'name or id' }) });
const IdParam = Type.Object({ id: Type.String() });
const errorReplies = { 400: m.ErrorBody, 401: m.ErrorBody, 403: m.ErrorBody, 404: m.ErrorBody, 409: m.ErrorBody };
const localAdmin: users.Principal = { user: 'local-administrator', role: 'administrator', via: 'socket' };

function bearer(req: FastifyRequest): string | undefined {
  const h = req.headers.authorization;
  if (!h) return undefined;
  const match = /^Bearer\s+(\S+)$/i.exec(h);
  return match?.[1];
}

/** Builds the API for one transport. Both transports share services, runner and events. */
export async function buildApi(opts: ApiOptions): Promise<FastifyInstance> {
  const base = {
    logger: false,
    ajv: { customOptions: { removeAdditional: false, coerceTypes: 'array' as const, useDefaults: true, allErrors: true } },
  };
  // One instance type for both transports: the https server is a drop-in for the http one here.
  const app = (opts.https ? (Fastify({ ...base, https: opts.https }) as unknown as FastifyInstance) : Fastify(base)).withTypeProvider<TypeBoxTypeProvider>();
  const { ctx } = opts;

  app.setErrorHandler(makeErrorHandler(log));
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send({ error: { kind: 'not-found', message: `no such route: ${req.method} ${req.url.split('?')[0]}` } });
  });

  await app.register(swagger, {
    openapi: {
      info: { title: 'Bulwark backup server API', version: opts.version, description: 'See docs/api.md.' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
  });
  await app.register(swaggerUi, { routePrefix: '/api/docs' });
  app.get(`${apiPrefix}/openapi.json`, { schema: { hide: true }, config: { permission: 'public' } }, async () => app.swagger());

  // A POST without a body (e.g. `/jobs/x/run`) means "no options": validate it as {}.
  app.addHook('preValidation', async (req) => {
    if ((req.body === undefined || req.body === null) && req.routeOptions.schema?.body) req.body = {};
  });

  // Authentication (who) then authorization (may they) for every route.
  app.addHook('onRequest', async (req) => {
    const permission = req.routeOptions.config?.permission;
    const isDocs = req.url.startsWith('/api/docs');
    // Unknown routes are not exempt: over TCP they answer 401 too, so nothing is probed without a token.
    if (permission === 'public' || isDocs) return;
    if (opts.transport === 'socket') {
      req.principal = localAdmin;
    } else {
      const token = bearer(req);
      if (!token) throw new BulwarkError('authentication required: send Authorization: Bearer <token>', { kind: 'unauthorized', hint: 'log in first: bulwark login URL' });
      req.principal = await users.authenticate(ctx, token);
    }
    if (permission && permission !== 'authenticated' && !users.can(req.principal.role, permission)) {
      throw new BulwarkError(`role ${req.principal.role} of user ${req.principal.user} may not do this (needs ${permission})`, { kind: 'forbidden' });
    }
  });

  await app.register(
    async (api) => {
      const r = api.withTypeProvider<TypeBoxTypeProvider>();

      r.get('/health', { config: { permission: 'public' }, schema: { tags: ['server'], response: { 200: Type.Object({ status: Type.Literal('ok'), version: Type.String() }) } } }, async () => ({
        status: 'ok' as const,
        version: opts.version,
      }));

      // ---- auth
      const Login = Type.Object({ user: Type.String({ minLength: 1 }), password: Type.String({ minLength: 1 }) }, { additionalProperties: false });
      const LoginReply = Type.Object({ token: Type.String(), expiresAt: Type.String(), user: Type.String(), role: m.Role });
      r.post('/auth/login', { config: { permission: 'public' }, schema: { tags: ['auth'], security: [], body: Login, response: { 200: LoginReply, ...errorReplies } } }, async (req) =>
        users.login(ctx, req.body.user, req.body.password),
      );
      r.post('/auth/logout', { config: { permission: 'authenticated' }, schema: { tags: ['auth'], response: { 204: Type.Null() } } }, async (req, reply) => {
        if (req.principal?.tokenHash) await users.logout(ctx, req.principal.tokenHash);
        return reply.status(204).send(null);
      });
      const Whoami = Type.Object({ user: Type.String(), role: m.Role, via: Type.Union([Type.Literal('token'), Type.Literal('socket')]) });
      r.get('/auth/whoami', { config: { permission: 'authenticated' }, schema: { tags: ['auth'], response: { 200: Whoami } } }, async (req) => {
        const p = req.principal ?? localAdmin;
        return { user: p.user, role: p.role, via: p.via };
      });

      // ---- configuration resources: the same five routes each
      interface Crud<T extends TSchema, C extends TSchema, P extends TSchema> {
        path: string;
        tag: string;
        item: T;
        create?: { body: C; fn: (b: Static<C>) => Promise<Static<T>> };
        patch: { body: P; fn: (name: string, b: Static<P>) => Promise<Static<T>> };
        list: () => Promise<Array<Static<T>>>;
        get: (name: string) => Promise<Static<T>>;
        del: (name: string) => Promise<void>;
        readPermission?: users.Permission;
      }
      function crud<T extends TSchema, C extends TSchema, P extends TSchema>(c: Crud<T, C, P>): void {
        const read = c.readPermission ?? 'read';
        api.get(c.path, { config: { permission: read }, schema: { tags: [c.tag], response: { 200: Items(c.item), ...errorReplies } } }, async () => ({ items: await c.list() }));
        api.get(`${c.path}/:name`, { config: { permission: read }, schema: { tags: [c.tag], params: NameParam, response: { 200: c.item, ...errorReplies } } }, async (req) =>
          c.get((req.params as { name: string }).name),
        );
        if (c.create) {
          const create = c.create;
          api.post(c.path, { config: { permission: 'configure' }, schema: { tags: [c.tag], body: create.body, response: { 201: c.item, ...errorReplies } } }, async (req, reply) =>
            reply.status(201).send(await create.fn(req.body as Static<C>)),
          );
        }
        api.patch(`${c.path}/:name`, { config: { permission: 'configure' }, schema: { tags: [c.tag], params: NameParam, body: c.patch.body, response: { 200: c.item, ...errorReplies } } }, async (req) =>
          c.patch.fn((req.params as { name: string }).name, req.body as Static<P>),
        );
        api.delete(`${c.path}/:name`, { config: { permission: 'configure' }, schema: { tags: [c.tag], params: NameParam, response: { 204: Type.Null(), ...errorReplies } } }, async (req, reply) => {
          await c.del((req.params as { name: string }).name);
          return reply.status(204).send();
        });
      }

      crud({
        path: '/hosts',
        tag: 'hosts',
        item: m.Host,
        create: { body: m.HostCreate, fn: (b) => infra.createHost(ctx, b) },
        patch: { body: m.HostPatch, fn: (n, b) => infra.updateHost(ctx, n, b) },
        list: () => infra.listHosts(ctx),
        get: (n) => infra.getHost(ctx, n),
        del: (n) => infra.deleteHost(ctx, n),
      });
      const EnrollmentToken = Type.Object({ token: Type.String(), expiresAt: Type.String(), name: Type.Optional(Type.String()) });
      const TokenRequest = Type.Object(
        {
          name: Type.Optional(Type.String({ description: 'only an agent of this name may enroll (and may replace one of that name)' })),
          ttlSeconds: Type.Optional(Type.Integer({ minimum: 60, maximum: 30 * 24 * 3600 })),
        },
        { additionalProperties: false },
      );
      r.post(
        '/agents/tokens',
        { config: { permission: 'configure' }, schema: { tags: ['agents'], body: Type.Optional(TokenRequest), response: { 201: EnrollmentToken, ...errorReplies } } },
        async (req, reply) => {
          if (!opts.createEnrollmentToken) throw new BulwarkError('agent enrollment is not available on this server', { kind: 'unavailable' });
          return reply.status(201).send(await opts.createEnrollmentToken({ name: req.body?.name, ttlSeconds: req.body?.ttlSeconds }));
        },
      );
      crud({
        path: '/agents',
        tag: 'agents',
        item: m.Agent,
        patch: { body: m.AgentPatch, fn: (n, b) => infra.updateAgent(ctx, n, b) },
        list: () => infra.listAgents(ctx),
        get: (n) => infra.getAgent(ctx, n),
        del: (n) => infra.deleteAgent(ctx, n),
      });
      crud({
        path: '/repositories',
        tag: 'repositories',
        item: m.Repository,
        create: { body: m.RepositoryCreate, fn: (b) => infra.createRepository(ctx, b) },
        patch: { body: m.RepositoryPatch, fn: (n, b) => infra.updateRepository(ctx, n, b) },
        list: () => infra.listRepositories(ctx),
        get: (n) => infra.getRepository(ctx, n),
        del: (n) => infra.deleteRepository(ctx, n),
      });
      const jobsChanged = async <T>(result: T): Promise<T> => {
        await opts.onJobsChanged?.();
        return result;
      };
      crud({
        path: '/jobs',
        tag: 'jobs',
        item: m.Job,
        create: { body: m.JobCreate, fn: async (b) => jobsChanged(await jobs.createJob(ctx, b)) },
        patch: { body: m.JobPatch, fn: async (n, b) => jobsChanged(await jobs.updateJob(ctx, n, b)) },
        list: () => jobs.listJobs(ctx),
        get: (n) => jobs.getJob(ctx, n),
        del: async (n) => jobsChanged(await jobs.deleteJob(ctx, n)),
      });
      crud({
        path: '/users',
        tag: 'users',
        item: m.User,
        create: { body: m.UserCreate, fn: (b) => users.createUser(ctx, b) },
        patch: { body: m.UserPatch, fn: (n, b) => users.updateUser(ctx, n, b) },
        list: () => users.listUsers(ctx),
        get: (n) => users.getUser(ctx, n),
        del: (n) => users.deleteUser(ctx, n),
        readPermission: 'configure',
      });

      // ---- job actions
      const RunBody = Type.Object({ full: Type.Optional(Type.Boolean()) }, { additionalProperties: false });
      r.post(
        '/jobs/:name/run',
        { config: { permission: 'run-jobs' }, schema: { tags: ['jobs'], params: NameParam, body: Type.Optional(RunBody), response: { 202: Type.Object({ sessionId: Type.String() }), ...errorReplies } } },
        async (req, reply) => reply.status(202).send(await opts.runner.run(req.params.name, { full: req.body?.full ?? false })),
      );
      for (const enabled of [true, false]) {
        r.post(
          `/jobs/:name/${enabled ? 'enable' : 'disable'}`,
          { config: { permission: 'configure' }, schema: { tags: ['jobs'], params: NameParam, response: { 200: m.Job, ...errorReplies } } },
          async (req) => jobsChanged(await jobs.setJobEnabled(ctx, req.params.name, enabled)),
        );
      }
      r.post(
        '/jobs/:name/clone',
        { config: { permission: 'configure' }, schema: { tags: ['jobs'], params: NameParam, body: Type.Object({ name: m.Name }, { additionalProperties: false }), response: { 201: m.Job, ...errorReplies } } },
        async (req, reply) => reply.status(201).send(await jobsChanged(await jobs.cloneJob(ctx, req.params.name, req.body.name))),
      );

      // ---- sessions
      const SessionQuery = Type.Object({
        job: Type.Optional(Type.String()),
        kind: Type.Optional(Type.String({ description: 'only sessions of this kind: backup, health-check, restore-vm, restore-disk, restore-files, instant-recovery' })),
        limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000 })),
      });
      r.get('/sessions', { config: { permission: 'read' }, schema: { tags: ['sessions'], querystring: SessionQuery, response: { 200: Items(m.Session), ...errorReplies } } }, async (req) => ({
        items: await sessions.listSessions(ctx, req.query),
      }));
      r.get('/sessions/:id', { config: { permission: 'read' }, schema: { tags: ['sessions'], params: IdParam, response: { 200: m.Session, ...errorReplies } } }, async (req) =>
        sessions.getSession(ctx, req.params.id),
      );
      r.post(
        '/sessions/:id/stop',
        { config: { permission: 'run-jobs' }, schema: { tags: ['sessions'], params: IdParam, response: { 200: m.Session, ...errorReplies } } },
        async (req) => {
          // Job runs through the engine; disk restores of this process through `restores`; other kinds say what stops them.
          await sessions.stopSession(ctx, { runner: opts.runner, restores: opts.restores }, req.params.id, req.principal?.user ?? 'a user');
          return sessions.getSession(ctx, req.params.id);
        },
      );
      r.get(
        '/sessions/:id/events',
        {
          config: { permission: 'read' },
          schema: {
            tags: ['sessions'],
            params: IdParam,
            description: 'Server-sent events: `event: session`, data = the session object, on every change; the stream ends when the session ends.',
            produces: ['text/event-stream'],
          },
        },
        async (req, reply) => {
          const id = req.params.id;
          const first = await sessions.getSession(ctx, id); // 404 before the stream starts
          reply.hijack();
          const res = reply.raw;
          res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
          let last = '';
          let ended = false;
          let pending = Promise.resolve();
          const send = (s: m.Session): void => {
            const data = JSON.stringify(s);
            if (data !== last) res.write(`event: session\ndata: ${data}\n\n`);
            last = data;
          };
          const finish = () => {
            if (ended) return;
            ended = true;
            unsubscribe();
            clearInterval(keepAlive);
            res.end();
          };
          const refresh = () => {
            pending = pending
              .then(async () => {
                if (ended) return;
                const s = await sessions.getSession(ctx, id);
                send(s);
                if (sessions.isFinal(s.state)) finish();
              })
              .catch((err: unknown) => {
                res.write(`event: error\ndata: ${JSON.stringify(errorBody(err).body)}\n\n`);
                finish();
              });
          };
          const unsubscribe = opts.events.subscribe((changed) => {
            if (changed === id) refresh();
          });
          const keepAlive = setInterval(() => res.write(': keep-alive\n\n'), 15_000);
          req.raw.on('close', finish);
          send(first);
          if (sessions.isFinal(first.state)) finish();
          else refresh(); // catch a change between the first read and the subscription
        },
      );

      // ---- restore points
      r.get(
        '/restore-points',
        { config: { permission: 'read-restore-points' }, schema: { tags: ['restore points'], querystring: Type.Object({ vm: Type.Optional(Type.String()) }), response: { 200: Items(m.RestorePoint) } } },
        async (req) => ({ items: await sessions.listRestorePoints(ctx, req.query) }),
      );
      r.get(
        '/restore-points/:id',
        { config: { permission: 'read-restore-points' }, schema: { tags: ['restore points'], params: IdParam, response: { 200: m.RestorePoint, ...errorReplies } } },
        async (req) => sessions.getRestorePoint(ctx, req.params.id),
      );

      // ---- configuration backup
      const cb = opts.configBackup;
      r.post(
        '/config/backup',
        {
          config: { permission: 'configure' },
          schema: {
            tags: ['configuration'],
            body: Type.Optional(Type.Object({ repository: Type.Optional(Type.String()) }, { additionalProperties: false })),
            response: { 200: Type.Object({ path: Type.String() }), ...errorReplies },
          },
        },
        async (req) => {
          if (!cb) throw new BulwarkError('configuration backup is not available on this server', { kind: 'unavailable' });
          return cb.backup(req.body?.repository);
        },
      );
      r.post(
        '/config/restore',
        {
          config: { permission: 'configure' },
          schema: {
            tags: ['configuration'],
            body: Type.Object({ path: Type.String({ minLength: 1, description: 'a bulwark-config-*.sqlite|sql file on the server' }) }, { additionalProperties: false }),
            response: { 200: Type.Object({ restoredFrom: Type.String() }), ...errorReplies },
          },
        },
        async (req) => {
          if (!cb) throw new BulwarkError('configuration restore is not available on this server', { kind: 'unavailable' });
          return cb.restore(req.body.path);
        },
      );

      for (const plugin of opts.plugins ?? []) await api.register(plugin);
    },
    { prefix: apiPrefix },
  );
  return app;
}
