// The task routes of the agent link (docs/formats/agent-link.md, "Tasks"): an agent long-polls for
// tasks and posts their events, authenticated by its client certificate like its heartbeats.
// Registered under /api/v1 on the TLS listener, next to agentLinkPlugin.
import { Type, type Static } from '@sinclair/typebox';
import type { FastifyPluginAsync } from 'fastify';
import type { AgentTask, TaskEvent } from '../../transport/agent-tasks.js';
import { authenticateAgent, type AgentLinkStore } from '../api/agent-link.js';
import type { AgentTaskBroker } from './broker.js';

const ErrorBody = Type.Object({ error: Type.Object({ kind: Type.String(), message: Type.String(), hint: Type.Optional(Type.String()) }) });
const errorReplies = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody };

export const PollRequestBody = Type.Object(
  {
    bootId: Type.String({ minLength: 8, maxLength: 64 }),
    running: Type.Array(Type.String({ maxLength: 64 }), { maxItems: 4096 }),
  },
  { additionalProperties: false },
);
export const PollReplyBody = Type.Object({
  // Task shapes are documented in the format page and typed in src/transport/agent-tasks.ts.
  tasks: Type.Array(Type.Object({ kind: Type.String(), taskId: Type.String() }, { additionalProperties: true })),
  cancel: Type.Array(Type.Object({ taskId: Type.String(), reason: Type.String() })),
});
export const EventsBody = Type.Object(
  { events: Type.Array(Type.Object({ type: Type.Union([Type.Literal('progress'), Type.Literal('log'), Type.Literal('ready'), Type.Literal('result')]) }, { additionalProperties: true }), { maxItems: 1000 }) },
  { additionalProperties: false },
);
export const EventsReplyBody = Type.Object({
  cancel: Type.Boolean(),
  limits: Type.Optional(Type.Array(Type.Object({ name: Type.String(), bytesPerSecond: Type.Number() }))),
  disks: Type.Optional(Type.Array(Type.String())),
});

export function agentTaskPlugin(opts: { store: Pick<AgentLinkStore, 'findAgent'>; broker: AgentTaskBroker }): FastifyPluginAsync {
  return async (app) => {
    const publicRoute = { permission: 'public' } as Record<string, unknown>;
    app.post<{ Body: Static<typeof PollRequestBody> }>(
      '/agents/tasks/poll',
      { config: publicRoute, schema: { tags: ['agents'], security: [], body: PollRequestBody, response: { 200: PollReplyBody, ...errorReplies } } },
      async (req, reply) => {
        const name = await authenticateAgent(opts.store, req);
        const closed = new Promise<void>((resolve) => {
          reply.raw.once('close', () => resolve());
        });
        const r = await opts.broker.poll(name, { bootId: req.body.bootId, running: req.body.running, address: normalizeAddress(req.socket.remoteAddress) }, closed);
        return { tasks: r.tasks as AgentTask[], cancel: [...r.cancel] };
      },
    );
    app.post<{ Body: Static<typeof EventsBody>; Params: { taskId: string } }>(
      '/agents/tasks/:taskId/events',
      {
        config: publicRoute,
        schema: { tags: ['agents'], security: [], params: Type.Object({ taskId: Type.String({ maxLength: 64 }) }), body: EventsBody, response: { 200: EventsReplyBody, ...errorReplies } },
      },
      async (req) => {
        const name = await authenticateAgent(opts.store, req);
        return opts.broker.events(name, req.params.taskId, req.body.events as unknown as TaskEvent[]);
      },
    );
  };
}

/** `::ffff:10.0.0.1` (IPv4 on a dual-stack socket) -> `10.0.0.1`. */
function normalizeAddress(a: string | undefined): string | undefined {
  return a?.startsWith('::ffff:') ? a.slice(7) : a;
}
