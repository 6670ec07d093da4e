// Task dispatch to agents (issue 5, multi-host data path): the broker that hands tasks to agents
// over the agent link, its routes, and the executor that runs a job's tasks in process or on
// agents. `createDispatch` is what the composition root (src/server/main.ts) wires.
import type { FastifyPluginAsync } from 'fastify';
import type { BackupVmSummary } from '../../agent/backup/disk-backup.js';
import type { RestorePointInfo } from '../../repository/index.js';
import { pointFromWire } from '../../agent/remote/repository-sink.js';
import type { RemovedVmSweepResult, WireRestoredDisk } from '../../transport/agent-tasks.js';
import { restoreDiskProgressOf, type WireRestoreDiskProgress } from '../../transport/restore-tasks.js';
import type { AgentLinkStore } from '../api/agent-link.js';
import type { DiskResolver, JobDefinition, TaskExecutor, TaskSpec } from '../jobs/ports.js';
import type { ThrottlingRule } from '../resources/throttling-rules.js';
import type { ServiceContext } from '../services/common.js';
import { getRepository, listHosts } from '../services/infrastructure.js';
import { listThrottlingRules, policyRule } from '../services/throttling.js';
import { AgentTaskBroker } from './broker.js';
import { RemoteDataPathExecutor } from './remote-executor.js';
import { agentTaskPlugin } from './routes.js';

export { AgentTaskBroker } from './broker.js';
export { RemoteDataPathExecutor } from './remote-executor.js';
export type { DispatchHost, DispatchRepository, RemoteDataPathOptions } from './remote-executor.js';

export interface DispatchOptions {
  /** An agent silent this long while running a task is lost and the task fails (default 60 s). */
  readonly agentLostMs?: number | undefined;
  /** A queued task no agent picked up within this time fails (default: agentLostMs). */
  readonly pickupTimeoutMs?: number | undefined;
  /** Longest a task poll is held open (default 20 s). */
  readonly pollWaitMs?: number | undefined;
  /** How long a data stream may stay down before a transfer fails (default 30 s). */
  readonly resumeWindowMs?: number | undefined;
  /** Network throttling rules and the time zone they are evaluated in (default: the rules in the configuration database). */
  readonly throttling?: (() => Promise<{ rules: readonly ThrottlingRule[]; timeZone: string }>) | undefined;
  /** Name of this server's own agent (default `local`). */
  readonly localAgent?: string | undefined;
  /** Time zone of rules' hours (default: the server's). */
  readonly timeZone?: string | undefined;
  /** How long after the start tasks agents still run are re-adopted rather than stopped (default 30 s). */
  readonly adoptWindowMs?: number | undefined;
}

export interface Dispatch {
  readonly broker: AgentTaskBroker;
  /** The task routes for the TLS listener (next to agentLinkPlugin). */
  plugin(store: Pick<AgentLinkStore, 'findAgent'>): FastifyPluginAsync;
  /** The job engine's executor: in process when proxy and repository are local, else on agents. */
  executor(
    local: TaskExecutor & DiskResolver,
    onRestorePoint?: (job: JobDefinition, task: TaskSpec, summary: BackupVmSummary) => Promise<void>,
    /** The catalog follows a VM's folder after retention and maintenance on a repository agent. */
    onVmPoints?: (job: JobDefinition, task: TaskSpec, points: readonly RestorePointInfo[]) => Promise<void>,
    /** The password of an encrypted job (the server's sealed key store, docs/encryption.md). */
    password?: (job: JobDefinition) => Promise<string | undefined>,
    /** Every password that may open the job's existing chains (the repository agent picks its chain's). */
    passwords?: (job: JobDefinition) => Promise<readonly string[]>,
  ): RemoteDataPathExecutor;
  /**
   * Restores a disk on the agent that owns the repository (to a path on that agent's host);
   * undefined when the repository is this server's own (restore in process).
   */
  restoreDisk: (
    repository: { readonly agent: string | null; readonly path: string },
    args: { pointId: string; disk: string; to: string; format?: 'raw' | 'qcow2' | undefined; overwrite?: boolean | undefined; digest?: boolean | undefined; password?: string | undefined },
    /** Aborted: the agent's task is cancelled (its restore stops and leaves no image). */
    signal?: AbortSignal,
    /** The task's progress as the agent reports it (about every 200 ms). */
    onProgress?: (p: WireRestoreDiskProgress) => void,
  ) => Promise<WireRestoredDisk> | undefined;
  /**
   * The removed-VM sweep of one job's folder on the agent that owns the repository (docs/formats/
   * agent-link.md, `removed-vm-sweep`); undefined when the repository is this server's own.
   */
  sweepRemovedVms: (
    repository: { readonly agent: string | null; readonly path: string },
    args: { job: string; method: 'forever-forward' | 'forward' | 'reverse'; vms: readonly string[]; days: number; now: Date },
  ) => Promise<{ vms: Array<{ vm: string; removedPoints: readonly string[]; points: RestorePointInfo[] }> }> | undefined;
  close(): void;
}

