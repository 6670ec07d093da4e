// Hosts, agents and repositories: the infrastructure the jobs run on. Names are unique per
// kind; references (a host's or repository's agent) are given by name and stored by id.
import type { Selectable } from 'kysely';
import { BulwarkError } from '../../common/errors.js';
import type { AgentTable, HostTable, RepositoryTable } from '../db/schema.js';
import {
  configFields,
  duplicate,
  findByNameOrId,
  invalid,
  isUniqueViolation,
  newId,
  notFound,
  nowIso,
  parseJson,
  updateVersioned,
  type ServiceContext,
} from './common.js';
import type { Agent, AgentPatch, Host, HostCreate, HostPatch, Repository, RepositoryCreate, RepositoryPatch } from './model.js';
import { NamePattern } from './model.js';
import { availableParallelism } from 'node:os';

/** Default task limit: one task per CPU core (src/server/resources/proxy-selection.ts defaultMaxTasks). */
const coresLimit = (cores: number): number => Math.max(1, Math.floor(cores));

const nameRe = new RegExp(NamePattern);
export function checkName(name: string): void {
  if (!nameRe.test(name)) throw invalid('name', `"${name}" is not a valid name: use letters, digits, ".", "_" and "-" (at most 63, starting with a letter or digit)`);
}

async function agentIdByName(ctx: ServiceContext, name: string | null | undefined, field = 'agent'): Promise<string | null> {
  if (name === null || name === undefined) return null;
  const a = await findByNameOrId(ctx, 'agents', name);
  if (!a) throw new BulwarkError(`${field}: agent "${name}" not found`, { kind: 'not-found', context: { field, agent: name } });
  return a.id;
}

async function agentNames(ctx: ServiceContext): Promise<Map<string, string>> {
  const rows = await ctx.db.selectFrom('agents').select(['id', 'name']).execute();
  return new Map(rows.map((r) => [r.id, r.name]));
}

async function insertUnique(what: string, name: string, insert: () => Promise<unknown>): Promise<void> {
  try {
    await insert();
  } catch (err) {
    if (isUniqueViolation(err)) throw duplicate(what, name);
    throw err;
  }
}

// ---- hosts
function toHost(r: Selectable<HostTable>, agents: Map<string, string>): Host {
  return { ...configFields(r), kind: r.kind, uri: r.uri, agent: r.agent_id ? (agents.get(r.agent_id) ?? null) : null };
}

