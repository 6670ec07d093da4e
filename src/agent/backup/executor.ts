// The job engine's data path on the one-host install: TaskExecutor and DiskResolver over the
// hypervisor adapters of the configured hosts and a repository folder on this machine (data moves
// in-process; the multi-host path sends it through src/transport). The engine runs one task per VM
// disk, and a restore point holds all disks of a VM (docs/resource-scheduling.md, "Parallel disks
// of one VM"): the VM's first disk task (per session and attempt) makes the shared part — chain
// plan, hypervisor view, restore point writer — and every disk task backs up its own disk in its
// own slot, side by side; the task that finishes the VM's last disk commits; the first failure
// aborts the view and the writer (no visible point) and fails the VM's other disk tasks. A VM's
// work is, by the session's operation (chain-policy.ts; the
// chain steps before and after the backup are chain-run.ts, shared with the repository agents):
// - backup / quick: plan the run (full, incremental, synthetic full, reverse injection), back up
//   (re-reading blocks a health check found damaged), then retention, and compaction and health
//   check on their days; each step is a line in the session log, the catalog follows;
// - health-check: verify the chain and record damaged blocks for the next run's repair.
// Disks the job excludes get no task and are named in the log.
import { randomBytes } from 'node:crypto';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { openHypervisor, type HypervisorConnection } from '../../hypervisor/index.js';
import type { BackupView, Hypervisor, VmInfo } from '../../hypervisor/types.js';
import { ALL_VMS, catalogPoints, openSharedRepository, splitAllVmsDiskName, type Repository, type RestorePointInfo, type RunPlan } from '../../repository/index.js';
import type { DiskRef, DiskResolver, JobDefinition, LogLevel, MaintenanceStepProgress, TaskContext, TaskExecutor, TaskOutcome, TaskSpec } from '../../server/jobs/ports.js';
import { methodSettings, splitDisks, type JobMethodSettings } from './chain-policy.js';
import { healthCheckSession, maintainAfterBackup, planVmBackup, runPasswords, stepOf, transformStepProgress, type ChainRunContext, type MaintenanceProgress } from './chain-run.js';
import { backupVm, repositoryTarget, startVmBackup, type BackupProgress, type BackupVmSummary, type DiskBackupSummary, type VmBackup } from './disk-backup.js';
import { jobPointFailed, JobPointTarget } from './job-target.js';
import { RateLimiter } from '../../transport/throttle.js';
import { StageTimes } from '../../transport/stage-times.js';
import { diskProgress, isBoolean, isCompression, isMode, isNumber, KEEP_SETTLED_MS, setting } from './job-settings.js';

const log = logger('local-data-path');

export interface LocalDataPathOptions {
  /** The hypervisor connections a job's VMs may be on (server: the hosts table), searched in order. */
  hosts(job: JobDefinition): Promise<readonly HypervisorConnection[]>;
  /** The repository folder of a job (server: the `path` of the repository named by `job.repository`). */
  repositoryPath(job: JobDefinition): Promise<string>;
  /** The job's current password (its new chains are encrypted with it), if encryption is on. */
  password?(job: JobDefinition): Promise<string | undefined>;
  /**
   * Every password that may open the job's existing chains, newest first (server: the job's
   * current and earlier passwords, then those added by hand). A chain keeps the password it was
   * created with: its increments and maintenance use the one that opens it (docs/encryption.md).
   * Default: `password` alone.
   */
  passwords?(job: JobDefinition): Promise<readonly string[]>;
  /** The hint of that password, stored in the .vbm of the job's new encrypted chains (docs/encryption.md). */
  passwordHint?(job: JobDefinition): Promise<string | undefined>;
  /**
   * Called once per VM backup after its restore point is committed in the repository (server:
   * records it in the catalog). A failure here is logged; the point stays in the repository,
   * where a rescan finds it.
   */
  onRestorePoint?: (job: JobDefinition, task: TaskSpec, summary: BackupVmSummary) => Promise<void>;
  /**
   * Called after a VM's transforms (synthetic full, retention, merges) with the VM's restore points
   * as the repository now holds them (server: the catalog follows: removed points disappear,
   * merged and synthesized points change kind). A failure is a warning (rescan repairs it).
   */
  onVmPoints?(job: JobDefinition, task: TaskSpec, points: readonly RestorePointInfo[]): Promise<void>;
  /** The time transforms and maintenance days are judged by, and the points' time (default: the system clock). */
  now?(): Date;
  /** Test hook: called with each VM's point-in-time view before any block is read (e.g. a reference copy). */
  onView?(task: TaskSpec, view: BackupView): Promise<void>;
}

/** Per-disk result of a VM's work, for its disk tasks. */
interface VmDiskResult {
  readonly name: string;
  readonly bytesRead: number;
  readonly bytesStored: number;
}

/** The result of a VM's work in one session attempt. */
interface VmResult {
  readonly pointId: string | null;
  readonly disks: readonly VmDiskResult[];
  /** Warnings for the task outcome (the VM's owner task reports them). */
  readonly warnings: readonly string[];
  readonly consistency: 'application' | 'crash' | null;
  /** Per-job storage: each VM's catalog id of the job's point (its slice). */
  readonly pointOf?: ReadonlyMap<string, string>;
}

/** A disk task attached to its VM's run: hears its disk's log lines, the VM's progress, and VM-wide lines when it is the oldest. */
interface RunListener {
  readonly disk: string;
  hear(e: RunEvent): void;
}

type RunEvent = { kind: 'progress'; progress: BackupProgress; vm?: string | undefined } | { kind: 'log'; level: LogLevel; message: string; disk: string | undefined };

/** The per-VM part of a backup, made by the VM's first disk task and shared by the others. */
interface SharedVm {
  readonly backup: VmBackup;
  readonly chain: ChainRunContext;
  readonly plan: RunPlan;
  readonly repository: Repository;
}

