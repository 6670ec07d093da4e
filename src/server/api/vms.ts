// `GET /vms` (`bulwark vm list`): the VMs of the managed hosts, as their hypervisors report them
// now, with the jobs that name each and its newest restore point. The server's own hosts are
// listed in this process (one-host install); a host served by an agent through a `list-vms` task
// (docs/formats/agent-link.md). A host that cannot be listed is named with the reason; the others
// are still listed.
import { Type, type Static, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Value } from '@sinclair/typebox/value';
import type { FastifyPluginAsync } from 'fastify';
import { BulwarkError, describeError } from '../../common/errors.js';
import type { HypervisorConnection } from '../../hypervisor/index.js';
import { listVmsOnHosts } from '../../agent/remote/list-vms.js';
import type { ListVmsResult } from '../../transport/agent-tasks.js';
import type { AgentTaskBroker } from '../dispatch/broker.js';
import type { ServiceContext } from '../services/common.js';
import { getHost, listHosts } from '../services/infrastructure.js';
import { listJobs } from '../services/jobs.js';
import type { Host } from '../services/model.js';
import { listRestorePoints } from '../services/sessions.js';

/** How long an agent gets to list its hosts' VMs. */
const AGENT_ANSWER_MS = 10_000;

const WireVmSchema = Type.Object({
  name: Type.String(),
  uuid: Type.Optional(Type.String()),
  state: Type.Union([Type.Literal('running'), Type.Literal('paused'), Type.Literal('shut-off'), Type.Literal('other')]),
  disks: Type.Array(Type.Object({ name: Type.String(), sizeBytes: Type.Number(), format: Type.String(), image: Type.String() })),
});
const ListVmsReply = Type.Object({ hosts: Type.Array(Type.Union([Type.Object({ vms: Type.Array(WireVmSchema) }), Type.Object({ error: Type.String() })])) });

export const VmListItem = Type.Object({
  ...WireVmSchema.properties,
  host: Type.String({ description: 'the managed host it runs on (bulwark host list)' }),
  agent: Type.Union([Type.String(), Type.Null()], { description: 'the agent that listed it; null: the server process (its own hosts)' }),
  jobs: Type.Array(Type.String(), { description: 'jobs that name this VM' }),
  lastPoint: Type.Union([Type.Object({ id: Type.String(), time: Type.String(), type: Type.String(), state: Type.String() }), Type.Null()], { description: 'its newest restore point in the catalog' }),
});
export type VmListItem = Static<typeof VmListItem>;

export const VmList = Type.Object({
  items: Type.Array(VmListItem),
  unreachable: Type.Array(Type.Object({ host: Type.String(), reason: Type.String() }), { description: 'hosts whose VMs could not be listed, with why' }),
});
export type VmList = Static<typeof VmList>;

export interface VmListAgents {
  readonly broker: AgentTaskBroker;
  /** The server's own agent (its hosts are listed in this process). Default `local`. */
  readonly localAgent?: string | undefined;
}

function connectionOf(h: Host): HypervisorConnection {
  return h.kind === 'qemu' ? { kind: 'qemu', qmpGlob: h.uri } : { kind: 'libvirt', uri: h.uri };
}