export function createDispatch(ctx: ServiceContext, opts: DispatchOptions = {}): Dispatch {
  const broker = new AgentTaskBroker({
    ...(opts.agentLostMs !== undefined ? { agentLostMs: opts.agentLostMs } : {}),
    ...(opts.pickupTimeoutMs !== undefined ? { pickupTimeoutMs: opts.pickupTimeoutMs } : {}),
    ...(opts.pollWaitMs !== undefined ? { pollWaitMs: opts.pollWaitMs } : {}),
    ...(opts.adoptWindowMs !== undefined ? { adoptWindowMs: opts.adoptWindowMs } : {}),
  });
  return {
    broker,
    plugin: (store) => agentTaskPlugin({ store, broker }),
    executor: (local, onRestorePoint, onVmPoints, password, passwords) =>
      new RemoteDataPathExecutor({
        broker,
        local,
        hosts: async () =>
          (await listHosts(ctx)).map((h) => ({
            name: h.name,
            agent: h.agent,
            connection: h.kind === 'qemu' ? { kind: 'qemu' as const, qmpGlob: h.uri } : { kind: 'libvirt' as const, uri: h.uri },
          })),
        repository: async (job) => {
          const r = await getRepository(ctx, job.repository);
          return { name: r.name, path: r.path, agent: r.agent };
        },
        ...(onRestorePoint ? { onRestorePoint } : {}),
        ...(onVmPoints ? { onVmPoints } : {}),
        ...(password ? { password } : {}),
        ...(passwords ? { passwords } : {}),
        throttling:
          opts.throttling ??
          (async () => ({ rules: (await listThrottlingRules(ctx)).map(policyRule), timeZone: opts.timeZone ?? Intl.DateTimeFormat().resolvedOptions().timeZone })),
        ...(opts.resumeWindowMs !== undefined ? { resumeWindowMs: opts.resumeWindowMs } : {}),
        now: () => ctx.clock.now(),
      }),
    restoreDisk: (repository, args, signal, onProgress) => {
      if (repository.agent === null || repository.agent === (opts.localAgent ?? 'local')) return undefined;
      const handle = broker.run(repository.agent, { kind: 'restore-disk', repositoryPath: repository.path, ...args }, (e) => {
        const p = e.type === 'progress' ? restoreDiskProgressOf(e.progress) : undefined;
        if (p) onProgress?.(p);
      });
      const stop = (): void => handle.cancel(signal?.reason instanceof Error ? signal.reason.message : 'the restore was stopped');
      signal?.addEventListener('abort', stop, { once: true });
      return (handle.result as Promise<WireRestoredDisk>).finally(() => signal?.removeEventListener('abort', stop));
    },
    sweepRemovedVms: (repository, args) => {
      if (repository.agent === null || repository.agent === (opts.localAgent ?? 'local')) return undefined;
      const handle = broker.run(repository.agent, { kind: 'removed-vm-sweep', repositoryPath: repository.path, ...args, now: args.now.toISOString() });
      return (handle.result as Promise<RemovedVmSweepResult>).then((r) => ({ vms: r.vms.map((v) => ({ vm: v.vm, removedPoints: v.removedPoints, points: v.points.map(pointFromWire) })) }));
    },
    close: () => broker.close(),
  };
}
