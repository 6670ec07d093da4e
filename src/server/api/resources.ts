// Routes of resource scheduling: the global server settings (processing mode) and the network
// throttling rules (docs/resource-scheduling.md). `onChanged` tells the resource scheduler to read
// its configuration again.
import { Type, type Static, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { BulwarkError } from '../../common/errors.js';
import type { FastifyPluginAsync } from 'fastify';
import type { ServiceContext } from '../services/common.js';
import { ErrorBody } from '../services/model.js';
import { ServerSettings, ServerSettingsPatch, getSettings, updateSettings } from '../services/settings.js';
import {
  ThrottlingRule,
  ThrottlingRuleCreate,
  ThrottlingRulePatch,
  createThrottlingRule,
  deleteThrottlingRule,
  getThrottlingRule,
  listThrottlingRules,
  updateThrottlingRule,
} from '../services/throttling.js';

const errorReplies = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 404: ErrorBody, 409: ErrorBody };
const NameParam = Type.Object({ name: Type.String({ description: 'name or id' }) });

const SchedulerStatus = Type.Object({
  mode: Type.Union([Type.Literal('parallel'), Type.Literal('sequential')]),
  proxies: Type.Array(Type.Object({ name: Type.String(), online: Type.Boolean(), maxTasks: Type.Integer(), running: Type.Integer() })),
  repositories: Type.Array(Type.Object({ name: Type.String(), maxTasks: Type.Integer(), running: Type.Integer(), rateLimit: Type.Union([Type.Number({ description: 'bytes/s shared by its tasks' }), Type.Null()]) })),
  running: Type.Array(Type.Object({ taskId: Type.String(), jobId: Type.String(), proxy: Type.String(), repository: Type.String() })),
  queued: Type.Array(Type.String(), { description: 'task ids, oldest first' }),
});

export function resourcesPlugin(
  ctx: ServiceContext,
  onChanged: () => Promise<void> = async () => undefined,
  status?: () => Static<typeof SchedulerStatus>,
): FastifyPluginAsync {
  return async (app) => {
    const r = app.withTypeProvider<TypeBoxTypeProvider>();
    const changed = async <T>(result: T): Promise<T> => {
      await onChanged();
      return result;
    };

    r.get('/settings', { config: { permission: 'read' }, schema: { tags: ['settings'], response: { 200: ServerSettings, ...errorReplies } } }, async () => getSettings(ctx));
    r.patch(
      '/settings',
      { config: { permission: 'configure' }, schema: { tags: ['settings'], body: ServerSettingsPatch, response: { 200: ServerSettings, ...errorReplies } } },
      async (req) => changed(await updateSettings(ctx, req.body)),
    );

    r.get(
      '/scheduler',
      { config: { permission: 'read' }, schema: { tags: ['settings'], description: 'task slots in use per proxy and repository, running and queued tasks', response: { 200: SchedulerStatus, ...errorReplies } } },
      async () => {
        if (!status) throw new BulwarkError('the resource scheduler does not run in this server', { kind: 'unavailable' });
        return status();
      },
    );

    const tags = ['throttling rules'];
    r.get('/throttling-rules', { config: { permission: 'read' }, schema: { tags, response: { 200: Type.Object({ items: Type.Array(ThrottlingRule) }), ...errorReplies } } }, async () => ({
      items: await listThrottlingRules(ctx),
    }));
    r.get('/throttling-rules/:name', { config: { permission: 'read' }, schema: { tags, params: NameParam, response: { 200: ThrottlingRule, ...errorReplies } } }, async (req) =>
      getThrottlingRule(ctx, req.params.name),
    );
    r.post(
      '/throttling-rules',
      { config: { permission: 'configure' }, schema: { tags, body: ThrottlingRuleCreate, response: { 201: ThrottlingRule, ...errorReplies } } },
      async (req, reply) => reply.status(201).send(await changed(await createThrottlingRule(ctx, req.body))),
    );
    r.patch(
      '/throttling-rules/:name',
      { config: { permission: 'configure' }, schema: { tags, params: NameParam, body: ThrottlingRulePatch, response: { 200: ThrottlingRule, ...errorReplies } } },
      async (req) => changed(await updateThrottlingRule(ctx, req.params.name, req.body)),
    );
    r.delete(
      '/throttling-rules/:name',
      { config: { permission: 'configure' }, schema: { tags, params: NameParam, response: { 204: Type.Null(), ...errorReplies } } },
      async (req, reply) => {
        await changed(await deleteThrottlingRule(ctx, req.params.name));
        return reply.status(204).send(null);
      },
    );
  };
}