/** Per-job storage: the job's part of a backup, made by its first disk task and shared by all its disk tasks. */
interface SharedJob {
  /** Each VM's backup (view, its part of the point), in the job's VM order. */
  readonly backups: readonly VmBackup[];
  readonly target: JobPointTarget;
  /** The `_all` chain. */
  readonly chain: ChainRunContext;
  readonly plan: RunPlan;
  readonly repository: Repository;
  /** Every disk of the point as `VM/DISK`. */
  readonly disks: readonly string[];
}

/**
 * One VM's work within a session round (attempt), shared by its disk tasks (per-job storage: the
 * job's work, shared by the disk tasks of all its VMs; disks are then keyed `VM/DISK`). A backup: the first
 * task makes the per-VM part (`shared`); each task backs up its own disk in its own slot (the
 * first one also the VM's disks that have no task in this round); the task that finishes the last
 * disk commits. The first failure aborts the view and the writer and fails the rest (`failure`).
 * A health check: the first task runs it, the others wait for `result`.
 */
class VmRun {
  readonly result: Promise<VmResult>;
  shared: Promise<SharedVm> | null = null;
  jobShared: Promise<SharedJob> | null = null;
  readonly listeners = new Set<RunListener>();
  /** Latest progress, for tasks that join late (per-job: by VM, in `vmProgress`). */
  progress: BackupProgress | null = null;
  readonly vmProgress = new Map<string, BackupProgress>();
  settledAt: number | null = null;
  /** Disks whose work a task has taken, and those done. */
  readonly claimed = new Set<string>();
  readonly done = new Set<string>();
  committing = false;
  /**
   * The maintenance steps of the commit (reverse injection) and after it (merges, synthetic full,
   * compaction, health check): told to the committing task's progress (set by it).
   */
  onStep: ((p: MaintenanceProgress) => void) | undefined = undefined;
  failure: unknown = undefined;
  /** Aborts every disk of the VM (a disk failed, or the session was stopped). */
  readonly stop = new AbortController();
  /** VM-wide log lines emitted while no task was attached (sequential processing), for the next one. */
  readonly #backlog: RunEvent[] = [];
  #resolve!: (r: VmResult) => void;
  #reject!: (err: unknown) => void;

  constructor() {
    this.result = new Promise<VmResult>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.result.catch(() => undefined); // tasks that await it handle the error; none may be waiting
  }

  settle(outcome: { ok: VmResult } | { error: unknown }): void {
    if (this.settledAt !== null) return;
    this.settledAt = Date.now();
    if ('ok' in outcome) this.#resolve(outcome.ok);
    else this.#reject(outcome.error);
  }

  attach(l: RunListener): void {
    this.listeners.add(l);
    for (const e of this.#backlog.splice(0)) l.hear(e);
  }

  say(level: LogLevel, message: string, disk?: string): void {
    const e: RunEvent = { kind: 'log', level, message, disk };
    // A disk's lines go to its task; VM-wide lines (and a disk without a task) to the oldest task attached.
    const to = (disk === undefined ? undefined : [...this.listeners].find((l) => l.disk === disk)) ?? this.listeners.values().next().value;
    if (to) to.hear(e);
    else this.#backlog.push(e);
  }

  progressed(progress: BackupProgress, vm?: string): void {
    if (vm === undefined) this.progress = progress;
    else this.vmProgress.set(vm, progress);
    for (const l of this.listeners) l.hear({ kind: 'progress', progress, vm });
  }
}

/** What `exportVm` writes: a standalone full outside any job's chain. */
export interface ExportVmOptions {
  /** Where the VM's hosts are looked up (the server passes every host). */
  readonly hosts: readonly HypervisorConnection[];
  readonly repositoryPath: string;
  readonly vm: string;
  /** Encrypt the export with this password. */
  readonly password?: string;
  /** With password: its hint, stored in the export's .vbm. */
  readonly passwordHint?: string;
  readonly blockSize?: number;
  readonly compression?: 'none' | 'zstd' | 'lz4';
  readonly requireGuestProcessing?: boolean;
  readonly now?: Date;
  readonly signal?: AbortSignal;
  readonly onLog?: (level: LogLevel, message: string) => void;
}

export interface ExportVmResult {
  /** The export's own job name in its .vbm (`_export-<vm>-<UTC time>`), also its folder's name. */
  readonly exportName: string;
  /** The export's folder, relative to the repository root. */
  readonly folder: string;
  readonly summary: BackupVmSummary;
}

function connectionKey(c: HypervisorConnection): string {
  return JSON.stringify(c);
}

export { describeRetentionAction } from './chain-run.js';

/** `_export-web1-20261125T170000Z`: the export's own job name (API job names never start with `_`). */
export function exportName(vm: string, time: Date): string {
  const stamp = time.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  return `_export-${vm}-${stamp}`;
}

/** The error of a disk task whose VM's backup failed elsewhere (another disk, the shared part, a stop). */
function vmFailed(task: TaskSpec, cause: unknown): BulwarkError {
  if (cause instanceof BulwarkError && cause.context?.vm === task.vm && cause.context?.disk === undefined) return cause;
  return new BulwarkError(`the backup of VM ${task.vm} failed: ${describeError(cause)}`, { kind: cause instanceof BulwarkError ? cause.kind : 'internal', context: { vm: task.vm, disk: task.disk.name }, cause });
}

/** TaskExecutor + DiskResolver of the one-host install; `close()` when the server stops. */
export class LocalDataPathExecutor implements TaskExecutor, DiskResolver {
  readonly #opts: LocalDataPathOptions;
  readonly #adapters = new Map<string, Hypervisor>();
  readonly #runs = new Map<string, VmRun>();

  constructor(options: LocalDataPathOptions) {
    this.#opts = options;
  }

  #now(): Date {
    return this.#opts.now?.() ?? new Date();
  }

