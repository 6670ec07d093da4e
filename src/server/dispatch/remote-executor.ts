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
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { methodSettings, splitDisks } from '../../agent/backup/chain-policy.js';
import type { BackupProgress, BackupVmSummary } from '../../agent/backup/disk-backup.js';
import { chainIdFor } from '../../agent/backup/disk-backup.js';
import { diskProgress, isBoolean, isCompression, isMode, isNumber, KEEP_SETTLED_MS, setting } from '../../agent/backup/job-settings.js';
import { pointFromWire } from '../../agent/remote/repository-sink.js';
import type { HypervisorConnection } from '../../hypervisor/index.js';
import type { RestorePointInfo } from '../../repository/index.js';
import type { BackupTargetResult, HealthCheckResult, TaskEvent, WireDisk } from '../../transport/agent-tasks.js';
import type { StageBusy } from '../../transport/stage-times.js';
import type { NamedLimit } from '../../transport/throttle.js';
import type { DiskRef, DiskResolver, JobDefinition, LogLevel, TaskContext, TaskExecutor, TaskOutcome, TaskSpec } from '../jobs/ports.js';
import { matchingThrottlingRules, mbpsToBytesPerSecond, type ThrottlingRule } from '../resources/throttling-rules.js';
import type { AgentTaskBroker } from './broker.js';

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

