// The job engine's executor for every install: a task runs in this process (the one-host data
// path, LocalDataPathExecutor) when both its proxy and its repository are this server's own local
// agent; otherwise it goes over the agent link. Then the repository's agent receives the VM's
// restore point (backup-target) and the proxy next to the VM reads and sends it (backup-source)
// straight to it over the data-mover transport; VM data never passes through the server. The
// repository agent owns the folder, so it also makes the chain decisions around the point (plan,
// repair, retention, synthetic full, compaction, health check: agent/backup/chain-run.ts); the
// server hands its plan to the source agent and makes the catalog follow the folder afterwards. A
// health-check session is one task on the repository agent. As on the one-host path, the first
// disk task of a VM runs the VM's work and its other disk tasks report their disk from that run.
import { randomBytes } from 'node:crypto';
import { lookup } from 'node:dns/promises';
import net from 'node:net';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { methodSettings, splitDisks } from '../../agent/backup/chain-policy.js';
import type { BackupProgress, BackupVmSummary } from '../../agent/backup/disk-backup.js';
import { chainIdFor } from '../../agent/backup/disk-backup.js';
import { jobPointFailed } from '../../agent/backup/job-target.js';
import { jobTransferId } from '../../agent/remote/job-target-task.js';
import { stepOf, type MaintenanceProgress } from '../../agent/backup/chain-run.js';
import { diskProgress, isBoolean, isCompression, isMode, isNumber, KEEP_SETTLED_MS, setting } from '../../agent/backup/job-settings.js';
import { pointFromWire } from '../../agent/remote/repository-sink.js';
import type { HypervisorConnection } from '../../hypervisor/index.js';
import { ALL_VMS, catalogPoints, splitAllVmsDiskName, type RestorePointInfo } from '../../repository/index.js';
import type { BackupTargetResult, BackupTargetTask, HealthCheckResult, TaskEvent, WireDisk } from '../../transport/agent-tasks.js';
import { emptyStageBusy, STAGES, type StageBusy } from '../../transport/stage-times.js';
import type { NamedLimit } from '../../transport/throttle.js';
import type { DiskRef, DiskResolver, JobDefinition, LogLevel, TaskContext, TaskExecutor, TaskOutcome, TaskSpec } from '../jobs/ports.js';
import { sumStageBusy } from '../resources/bottleneck.js';
import { matchingThrottlingRules, mbpsToBytesPerSecond, type ThrottlingRule } from '../resources/throttling-rules.js';
import type { AgentTaskBroker, AgentTaskHandle } from './broker.js';

const log = logger('remote-data-path');

export interface DispatchHost {
  readonly name: string;
  readonly connection: HypervisorConnection;
  /** The agent next to the host's VMs; null: this server's local agent. */
  readonly agent: string | null;
}

export interface DispatchRepository {
  readonly name: string;
  readonly path: string;
  /** The agent that owns the folder; null: this server's local agent. */
  readonly agent: string | null;
}

export interface RemoteDataPathOptions {
  readonly broker: AgentTaskBroker;
  /** The in-process data path (one-host install), for tasks whose proxy and repository are local. */
  readonly local: TaskExecutor & DiskResolver;
  /** Name of this server's own agent (default `local`). */
  readonly localAgent?: string;
  hosts(): Promise<readonly DispatchHost[]>;
  repository(job: JobDefinition): Promise<DispatchRepository>;
  password?(job: JobDefinition): Promise<string | undefined>;
  /**
   * Every password that may open the job's existing chains, newest first (server: its current and
   * earlier ones, then those added by hand): sent to the repository agent, which continues the
   * latest chain with the one that opens it (a changed password applies from the next full).
   */
  passwords?(job: JobDefinition): Promise<readonly string[]>;
  /** Records a committed point in the catalog (as the local path's onRestorePoint). */
  onRestorePoint?(job: JobDefinition, task: TaskSpec, summary: BackupVmSummary): Promise<void>;
  /** After the repository agent's chain steps: the VM's points as its folder holds them (as the local path's onVmPoints). */
  onVmPoints?(job: JobDefinition, task: TaskSpec, points: readonly RestorePointInfo[]): Promise<void>;
  /** Network throttling rules (SCHED's store) and the server's time zone. */
  throttling?(): Promise<{ rules: readonly ThrottlingRule[]; timeZone: string }>;
  /** How long a data stream may stay down before the transfer fails (default 30 s). */
  readonly resumeWindowMs?: number;
  readonly now?: () => Date;
}

type RunEvent =
  | { kind: 'progress'; progress: BackupProgress | null; stageTimes?: StageBusy | undefined }
  | { kind: 'log'; level: LogLevel; message: string; disk: string | undefined }
  /** A maintenance step's live progress on the repository agent (merge, synthetic-full, compact, inject, health-check). */
  | { kind: 'maintenance'; progress: MaintenanceProgress };

/** The maintenance progress a repository agent sends as `progress { maintenance }` (chain-run.ts; agent-link.md). */
function maintenanceOf(progress: Record<string, unknown>): MaintenanceProgress | null {
  const m = progress.maintenance as Partial<MaintenanceProgress> | undefined;
  const numbers = m && [m.bytesDone, m.bytesTotal, m.bytesRead, m.bytesWritten].every((n) => typeof n === 'number' && Number.isFinite(n) && n >= 0);
  return m && typeof m.step === 'string' && numbers ? (m as MaintenanceProgress) : null;
}

/** What a VM's run came to: a backup's summary, or a health check's warnings. */
type VmRunResult =
  | { readonly kind: 'backup'; readonly summary: BackupVmSummary & { stageTimes?: StageBusy } }
  | { readonly kind: 'health-check'; readonly warnings: readonly string[] };

interface VmRun {
  readonly result: Promise<VmRunResult>;
  readonly listeners: Set<(e: RunEvent) => void>;
  progress: BackupProgress | null;
  stageTimes: StageBusy | undefined;
  settledAt: number | null;
  /** One task per disk (TaskSpec.vmDisks): the disks whose task has its slot, told to the source agent. */
  readonly go: Set<string>;
  /** Sends `go` to the source agent (set once its task exists). */
  pushGo?: (() => void) | undefined;
  /** Fails the run: both agents' tasks are cancelled. */
  cancel?: ((reason: string) => void) | undefined;
  /** The disk tasks listening, in arrival order: the first takes the VM-wide log lines and stage times. */
  readonly tasks: Array<(e: RunEvent) => void>;
  /** A health check: how far it has come (the repository agent's latest maintenance progress). */
  checked?: MaintenanceProgress | undefined;
  /**
   * The run's disk tasks that hold their slot now: the VM's one transfer carries all their data,
   * so its share of the repository's rate is the sum of theirs (docs/resource-scheduling.md).
   */
  readonly holders: Set<StageTimesContext>;
  /** Sends the current limits to the source agent (set once its task exists). */
  refreshLimits?: (() => void) | undefined;
  /** The VM's cumulative stage times last given to a task (a task that takes over reports only what came after). */
  stagesGiven?: StageBusy | undefined;
}

type JobRunEvent =
  | { kind: 'progress'; vm: string; progress: BackupProgress; stageTimes?: StageBusy | undefined }
  /** A maintenance step's live progress on the `_all` chain (the repository agent's). */
  | { kind: 'maintenance'; progress: MaintenanceProgress }
  | { kind: 'log'; level: LogLevel; message: string; /** `VM/DISK` when it is about one disk. */ disk: string | undefined };