  #adapter(c: HypervisorConnection): Hypervisor {
    const key = connectionKey(c);
    let a = this.#adapters.get(key);
    if (!a) {
      a = openHypervisor(c);
      this.#adapters.set(key, a);
    }
    return a;
  }

  /** The adapter whose hosts run `vm`, with the VM. */
  async #locateIn(hosts: readonly HypervisorConnection[], vm: string, job: string): Promise<{ hypervisor: Hypervisor; vm: VmInfo; connection: HypervisorConnection }> {
    const misses: string[] = [];
    for (const connection of hosts) {
      const hypervisor = this.#adapter(connection);
      try {
        return { hypervisor, vm: await hypervisor.getVm(vm), connection };
      } catch (err) {
        if (err instanceof BulwarkError && err.kind === 'not-found') {
          misses.push(connection.kind === 'qemu' ? connection.qmpGlob : connection.kind);
          continue;
        }
        throw err;
      }
    }
    throw new BulwarkError(`VM ${vm} was not found on any host${misses.length > 0 ? ` (looked behind ${misses.join(', ')})` : ''}`, {
      kind: 'not-found',
      context: { vm, job },
    });
  }

  async #locate(job: JobDefinition, vm: string): Promise<{ hypervisor: Hypervisor; vm: VmInfo; connection: HypervisorConnection }> {
    return this.#locateIn(await this.#opts.hosts(job), vm, job.name);
  }

  #repository(path: string): Promise<Repository> {
    return openSharedRepository(path, { create: true });
  }

  /** The VM's disks as tasks: every disk but those the job excludes. */
  async resolveDisks(job: JobDefinition, vm: string, signal: AbortSignal): Promise<DiskRef[]> {
    signal.throwIfAborted();
    const { vm: info, connection } = await this.#locate(job, vm);
    const { excludeDisks } = methodSettings(job.settings);
    const { included } = splitDisks(excludeDisks, vm, info.disks.map((d) => d.name));
    return info.disks
      .filter((d) => included.includes(d.name))
      .map((d) => ({
        name: d.name,
        sizeBytes: d.virtualSize,
        location: { hypervisor: connection.kind, vm: info.id, image: d.imagePath, format: d.format, ...(d.nodeName ? { node: d.nodeName } : {}) },
      }));
  }

  /**
   * The passwords of a run on VM folder `folder`: `password`, the job's current one (a new
   * chain), with its hint; `chainPassword`, the one the folder's latest chain was created with
   * (its increments and maintenance): a changed job password applies from the next full.
   */
  async #passwords(
    job: JobDefinition,
    repository: Repository,
    folder: string,
    say: (level: LogLevel, message: string) => void,
  ): Promise<{ password: string | undefined; chainPassword: string | undefined; passwordHint: string | undefined }> {
    const password = await this.#opts.password?.(job);
    const passwordHint = password === undefined ? undefined : await this.#opts.passwordHint?.(job);
    const { chainPassword } = await runPasswords(repository, job.name, folder, password, (await this.#opts.passwords?.(job)) ?? [], say);
    return { password, chainPassword, passwordHint };
  }

  /** The per-VM part of a backup: plan the run, take the view, start the restore point. */
  async #startShared(task: TaskSpec, settings: JobMethodSettings, run: VmRun): Promise<SharedVm> {
    const { job } = task;
    const say = (level: LogLevel, message: string, disk?: string) => run.say(level, message, disk);
    const { hypervisor, vm } = await this.#locate(job, task.vm);
    const repository = await this.#repository(await this.#opts.repositoryPath(job));
    const { password, chainPassword, passwordHint } = await this.#passwords(job, repository, vm.name, say);
    const blockSize = setting(job, 'blockSize', isNumber);
    const compression = setting(job, 'compression', isCompression);
    const mode = setting(job, 'mode', isMode);
    const now = this.#now();

    const { included, excluded } = splitDisks(settings.excludeDisks, task.vm, vm.disks.map((d) => d.name));
    if (excluded.length > 0) say('info', `disk(s) ${excluded.join(', ')} of VM ${vm.name} excluded by the job (not backed up)`);
    if (included.length === 0) {
      throw new BulwarkError(`every disk of VM ${vm.name} is excluded by job ${job.name}`, { kind: 'invalid', context: { vm: vm.name, job: job.name } });
    }

    const chain: ChainRunContext = { repository, job: job.name, vm: vm.name, settings, now, password: chainPassword, newChainPassword: password, say: (level, message) => say(level, message) };
    const { plan, repair } = await planVmBackup(chain, task.full);

    // A reverse injection's commit step (inject) tells its progress like the steps after it.
    const local = repositoryTarget(repository);
    const target = { ...local, startRestorePoint: (o: Parameters<Repository['startRestorePoint']>[0]) => repository.startRestorePoint({ ...o, onTransformProgress: (p) => run.onStep?.(transformStepProgress(p)) }) };
    const backup = await startVmBackup({
      hypervisor,
      target,
      job: job.name,
      vm: vm.id,
      full: plan.kind === 'full',
      ...(plan.kind === 'full' ? { fullReason: plan.reason } : {}),
      chainMethod: plan.chainMethod,
      disks: included,
      ...(repair.length > 0 ? { repair } : {}),
      requireGuestProcessing: setting(job, 'requireGuestProcessing', isBoolean) ?? false,
      ...(mode ? { mode } : {}),
      ...(blockSize !== undefined ? { blockSize } : {}),
      ...(compression ? { compression } : {}),
      ...(password !== undefined ? { password } : {}),
      ...(chainPassword !== undefined ? { chainPassword } : {}),
      ...(passwordHint ? { passwordHint } : {}),
      signal: run.stop.signal,
      time: now,
      onProgress: (p) => run.progressed(p),
      onLog: (level, message, disk) => say(level, message, disk),
      ...(this.#opts.onView ? { onView: (view: BackupView) => this.#opts.onView!(task, view) } : {}),
    });
    return { backup, chain, plan, repository };
  }

  /** Every disk is backed up: commit the point (and the view), record it, then the chain steps after a backup. */
  async #commitVm(task: TaskSpec, shared: SharedVm, run: VmRun): Promise<VmResult> {
    const { job } = task;
    const { chain, plan, repository } = shared;
    const say = (level: LogLevel, message: string) => run.say(level, message);
    const summary = await shared.backup.commit();
    if (this.#opts.onRestorePoint) {
      try {
        await this.#opts.onRestorePoint(job, task, summary);
      } catch (err) {
        log.error({ vm: task.vm, point: summary.pointId, err: describeError(err) }, 'restore point committed but not recorded in the catalog');
        say('warning', `restore point ${summary.pointId} is in the repository but could not be recorded in the catalog: ${describeError(err)} (rescan the repository)`);
      }
    }

    // After the commit: the point is safe whatever happens below; a failed step is a warning.
    const warnings: string[] = [...summary.warnings, ...(await maintainAfterBackup({ ...chain, progress: (p) => run.onStep?.(p) }, plan, summary.pointId))];
    await this.#syncPoints(repository, task, say, warnings);
    return {
      pointId: summary.pointId,
      disks: summary.disks.map((d) => ({ name: d.name, bytesRead: d.bytesRead, bytesStored: d.bytesStored })),
      warnings,
      consistency: summary.consistency,
    };
  }

  /** The VM's backup fails: abort its view and writer once (no visible point), fail its other disk tasks. */
  async #failVm(run: VmRun, err: unknown): Promise<void> {
    if (run.failure !== undefined || run.settledAt !== null) return;
    run.failure = err;
    run.stop.abort(err);
    run.settle({ error: err });
    const shared = await run.shared?.catch(() => null);
    await shared?.backup.abort(err);
    const job = await run.jobShared?.catch(() => null);
    if (job) {
      await job.target.abort(err);
      await Promise.all(job.backups.map((b) => b.abort(err)));
    }
  }

  /**
   * Tells the catalog VM `vm`'s points as the repository now holds them: its own folder's and its
   * parts of the job's per-job points (either may hold some after the job's storage changed).
   */
  async #syncPoints(repository: Repository, task: TaskSpec, say: (level: LogLevel, message: string) => void, warnings: string[], vm = task.vm): Promise<void> {
    if (!this.#opts.onVmPoints) return;
    try {
      const own = await repository.listRestorePoints({ job: task.job.name, vm });
      const shared = await repository.listRestorePoints({ job: task.job.name, vm: ALL_VMS });
      const points = catalogPoints([...own, ...shared]).filter((p) => p.vm === vm);
      await this.#opts.onVmPoints(task.job, { ...task, vm }, points);
    } catch (err) {
      const w = `the catalog could not follow the repository's points of VM ${vm}: ${describeError(err)} (rescan the repository)`;
      warnings.push(w);
      say('warning', w);
    }
  }

  /** A health check of VM `folder`'s chain (per-job storage: the job's `_all` chain). */
  async #healthCheckVm(task: TaskSpec, settings: JobMethodSettings, say: (level: LogLevel, message: string) => void, folder = task.vm, progress?: (p: MaintenanceProgress) => void): Promise<VmResult> {
    const { job } = task;
    const repository = await this.#repository(await this.#opts.repositoryPath(job));
    const { chainPassword } = await this.#passwords(job, repository, folder, say);
    const warnings = await healthCheckSession({ repository, job: job.name, vm: folder, settings, now: this.#now(), password: chainPassword, say, ...(progress ? { progress } : {}) });
    const points = await repository.listRestorePoints({ job: job.name, vm: folder });
    // The catalog shows what the check found (state corrupt) and what it read clean again.
    const vms = folder === ALL_VMS ? [...new Set(catalogPoints(points).map((p) => p.vm))] : [task.vm];
    for (const vm of vms) await this.#syncPoints(repository, task, say, warnings, vm);
    const disks = points.at(-1)?.disks.map((d) => ({ name: d.name, bytesRead: 0, bytesStored: 0 })) ?? [];
    return { pointId: null, disks, warnings, consistency: null };
  }

  #sweepRuns(): void {
    const now = Date.now();
    for (const [k, r] of this.#runs) if (r.settledAt !== null && now - r.settledAt > KEEP_SETTLED_MS) this.#runs.delete(k);
  }

  /** The VM's run in this session round; per-job storage: the job's (one run for all its VMs). */
  #run(task: TaskSpec): { run: VmRun; first: boolean } {
    this.#sweepRuns();
    const perJob = methodSettings(task.job.settings).storage === 'per-job';
    // VM names are never empty: the empty name keys the job's run.
    const key = `${task.sessionId}\0${perJob ? '' : task.vm}\0${task.attempt}`;
    const found = this.#runs.get(key);
    if (found) return { run: found, first: false };
    const run = new VmRun();
    this.#runs.set(key, run);
    return { run, first: true };
  }

  async execute(task: TaskSpec, context: TaskContext): Promise<TaskOutcome> {
    const settings = methodSettings(task.job.settings);
    const { run, first } = this.#run(task);
    if (settings.operation === 'health-check') return this.#executeHealthCheck(task, context, settings, run, first);
    return settings.storage === 'per-job' ? this.#executeJobBackup(task, context, settings, run, first) : this.#executeBackup(task, context, settings, run, first);
  }

  /**
   * A task of this round that will not run: its disk cannot be backed up, so the VM's restore point
   * cannot be complete. The VM's backup fails (its other tasks with this reason) instead of waiting.
   */
  taskSkipped(task: TaskSpec, reason: string): void {
    const settings = methodSettings(task.job.settings);
    if (settings.operation === 'health-check') return;
    const { run } = this.#run(task);
    if (settings.storage === 'per-job') {
      void this.#failVm(
        run,
        new BulwarkError(`disk ${task.disk.name} of VM ${task.vm} did not run (${reason}), so job ${task.job.name}'s restore point (all its VMs in one) cannot be complete`, {
          kind: 'unavailable',
          context: { job: task.job.name, vm: task.vm, disk: task.disk.name },
        }),
      );
      return;
    }
    void this.#failVm(
      run,
      new BulwarkError(`disk ${task.disk.name} of VM ${task.vm} did not run (${reason}), so the VM's restore point cannot be complete`, {
        kind: 'unavailable',
        context: { vm: task.vm, disk: task.disk.name },
      }),
    );
  }

  /** One disk task of a backup: see `VmRun`. */
  async #executeBackup(task: TaskSpec, context: TaskContext, settings: JobMethodSettings, run: VmRun, first: boolean): Promise<TaskOutcome> {
    const disk = task.disk.name;
    const stages = new StageTimes();
    const reportStages = () => context.stageTimes?.(stages.snapshot());
    // The task's share of its repository's rate limit, following the scheduler's changes.
    const limiter = context.rateLimit ? new RateLimiter(`repo:${task.taskId}`, { bytesPerSecond: context.rateLimit() ?? 0 }) : undefined;
    const unwatch = limiter && context.watchRate ? context.watchRate((r) => limiter.setRate(r ?? 0)) : undefined;
    const listener: RunListener = {
      disk,
      hear: (e) => {
        switch (e.kind) {
          case 'progress':
            context.progress(diskProgress(e.progress, disk));
            reportStages();
            break;
          case 'log':
            context.log(e.level, e.message);
            break;
        }
      },
    };
    if (first) {
      context.log('info', `backing up VM ${task.vm}: its view and restore point are shared by its disk tasks; this task makes them`);
      this.#failOnAbort(run, context.signal);
      run.shared = this.#startShared(task, settings, run);
      run.shared.catch((err: unknown) => run.settle({ error: err }));
    }
    run.attach(listener);
    if (run.progress) context.progress(diskProgress(run.progress, disk));
    try {
      // No shared part: a task of this round was skipped before any ran (taskSkipped).
      if (!run.shared) throw vmFailed(task, run.failure ?? new BulwarkError('it did not start', { kind: 'internal' }));
      const shared = await run.shared;
      const { backup } = shared;
      if (run.failure !== undefined) throw vmFailed(task, run.failure);
      if (!backup.disks.includes(disk)) {
        throw new BulwarkError(`disk ${disk} of VM ${task.vm} is not in its backup (removed from the VM?; the VM's disks: ${backup.disks.join(', ')})`, {
          kind: 'not-found',
          context: { vm: task.vm, disk },
        });
      }
      if (run.claimed.has(disk)) {
        // The VM's first task does this disk (the engine did not say which disks have tasks).
        context.log('info', `disk ${disk} is backed up by the VM's first task in this session`);
        return this.#outcome(task, context, await run.result, false);
      }
      // This task's disk; the VM's first task also does the disks no task of this round does
      // (a retry round retries only the failed disks, but the point holds every disk).
      const orphans = first ? backup.disks.filter((d) => d !== disk && (task.vmDisks === undefined || !task.vmDisks.includes(d))) : [];
      if (orphans.length > 0) context.log('info', `this task also backs up disk(s) ${orphans.join(', ')} of VM ${task.vm} (no task of their own in this round)`);
      const mine = [disk, ...orphans].filter((d) => !run.claimed.has(d));
      for (const d of mine) run.claimed.add(d);
      let own: DiskBackupSummary | undefined;
      for (const d of mine) {
        try {
          const s = await backup.backupDisk(d, { signal: run.stop.signal, stages, ...(limiter ? { throttle: limiter } : {}) });
          if (d === disk) own = s;
          run.done.add(d);
        } catch (err) {
          const cause = run.failure ?? err;
          await this.#failVm(run, err);
          throw cause === err ? err : vmFailed(task, cause);
        }
      }
      if (run.failure !== undefined) throw vmFailed(task, run.failure);
      return await this.#diskWritten(task, context, run, own, stages, {
        disks: backup.disks.length,
        waiting: `disk ${disk} is written; the VM's restore point is committed when its other disks are done`,
        commit: () => this.#commitVm(task, shared, run),
      });
    } finally {
      run.listeners.delete(listener);
      unwatch?.();
      reportStages();
    }
  }

  /**
   * Per-job storage: the job's part of a backup — plan the `_all` chain, take every VM's view,
   * start the one restore point holding all of them (job-target.ts). Every VM of the job is in
   * the point; a VM that cannot be found or fails fails the job's point (docs/decisions/0007).
   */
  async #startJob(task: TaskSpec, settings: JobMethodSettings, run: VmRun): Promise<SharedJob> {
    const { job } = task;
    const say = (level: LogLevel, message: string, disk?: string) => run.say(level, message, disk);
    if (settings.operation === 'quick') {
      throw new BulwarkError(`quick backup of VM ${task.vm}: job ${job.name} keeps all its VMs in one restore point (storage per-job), so a point of one VM alone is not written`, {
        kind: 'invalid',
        context: { job: job.name, vm: task.vm },
        hint: `run the whole job instead: bulwark job run ${job.name}`,
      });
    }
    const repository = await this.#repository(await this.#opts.repositoryPath(job));
    const blockSize = setting(job, 'blockSize', isNumber);
    const compression = setting(job, 'compression', isCompression);
    const mode = setting(job, 'mode', isMode);
    const now = this.#now();

    // Every VM of the job (not only those of this round's tasks: the point holds them all).
    const located: { hypervisor: Hypervisor; vm: VmInfo; included: string[] }[] = [];
    for (const name of job.vms) {
      run.stop.signal.throwIfAborted();
      const { hypervisor, vm } = await this.#locate(job, name).catch((err: unknown) => {
        throw new BulwarkError(`VM ${name}: ${describeError(err)}; job ${job.name} keeps all its VMs in one restore point, so none is written`, {
          kind: err instanceof BulwarkError ? err.kind : 'internal',
          context: { job: job.name, vm: name },
          cause: err,
          hint: `remove VM ${name} from the job, or set the job's storage to per-vm`,
        });
      });
      const { included, excluded } = splitDisks(settings.excludeDisks, vm.name, vm.disks.map((d) => d.name));
      if (excluded.length > 0) say('info', `disk(s) ${excluded.join(', ')} of VM ${vm.name} excluded by the job (not backed up)`);
      if (included.length === 0) {
        throw new BulwarkError(`every disk of VM ${vm.name} is excluded by job ${job.name}`, { kind: 'invalid', context: { vm: vm.name, job: job.name } });
      }
      located.push({ hypervisor, vm, included });
    }
    const { password, chainPassword, passwordHint } = await this.#passwords(job, repository, ALL_VMS, say);
    say('info', `job ${job.name} keeps its VMs in one restore point (storage per-job): ${located.map((l) => l.vm.name).join(', ')}`);
    const chain: ChainRunContext = { repository, job: job.name, vm: ALL_VMS, settings, now, password: chainPassword, newChainPassword: password, say: (level, message) => say(level, message) };
    const { plan, repair } = await planVmBackup(chain, task.full);
    const parent = plan.kind === 'full' ? undefined : (await repository.listRestorePoints({ job: job.name, vm: ALL_VMS })).find((p) => p.id === plan.parent);
    if (plan.kind !== 'full' && !parent) {
      throw new BulwarkError(`job ${job.name}: the point ${plan.parent ?? '(none)'} this run continues is not in the repository`, { kind: 'conflict', context: { job: job.name } });
    }
    const target = new JobPointTarget({
      repository,
      job: job.name,
      vms: located.map((l) => l.vm.name),
      kind: plan.kind === 'full' ? 'full' : parent!.method === 'reverse' ? 'reverse' : 'incremental',
      parent,
      chainMethod: plan.chainMethod,
      blockSize,
      compression,
      ...(password !== undefined ? { encryption: { password, hint: passwordHint } } : {}),
      password: chainPassword,
      time: now,
      onTransformProgress: (p) => run.onStep?.(transformStepProgress(p)),
    });
    const starts = located.map(({ hypervisor, vm, included }) => {
      const vmRepair = repair.flatMap((r) => {
        const split = splitAllVmsDiskName(r.disk);
        return split?.vm === vm.name ? [{ disk: split.disk, blocks: r.blocks }] : [];
      });
      return startVmBackup({
        hypervisor,
        target,
        job: job.name,
        vm: vm.id,
        full: plan.kind === 'full',
        ...(plan.kind === 'full' ? { fullReason: plan.reason } : {}),
        intoIncrement: plan.kind !== 'full',
        chainMethod: plan.chainMethod,
        disks: included,
        ...(vmRepair.length > 0 ? { repair: vmRepair } : {}),
        requireGuestProcessing: setting(job, 'requireGuestProcessing', isBoolean) ?? false,
        ...(mode ? { mode } : {}),
        // An increment's blocks are the chain's size.
        ...((parent?.blockSize ?? blockSize) !== undefined ? { blockSize: parent?.blockSize ?? blockSize } : {}),
        ...(compression ? { compression } : {}),
        ...(password !== undefined ? { password } : {}),
        ...(chainPassword !== undefined ? { chainPassword } : {}),
        signal: run.stop.signal,
        time: now,
        onProgress: (p) => run.progressed(p, vm.name),
        onLog: (level, message, disk) => say(level, disk === undefined ? `VM ${vm.name}: ${message}` : message, disk === undefined ? undefined : `${vm.name}/${disk}`),
        ...(this.#opts.onView ? { onView: (view: BackupView) => this.#opts.onView!({ ...task, vm: vm.name }, view) } : {}),
      }).catch((err: unknown) => {
        const named = new BulwarkError(`VM ${vm.name}: ${describeError(err)}`, { kind: err instanceof BulwarkError ? err.kind : 'internal', context: { job: job.name, vm: vm.name }, cause: err });
        target.fail(named);
        throw named;
      });
    });
    const settled = await Promise.allSettled(starts);
    const backups = settled.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      await target.abort(failed.reason);
      await Promise.all(backups.map((b) => b.abort(failed.reason)));
      throw failed.reason;
    }
    return { backups, target, chain, plan, repository, disks: backups.flatMap((b) => b.disks.map((d) => `${b.vm}/${d}`)) };
  }

  /**
   * Per-job storage: every disk of every VM is written: commit the one point (then each VM's
   * view), record each VM's part in the catalog, then the chain steps on the `_all` chain.
   */
  async #commitJob(task: TaskSpec, shared: SharedJob, run: VmRun): Promise<VmResult> {
    const { job } = task;
    const { chain, plan, repository } = shared;
    const say = (level: LogLevel, message: string) => run.say(level, message);
    // Every VM's commit waits for the others; the last one commits the point for all.
    const summaries = await Promise.all(shared.backups.map((b) => b.commit()));
    const point = summaries[0]!.point;
    const slices = catalogPoints([point]);
    const pointOf = new Map<string, string>();
    const warnings: string[] = [];
    let consistency: 'application' | 'crash' = 'application';
    for (const s of summaries) {
      const slice = slices.find((p) => p.vm === s.vm);
      if (!slice) throw new BulwarkError(`restore point ${point.id} of job ${job.name} does not hold VM ${s.vm}`, { kind: 'internal', context: { job: job.name, vm: s.vm, point: point.id } });
      pointOf.set(s.vm, slice.id);
      if (s.consistency === 'crash') consistency = 'crash';
      warnings.push(...s.warnings.map((w) => `VM ${s.vm}: ${w}`));
      if (s.consistency === 'crash') warnings.push(`VM ${s.vm}: crash-consistent (guest not quiesced)`);
      if (!this.#opts.onRestorePoint) continue;
      try {
        await this.#opts.onRestorePoint(job, { ...task, vm: s.vm }, { ...s, pointId: slice.id, point: slice });
      } catch (err) {
        log.error({ vm: s.vm, point: slice.id, err: describeError(err) }, 'restore point committed but not recorded in the catalog');
        say('warning', `restore point ${slice.id} of VM ${s.vm} is in the repository but could not be recorded in the catalog: ${describeError(err)} (rescan the repository)`);
      }
    }
    say('info', `restore point ${point.id} of job ${job.name} holds ${summaries.length} VM(s): ${summaries.map((s) => `${s.vm} (${pointOf.get(s.vm)})`).join(', ')}`);

    // After the commit: the point is safe whatever happens below; a failed step is a warning.
    const before = await repository.listRestorePoints({ job: job.name, vm: ALL_VMS }).catch(() => []);
    warnings.push(...(await maintainAfterBackup({ ...chain, progress: (p) => run.onStep?.(p) }, plan, point.id)));
    // The catalog follows every VM the job's points held (a VM removed from the job leaves with them).
    const vms = new Set([...summaries.map((s) => s.vm), ...catalogPoints(before).map((p) => p.vm)]);
    for (const vm of vms) await this.#syncPoints(repository, task, say, warnings, vm);
    return {
      pointId: point.id,
      disks: summaries.flatMap((s) => s.disks.map((d) => ({ name: `${s.vm}/${d.name}`, bytesRead: d.bytesRead, bytesStored: d.bytesStored }))),
      warnings,
      consistency,
      pointOf,
    };
  }

  /**
   * One disk task of a per-job backup: like `#executeBackup` for the whole job. The job's first
   * task makes the shared part; each task backs up its own disk (the first one of a retry round
   * also every disk no task of the round has: the point holds every VM); the task that finishes
   * the job's last disk commits; the first failure aborts every view and the writer.
   */
  async #executeJobBackup(task: TaskSpec, context: TaskContext, settings: JobMethodSettings, run: VmRun, first: boolean): Promise<TaskOutcome> {
    const key = `${task.vm}/${task.disk.name}`;
    const stages = new StageTimes();
    const reportStages = () => context.stageTimes?.(stages.snapshot());
    const limiter = context.rateLimit ? new RateLimiter(`repo:${task.taskId}`, { bytesPerSecond: context.rateLimit() ?? 0 }) : undefined;
    const unwatch = limiter && context.watchRate ? context.watchRate((r) => limiter.setRate(r ?? 0)) : undefined;
    const listener: RunListener = {
      disk: key,
      hear: (e) => {
        switch (e.kind) {
          case 'progress':
            if (e.vm !== task.vm) break;
            context.progress(diskProgress(e.progress, task.disk.name));
            reportStages();
            break;
          case 'log':
            context.log(e.level, e.message);
            break;
        }
      },
    };
    if (first) {
      context.log('info', `backing up job ${task.job.name} into one restore point for all its VMs (storage per-job): this task makes the views and the point`);
      this.#failOnAbort(run, context.signal);
      run.jobShared = this.#startJob(task, settings, run);
      run.jobShared.catch((err: unknown) => {
        run.failure ??= err;
        run.settle({ error: err });
      });
    }
    run.attach(listener);
    const p = run.vmProgress.get(task.vm);
    if (p) context.progress(diskProgress(p, task.disk.name));
    const failedHere = (cause: unknown) => jobPointFailed(task.job.name, cause);
    try {
      if (!run.jobShared) throw failedHere(run.failure ?? new BulwarkError('it did not start', { kind: 'internal' }));
      const shared = await run.jobShared.catch((err: unknown) => {
        throw failedHere(err);
      });
      if (run.failure !== undefined) throw failedHere(run.failure);
      if (!shared.disks.includes(key)) {
        throw new BulwarkError(`disk ${task.disk.name} of VM ${task.vm} is not in job ${task.job.name}'s backup (removed from the VM?; its disks: ${shared.disks.join(', ')})`, {
          kind: 'not-found',
          context: { vm: task.vm, disk: task.disk.name },
        });
      }
      if (run.claimed.has(key)) {
        context.log('info', `disk ${task.disk.name} is backed up by another task of this round (the job's first)`);
        return this.#outcome(task, context, await run.result, false);
      }
      // The first task of the round also does the disks with no task of their own: its VM's
      // (task.vmDisks) and, in a retry round (only failed tasks run again), every other VM's.
      const orphans = first
        ? shared.disks.filter((d) => d !== key && (d.startsWith(`${task.vm}/`) ? task.vmDisks !== undefined && !task.vmDisks.includes(d.slice(task.vm.length + 1)) : task.attempt > 1))
        : [];
      if (orphans.length > 0) context.log('info', `this task also backs up disk(s) ${orphans.join(', ')} (no task of their own in this round; the job's point holds every VM)`);
      let own: DiskBackupSummary | undefined;
      for (const d of [key, ...orphans]) {
        if (run.claimed.has(d)) continue; // another task of the round took it meanwhile
        run.claimed.add(d);
        const split = splitAllVmsDiskName(d)!;
        const backup = shared.backups.find((b) => b.vm === split.vm)!;
        try {
          const s = await backup.backupDisk(split.disk, { signal: run.stop.signal, stages, ...(limiter ? { throttle: limiter } : {}) });
          if (d === key) own = s;
          run.done.add(d);
        } catch (err) {
          const named = new BulwarkError(`VM ${split.vm}: ${describeError(err)}`, {
            kind: err instanceof BulwarkError ? err.kind : 'internal',
            context: { job: task.job.name, vm: split.vm, disk: split.disk },
            cause: err,
          });
          const cause = run.failure ?? named;
          await this.#failVm(run, named);
          throw failedHere(cause);
        }
      }
      if (run.failure !== undefined) throw failedHere(run.failure);
      return await this.#diskWritten(task, context, run, own, stages, {
        disks: shared.disks.length,
        waiting: `disk ${task.disk.name} is written; job ${task.job.name}'s restore point is committed when the job's other disks are done`,
        commit: () => this.#commitJob(task, shared, run),
      });
    } finally {
      run.listeners.delete(listener);
      unwatch?.();
      reportStages();
    }
  }

  /** The run fails when the task that started it is aborted, until the run settles. */
  #failOnAbort(run: VmRun, signal: AbortSignal): void {
    const onAbort = () => void this.#failVm(run, signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    void run.result.then(
      () => signal.removeEventListener('abort', onAbort),
      () => signal.removeEventListener('abort', onAbort),
    );
  }

  /**
   * A disk task's disk is written: report its bytes; the task that writes the point's last disk
   * commits it (per VM, or the job's point), the others end and leave the commit to it.
   */
  async #diskWritten(
    task: TaskSpec,
    context: TaskContext,
    run: VmRun,
    own: DiskBackupSummary | undefined,
    stages: StageTimes,
    point: { disks: number; waiting: string; commit: () => Promise<VmResult> },
  ): Promise<TaskOutcome> {
    const read = own?.bytesRead ?? 0;
    const written = { bytesRead: read, bytesTransferred: read, bytesStored: own?.bytesStored ?? 0, total: read };
    context.progress(written);
    if (run.done.size < point.disks || run.committing) {
      context.log('info', point.waiting);
      return { state: 'success' };
    }
    run.committing = true;
    // This task commits: the maintenance steps' progress is its own (the last one stays recorded).
    run.onStep = (p) => context.progress({ ...written, step: stepOf(p) });
    let result: VmResult;
    try {
      result = await stages.measure('target', point.commit);
    } catch (err) {
      run.committing = false;
      await this.#failVm(run, err);
      throw err;
    }
    run.settle({ ok: result });
    return this.#outcome(task, context, result, true);
  }

  /** The outcome of a disk task from the VM's result; `vmWide`: this task reports the VM's warnings. */
  #outcome(task: TaskSpec, context: TaskContext, result: VmResult, vmWide: boolean): TaskOutcome {
    const pointId = result.pointOf?.get(task.vm) ?? result.pointId;
    if (pointId) context.log('info', `disk ${task.disk.name} is in restore point ${pointId}${result.pointOf ? ` (VM ${task.vm}'s part of job point ${result.pointId})` : ''}`);
    const messages = vmWide ? [...result.warnings] : [];
    if (vmWide && result.consistency === 'crash' && !messages.some((m) => /crash/i.test(m))) messages.push('the restore point is crash-consistent (guest not quiesced)');
    return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
  }

  /** A health check: the VM's first task runs it for the whole VM (per-job: the job's first task, the job's chain), its other tasks wait for it. */
  async #executeHealthCheck(task: TaskSpec, context: TaskContext, settings: JobMethodSettings, run: VmRun, first: boolean): Promise<TaskOutcome> {
    const listener: RunListener = { disk: task.disk.name, hear: (e) => e.kind === 'log' && context.log(e.level, e.message) };
    const perJob = settings.storage === 'per-job';
    // The check's byte progress (disk bytes of the checked points gone through) is the first task's.
    let checked = 0;
    let step: MaintenanceStepProgress | undefined;
    const progress = (p: MaintenanceProgress): void => {
      checked = p.bytesTotal;
      step = stepOf(p);
      context.progress({ bytesRead: p.bytesRead, bytesTransferred: 0, bytesStored: 0, total: checked, step });
    };
    if (first) {
      context.log('info', perJob ? `checking job ${task.job.name}'s restore points (every VM in one file set per point)` : `checking VM ${task.vm} (all its disks)`);
      this.#healthCheckVm(task, settings, (level, message) => run.say(level, message), perJob ? ALL_VMS : task.vm, progress).then(
        (ok) => run.settle({ ok }),
        (error: unknown) => run.settle({ error }),
      );
    } else {
      context.log('info', `disk ${task.disk.name} is checked by the VM's check already going in this session`);
    }
    run.attach(listener);
    try {
      const result = await run.result;
      context.progress({ bytesRead: checked, bytesTransferred: 0, bytesStored: 0, total: checked, ...(step ? { step } : {}) });
      return this.#outcome(task, context, { ...result, pointId: null }, first);
    } finally {
      run.listeners.delete(listener);
    }
  }

  /**
   * Writes a standalone full of a VM (`bulwark export`) into its own folder of the repository,
   * `<repository>/_export-<vm>-<UTC time>/<vm>/` with its own .vbm (docs/formats/backup-files.md
   * section 2): outside every job's chain and retention, importable anywhere with a rescan. No
   * change tracking is left behind on the VM.
   */
  async exportVm(o: ExportVmOptions): Promise<ExportVmResult> {
    const { hypervisor, vm } = await this.#locateIn(o.hosts, o.vm, '(export)');
    const repository = await this.#repository(o.repositoryPath);
    const name = exportName(vm.name, o.now ?? this.#now());
    const summary = await backupVm({
      hypervisor,
      repository,
      job: name,
      vm: vm.id,
      full: true,
      // A chain id of its own: the job chains' bitmaps are not touched, and this one is removed at the end.
      chainId: `bw-x-${randomBytes(8).toString('hex')}`,
      keepTracking: false,
      requireGuestProcessing: o.requireGuestProcessing ?? false,
      ...(o.blockSize !== undefined ? { blockSize: o.blockSize } : {}),
      ...(o.compression ? { compression: o.compression } : {}),
      ...(o.password !== undefined ? { password: o.password } : {}),
      ...(o.password !== undefined && o.passwordHint ? { passwordHint: o.passwordHint } : {}),
      ...(o.signal ? { signal: o.signal } : {}),
      onLog: (level, message) => o.onLog?.(level, message),
    });
    const folder = summary.point.file.slice(repository.root.length + 1).split('/').slice(0, 1)[0]!;
    return { exportName: name, folder, summary };
  }

  /** Closes the hypervisor connections. */
  async close(): Promise<void> {
    await Promise.allSettled([...this.#adapters.values()].map((a) => a.close()));
    this.#adapters.clear();
  }
}
