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
// The wire boundary: every event is checked against its type's fields (TaskEvent in
// src/transport/agent-tasks.ts) before the broker sees it. Payloads that belong to one task kind
// (progress counters, a result's value, a previous point) are that kind's to read; extra fields are
// allowed so a newer agent's additions do not break an older server.
const open = { additionalProperties: true } as const;
const StageBusyBody = Type.Record(Type.String(), Type.Number());
const TaskEventBody = Type.Union([
  Type.Object({ type: Type.Literal('progress'), progress: Type.Record(Type.String(), Type.Unknown()), stageTimes: Type.Optional(StageBusyBody) }, open),
  Type.Object({ type: Type.Literal('log'), level: Type.Union([Type.Literal('info'), Type.Literal('warning'), Type.Literal('error')]), message: Type.String(), disk: Type.Optional(Type.String()) }, open),
  Type.Object(
    {
      type: Type.Literal('ready'),
      port: Type.Integer({ minimum: 0, maximum: 65535 }),
      host: Type.Optional(Type.String()),
      previous: Type.Union([Type.Record(Type.String(), Type.Unknown()), Type.Null()]),
      plan: Type.Optional(Type.Record(Type.String(), Type.Unknown())),
      vms: Type.Optional(Type.Record(Type.String(), Type.Union([Type.Record(Type.String(), Type.Unknown()), Type.Null()]))),
      blockSize: Type.Optional(Type.Integer({ minimum: 1 })),
    },
    open,
  ),
  Type.Object({ type: Type.Literal('result'), ok: Type.Literal(true), value: Type.Optional(Type.Unknown()), stageTimes: Type.Optional(StageBusyBody) }, open),
  Type.Object(
    { type: Type.Literal('result'), ok: Type.Literal(false), error: Type.Object({ kind: Type.String(), message: Type.String(), hint: Type.Optional(Type.String()) }, open) },
    open,
  ),
]);
export const EventsBody = Type.Object({ events: Type.Array(TaskEventBody, { maxItems: 1000 }) }, { additionalProperties: false });
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
