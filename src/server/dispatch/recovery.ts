// Full VM restore and instant recovery on another agent's host (docs/formats/agent-link.md,
// "Restore tasks"): the agent of the host the VM goes to does the work; it reads the point from
// its own host's repository, or through the data mover from a restore-serve task on the
// repository's agent, which this module starts first and stops when the reader is done. VM data
// never passes through the server.
import type { Static, TSchema } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { randomBytes } from 'node:crypto';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { HypervisorConnection } from '../../hypervisor/index.js';
import type { TaskEvent } from '../../transport/agent-tasks.js';
import {
  InstantRecoveryReplySchemas, WirePointConfigSchema, type InstantRecoveryAction, type InstantRecoveryReply, type WireInstantSession, type WirePointConfig, type WireRestoreSource,
} from '../../transport/restore-tasks.js';
import type { AgentTaskBroker, AgentTaskHandle } from './broker.js';

const log = logger('remote-recovery');

export interface RecoveryRepository {
  readonly path: string;
  /** The agent that owns the folder; null: this server's own. */
  readonly agent: string | null;
}

/** Where a point is read from, and the serve task to stop once the reader is done. */
export interface PointSourcePlan {
  readonly source: WireRestoreSource;
  readonly serve: AgentTaskHandle | undefined;
}

export interface RemoteVmRestoreArgs {
  readonly repository: RecoveryRepository;
  /** The agent of the host the VM is restored to (null: this server's own agent). */
  readonly hostAgent: string | null;
  readonly hypervisor: HypervisorConnection;
  readonly pointId: string;
  readonly password?: string | undefined;
  readonly name?: string | undefined;
  readonly storage?: string | undefined;
  readonly format?: 'raw' | 'qcow2' | undefined;
  readonly powerOn?: boolean | undefined;
  readonly digest?: boolean | undefined;
  readonly onEvent?: (e: TaskEvent) => void;
  readonly signal?: AbortSignal | undefined;
}

/**
 * An agent's reply checked against its wire schema before the server reads it; otherwise an error
 * naming the agent, what it answered and the first field that is not as expected.
 */
export function checkedReply<S extends TSchema>(schema: S, raw: unknown, agent: string, what: string): Static<S> {
  if (Value.Check(schema, raw)) return raw;
  const first = Value.Errors(schema, raw).First();
  const where = first ? `field ${first.path || '(the whole reply)'}: ${first.message}` : 'unexpected shape';
  throw new BulwarkError(`agent ${agent} answered ${what} with a reply this server cannot read (${where})`, {
    kind: 'internal',
    context: { agent, task: what, ...(first ? { field: first.path } : {}) },
    hint: 'the agent may run another Bulwark version than the server: update it',
  });
}

export class RemoteRecovery {
  readonly #broker: AgentTaskBroker;
  readonly #localAgent: string;

  constructor(broker: AgentTaskBroker, localAgent = 'local') {
    this.#broker = broker;
    this.#localAgent = localAgent;
  }

  /** The agent name that runs work for `agent` (null: this server's own agent). */
  agentOf(agent: string | null): string {
    return agent ?? this.#localAgent;
  }

  isLocal(agent: string | null): boolean {
    return agent === null || agent === this.#localAgent;
  }

  /** Refuses at once when an agent the work needs is not connected (rather than after the pickup time). */
  #connected(agent: string, role: string): void {
    if (this.#broker.isConnected(agent)) return;
    throw new BulwarkError(`agent ${agent} (${role}) is not connected`, {
      kind: 'unavailable',
      context: { agent },
      hint: 'check `bulwark agent list` and the agent host; the restore starts once it is back',
    });
  }

  /** The point's stored VM configuration and disks, read by the repository's agent. */
  async pointConfig(repository: RecoveryRepository, pointId: string, password: string | undefined): Promise<WirePointConfig> {
    this.#connected(this.agentOf(repository.agent), 'the repository\'s agent');
    const agent = this.agentOf(repository.agent);
    const handle = this.#broker.run(agent, { kind: 'restore-point-config', repositoryPath: repository.path, pointId, password });
    return checkedReply(WirePointConfigSchema, await handle.result, agent, `restore-point-config of point ${pointId}`);
  }