/** The VMs of every host (or of `host` alone), sorted by host then name. */
export async function listVms(ctx: ServiceContext, agents: VmListAgents | undefined, o: { host?: string | undefined } = {}): Promise<VmList> {
  const hosts = o.host !== undefined ? [await getHost(ctx, o.host)] : await listHosts(ctx);
  const local = (h: Host): boolean => !agents || h.agent === null || h.agent === (agents.localAgent ?? 'local');
  const byAgent = new Map<string | null, Host[]>();
  for (const h of hosts) {
    const key = local(h) ? null : h.agent;
    byAgent.set(key, [...(byAgent.get(key) ?? []), h]);
  }
  const listed = await Promise.all(
    [...byAgent].map(async ([agent, group]): Promise<Array<{ host: Host; agent: string | null; result: ListVmsResult['hosts'][number] }>> => {
      const results = agent === null ? await listVmsOnHosts(group.map(connectionOf)) : await listOnAgent(agents!.broker, agent, group);
      return group.map((host, i) => ({ host, agent, result: results[i] ?? { error: 'no answer for this host' } }));
    }),
  );
  const [jobs, points] = await Promise.all([listJobs(ctx), listRestorePoints(ctx)]);
  const newest = new Map<string, (typeof points)[number]>();
  for (const p of points) {
    const seen = newest.get(p.vm);
    if (!seen || p.time > seen.time) newest.set(p.vm, p);
  }
  const items: VmListItem[] = [];
  const unreachable: VmList['unreachable'] = [];
  for (const { host, agent, result } of listed.flat()) {
    if ('error' in result) {
      unreachable.push({ host: host.name, reason: result.error });
      continue;
    }
    for (const vm of result.vms) {
      const p = newest.get(vm.name);
      items.push({
        ...vm,
        disks: vm.disks.map((d) => ({ ...d })),
        host: host.name,
        agent,
        jobs: jobs.filter((j) => j.vms.includes(vm.name)).map((j) => j.name),
        lastPoint: p ? { id: p.id, time: p.time, type: p.type, state: p.state } : null,
      });
    }
  }
  items.sort((a, b) => a.host.localeCompare(b.host) || a.name.localeCompare(b.name));
  return { items, unreachable };
}

/** One `list-vms` task on the agent for its hosts; a silent or disconnected agent makes each of them unreachable. */
async function listOnAgent(broker: AgentTaskBroker, agent: string, hosts: readonly Host[]): Promise<ListVmsResult['hosts']> {
  const all = (error: string): ListVmsResult['hosts'] => hosts.map(() => ({ error }));
  if (!broker.isConnected(agent)) return all(`agent ${agent} is not connected (check \`bulwark agent list\` and the agent host)`);
  const handle = broker.run(agent, { kind: 'list-vms', hosts: hosts.map(connectionOf) });
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), AGENT_ANSWER_MS)));
  try {
    const r = await Promise.race([handle.result, late]);
    if (r === 'late') {
      handle.cancel('no answer in time');
      return all(`agent ${agent} did not answer within ${AGENT_ANSWER_MS / 1000} s`);
    }
    if (!Value.Check(ListVmsReply, r) || r.hosts.length !== hosts.length) {
      const first = Value.Errors(ListVmsReply, r).First();
      return all(`agent ${agent} answered list-vms in another shape (${first?.path ?? '/hosts'}: ${first?.message ?? 'one entry per host expected'}): run the same Bulwark version on the server and its agents`);
    }
    return r.hosts;
  } catch (err) {
    return all(`agent ${agent}: ${describeError(err)}`);
  } finally {
    clearTimeout(timer);
  }
}

export function vmsPlugin(ctx: ServiceContext, agents?: VmListAgents): FastifyPluginAsync {
  return async (api) => {
    const r = api.withTypeProvider<TypeBoxTypeProvider>();
    r.get(
      '/vms',
      {
        config: { permission: 'read' },
        schema: {
          tags: ['infrastructure'],
          description: 'the VMs of the managed hosts as their hypervisors report them now, with the jobs naming each and its newest restore point',
          querystring: Type.Object({ host: Type.Optional(Type.String({ minLength: 1, description: 'one host (name)' })) }, { additionalProperties: false }),
          response: { 200: VmList },
        },
      },
      async (req) => {
        const list = await listVms(ctx, agents, { host: req.query.host });
        if (req.query.host !== undefined && list.unreachable.length > 0) {
          throw new BulwarkError(`the VMs of host ${req.query.host} could not be listed: ${list.unreachable[0]!.reason}`, { kind: 'unavailable', context: { host: req.query.host } });
        }
        return list;
      },
    );
  };
}