function checkHostUri(kind: string, uri: string): void {
  if (kind === 'libvirt' && !/^[a-z+]+:\/\//.test(uri)) throw invalid('uri', `"${uri}" is not a libvirt URI (e.g. qemu:///system)`);
  if (kind === 'qemu' && !uri.startsWith('/')) throw invalid('uri', `"${uri}" must be an absolute glob of QMP sockets (e.g. /run/vms/*.qmp)`);
}

export async function listHosts(ctx: ServiceContext): Promise<Host[]> {
  const [rows, agents] = await Promise.all([ctx.db.selectFrom('hosts').selectAll().orderBy('name').execute(), agentNames(ctx)]);
  return rows.map((r) => toHost(r, agents));
}

export async function getHost(ctx: ServiceContext, name: string): Promise<Host> {
  const r = await findByNameOrId(ctx, 'hosts', name);
  if (!r) throw notFound('host', name);
  return toHost(r, await agentNames(ctx));
}

export async function createHost(ctx: ServiceContext, input: HostCreate): Promise<Host> {
  checkName(input.name);
  checkHostUri(input.kind, input.uri);
  const agentId = await agentIdByName(ctx, input.agent);
  const now = nowIso(ctx);
  await insertUnique('host', input.name, () =>
    ctx.db
      .insertInto('hosts')
      .values({ id: newId(), name: input.name, version: 1, created_at: now, updated_at: now, kind: input.kind, uri: input.uri, agent_id: agentId })
      .execute(),
  );
  return getHost(ctx, input.name);
}

export async function updateHost(ctx: ServiceContext, name: string, patch: HostPatch): Promise<Host> {
  const r = await findByNameOrId(ctx, 'hosts', name);
  if (!r) throw notFound('host', name);
  const kind = patch.kind ?? r.kind;
  const uri = patch.uri ?? r.uri;
  checkHostUri(kind, uri);
  const values: Partial<HostTable> = { kind, uri };
  if (patch.agent !== undefined) values.agent_id = await agentIdByName(ctx, patch.agent);
  await updateVersioned(ctx, 'hosts', 'host', r, patch.version, values);
  return getHost(ctx, r.id);
}

export async function deleteHost(ctx: ServiceContext, name: string): Promise<void> {
  const r = await findByNameOrId(ctx, 'hosts', name);
  if (!r) throw notFound('host', name);
  await ctx.db.deleteFrom('hosts').where('id', '=', r.id).execute();
}

// ---- agents (created by enrollment, see agent-link; here: list, show, edit state, delete)
/** An online agent not heard from for this long (3 missed heartbeats of 30 s) shows as offline. */
export const agentOfflineAfterMs = 90_000;

function toAgent(r: Selectable<AgentTable>, now: Date): Agent {
  const silent = r.last_seen_at === null || now.getTime() - new Date(r.last_seen_at).getTime() > agentOfflineAfterMs;
  const health = parseJson<{ uptimeSeconds?: number; repositories?: Agent['repositories'] }>(r.health, 'agent health');
  return {
    ...configFields(r),
    hostname: r.hostname,
    agentVersion: r.agent_version,
    cores: r.cores,
    lastSeenAt: r.last_seen_at,
    certFingerprint: r.cert_fingerprint,
    state: r.state === 'online' && silent ? 'offline' : r.state,
    maxTasks: r.max_tasks ?? coresLimit(r.cores),
    maxTasksSetting: r.max_tasks,
    uptimeSeconds: health?.uptimeSeconds ?? null,
    repositories: health?.repositories ?? [],
  };
}

export async function listAgents(ctx: ServiceContext): Promise<Agent[]> {
  const now = ctx.clock.now();
  return (await ctx.db.selectFrom('agents').selectAll().orderBy('name').execute()).map((r) => toAgent(r, now));
}

export async function getAgent(ctx: ServiceContext, name: string): Promise<Agent> {
  const r = await findByNameOrId(ctx, 'agents', name);
  if (!r) throw notFound('agent', name);
  return toAgent(r, ctx.clock.now());
}

export interface AgentRegistration {
  name: string;
  hostname: string;
  agentVersion: string;
  cores: number;
  certFingerprint: string | null;
  certSerial?: string | null;
  state?: Agent['state'];
}

/** Records a newly enrolled agent (used by enrollment and by the one-host install's local agent). */
export async function registerAgent(ctx: ServiceContext, a: AgentRegistration): Promise<Agent> {
  checkName(a.name);
  const now = nowIso(ctx);
  await insertUnique('agent', a.name, () =>
    ctx.db
      .insertInto('agents')
      .values({
        id: newId(),
        name: a.name,
        version: 1,
        created_at: now,
        updated_at: now,
        hostname: a.hostname,
        agent_version: a.agentVersion,
        cores: a.cores,
        last_seen_at: now,
        cert_fingerprint: a.certFingerprint,
        cert_serial: a.certSerial ?? null,
        state: a.state ?? 'online',
      })
      .execute(),
  );
  return getAgent(ctx, a.name);
}

export async function updateAgent(ctx: ServiceContext, name: string, patch: AgentPatch): Promise<Agent> {
  const r = await findByNameOrId(ctx, 'agents', name);
  if (!r) throw notFound('agent', name);
  const values: Record<string, unknown> = {};
  if (patch.state) values.state = patch.state;
  if (patch.maxTasks !== undefined) values.max_tasks = patch.maxTasks;
  await updateVersioned(ctx, 'agents', 'agent', r, patch.version, values);
  return getAgent(ctx, r.id);
}

export async function deleteAgent(ctx: ServiceContext, name: string): Promise<void> {
  const r = await findByNameOrId(ctx, 'agents', name);
  if (!r) throw notFound('agent', name);
  const repo = await ctx.db.selectFrom('repositories').select('name').where('agent_id', '=', r.id).executeTakeFirst();
  if (repo) throw new BulwarkError(`agent "${r.name}" owns repository "${repo.name}": move or delete the repository first`, { kind: 'conflict', context: { agent: r.name, repository: repo.name } });
  const host = await ctx.db.selectFrom('hosts').select('name').where('agent_id', '=', r.id).executeTakeFirst();
  if (host) throw new BulwarkError(`agent "${r.name}" serves host "${host.name}": change or delete the host first`, { kind: 'conflict', context: { agent: r.name, host: host.name } });
  await ctx.db.deleteFrom('agents').where('id', '=', r.id).execute();
}

// ---- repositories
/** CPU cores by agent id; '' = the local agent's (a repository without agent is the local agent's). */
async function agentCores(ctx: ServiceContext): Promise<Map<string, number>> {
  const rows = await ctx.db.selectFrom('agents').select(['id', 'name', 'cores']).execute();
  const cores = new Map(rows.map((r) => [r.id, r.cores]));
  cores.set('', rows.find((r) => r.name === 'local')?.cores || availableParallelism());
  return cores;
}

function toRepository(r: Selectable<RepositoryTable>, agents: Map<string, string>, cores: Map<string, number>): Repository {
  return {
    ...configFields(r),
    path: r.path,
    agent: r.agent_id ? (agents.get(r.agent_id) ?? null) : null,
    // max_tasks 0: the default, the cores of its agent.
    maxTasks: r.max_tasks > 0 ? r.max_tasks : coresLimit(cores.get(r.agent_id ?? '') ?? 1),
    maxTasksSetting: r.max_tasks > 0 ? r.max_tasks : null,
    readRateMBps: r.read_rate_mbps,
    writeRateMBps: r.write_rate_mbps,
  };
}

function checkPath(path: string): void {
  if (!path.startsWith('/')) throw invalid('path', `"${path}" must be an absolute path`);
}

export async function listRepositories(ctx: ServiceContext): Promise<Repository[]> {
  const [rows, agents, cores] = await Promise.all([ctx.db.selectFrom('repositories').selectAll().orderBy('name').execute(), agentNames(ctx), agentCores(ctx)]);
  return rows.map((r) => toRepository(r, agents, cores));
}

export async function getRepository(ctx: ServiceContext, name: string): Promise<Repository> {
  const r = await findByNameOrId(ctx, 'repositories', name);
  if (!r) throw notFound('repository', name);
  return toRepository(r, await agentNames(ctx), await agentCores(ctx));
}

export async function createRepository(ctx: ServiceContext, input: RepositoryCreate): Promise<Repository> {
  checkName(input.name);
  checkPath(input.path);
  const agentId = await agentIdByName(ctx, input.agent);
  const now = nowIso(ctx);
  await insertUnique('repository', input.name, () =>
    ctx.db
      .insertInto('repositories')
      .values({
        id: newId(),
        name: input.name,
        version: 1,
        created_at: now,
        updated_at: now,
        path: input.path,
        agent_id: agentId,
        max_tasks: input.maxTasks ?? 0,
        read_rate_mbps: input.readRateMBps ?? null,
        write_rate_mbps: input.writeRateMBps ?? null,
      })
      .execute(),
  );
  return getRepository(ctx, input.name);
}

export async function updateRepository(ctx: ServiceContext, name: string, patch: RepositoryPatch): Promise<Repository> {
  const r = await findByNameOrId(ctx, 'repositories', name);
  if (!r) throw notFound('repository', name);
  const values: Partial<RepositoryTable> = {};
  if (patch.path !== undefined) {
    checkPath(patch.path);
    values.path = patch.path;
  }
  if (patch.agent !== undefined) values.agent_id = await agentIdByName(ctx, patch.agent);
  if (patch.maxTasks !== undefined) values.max_tasks = patch.maxTasks ?? 0;
  if (patch.readRateMBps !== undefined) values.read_rate_mbps = patch.readRateMBps;
  if (patch.writeRateMBps !== undefined) values.write_rate_mbps = patch.writeRateMBps;
  await updateVersioned(ctx, 'repositories', 'repository', r, patch.version, values);
  return getRepository(ctx, r.id);
}

export async function deleteRepository(ctx: ServiceContext, name: string): Promise<void> {
  const r = await findByNameOrId(ctx, 'repositories', name);
  if (!r) throw notFound('repository', name);
  const points = await ctx.db
    .selectFrom('restore_points')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('repository_id', '=', r.id)
    .executeTakeFirstOrThrow();
  if (Number(points.n) > 0) {
    // There is no command that deletes a restore point: say how points leave the catalog (a rescan
    // reads folders on this host only).
    const agent = r.agent_id === null ? null : ((await agentNames(ctx)).get(r.agent_id) ?? r.agent_id);
    const rescan = agent === null || agent === 'local' ? `, or when their folder is gone from the repository and \`bulwark repo rescan ${r.name}\` runs` : '';
    throw new BulwarkError(`repository "${r.name}" holds ${Number(points.n)} restore point(s)`, {
      kind: 'conflict',
      context: { repository: r.name, restorePoints: Number(points.n) },
      hint: `points leave the catalog through their job's retention or \`bulwark exports delete\` (exports)${rescan}`,
    });
  }
  const job = await ctx.db.selectFrom('jobs').select('name').where('repository_id', '=', r.id).executeTakeFirst();
  if (job) throw new BulwarkError(`repository "${r.name}" is the target of job "${job.name}": change or delete the job first`, { kind: 'conflict', context: { repository: r.name, job: job.name } });
  await ctx.db.deleteFrom('repositories').where('id', '=', r.id).execute();
}