  /**
   * How `readerAgent` reads the point: from the repository folder when the repository is on its
   * own host; else from a restore-serve task on the repository's agent (started here, ready).
   */
  async plan(repository: RecoveryRepository, readerAgent: string, pointId: string, password: string | undefined, config: () => Promise<WirePointConfig>): Promise<PointSourcePlan> {
    const repoAgent = this.agentOf(repository.agent);
    this.#connected(readerAgent, 'the host\'s agent');
    this.#connected(repoAgent, 'the repository\'s agent');
    if (repoAgent === readerAgent) return { source: { kind: 'repository', repositoryPath: repository.path, password }, serve: undefined };
    const point = await config();
    const secret = randomBytes(32).toString('hex');
    let ready: ((e: Extract<TaskEvent, { type: 'ready' }>) => void) | undefined;
    const readyEvent = new Promise<Extract<TaskEvent, { type: 'ready' }>>((resolve) => (ready = resolve));
    const serve = this.#broker.run(repoAgent, { kind: 'restore-serve', repositoryPath: repository.path, pointId, password, secret, readerAgent }, (e) => {
      if (e.type === 'ready') ready?.(e);
    });
    const first = await Promise.race([readyEvent, serve.result.then(() => undefined)]);
    if (!first) throw new BulwarkError(`repository agent ${repoAgent} ended the restore-serve task before it was ready`, { kind: 'internal', context: { agent: repoAgent } });
    const host = first.host ?? this.#broker.addressOf(repoAgent) ?? '127.0.0.1';
    log.info({ point: pointId, repositoryAgent: repoAgent, reader: readerAgent, host, port: first.port }, 'restore point served to another agent');
    return {
      source: { kind: 'agent', agent: repoAgent, host, port: first.port, transferId: serve.taskId, secret, vm: point.vm, config: point.config, disks: point.disks },
      serve,
    };
  }

  /** A full VM restore on the host's agent; resolves with its result (RestoreVmResult as JSON). */
  async restoreVm(a: RemoteVmRestoreArgs): Promise<Record<string, unknown>> {
    const hostAgent = this.agentOf(a.hostAgent);
    let config: Promise<WirePointConfig> | undefined;
    const { source, serve } = await this.plan(a.repository, hostAgent, a.pointId, a.password, () => (config ??= this.pointConfig(a.repository, a.pointId, a.password)));
    try {
      a.signal?.throwIfAborted();
      const handle = this.#broker.run(
        hostAgent,
        {
          kind: 'restore-vm',
          hypervisor: a.hypervisor,
          pointId: a.pointId,
          name: a.name,
          storage: a.storage,
          format: a.format,
          powerOn: a.powerOn,
          ...(a.digest ? { digest: true } : {}),
          source,
        },
        (e) => a.onEvent?.(e),
      );
      const stop = (): void => handle.cancel('the server is stopping');
      a.signal?.addEventListener('abort', stop, { once: true });
      // The serve task failing (its agent lost) fails the restore at once.
      const serveFailed = serve
        ? serve.result.then(
            () => new Promise<never>(() => undefined),
            (err: unknown) => {
              handle.cancel('the repository agent stopped serving the point');
              throw err;
            },
          )
        : new Promise<never>(() => undefined);
      try {
        return (await Promise.race([handle.result, serveFailed])) as Record<string, unknown>;
      } finally {
        a.signal?.removeEventListener('abort', stop);
      }
    } finally {
      serve?.cancel('the VM restore ended');
    }
  }

  /** Starts instant recovery on `hostAgent`; the serve task (if any) stays until stop or migrate. */
  async instantStart(a: {
    repository: RecoveryRepository;
    hostAgent: string | null;
    pointId: string;
    name: string;
    password?: string | undefined;
    /** The host's name, kept with the session by its agent (a restarted server lists it so). */
    host?: string | undefined;
    /** The NICs' network (startInstantRecovery's `network`); absent: disconnected. */
    network?: 'disconnected' | 'recorded' | undefined;
  }): Promise<{ session: WireInstantSession; agent: string; serve: AgentTaskHandle | undefined }> {
    const agent = this.agentOf(a.hostAgent);
    const { source, serve } = await this.plan(a.repository, agent, a.pointId, a.password, () => this.pointConfig(a.repository, a.pointId, a.password));
    try {
      const raw = await this.#broker.run(agent, { kind: 'instant-recovery', action: 'start', pointId: a.pointId, name: a.name, source, ...(a.host !== undefined ? { host: a.host } : {}), ...(a.network !== undefined ? { network: a.network } : {}) }).result;
      const session: WireInstantSession = checkedReply(InstantRecoveryReplySchemas.start, raw, agent, 'instant-recovery start');
      return { session, agent, serve };
    } catch (err) {
      serve?.cancel('instant recovery did not start');
      throw err;
    }
  }

  /**
   * The instant recovery sessions an agent runs, or undefined when it is not connected, does not
   * answer within `timeoutMs` (a listing must not wait for the agent-lost time) or answers with a
   * reply this server cannot read (logged).
   */
  async sessionsOn(agent: string, timeoutMs = 5000): Promise<WireInstantSession[] | undefined> {
    if (!this.#broker.isConnected(agent)) return undefined;
    const handle = this.#broker.run(agent, { kind: 'instant-recovery', action: 'list' });
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), timeoutMs)));
    const read = (v: unknown): { sessions: WireInstantSession[] } | undefined => {
      try {
        return checkedReply(InstantRecoveryReplySchemas.list, v, agent, 'instant-recovery list');
      } catch (err) {
        log.error({ agent, err: describeError(err) }, 'instant recovery sessions of an agent not listed');
        return undefined;
      }
    };
    try {
      const r = await Promise.race([handle.result.then(read, () => undefined), late]);
      if (r === undefined) handle.cancel('the session list was not answered in time');
      return r?.sessions;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Takes over a restore-serve task a repository agent still runs after this server (re)started:
   * an instant recovery session reads from it (its agent's list names it), so it must not stop.
   */
  adoptServe(serve: { readonly agent: string; readonly taskId: string }): AgentTaskHandle {
    return this.#broker.adopt(serve.agent, serve.taskId, 'restore-serve');
  }

  /** Until when the tasks `agent` still runs can be adopted (the broker's adoption window). */
  adoptableUntil(agent: string): number {
    return this.#broker.adoptableUntil(agent);
  }

  /**
   * Calls `fn` when an agent first polls this server (after a start: its sessions may be adopted);
   * while the promise `fn` returns is pending, the broker stops none of that agent's unknown tasks.
   */
  onAgentSeen(fn: (agent: string) => void | Promise<unknown>): void {
    this.#broker.onAgentSeen(fn);
  }

  /** Agents connected now (their instant recovery sessions are listed too). */
  connectedAgents(): string[] {
    return this.#broker.connectedAgents();
  }

  /** show / list / migrate / stop of a session on an agent; the reply is checked against its wire schema. */
  async instant<A extends Exclude<InstantRecoveryAction, { action: 'start' }>>(agent: string, action: A): Promise<InstantRecoveryReply<A['action']>> {
    const raw = await this.#broker.run(agent, { kind: 'instant-recovery', ...action }).result;
    return checkedReply(InstantRecoveryReplySchemas[action.action], raw, agent, `instant-recovery ${action.action}`);
  }
}