/** What a per-job run came to: the job's point, each VM's summary (its slice of the point) and the warnings. */
interface JobRunResult {
  readonly pointId: string;
  readonly summaries: ReadonlyMap<string, BackupVmSummary & { stageTimes?: StageBusy }>;
  readonly warnings: readonly string[];
}

/** Per-job storage on an agent's repository: the job's run in one session round (agent-link.md, "Per-job storage"). */
interface JobRun {
  readonly result: Promise<JobRunResult>;
  /** Latest progress of each VM. */
  readonly progress: Map<string, BackupProgress>;
  /** The disk tasks listening (`VM/DISK`), in arrival order: the first takes the job-wide lines. */
  readonly tasks: Array<{ readonly disk: string; hear(e: JobRunEvent): void }>;
  settledAt: number | null;
  /** Fails the run: the target and every source task are cancelled. */
  cancel?: ((reason: string) => void) | undefined;
  /** The job's disk tasks that hold their slot now: their shares of the repository's rate, summed, go to the job's transfers. */
  readonly holders: Set<StageTimesContext>;
  /** Sends the current limits to every source agent (set once their tasks exist). */
  refreshLimits?: (() => void) | undefined;
  /** Each VM's latest cumulative stage times: the job's are their sum. */
  readonly vmStages: Map<string, StageBusy>;
  /** The job's cumulative stage times last given to a task (a task that takes over reports only what came after). */
  stagesGiven?: StageBusy | undefined;
}

/** The stage-times hook SCHED adds to the task context (optional until it lands everywhere). */
type StageTimesContext = TaskContext & {
  stageTimes?: (busy: StageBusy) => void;
  rateLimit?: () => number | undefined;
  watchRate?: (listener: (bytesPerSecond: number | undefined) => void) => () => void;
};

export class RemoteDataPathExecutor implements TaskExecutor, DiskResolver {
  readonly #o: RemoteDataPathOptions;
  readonly #runs = new Map<string, VmRun>();
  /** Per-job storage: the job's run in a session round, shared by every disk task of the job. */
  readonly #jobRuns = new Map<string, JobRun>();
  /** Disk tasks of a round that will not run (taskSkipped), by run key: the VM's run fails. */
  readonly #skipped = new Map<string, { why: string; at: number }>();
  readonly #localAgent: string;
  /**
   * The transfers each throttling rule covers now (transfer key -> its source agent). An agent
   * enforces a rule with one bucket for all its own streams, so a rule's rate is split among the
   * agents that send under it, by their number of transfers: the rule holds in total.
   */
  readonly #ruleUsers = new Map<string, Map<string, string>>();
  /** Re-sends the limits of each transfer running now (by transfer key), when a rule's users change. */
  readonly #limitRefreshers = new Map<string, () => void>();
  /** Transfers started and not ended: only these count in a rule's users (a late refresh of an ended one must not). */
  readonly #liveTransfers = new Set<string>();

  constructor(options: RemoteDataPathOptions) {
    this.#o = options;
    this.#localAgent = options.localAgent ?? 'local';
  }