type RunEvent = { kind: 'progress'; progress: BackupProgress | null; stageTimes?: StageBusy | undefined } | { kind: 'log'; level: LogLevel; message: string; disk: string | undefined };

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
  /** Disk tasks of a round that will not run (taskSkipped), by run key: the VM's run fails. */
  readonly #skipped = new Map<string, { why: string; at: number }>();
  readonly #localAgent: string;

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
    const hostAgent = task.disk.location?.agent;
    const chosen = task.proxy ?? task.job.proxy ?? hostAgent ?? repository.agent ?? this.#localAgent;
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
      },
      (err: unknown) => log.warn({ task: task.taskId, err: describeError(err) }, 'a skipped task could not be routed'),
    );
  }

  async execute(task: TaskSpec, context: TaskContext): Promise<TaskOutcome> {
    const repository = await this.#o.repository(task.job);
    const source = this.#sourceAgent(task, repository);
    const healthCheck = methodSettings(task.job.settings).operation === 'health-check';
    if (this.#runsLocally(task, repository)) return this.#o.local.execute(task, context);
    // Per-job storage is written by the in-process path only (PERJOB): refused, never silently per VM.
    if (methodSettings(task.job.settings).storage === 'per-job') {
      throw new BulwarkError(`job ${task.job.name} keeps all its VMs in one restore point (storage per-job), which only the server's own host writes; VM ${task.vm} would go through agent ${source} into repository ${repository.name}`, {
        kind: 'invalid',
        context: { job: task.job.name, vm: task.vm, repository: repository.name },
        hint: "set the job's storage to per-vm, or use the server's own proxy and a repository of its host",
      });
    }

    const now = Date.now();
    for (const [k, r] of this.#runs) if (r.settledAt !== null && now - r.settledAt > KEEP_SETTLED_MS) this.#runs.delete(k);
    for (const [k, sk] of this.#skipped) if (now - sk.at > KEEP_SETTLED_MS) this.#skipped.delete(k);
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
    const listener = (e: RunEvent): void => {
      switch (e.kind) {
        case 'progress':
          if (e.progress) context.progress(diskProgress(e.progress, task.disk.name));
          if (e.stageTimes && general()) ctx.stageTimes?.(e.stageTimes);
          break;
        case 'log':
          if (e.disk === undefined ? general() : e.disk === task.disk.name) context.log(e.level, e.message);
          break;
      }
    };
    run.listeners.add(listener);
    run.tasks.push(listener);
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
        context.progress({ bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 });
        const messages = owner ? [...result.warnings] : [];
        return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
      }
      const { summary } = result;
      const disk = summary.disks.find((d) => d.name === task.disk.name);
      if (!disk) {
        throw new BulwarkError(`disk ${task.disk.name} of VM ${task.vm} is not in restore point ${summary.pointId}`, { kind: 'not-found', context: { vm: task.vm, disk: task.disk.name } });
      }
      const transferred = (disk as { bytesTransferred?: number }).bytesTransferred ?? disk.bytesStored;
      context.progress({ bytesRead: disk.bytesRead, bytesTransferred: transferred, bytesStored: disk.bytesStored, total: disk.bytesRead });
      if (general() && summary.stageTimes) ctx.stageTimes?.(summary.stageTimes);
      const messages = [...summary.warnings];
      if (summary.consistency === 'crash' && !messages.some((m) => /crash/i.test(m))) messages.push('the restore point is crash-consistent (guest not quiesced)');
      return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
    } finally {
      run.listeners.delete(listener);
      run.tasks.splice(run.tasks.indexOf(listener), 1);
    }
  }

  #runKey(task: TaskSpec): string {
    return `${task.sessionId}\0${task.vm}\0${task.attempt}`;
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
    const run: VmRun = { listeners, progress: null, stageTimes: undefined, settledAt: null, go: new Set(), tasks: [], result: Promise.resolve() as never };
    const { job } = task;
    const settings = methodSettings(job.settings);
    const broker = this.#o.broker;
    const targetAgent = repository.agent ?? this.#localAgent;
    const signal = context.signal;
    const onEvent = (e: TaskEvent): void => {
      switch (e.type) {
        case 'progress':
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
      let ready: ((e: Extract<TaskEvent, { type: 'ready' }>) => void) | undefined;
      const readyEvent = new Promise<Extract<TaskEvent, { type: 'ready' }>>((resolve) => (ready = resolve));
      // 1. The repository agent opens the point's receiving end and tells where it listens.
      const target = broker.run(
        targetAgent,
        {
          kind: 'backup-target',
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
        (e) => {
          if (e.type === 'ready') ready?.(e);
          else onEvent(e);
        },
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
        const readyOrFailed = await Promise.race([readyEvent, target.result.then(() => undefined)]);
        if (!readyOrFailed) throw new BulwarkError(`repository agent ${targetAgent} ended the task before it was ready`, { kind: 'internal' });
        const plan = readyOrFailed.plan;
        const targetHost = readyOrFailed.host ?? broker.addressOf(targetAgent) ?? '127.0.0.1';
        const sourceIp = broker.addressOf(sourceAgent) ?? '127.0.0.1';
        const limits = await this.#limits(task, context, sourceIp, targetHost);
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
          this.#limits(task, context, sourceIp, targetHost).then(
            (l) => handle.setLimits(l),
            (err: unknown) => log.warn({ err: describeError(err) }, 'could not re-evaluate the rate limits'),
          );
        };
        const limitTimer = setInterval(refresh, 5000);
        limitTimer.unref();
        const unwatch = context.watchRate?.(() => refresh());
        signal.addEventListener('abort', () => clearInterval(limitTimer), { once: true });
        void sourceHandle.result.finally(() => {
          clearInterval(limitTimer);
          unwatch?.();
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
        const sent = raw as unknown as BackupVmSummary;
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
            emit({ kind: 'log', level: 'warning', message: `restore point ${summary.pointId} is in the repository but could not be recorded in the catalog: ${describeError(err)} (rescan the repository)`, disk: undefined });
          }
        }
        if (targetResult.points) await this.#syncPoints(task, targetResult.points, emit);
        return { kind: 'backup', summary };
      } catch (err) {
        target.cancel('the backup failed');
        sourceHandle?.cancel('the backup failed');
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

  #now(): Date {
    return this.#o.now?.() ?? new Date();
  }

  /** The job's passwords other than the current one, for the repository agent to find its chains' own. */
  async #knownPasswords(job: JobDefinition, current: string | undefined): Promise<string[]> {
    return [...new Set((await this.#o.passwords?.(job)) ?? [])].filter((p) => p !== current);
  }

  /** The catalog follows the VM's folder after the repository agent's chain steps. */
  async #syncPoints(task: TaskSpec, wire: readonly Record<string, unknown>[], emit: (e: RunEvent) => void): Promise<void> {
    if (!this.#o.onVmPoints) return;
    try {
      await this.#o.onVmPoints(task.job, task, wire.map(pointFromWire));
    } catch (err) {
      emit({ kind: 'log', level: 'warning', message: `the catalog could not follow the repository's points of VM ${task.vm}: ${describeError(err)} (rescan the repository)`, disk: undefined });
    }
  }

  /** A health-check session's work on one VM: a health-check task on the repository's agent. */
  #startHealthCheck(task: TaskSpec, context: TaskContext, repository: DispatchRepository): VmRun {
    const listeners = new Set<(e: RunEvent) => void>();
    const emit = (e: RunEvent): void => {
      for (const l of listeners) l(e);
    };
    const run: VmRun = { listeners, progress: null, stageTimes: undefined, settledAt: null, go: new Set(), tasks: [], result: Promise.resolve() as never };
    const { job } = task;
    const agent = repository.agent ?? this.#localAgent;
    (run as { result: VmRun['result'] }).result = (async (): Promise<VmRunResult> => {
      context.signal.throwIfAborted();
      const password = await this.#o.password?.(job);
      const passwords = await this.#knownPasswords(job, password);
      const handle = this.#o.broker.run(
        agent,
        { kind: 'health-check', repositoryPath: repository.path, job: job.name, vm: task.vm, settings: job.settings ?? {}, now: this.#now().toISOString(), password, ...(passwords.length > 0 ? { passwords } : {}) },
        (e) => {
          if (e.type === 'log') emit({ kind: 'log', level: e.level, message: e.message, disk: e.disk });
        },
      );
      const stop = () => handle.cancel('the job was stopped');
      context.signal.addEventListener('abort', stop, { once: true });
      try {
        const r = (await handle.result) as HealthCheckResult;
        await this.#syncPoints(task, r.points, emit);
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

  /** The rate limits of a transfer: each matching throttling rule (shared by name) and the task's repository share. */
  async #limits(task: TaskSpec, context: StageTimesContext, sourceIp: string, targetIp: string): Promise<NamedLimit[]> {
    const limits: NamedLimit[] = [];
    if (this.#o.throttling) {
      const { rules, timeZone } = await this.#o.throttling();
      const at = this.#now();
      for (const r of matchingThrottlingRules(rules, { sourceIp, targetIp, at, timeZone })) {
        limits.push({ name: `rule:${r.name}`, bytesPerSecond: mbpsToBytesPerSecond(r.mbps) });
      }
    }
    const share = context.rateLimit?.();
    if (share !== undefined && share > 0) limits.push({ name: `task:${task.taskId}`, bytesPerSecond: share });
    return limits;
  }
}
