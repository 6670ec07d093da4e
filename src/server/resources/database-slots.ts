// The resource scheduler as the server runs it: proxies (agents) and repositories with their task
// limits, the processing mode and the repositories' rate limits come from the configuration
// database, and are read again before every slot request, when a setting changes and every few
// seconds (so an agent that stops sending heartbeats is seen offline and its waiting tasks go to
// another proxy or fail with the reason).
import { describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { SlotLease, SlotRequest, TaskSlots } from '../jobs/ports.js';
import type { ServiceContext } from '../services/common.js';
import { listAgents, listHosts, listRepositories } from '../services/infrastructure.js';
import { getSettings } from '../services/settings.js';
import { defaultMaxTasks } from './proxy-selection.js';
import { ResourceScheduler } from './scheduler.js';
import type { ProcessingMode, ProxyConfig, RepositoryLimits, TaskRequirements } from './task-slots.js';

const log = logger('resources');

/** MB/s (10^6 bytes) as the API and console give repository rates, to bytes/s. */
export const MB = 1_000_000;

export interface LocalProxy {
  /** The agent name of the server's own data path (the one-host install's agent, `local`). */
  readonly name: string;
  /** CPU cores of this machine: its task limit when its agent row sets none. */
  readonly cores: number;
  /**
   * The data path runs inside the server process (the one-host install), so this proxy is
   * available whenever the server is, whatever its agent link's heartbeats say.
   */
  readonly inProcess: boolean;
}

/** The host of a disk that an agent found (`location.agent`) when the host's name is not known. */
export const agentHost = (agent: string): string => `agent:${agent}`;

export interface ResourceConfig {
  readonly proxies: ProxyConfig[];
  readonly repositories: RepositoryLimits[];
  readonly mode: ProcessingMode;
  /** Host name by the URI of its hypervisor connection (libvirt URI or QMP glob). */
  readonly hostByUri: ReadonlyMap<string, string>;
}

/**
 * Reads the scheduling configuration. Every agent is a proxy on the hosts that name it (hosts
 * without an agent belong to the local proxy, which also takes disks whose host is unknown); its
 * limit is its `max_tasks` or its CPU cores. A repository's limit is its `max_tasks`, or when 0 the
 * cores of its agent; its rate limit for backup tasks is its write rate.
 */
export async function loadResourceConfig(ctx: ServiceContext, local: LocalProxy): Promise<ResourceConfig> {
  const [agents, hosts, repositories, settings] = await Promise.all([listAgents(ctx), listHosts(ctx), listRepositories(ctx), getSettings(ctx)]);
  const hostsOf = (agent: string | null): string[] => hosts.filter((h) => h.agent === agent).map((h) => h.name);
  const proxies: ProxyConfig[] = agents.map((a) => ({
    name: a.name,
    host: a.hostname,
    hosts: a.name === local.name ? [...hostsOf(a.name), ...hostsOf(null), agentHost(a.name), ''] : [...hostsOf(a.name), agentHost(a.name)],
    online: a.state === 'online' || (a.name === local.name && local.inProcess && a.state !== 'revoked'),
    maxTasks: a.maxTasks,
    reaches: [],
  }));
  const localRow = agents.find((a) => a.name === local.name);
  if (!localRow && local.inProcess) {
    proxies.push({ name: local.name, host: '', hosts: [...hostsOf(local.name), ...hostsOf(null), agentHost(local.name), ''], online: true, maxTasks: defaultMaxTasks(local.cores), reaches: [] });
  }
  const cores = new Map(agents.map((a) => [a.name, a.cores]));
  const limits: RepositoryLimits[] = repositories.map((r) => ({
    name: r.name,
    maxTasks: r.maxTasksSetting ?? defaultMaxTasks(cores.get(r.agent ?? local.name) ?? local.cores),
    rateLimit: r.writeRateMBps === null ? undefined : r.writeRateMBps * MB,
  }));
  return { proxies, repositories: limits, mode: settings.processing, hostByUri: new Map(hosts.map((h) => [h.uri, h.name])) };
}

/** What the scheduler holds now, for the API and console. */
export interface SchedulerStatus {
  mode: ProcessingMode;
  proxies: Array<{ name: string; online: boolean; maxTasks: number; running: number }>;
  repositories: Array<{ name: string; maxTasks: number; running: number; rateLimit: number | null }>;
  running: Array<{ taskId: string; jobId: string; proxy: string; repository: string }>;
  queued: string[];
}

export interface DatabaseTaskSlotsOptions {
  readonly local: LocalProxy;
  /** How often the configuration is read again without a request (default 10 s). */
  readonly refreshMs?: number | undefined;
}

/** The job engine's TaskSlots over a ResourceScheduler fed from the configuration database. */
export class DatabaseTaskSlots implements TaskSlots {
  readonly scheduler = new ResourceScheduler({ proxies: [], repositories: [] });
  readonly #ctx: ServiceContext;
  readonly #local: LocalProxy;
  readonly #timer: NodeJS.Timeout;
  #mode: ProcessingMode = 'parallel';
  #hostByUri: ReadonlyMap<string, string> = new Map();
  #config: ResourceConfig | undefined;
  #refreshing: Promise<void> | undefined;

  constructor(ctx: ServiceContext, opts: DatabaseTaskSlotsOptions) {
    this.#ctx = ctx;
    this.#local = opts.local;
    this.#timer = setInterval(() => {
      this.refresh().catch((err: unknown) => log.warn({ err: describeError(err) }, 'could not read the scheduling configuration'));
    }, opts.refreshMs ?? 10_000);
    this.#timer.unref();
  }

  /** The global processing mode as last read (the job engine asks before it runs a session's tasks). */
  mode(): ProcessingMode {
    return this.#mode;
  }

  /** Reads agents, hosts, repositories and settings again and re-plans the waiting tasks. */
  refresh(): Promise<void> {
    // Reads run one after another, so the last one to finish is the newest.
    const run = async (): Promise<void> => {
      const c = await loadResourceConfig(this.#ctx, this.#local);
      this.#mode = c.mode;
      this.#config = c;
      this.#hostByUri = c.hostByUri;
      this.scheduler.setMode(c.mode);
      this.scheduler.setRepositories(c.repositories);
      this.scheduler.setProxies(c.proxies);
    };
    const next = (this.#refreshing ?? Promise.resolve()).catch(() => undefined).then(run);
    this.#refreshing = next;
    void next.finally(() => {
      if (this.#refreshing === next) this.#refreshing = undefined;
    }).catch(() => undefined);
    return next;
  }

  async acquire(request: SlotRequest, signal: AbortSignal): Promise<SlotLease> {
    await this.refresh();
    const lease = await this.scheduler.acquire(this.#describe(request), signal, request.onWaiting);
    return { proxy: lease.proxy, rateLimit: () => lease.rateLimit(), watchRate: (l) => lease.watchRate(l), release: () => lease.release() };
  }

  /**
   * The VM's host: `location.host` (a host name), else the host whose URI is `location.hostUri`,
   * else "a host of agent X" when `location.agent` names the agent that found the disk, else
   * unknown ('': the local proxy, whose in-process data path found it).
   */
  #describe(request: SlotRequest): TaskRequirements {
    const loc = request.disk.location;
    const vmHost =
      loc?.host ?? (loc?.hostUri !== undefined ? this.#hostByUri.get(loc.hostUri) : undefined) ?? (loc?.agent !== undefined ? agentHost(loc.agent) : '');
    return {
      taskId: request.taskId,
      jobId: request.jobId,
      repository: request.repository,
      need: { vm: request.vm, disk: request.disk.name, vmHost, storage: loc?.storage, pinned: request.proxy, foundBy: loc?.agent },
    };
  }

  /** Slots in use per proxy and repository, running and queued tasks (as of the last read). */
  status(): SchedulerStatus {
    const snap = this.scheduler.snapshot();
    const count = (key: 'proxy' | 'repository', name: string): number => snap.running.filter((r) => r[key] === name).length;
    return {
      mode: this.#mode,
      proxies: (this.#config?.proxies ?? []).map((p) => ({ name: p.name, online: p.online, maxTasks: p.maxTasks, running: count('proxy', p.name) })),
      repositories: (this.#config?.repositories ?? []).map((r) => ({ name: r.name, maxTasks: r.maxTasks, running: count('repository', r.name), rateLimit: r.rateLimit ?? null })),
      running: snap.running,
      queued: snap.queued,
    };
  }

  close(): void {
    clearInterval(this.#timer);
  }
}