  #isLocal(agent: string | null | undefined): boolean {
    return agent === null || agent === undefined || agent === this.#localAgent;
  }

  async resolveDisks(job: JobDefinition, vm: string, signal: AbortSignal): Promise<DiskRef[]> {
    const hosts = await this.#o.hosts();
    // The server's own hosts first (in process), then each remote agent's hosts through the agent.
    let firstError: unknown;
    if (hosts.some((h) => this.#isLocal(h.agent))) {
      try {
        return await this.#o.local.resolveDisks(job, vm, signal);
      } catch (err) {
        if (!(err instanceof BulwarkError && err.kind === 'not-found')) firstError = err;
      }
    }
    const byAgent = new Map<string, HypervisorConnection[]>();
    for (const h of hosts) if (!this.#isLocal(h.agent)) byAgent.set(h.agent!, [...(byAgent.get(h.agent!) ?? []), h.connection]);
    for (const [agent, connections] of byAgent) {
      signal.throwIfAborted();
      const handle = this.#o.broker.run(agent, { kind: 'resolve-disks', hosts: connections, vm });
      const onAbort = () => handle.cancel('stopped');
      signal.addEventListener('abort', onAbort, { once: true });
      try {
        const disks = (await handle.result) as WireDisk[];
        // Disks the job excludes get no task (as on the one-host path).
        const { included } = splitDisks(methodSettings(job.settings).excludeDisks, vm, disks.map((d) => d.name));
        return disks.filter((d) => included.includes(d.name)).map((d) => ({ name: d.name, sizeBytes: d.sizeBytes, location: { ...d.location, agent } }));
      } catch (err) {
        if (err instanceof BulwarkError && err.kind === 'not-found') continue;
        firstError ??= err;
      } finally {
        signal.removeEventListener('abort', onAbort);
      }
    }
    if (firstError !== undefined) throw firstError instanceof Error ? firstError : new BulwarkError(describeError(firstError), { kind: 'internal' });
    throw new BulwarkError(`VM ${vm} was not found on any host`, { kind: 'not-found', context: { vm, job: job.name } });
  }

  /** The source agent of a task: the granted proxy, the job's pinned proxy, the VM's host agent, or the repository's agent. */
  #sourceAgent(task: TaskSpec, repository: DispatchRepository): string {
    return this.#sourceAgentOf(task.proxy ?? task.job.proxy, task.disk.location?.agent, repository);
  }

  /** The source agent of a VM: the proxy chosen, the VM's host agent, or the repository's agent (never the server's own for another agent's host). */
  #sourceAgentOf(proxy: string | undefined, hostAgent: string | undefined, repository: DispatchRepository): string {
    const chosen = proxy ?? hostAgent ?? repository.agent ?? this.#localAgent;
    // The server's own agent cannot reach a host that another agent serves.
    return this.#isLocal(chosen) && hostAgent !== undefined && !this.#isLocal(hostAgent) ? hostAgent : chosen;
  }

  /** Whether the task runs in process (LocalDataPathExecutor): its repository is this server's and so is its proxy (a health check needs only the repository). */
  #runsLocally(task: TaskSpec, repository: DispatchRepository): boolean {
    const healthCheck = methodSettings(task.job.settings).operation === 'health-check';
    return this.#isLocal(repository.agent) && (healthCheck || this.#isLocal(this.#sourceAgent(task, repository)));
  }

  /** A task of the round will not run: the in-process path stops waiting for it (its VM's other disk tasks share one run). */
  taskSkipped(task: TaskSpec, reason: string): void {
    this.#o.repository(task.job).then(
      (repository) => {
        if (this.#runsLocally(task, repository)) {
          this.#o.local.taskSkipped?.(task, reason);
          return;
        }
        // Remote: the VM's point cannot be complete without this disk; its run fails (or will, when it starts).
        const why = `disk ${task.disk.name} of VM ${task.vm} did not run (${reason}), so the VM's restore point cannot be complete`;
        const key = this.#runKey(task);
        this.#skipped.set(key, { why, at: Date.now() });
        this.#runs.get(key)?.cancel?.(why);
        this.#jobRuns.get(key)?.cancel?.(why);
      },
      (err: unknown) => log.warn({ task: task.taskId, err: describeError(err) }, 'a skipped task could not be routed'),
    );
  }

  async execute(task: TaskSpec, context: TaskContext): Promise<TaskOutcome> {
    const repository = await this.#o.repository(task.job);
    const source = this.#sourceAgent(task, repository);
    const healthCheck = methodSettings(task.job.settings).operation === 'health-check';
    if (this.#runsLocally(task, repository)) return this.#o.local.execute(task, context);
    // Per-job storage: one run for all the job's VMs, written by the repository agent (agent-link.md).
    if (methodSettings(task.job.settings).storage === 'per-job' && !healthCheck) return this.#executeJob(task, context, repository);

    this.#sweepRuns();
    const key = this.#runKey(task);
    let run = this.#runs.get(key);
    const owner = run === undefined;
    const skipped = this.#skipped.get(key);
    if (skipped !== undefined) throw new BulwarkError(skipped.why, { kind: 'unavailable', context: { vm: task.vm, disk: task.disk.name } });
    // One task per disk: this task's disk is backed up while this task holds its slot.
    const paced = !healthCheck && task.vmDisks !== undefined && task.vmDisks.includes(task.disk.name);
    if (!run) {
      run = healthCheck ? this.#startHealthCheck(task, context, repository) : this.#startRun(task, context, source, repository, paced ? task.vmDisks! : undefined);
      this.#runs.set(key, run);
      context.log(
        'info',
        healthCheck
          ? `checking VM ${task.vm} in repository ${repository.name} on its agent ${repository.agent ?? this.#localAgent}`
          : `backing up VM ${task.vm} on agent ${source} into repository ${repository.name} (agent ${repository.agent ?? this.#localAgent})`,
      );
    } else if (!paced) {
      context.log('info', `disk ${task.disk.name} is backed up by the VM's backup already running in this session`);
    }
    if (paced) {
      run.go.add(task.disk.name);
      run.pushGo?.();
      if (!owner) context.log('info', `disk ${task.disk.name}: backed up now by the VM's backup on agent ${source} (its view and restore point are shared by its disk tasks)`);
    }
    const ctx = context as StageTimesContext;
    const r = run;
    // The VM-wide lines and stage times go to one task: the first still listening (the owner, or
    // with one task per disk, whichever disk task runs on after the owner ended).
    const general = (): boolean => r.tasks[0] === listener;
    // The maintenance step this task showed last: kept in its final progress (the session records it).
    let step: ReturnType<typeof stepOf> | undefined;
    const reportStages = stageReporter(r, ctx);
    const listener = (e: RunEvent): void => {
      switch (e.kind) {
        case 'progress':
          if (e.progress) context.progress(diskProgress(e.progress, task.disk.name));
          if (e.stageTimes && general()) reportStages(e.stageTimes);
          break;
        case 'log':
          if (e.disk === undefined ? general() : e.disk === task.disk.name) context.log(e.level, e.message);
          break;
        case 'maintenance':
          // A health-check session's progress is the check's (bytes of the points gone through);
          // after a backup the task's bytes stay the backup's, with the step and how far it came.
          if (!general()) break;
          step = stepOf(e.progress);
          if (healthCheck) context.progress({ bytesRead: e.progress.bytesRead, bytesTransferred: 0, bytesStored: e.progress.bytesWritten, total: e.progress.bytesTotal, step });
          else context.progress({ ...(r.progress ? diskProgress(r.progress, task.disk.name) : { bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 }), step });
          break;
      }
    };
    run.listeners.add(listener);
    run.tasks.push(listener);
    // While this task holds its slot, its share of the repository's rate goes into the VM's transfer.
    run.holders.add(ctx);
    const unwatchRate = ctx.watchRate?.(() => r.refreshLimits?.());
    r.refreshLimits?.();
    if (run.progress) context.progress(diskProgress(run.progress, task.disk.name));
    try {
      if (paced) {
        // This disk done while another still runs: its task ends here (the last disk's task waits
        // for the commit; if the point is not committed the engine fails this task too).
        const early = await this.#diskDone(run, task.disk.name);
        if (early) {
          context.progress({ bytesRead: early.bytesRead, bytesTransferred: early.bytesRead, bytesStored: early.bytesStored, total: early.bytesRead });
          context.log('info', `disk ${task.disk.name} is written; the VM's restore point is committed when its other disks are done`);
          return { state: 'success' };
        }
      }
      const result = await run.result;
      if (result.kind === 'health-check') {
        // The VM's check is reported whole by the task that ran it.
        const checked = owner ? (run.checked?.bytesTotal ?? 0) : 0;
        context.progress({ bytesRead: checked, bytesTransferred: 0, bytesStored: 0, total: checked, ...(step ? { step } : {}) });
        const messages = owner ? [...result.warnings] : [];
        return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
      }
      const { summary } = result;
      const disk = summary.disks.find((d) => d.name === task.disk.name);
      if (!disk) {
        throw new BulwarkError(`disk ${task.disk.name} of VM ${task.vm} is not in restore point ${summary.pointId}`, { kind: 'not-found', context: { vm: task.vm, disk: task.disk.name } });
      }
      const transferred = (disk as { bytesTransferred?: number }).bytesTransferred ?? disk.bytesStored;
      context.progress({ bytesRead: disk.bytesRead, bytesTransferred: transferred, bytesStored: disk.bytesStored, total: disk.bytesRead, ...(step ? { step } : {}) });
      if (general() && summary.stageTimes) reportStages(summary.stageTimes);
      const messages = [...summary.warnings];
      if (summary.consistency === 'crash' && !messages.some((m) => /crash/i.test(m))) messages.push('the restore point is crash-consistent (guest not quiesced)');
      return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
    } finally {
      run.listeners.delete(listener);
      run.tasks.splice(run.tasks.indexOf(listener), 1);
      run.holders.delete(ctx);
      unwatchRate?.();
      if (run.holders.size > 0) run.refreshLimits?.();
    }
  }

  /** The run a task belongs to: its VM's in this session round; per-job storage: the job's (VM names are never empty). */
  #runKey(task: TaskSpec): string {
    const perJob = methodSettings(task.job.settings).storage === 'per-job';
    return `${task.sessionId}\0${perJob ? '' : task.vm}\0${task.attempt}`;
  }

  #sweepRuns(): void {
    const now = Date.now();
    for (const [k, r] of this.#runs) if (r.settledAt !== null && now - r.settledAt > KEEP_SETTLED_MS) this.#runs.delete(k);
    for (const [k, r] of this.#jobRuns) if (r.settledAt !== null && now - r.settledAt > KEEP_SETTLED_MS) this.#jobRuns.delete(k);
    for (const [k, sk] of this.#skipped) if (now - sk.at > KEEP_SETTLED_MS) this.#skipped.delete(k);
  }

  /**
   * Waits until the source agent reports disk `name` done. Resolves with its counters when other
   * disks of the run are still going; with null when every disk is done (this task waits for the
   * commit) or the run ended first. Rejects when the run fails.
   */
  async #diskDone(run: VmRun, name: string): Promise<{ bytesRead: number; bytesStored: number } | null> {
    const check = (): { bytesRead: number; bytesStored: number } | null | undefined => {
      const disks = run.progress?.disks;
      const mine = disks?.[name];
      if (!disks || !mine?.done) return undefined;
      return Object.values(disks).every((d) => d.done) ? null : { bytesRead: mine.bytesRead, bytesStored: mine.bytesStored };
    };
    const now = check();
    if (now !== undefined) return now;
    let listener: ((e: RunEvent) => void) | undefined;
    const done = new Promise<{ bytesRead: number; bytesStored: number } | null>((resolve) => {
      listener = (e) => {
        if (e.kind !== 'progress') return;
        const c = check();
        if (c !== undefined) resolve(c);
      };
      run.listeners.add(listener);
    });
    try {
      return await Promise.race([done, run.result.then(() => null)]);
    } finally {
      if (listener) run.listeners.delete(listener);
    }
  }

  #startRun(task: TaskSpec, context: StageTimesContext, sourceAgent: string, repository: DispatchRepository, diskTasks?: readonly string[]): VmRun {
    const listeners = new Set<(e: RunEvent) => void>();
    const emit = (e: RunEvent): void => {
      for (const l of listeners) l(e);
    };
    const run: VmRun = { listeners, progress: null, stageTimes: undefined, settledAt: null, go: new Set(), tasks: [], holders: new Set([context]), result: Promise.resolve() as never };
    const { job } = task;
    const settings = methodSettings(job.settings);
    const broker = this.#o.broker;
    const targetAgent = repository.agent ?? this.#localAgent;
    const signal = context.signal;
    const transfer = { key: this.#runKey(task), agent: sourceAgent };
    const limitsNow = (sourceIp: string, targetHost: string): Promise<NamedLimit[]> => this.#limits(task, () => sumShares(run.holders), sourceIp, targetHost, transfer);
    const onEvent = (e: TaskEvent): void => {
      switch (e.type) {
        case 'progress':
          if (maintenanceOf(e.progress)) {
            emit({ kind: 'maintenance', progress: maintenanceOf(e.progress)! });
            break;
          }
          if (Object.keys(e.progress).length > 0) run.progress = e.progress as unknown as BackupProgress;
          if (e.stageTimes) run.stageTimes = e.stageTimes;
          emit({ kind: 'progress', progress: run.progress, stageTimes: e.stageTimes });
          break;
        case 'log':
          emit({ kind: 'log', level: e.level, message: e.message, disk: e.disk });
          break;
        case 'ready':
        case 'result':
          break;
      }
    };
    (run as { result: VmRun['result'] }).result = (async (): Promise<VmRunResult> => {
      signal.throwIfAborted();
      const secret = randomBytes(32).toString('hex');
      const password = await this.#o.password?.(job);
      const passwords = await this.#knownPasswords(job, password);
      const chainId = chainIdFor(job.name, task.vm);
      // 1. The repository agent opens the point's receiving end and tells where it listens.
      const { target, ready } = this.#startTarget(
        targetAgent,
        {
          secret,
          repositoryPath: repository.path,
          job: job.name,
          vm: task.vm,
          chainId,
          password,
          ...(passwords.length > 0 ? { passwords } : {}),
          sourceAgent,
          // The repository agent plans the run and keeps the chain (retention, maintenance).
          settings: job.settings ?? {},
          fullRequested: task.full,
          now: this.#now().toISOString(),
        },
        onEvent,
      );
      run.cancel = (reason) => {
        target.cancel(reason);
        sourceHandle?.cancel(reason);
      };
      const stopTarget = () => target.cancel('the job was stopped');
      signal.addEventListener('abort', stopTarget, { once: true });
      let sourceHandle: ReturnType<AgentTaskBroker['run']> | undefined;
      const stopSource = () => sourceHandle?.cancel('the job was stopped');
      signal.addEventListener('abort', stopSource, { once: true });
      try {
        const readyOrFailed = await ready();
        const plan = readyOrFailed.plan;
        const targetHost = readyOrFailed.host ?? broker.addressOf(targetAgent) ?? '127.0.0.1';
        const sourceIp = broker.addressOf(sourceAgent) ?? '127.0.0.1';
        this.#liveTransfers.add(transfer.key);
        const limits = await limitsNow(sourceIp, targetHost);
        const hosts = await this.#o.hosts();
        const mine = hosts.filter((h) => (h.agent ?? this.#localAgent) === sourceAgent).map((h) => h.connection);
        const streams = setting(job, 'multithreadedTransfer', isBoolean) === false ? 1 : (setting(job, 'streams', isNumber) ?? 5);
        const mode = setting(job, 'mode', isMode);
        const blockSize = setting(job, 'blockSize', isNumber);
        const compression = setting(job, 'compression', isCompression);
        // 2. The source agent reads the VM and sends it straight to the repository agent.
        sourceHandle = broker.run(
          sourceAgent,
          {
            kind: 'backup-source',
            transferId: target.taskId,
            secret,
            target: { host: targetHost, port: readyOrFailed.port, agent: targetAgent },
            hosts: mine.length > 0 ? mine : hosts.map((h) => h.connection),
            job: job.name,
            vm: task.vm,
            // What the repository agent planned (an agent without chain steps: what was asked).
            full: plan ? plan.kind === 'full' : task.full,
            ...(plan?.kind === 'full' ? { fullReason: plan.reason } : {}),
            previous: readyOrFailed.previous,
            ...(plan ? { chainMethod: plan.chainMethod, repair: plan.repair } : {}),
            ...(settings.excludeDisks.length > 0 ? { excludeDisks: settings.excludeDisks } : {}),
            mode,
            requireGuestProcessing: setting(job, 'requireGuestProcessing', isBoolean),
            blockSize,
            compression,
            streams,
            resumeWindowMs: this.#o.resumeWindowMs ?? 30_000,
            limits,
            ...(diskTasks ? { diskTasks } : {}),
          },
          onEvent,
        );
        if (diskTasks) {
          const h = sourceHandle;
          run.pushGo = () => h.setDisks([...run.go]);
          run.pushGo();
        }
        if (signal.aborted) stopSource();
        // Rules have hours and the repository share changes as tasks come and go: keep the limits current.
        const handle = sourceHandle;
        const refresh = (): void => {
          limitsNow(sourceIp, targetHost).then(
            (l) => handle.setLimits(l),
            (err: unknown) => log.warn({ err: describeError(err) }, 'could not re-evaluate the rate limits'),
          );
        };
        // The disk tasks' shares change as tasks start and end (each holder's watchRate and its
        // arrival or end call run.refreshLimits).
        run.refreshLimits = refresh;
        this.#limitRefreshers.set(transfer.key, refresh);
        const limitTimer = setInterval(refresh, 5000);
        limitTimer.unref();
        signal.addEventListener('abort', () => clearInterval(limitTimer), { once: true });
        void sourceHandle.result.finally(() => {
          clearInterval(limitTimer);
          run.refreshLimits = undefined;
          this.#transferEnded(transfer.key);
        }).catch(() => undefined);
        // Whichever side fails first fails the run; the other side is stopped.
        const sourceDone = sourceHandle.result;
        const targetFailed = target.result.then(
          () => new Promise<never>(() => undefined),
          (err: unknown) => {
            throw err;
          },
        );
        let raw: Record<string, unknown>;
        try {
          raw = (await Promise.race([sourceDone, targetFailed])) as Record<string, unknown>;
        } catch (err) {
          sourceHandle.cancel(`the repository side failed: ${describeError(err)}`);
          target.cancel('the backup failed');
          throw err;
        }
        // What the repository stored (after its compression and dedup), per disk, from the target side.
        const targetResult = (await target.result) as Partial<BackupTargetResult>;
        const stored = targetResult.disks ?? [];
        const sent = sourceSummary(raw, sourceAgent, task.vm);
        const summary = {
          ...sent,
          warnings: [...sent.warnings, ...(targetResult.warnings ?? [])],
          disks: sent.disks.map((d) => {
            const s = stored.find((x) => x.name === d.name);
            // bytesTransferred: what crossed the network (the source's count of wire bytes).
            return { ...d, bytesTransferred: d.bytesStored, ...(s ? { bytesStored: s.storedBytes, storedBlocks: s.storedBlocks, unchangedBlocks: s.unchangedBlocks } : {}) };
          }),
          point: pointFromWire(raw.point as Record<string, unknown>),
        } as BackupVmSummary & { stageTimes?: StageBusy };
        if (this.#o.onRestorePoint) {
          try {
            await this.#o.onRestorePoint(job, task, summary);
          } catch (err) {
            log.error({ vm: task.vm, point: summary.pointId, err: describeError(err) }, 'restore point committed but not recorded in the catalog');
            emit({ kind: 'log', level: 'warning', message: `restore point ${summary.pointId} is in the repository but could not be recorded in the catalog: ${describeError(err)} (the job's next run brings the catalog in line with the repository's folder)`, disk: undefined });
          }
        }
        if (targetResult.points) await this.#syncPoints(task, targetResult.points.map(pointFromWire), emit);
        return { kind: 'backup', summary };
      } catch (err) {
        target.cancel('the backup failed');
        sourceHandle?.cancel('the backup failed');
        // A source that never started leaves no transfer behind in the rules' shares.
        if (!sourceHandle) this.#transferEnded(transfer.key);
        throw err;
      } finally {
        signal.removeEventListener('abort', stopTarget);
        signal.removeEventListener('abort', stopSource);
      }
    })();
    run.result.then(
      () => (run.settledAt = Date.now()),
      () => (run.settledAt = Date.now()),
    );
    return run;
  }

  /**
   * Starts a backup-target task on the repository agent. Its `ready` event goes to `ready()` (which
   * rejects with the task's error, or fails when the task ends before it), every other event to
   * `onEvent`.
   */
  #startTarget(
    agent: string,
    body: Omit<BackupTargetTask, 'kind' | 'taskId'>,
    onEvent: (e: TaskEvent) => void,
  ): { target: AgentTaskHandle; ready: () => Promise<Extract<TaskEvent, { type: 'ready' }>> } {
    let resolveReady: ((e: Extract<TaskEvent, { type: 'ready' }>) => void) | undefined;
    const readyEvent = new Promise<Extract<TaskEvent, { type: 'ready' }>>((resolve) => (resolveReady = resolve));
    const target = this.#o.broker.run(agent, { kind: 'backup-target', ...body }, (e) => {
      if (e.type === 'ready') resolveReady?.(e);
      else onEvent(e);
    });
    const ready = async (): Promise<Extract<TaskEvent, { type: 'ready' }>> => {
      const r = await Promise.race([readyEvent, target.result.then(() => undefined)]);
      if (!r) throw new BulwarkError(`repository agent ${agent} ended the task before it was ready`, { kind: 'internal', context: { agent, job: body.job, vm: body.vm } });
      return r;
    };
    return { target, ready };
  }

  #now(): Date {
    return this.#o.now?.() ?? new Date();
  }

  /** The job's passwords other than the current one, for the repository agent to find its chains' own. */
  async #knownPasswords(job: JobDefinition, current: string | undefined): Promise<string[]> {
    return [...new Set((await this.#o.passwords?.(job)) ?? [])].filter((p) => p !== current);
  }

  /** The catalog follows the VM's folder after the repository agent's chain steps. */
  async #syncPoints(task: TaskSpec, points: readonly RestorePointInfo[], emit: (e: RunEvent) => void): Promise<void> {
    if (!this.#o.onVmPoints) return;
    try {
      await this.#o.onVmPoints(task.job, task, points);
    } catch (err) {
      emit({ kind: 'log', level: 'warning', message: `the catalog could not follow the repository's points of VM ${task.vm}: ${describeError(err)} (the job's next run brings the catalog in line with the repository's folder)`, disk: undefined });
    }
  }

  /** A health-check session's work on one VM: a health-check task on the repository's agent. */
  #startHealthCheck(task: TaskSpec, context: TaskContext, repository: DispatchRepository): VmRun {
    const listeners = new Set<(e: RunEvent) => void>();
    const emit = (e: RunEvent): void => {
      for (const l of listeners) l(e);
    };
    const run: VmRun = { listeners, progress: null, stageTimes: undefined, settledAt: null, go: new Set(), tasks: [], holders: new Set(), result: Promise.resolve() as never };
    const { job } = task;
    const agent = repository.agent ?? this.#localAgent;
    (run as { result: VmRun['result'] }).result = (async (): Promise<VmRunResult> => {
      context.signal.throwIfAborted();
      const password = await this.#o.password?.(job);
      const passwords = await this.#knownPasswords(job, password);
      // Per-job storage: the job's `_all` chain; the catalog of each of its VMs follows (a point the
      // check found damaged shows as corrupt).
      const perJob = methodSettings(job.settings).storage === 'per-job';
      const handle = this.#o.broker.run(
        agent,
        { kind: 'health-check', repositoryPath: repository.path, job: job.name, vm: perJob ? ALL_VMS : task.vm, settings: job.settings ?? {}, now: this.#now().toISOString(), password, ...(passwords.length > 0 ? { passwords } : {}) },
        (e) => {
          if (e.type === 'log') emit({ kind: 'log', level: e.level, message: e.message, disk: e.disk });
          const m = e.type === 'progress' ? maintenanceOf(e.progress) : null;
          if (m) {
            run.checked = m;
            emit({ kind: 'maintenance', progress: m });
          }
        },
      );
      const stop = () => handle.cancel('the job was stopped');
      context.signal.addEventListener('abort', stop, { once: true });
      try {
        const r = (await handle.result) as HealthCheckResult;
        const points = r.points.map(pointFromWire);
        if (!perJob) await this.#syncPoints(task, points, emit);
        else {
          const slices = catalogPoints(points);
          for (const vm of new Set(slices.map((p) => p.vm))) await this.#syncPoints({ ...task, vm }, slices.filter((p) => p.vm === vm), emit);
        }
        return { kind: 'health-check', warnings: r.warnings };
      } finally {
        context.signal.removeEventListener('abort', stop);
      }
    })();
    run.result.then(
      () => (run.settledAt = Date.now()),
      () => (run.settledAt = Date.now()),
    );
    return run;
  }

  /**
   * One disk task of a per-job backup whose point an agent writes: the job's first task to run
   * starts the job's run (every VM, one point) and holds its slot for it; every disk task reports
   * its disk from the run's result (its VM's slice of the job's point).
   */
  async #executeJob(task: TaskSpec, context: TaskContext, repository: DispatchRepository): Promise<TaskOutcome> {
    this.#sweepRuns();
    const key = this.#runKey(task);
    const skipped = this.#skipped.get(key);
    if (skipped !== undefined) throw jobPointFailed(task.job.name, new BulwarkError(skipped.why, { kind: 'unavailable', context: { vm: task.vm, disk: task.disk.name } }));
    let run = this.#jobRuns.get(key);
    const owner = run === undefined;
    if (!run) {
      run = this.#startJobRun(task, context, repository);
      this.#jobRuns.set(key, run);
      context.log('info', `backing up job ${task.job.name} into one restore point for all its VMs (storage per-job), written by agent ${repository.agent ?? this.#localAgent} into repository ${repository.name}: this task runs it`);
    } else {
      context.log('info', `disk ${task.disk.name} of VM ${task.vm} is backed up by the job's run already going in this session (one restore point for all its VMs)`);
    }
    const r = run;
    const ctx = context as StageTimesContext;
    const mine = `${task.vm}/${task.disk.name}`;
    // The maintenance step of the job's chain this task showed last (kept in its final progress).
    let step: ReturnType<typeof stepOf> | undefined;
    const reportStages = stageReporter(r, ctx);
    const listener = {
      disk: mine,
      hear: (e: JobRunEvent): void => {
        const general = r.tasks[0] === listener;
        switch (e.kind) {
          case 'progress':
            if (e.vm === task.vm) context.progress(diskProgress(e.progress, task.disk.name));
            // Every VM's transfer reports its own: the job's stage times are their sum.
            if (e.stageTimes && general) reportStages(sumStageBusy([...r.vmStages.values()]));
            break;
          case 'maintenance': {
            if (!general) break;
            step = stepOf(e.progress);
            const p = r.progress.get(task.vm);
            context.progress({ ...(p ? diskProgress(p, task.disk.name) : { bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 }), step });
            break;
          }
          case 'log':
            // A disk's lines go to its task (the oldest task when that disk's task is not listening).
            if (e.disk === undefined ? general : e.disk === mine || (general && !r.tasks.some((t) => t.disk === e.disk))) context.log(e.level, e.message);
            break;
        }
      },
    };
    r.tasks.push(listener);
    r.holders.add(ctx);
    const unwatchRate = ctx.watchRate?.(() => r.refreshLimits?.());
    r.refreshLimits?.();
    const p = r.progress.get(task.vm);
    if (p) context.progress(diskProgress(p, task.disk.name));
    try {
      const result = await r.result;
      const summary = result.summaries.get(task.vm);
      const disk = summary?.disks.find((d) => d.name === task.disk.name);
      if (!summary || !disk) {
        throw new BulwarkError(`disk ${task.disk.name} of VM ${task.vm} is not in job ${task.job.name}'s restore point ${result.pointId} (removed from the VM?)`, {
          kind: 'not-found',
          context: { job: task.job.name, vm: task.vm, disk: task.disk.name },
        });
      }
      const transferred = (disk as { bytesTransferred?: number }).bytesTransferred ?? disk.bytesStored;
      context.progress({ bytesRead: disk.bytesRead, bytesTransferred: transferred, bytesStored: disk.bytesStored, total: disk.bytesRead, ...(step ? { step } : {}) });
      if (r.tasks[0] === listener) {
        const all = [...result.summaries.values()].flatMap((x) => (x.stageTimes ? [x.stageTimes] : []));
        if (all.length > 0) reportStages(sumStageBusy(all));
      }
      context.log('info', `disk ${task.disk.name} is in restore point ${summary.pointId} (VM ${task.vm}'s part of job point ${result.pointId})`);
      const messages = owner ? [...result.warnings] : [];
      return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
    } finally {
      r.tasks.splice(r.tasks.indexOf(listener), 1);
      r.holders.delete(ctx);
      unwatchRate?.();
      if (r.holders.size > 0) r.refreshLimits?.();
    }
  }

  /**
   * The job's run: the per-job target on the repository agent (plans the `_all` chain, opens the
   * one writer), then one source task per VM on its source agent, all at once; the point commits
   * when every VM is in it; the first failure cancels everything (nothing is visible). Then each
   * VM's slice goes into the catalog and the catalog follows the `_all` chain's steps.
   */
  #startJobRun(task: TaskSpec, context: StageTimesContext, repository: DispatchRepository): JobRun {
    const run: JobRun = { progress: new Map(), tasks: [], settledAt: null, holders: new Set([context]), vmStages: new Map(), result: Promise.resolve() as never };
    const emit = (e: JobRunEvent): void => {
      for (const t of [...run.tasks]) t.hear(e);
    };
    const say = (level: LogLevel, message: string, disk?: string) => emit({ kind: 'log', level, message, disk });
    const { job } = task;
    const settings = methodSettings(job.settings);
    const broker = this.#o.broker;
    const targetAgent = repository.agent ?? this.#localAgent;
    const signal = context.signal;
    (run as { result: JobRun['result'] }).result = (async (): Promise<JobRunResult> => {
      signal.throwIfAborted();
      if (settings.operation === 'quick') {
        throw new BulwarkError(`quick backup of VM ${task.vm}: job ${job.name} keeps all its VMs in one restore point (storage per-job), so a point of one VM alone is not written`, {
          kind: 'invalid',
          context: { job: job.name, vm: task.vm },
          hint: `run the whole job instead: bulwark job run ${job.name}`,
        });
      }
      // Every VM of the job (the point holds them all) and the agent that reads it.
      const vms: Array<{ vm: string; sourceAgent: string; chainId: string }> = [];
      for (const name of job.vms) {
        signal.throwIfAborted();
        let hostAgent: string | undefined = task.disk.location?.agent;
        if (name !== task.vm) {
          const disks = await this.resolveDisks(job, name, signal).catch((err: unknown) => {
            throw new BulwarkError(`VM ${name}: ${describeError(err)}`, { kind: err instanceof BulwarkError ? err.kind : 'internal', context: { job: job.name, vm: name }, cause: err, hint: `remove VM ${name} from the job, or set the job's storage to per-vm` });
          });
          hostAgent = disks[0]?.location?.agent;
        }
        vms.push({ vm: name, sourceAgent: this.#sourceAgentOf(name === task.vm ? (task.proxy ?? job.proxy) : job.proxy, hostAgent, repository), chainId: chainIdFor(job.name, name) });
      }
      const secret = randomBytes(32).toString('hex');
      const password = await this.#o.password?.(job);
      const passwords = await this.#knownPasswords(job, password);
      // 1. The repository agent plans the `_all` chain and opens the one writer.
      const { target, ready } = this.#startTarget(
        targetAgent,
        {
          secret,
          repositoryPath: repository.path,
          job: job.name,
          vm: ALL_VMS,
          chainId: '',
          password,
          ...(passwords.length > 0 ? { passwords } : {}),
          sourceAgent: vms[0]!.sourceAgent,
          settings: job.settings ?? {},
          fullRequested: task.full,
          now: this.#now().toISOString(),
          vms,
        },
        (e) => {
          if (e.type === 'log') say(e.level, e.message, e.disk);
          else if (e.type === 'progress' && typeof e.progress.failedVm === 'string') failedVm ??= e.progress.failedVm;
          else if (e.type === 'progress' && maintenanceOf(e.progress)) emit({ kind: 'maintenance', progress: maintenanceOf(e.progress)! });
        },
      );
      /** The VM whose transfer the target saw end first: where a failure began. */
      let failedVm: string | undefined;
      const sources = new Map<string, ReturnType<AgentTaskBroker['run']>>();
      run.cancel = (reason) => {
        target.cancel(reason);
        for (const h of sources.values()) h.cancel(reason);
      };
      const onAbort = () => run.cancel?.('the job was stopped');
      signal.addEventListener('abort', onAbort, { once: true });
      let limitTimer: NodeJS.Timeout | undefined;
      /** The keys of the VMs' transfers (in the throttling rules' shares while they run). */
      const transfers: string[] = [];
      try {
        const readyOrFailed = await ready();
        const plan = readyOrFailed.plan;
        if (!plan) throw new BulwarkError(`repository agent ${targetAgent} did not plan job ${job.name}'s run (an older agent: update it)`, { kind: 'unavailable', context: { job: job.name } });
        const targetHost = readyOrFailed.host ?? broker.addressOf(targetAgent) ?? '127.0.0.1';
        const hosts = await this.#o.hosts();
        const streams = setting(job, 'multithreadedTransfer', isBoolean) === false ? 1 : (setting(job, 'streams', isNumber) ?? 5);
        const blockSize = setting(job, 'blockSize', isNumber);
        const full = plan.kind === 'full';
        // 2. Each VM's source agent reads it and sends it to the target, all at once. The job's
        // disk tasks' shares of the repository's rate, summed, are split among the VMs' transfers.
        const refreshers: Array<() => void> = [];
        const vmShare = (): number | undefined => {
          const sum = sumShares(run.holders);
          return sum === undefined ? undefined : sum / vms.length;
        };
        for (const v of vms) {
          const sourceIp = broker.addressOf(v.sourceAgent) ?? '127.0.0.1';
          const transfer = { key: `${this.#runKey(task)}/${v.vm}`, agent: v.sourceAgent };
          transfers.push(transfer.key);
          this.#liveTransfers.add(transfer.key);
          const mine = hosts.filter((h) => (h.agent ?? this.#localAgent) === v.sourceAgent).map((h) => h.connection);
          const repair = plan.repair.flatMap((r) => {
            const split = splitAllVmsDiskName(r.disk);
            return split?.vm === v.vm ? [{ disk: split.disk, blocks: r.blocks }] : [];
          });
          const chainBlockSize = full ? blockSize : (readyOrFailed.blockSize ?? blockSize);
          const handle = broker.run(
            v.sourceAgent,
            {
              kind: 'backup-source',
              transferId: jobTransferId(target.taskId, v.vm),
              secret,
              target: { host: targetHost, port: readyOrFailed.port, agent: targetAgent },
              hosts: mine.length > 0 ? mine : hosts.map((h) => h.connection),
              job: job.name,
              vm: v.vm,
              full,
              ...(full ? { fullReason: plan.reason } : {}),
              previous: readyOrFailed.vms?.[v.vm] ?? null,
              chainMethod: plan.chainMethod,
              ...(repair.length > 0 ? { repair } : {}),
              ...(settings.excludeDisks.length > 0 ? { excludeDisks: settings.excludeDisks } : {}),
              mode: setting(job, 'mode', isMode),
              requireGuestProcessing: setting(job, 'requireGuestProcessing', isBoolean),
              ...(chainBlockSize !== undefined ? { blockSize: chainBlockSize } : {}),
              compression: setting(job, 'compression', isCompression),
              streams,
              resumeWindowMs: this.#o.resumeWindowMs ?? 30_000,
              limits: await this.#limits(task, vmShare, sourceIp, targetHost, transfer, v.vm),
              ...(full ? {} : { intoIncrement: true }),
            },
            (e) => {
              switch (e.type) {
                case 'progress':
                  if (Object.keys(e.progress).length > 0) {
                    const progress = e.progress as unknown as BackupProgress;
                    run.progress.set(v.vm, progress);
                    if (e.stageTimes) run.vmStages.set(v.vm, e.stageTimes);
                    emit({ kind: 'progress', vm: v.vm, progress, stageTimes: e.stageTimes });
                  }
                  break;
                case 'log':
                  say(e.level, e.disk === undefined ? `VM ${v.vm}: ${e.message}` : e.message, e.disk === undefined ? undefined : `${v.vm}/${e.disk}`);
                  break;
                case 'ready':
                case 'result':
                  break;
              }
            },
          );
          sources.set(v.vm, handle);
          const refresh = (): void => {
            this.#limits(task, vmShare, sourceIp, targetHost, transfer, v.vm).then(
              (l) => handle.setLimits(l),
              (err: unknown) => log.warn({ err: describeError(err) }, 'could not re-evaluate the rate limits'),
            );
          };
          refreshers.push(refresh);
          this.#limitRefreshers.set(transfer.key, refresh);
          void handle.result.finally(() => this.#transferEnded(transfer.key)).catch(() => undefined);
        }
        if (signal.aborted) onAbort();
        // Rules have hours and the repository share changes as tasks come and go: keep the limits current.
        const refreshAll = (): void => refreshers.forEach((f) => f());
        run.refreshLimits = refreshAll;
        limitTimer = setInterval(refreshAll, 5000);
        limitTimer.unref();

        // Every VM or none: the first failure (a source, or the target) stops everything.
        const failures: Array<{ vm: string | null; err: unknown }> = [];
        const watched = [...sources].map(([vm, h]) =>
          h.result.catch((err: unknown) => {
            failures.push({ vm, err });
            throw err;
          }),
        );
        const targetFailed = target.result.then(
          () => new Promise<never>(() => undefined),
          (err: unknown) => {
            failures.push({ vm: null, err });
            throw err;
          },
        );
        let raws: unknown[];
        try {
          raws = await Promise.race([Promise.all(watched), targetFailed]);
        } catch (first) {
          run.cancel?.(`job ${job.name}'s restore point failed: ${describeError(first)}`);
          // Where it began (the target names the VM whose transfer ended first; else the first source
          // to fail): the others fail because of it. Wait a moment for every side to report.
          await Promise.race([Promise.allSettled([...watched, targetFailed]), new Promise((r) => setTimeout(r, 3000).unref())]);
          const named = failedVm === undefined ? undefined : (failures.find((f) => f.vm === failedVm) ?? failures.find((f) => f.vm === null));
          const origin = named ?? failures.find((f) => f.vm !== null) ?? failures[0];
          const cause = origin?.vm ? new BulwarkError(`VM ${origin.vm} (agent ${sourceAgentOf(vms, origin.vm)}): ${describeError(origin.err)}`, { kind: kindOf(origin.err), context: { job: job.name, vm: origin.vm }, cause: origin.err }) : (origin?.err ?? first);
          throw jobPointFailed(job.name, cause);
        }
        const targetResult = (await target.result) as BackupTargetResult;
        const point = pointFromWire(targetResult.point);
        const slices = catalogPoints([point]);
        const stored = targetResult.disks;
        const summaries = new Map<string, BackupVmSummary & { stageTimes?: StageBusy }>();
        const warnings = [...(targetResult.warnings ?? [])];
        for (const [i, v] of vms.entries()) {
          const sent = sourceSummary(raws[i], v.sourceAgent, v.vm);
          const slice = slices.find((p) => p.vm === v.vm);
          if (!slice) throw new BulwarkError(`restore point ${point.id} of job ${job.name} does not hold VM ${v.vm}`, { kind: 'internal', context: { job: job.name, vm: v.vm, point: point.id } });
          const summary = {
            ...sent,
            pointId: slice.id,
            point: slice,
            disks: sent.disks.map((d) => {
              const st = stored.find((x) => x.name === `${v.vm}/${d.name}`);
              return { ...d, bytesTransferred: d.bytesStored, ...(st ? { bytesStored: st.storedBytes, storedBlocks: st.storedBlocks, unchangedBlocks: st.unchangedBlocks } : {}) };
            }),
          };
          summaries.set(v.vm, summary);
          warnings.push(...sent.warnings.map((w) => `VM ${v.vm}: ${w}`));
          if (sent.consistency === 'crash') warnings.push(`VM ${v.vm}: the restore point is crash-consistent (guest not quiesced)`);
          if (!this.#o.onRestorePoint) continue;
          try {
            await this.#o.onRestorePoint(job, { ...task, vm: v.vm }, summary);
          } catch (err) {
            log.error({ vm: v.vm, point: slice.id, err: describeError(err) }, 'restore point committed but not recorded in the catalog');
            say('warning', `restore point ${slice.id} of VM ${v.vm} is in the repository but could not be recorded in the catalog: ${describeError(err)} (the job's next run brings the catalog in line with the repository's folder)`);
          }
        }
        say('info', `restore point ${point.id} of job ${job.name} holds ${vms.length} VM(s): ${vms.map((v) => `${v.vm} (${summaries.get(v.vm)!.pointId})`).join(', ')}`);
        // The catalog follows each VM: its slices of the `_all` chain after its steps, and its own folder.
        if (targetResult.points && this.#o.onVmPoints) {
          const all = catalogPoints(targetResult.points.map(pointFromWire));
          for (const vm of new Set([...vms.map((v) => v.vm), ...all.map((p) => p.vm)])) {
            try {
              await this.#o.onVmPoints(job, { ...task, vm }, all.filter((p) => p.vm === vm));
            } catch (err) {
              const w = `the catalog could not follow the repository's points of VM ${vm}: ${describeError(err)} (the job's next run brings the catalog in line with the repository's folder)`;
              warnings.push(w);
              say('warning', w);
            }
          }
        }
        return { pointId: point.id, summaries, warnings };
      } catch (err) {
        run.cancel?.('the backup failed');
        throw err;
      } finally {
        clearInterval(limitTimer);
        run.refreshLimits = undefined;
        for (const key of transfers) this.#transferEnded(key);
        signal.removeEventListener('abort', onAbort);
      }
    })();
    run.result.then(
      () => (run.settledAt = Date.now()),
      () => (run.settledAt = Date.now()),
    );
    return run;
  }

  /**
   * The rate limits of a transfer: each matching throttling rule (shared by name) and its share of
   * the repository's rate (`share()`: its disk tasks' shares summed; `part`: one VM's transfer of a
   * per-job run).
   */
  async #limits(
    task: TaskSpec,
    share: () => number | undefined,
    sourceIp: string,
    targetIp: string,
    transfer: { readonly key: string; readonly agent: string },
    part?: string,
  ): Promise<NamedLimit[]> {
    const limits: NamedLimit[] = [];
    if (this.#o.throttling) {
      const { rules, timeZone } = await this.#o.throttling();
      const at = this.#now();
      // The repository agent may advertise its listener by name (--data-advertise): rules are
      // about addresses, so a name is matched by every address it resolves to.
      const targets = await addressesOf(targetIp);
      const matched = new Map(targets.flatMap((ip) => matchingThrottlingRules(rules, { sourceIp, targetIp: ip, at, timeZone })).map((r) => [r.name, r]));
      const changed = this.#liveTransfers.has(transfer.key) && this.#coverTransfer(transfer, new Set(matched.keys()));
      for (const r of matched.values()) {
        // This agent's part of the rule: its transfers under the rule over all transfers under it.
        const users = [...(this.#ruleUsers.get(r.name)?.values() ?? [])];
        const mine = users.filter((a) => a === transfer.agent).length;
        const fraction = users.length > 0 ? Math.max(1, mine) / users.length : 1;
        limits.push({ name: `rule:${r.name}`, bytesPerSecond: mbpsToBytesPerSecond(r.mbps) * fraction });
      }
      if (changed) this.#refreshOthers(transfer.key);
    }
    const rate = share();
    if (rate !== undefined && rate > 0) limits.push({ name: `task:${task.taskId}${part === undefined ? '' : `/${part}`}`, bytesPerSecond: rate });
    return limits;
  }

  /** Records which rules cover a transfer now; whether that changed any rule's users. */
  #coverTransfer(transfer: { readonly key: string; readonly agent: string }, rules: ReadonlySet<string>): boolean {
    let changed = false;
    for (const [name, users] of this.#ruleUsers) {
      if (!rules.has(name) && users.delete(transfer.key)) {
        changed = true;
        if (users.size === 0) this.#ruleUsers.delete(name);
      }
    }
    for (const name of rules) {
      let users = this.#ruleUsers.get(name);
      if (!users) this.#ruleUsers.set(name, (users = new Map<string, string>()));
      if (users.get(transfer.key) !== transfer.agent) {
        users.set(transfer.key, transfer.agent);
        changed = true;
      }
    }
    return changed;
  }

  /** A transfer ended: it leaves every rule, and the transfers still running get their larger parts. */
  #transferEnded(key: string): void {
    this.#liveTransfers.delete(key);
    this.#limitRefreshers.delete(key);
    let changed = false;
    for (const [name, users] of this.#ruleUsers) {
      if (users.delete(key)) {
        changed = true;
        if (users.size === 0) this.#ruleUsers.delete(name);
      }
    }
    if (changed) this.#refreshOthers(key);
  }

  #refreshOthers(key: string): void {
    for (const [k, refresh] of this.#limitRefreshers) if (k !== key) refresh();
  }
}

/**
 * How a task reports the stage times of a run whose one transfer it shares with other tasks: the
 * run's cumulative figures arrive at whichever task takes the run-wide figures now; a task that
 * took over from one that ended reports only what accrued since, so the session (the sum of its
 * tasks) counts every millisecond once.
 */
function stageReporter(run: { stagesGiven?: StageBusy | undefined }, ctx: StageTimesContext): (cumulative: StageBusy) => void {
  let base: StageBusy | undefined;
  return (cumulative) => {
    base ??= run.stagesGiven ?? emptyStageBusy();
    run.stagesGiven = cumulative;
    const mine = emptyStageBusy();
    for (const s of STAGES) mine[s] = Math.max(0, cumulative[s] - base[s]);
    ctx.stageTimes?.(mine);
  };
}

/** An address as it is, or the addresses a host name resolves to (the name itself when it does not resolve). */
async function addressesOf(host: string): Promise<string[]> {
  if (net.isIP(host) !== 0) return [host];
  try {
    const found = (await lookup(host, { all: true })).map((a) => a.address);
    return found.length > 0 ? found : [host];
  } catch (err) {
    log.warn({ host, err: describeError(err) }, 'could not resolve the repository agent\'s data address: throttling rules are matched against the name');
    return [host];
  }
}

/**
 * The rate share of a transfer that carries several disk tasks' data: their shares summed;
 * undefined (unlimited) when a task has none (the repository has no limit) or none holds a slot.
 */
function sumShares(holders: Iterable<StageTimesContext>): number | undefined {
  let sum = 0;
  let any = false;
  for (const h of holders) {
    const share = h.rateLimit?.();
    if (share === undefined || !(share > 0)) return undefined;
    sum += share;
    any = true;
  }
  return any ? sum : undefined;
}

function kindOf(err: unknown): BulwarkError['kind'] {
  return err instanceof BulwarkError ? err.kind : 'internal';
}

function sourceAgentOf(vms: ReadonlyArray<{ vm: string; sourceAgent: string }>, vm: string): string {
  return vms.find((v) => v.vm === vm)?.sourceAgent ?? '?';
}

/**
 * A source agent's backup summary as the server uses it, checked: an agent of another version
 * that sends another shape fails the run naming the agent, the VM and the field.
 */
function sourceSummary(raw: unknown, agent: string, vm: string): BackupVmSummary & { stageTimes?: StageBusy } {
  const bad = (field: string): BulwarkError =>
    new BulwarkError(`agent ${agent} reported the backup of VM ${vm} without a valid ${field}`, { kind: 'internal', context: { agent, vm, field }, hint: `run the server's version of bulwark on agent ${agent}` });
  if (typeof raw !== 'object' || raw === null) throw bad('summary');
  const o = raw as Record<string, unknown>;
  if (!Array.isArray(o.warnings) || !o.warnings.every((w) => typeof w === 'string')) throw bad('warnings');
  if (typeof o.point !== 'object' || o.point === null) throw bad('point');
  if (!Array.isArray(o.disks)) throw bad('disks');
  for (const d of o.disks as unknown[]) {
    const disk = d as Record<string, unknown> | null;
    if (typeof disk?.name !== 'string' || typeof disk.bytesRead !== 'number' || typeof disk.bytesStored !== 'number') throw bad('disks entry');
  }
  return o as unknown as BackupVmSummary & { stageTimes?: StageBusy };
}
