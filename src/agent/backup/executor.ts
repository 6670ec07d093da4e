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
import { openRepository, type Repository, type RestorePointInfo, type RunPlan } from '../../repository/index.js';
import type { DiskRef, DiskResolver, JobDefinition, LogLevel, TaskContext, TaskExecutor, TaskOutcome, TaskSpec } from '../../server/jobs/ports.js';
import { methodSettings, splitDisks, type JobMethodSettings } from './chain-policy.js';
import { healthCheckSession, maintainAfterBackup, planVmBackup, type ChainRunContext } from './chain-run.js';
import { backupVm, startVmBackup, type BackupProgress, type BackupVmSummary, type DiskBackupSummary, type VmBackup } from './disk-backup.js';
import { RateLimiter } from '../../transport/throttle.js';
import { StageTimes } from '../../transport/stage-times.js';
import { diskProgress, isBoolean, isCompression, isMode, isNumber, KEEP_SETTLED_MS, setting } from './job-settings.js';

const log = logger('local-data-path');

export interface LocalDataPathOptions {
  /** The hypervisor connections a job's VMs may be on (server: the hosts table), searched in order. */
  hosts(job: JobDefinition): Promise<readonly HypervisorConnection[]>;
  /** The repository folder of a job (server: the `path` of the repository named by `job.repository`). */
  repositoryPath(job: JobDefinition): Promise<string>;
  /** Password of the job's encrypted chains, if any. */
  password?(job: JobDefinition): Promise<string | undefined>;
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
}

/** A disk task attached to its VM's run: hears its disk's log lines, the VM's progress, and VM-wide lines when it is the oldest. */
interface RunListener {
  readonly disk: string;
  hear(e: RunEvent): void;
}

type RunEvent = { kind: 'progress'; progress: BackupProgress } | { kind: 'log'; level: LogLevel; message: string; disk: string | undefined };

/** The per-VM part of a backup, made by the VM's first disk task and shared by the others. */
interface SharedVm {
  readonly backup: VmBackup;
  readonly chain: ChainRunContext;
  readonly plan: RunPlan;
  readonly repository: Repository;
}

/**
 * One VM's work within a session round (attempt), shared by its disk tasks. A backup: the first
 * task makes the per-VM part (`shared`); each task backs up its own disk in its own slot (the
 * first one also the VM's disks that have no task in this round); the task that finishes the last
 * disk commits. The first failure aborts the view and the writer and fails the rest (`failure`).
 * A health check: the first task runs it, the others wait for `result`.
 */
class VmRun {
  readonly result: Promise<VmResult>;
  shared: Promise<SharedVm> | null = null;
  readonly listeners = new Set<RunListener>();
  /** Latest progress, for tasks that join late. */
  progress: BackupProgress | null = null;
  settledAt: number | null = null;
  /** Disks whose work a task has taken, and those done. */
  readonly claimed = new Set<string>();
  readonly done = new Set<string>();
  committing = false;
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

  progressed(progress: BackupProgress): void {
    this.progress = progress;
    for (const l of this.listeners) l.hear({ kind: 'progress', progress });
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
  readonly #repositories = new Map<string, Promise<Repository>>();
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
    let r = this.#repositories.get(path);
    if (!r) {
      r = openRepository(path, { create: true });
      r.catch(() => this.#repositories.delete(path));
      this.#repositories.set(path, r);
    }
    return r;
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

  /** The per-VM part of a backup: plan the run, take the view, start the restore point. */
  async #startShared(task: TaskSpec, settings: JobMethodSettings, run: VmRun): Promise<SharedVm> {
    const { job } = task;
    const say = (level: LogLevel, message: string, disk?: string) => run.say(level, message, disk);
    const { hypervisor, vm } = await this.#locate(job, task.vm);
    const repository = await this.#repository(await this.#opts.repositoryPath(job));
    const password = await this.#opts.password?.(job);
    const passwordHint = password === undefined ? undefined : await this.#opts.passwordHint?.(job);
    const blockSize = setting(job, 'blockSize', isNumber);
    const compression = setting(job, 'compression', isCompression);
    const mode = setting(job, 'mode', isMode);
    const now = this.#now();

    const { included, excluded } = splitDisks(settings.excludeDisks, task.vm, vm.disks.map((d) => d.name));
    if (excluded.length > 0) say('info', `disk(s) ${excluded.join(', ')} of VM ${vm.name} excluded by the job (not backed up)`);
    if (included.length === 0) {
      throw new BulwarkError(`every disk of VM ${vm.name} is excluded by job ${job.name}`, { kind: 'invalid', context: { vm: vm.name, job: job.name } });
    }

    const chain: ChainRunContext = { repository, job: job.name, vm: vm.name, settings, now, password, say: (level, message) => say(level, message) };
    const { plan, repair } = await planVmBackup(chain, task.full);

    const backup = await startVmBackup({
      hypervisor,
      repository,
      job: job.name,
      vm: vm.id,
      full: plan.kind === 'full',
      chainMethod: plan.chainMethod,
      disks: included,
      ...(repair.length > 0 ? { repair } : {}),
      requireGuestProcessing: setting(job, 'requireGuestProcessing', isBoolean) ?? false,
      ...(mode ? { mode } : {}),
      ...(blockSize !== undefined ? { blockSize } : {}),
      ...(compression ? { compression } : {}),
      ...(password !== undefined ? { password } : {}),
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
    const warnings: string[] = [...summary.warnings, ...(await maintainAfterBackup(chain, plan, summary.pointId))];
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
  }

  /** Tells the catalog the VM's points as the repository now holds them. */
  async #syncPoints(repository: Repository, task: TaskSpec, say: (level: LogLevel, message: string) => void, warnings: string[]): Promise<void> {
    if (!this.#opts.onVmPoints) return;
    try {
      const points = await repository.listRestorePoints({ job: task.job.name, vm: task.vm });
      await this.#opts.onVmPoints(task.job, task, points);
    } catch (err) {
      const w = `the catalog could not follow the repository's points of VM ${task.vm}: ${describeError(err)} (rescan the repository)`;
      warnings.push(w);
      say('warning', w);
    }
  }

  async #healthCheckVm(task: TaskSpec, settings: JobMethodSettings, say: (level: LogLevel, message: string) => void): Promise<VmResult> {
    const { job } = task;
    const repository = await this.#repository(await this.#opts.repositoryPath(job));
    const password = await this.#opts.password?.(job);
    const warnings = await healthCheckSession({ repository, job: job.name, vm: task.vm, settings, now: this.#now(), password, say });
    const points = await repository.listRestorePoints({ job: job.name, vm: task.vm });
    const disks = points.at(-1)?.disks.map((d) => ({ name: d.name, bytesRead: 0, bytesStored: 0 })) ?? [];
    return { pointId: null, disks, warnings, consistency: null };
  }

  #sweepRuns(): void {
    const now = Date.now();
    for (const [k, r] of this.#runs) if (r.settledAt !== null && now - r.settledAt > KEEP_SETTLED_MS) this.#runs.delete(k);
  }

  #run(task: TaskSpec): { run: VmRun; first: boolean } {
    this.#sweepRuns();
    const key = `${task.sessionId}\0${task.vm}\0${task.attempt}`;
    const found = this.#runs.get(key);
    if (found) return { run: found, first: false };
    const run = new VmRun();
    this.#runs.set(key, run);
    return { run, first: true };
  }

  async execute(task: TaskSpec, context: TaskContext): Promise<TaskOutcome> {
    const settings = methodSettings(task.job.settings);
    const { run, first } = this.#run(task);
    return settings.operation === 'health-check' ? this.#executeHealthCheck(task, context, settings, run, first) : this.#executeBackup(task, context, settings, run, first);
  }

  /**
   * A task of this round that will not run: its disk cannot be backed up, so the VM's restore point
   * cannot be complete. The VM's backup fails (its other tasks with this reason) instead of waiting.
   */
  taskSkipped(task: TaskSpec, reason: string): void {
    if (methodSettings(task.job.settings).operation === 'health-check') return;
    const { run } = this.#run(task);
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
      const signal = context.signal;
      const onAbort = () => void this.#failVm(run, signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      void run.result.then(
        () => signal.removeEventListener('abort', onAbort),
        () => signal.removeEventListener('abort', onAbort),
      );
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
      const read = own?.bytesRead ?? 0;
      context.progress({ bytesRead: read, bytesTransferred: read, bytesStored: own?.bytesStored ?? 0, total: read });
      if (run.done.size < backup.disks.length || run.committing) {
        context.log('info', `disk ${disk} is written; the VM's restore point is committed when its other disks are done`);
        return { state: 'success' };
      }
      // The last disk of the VM: this task commits.
      run.committing = true;
      let result: VmResult;
      try {
        result = await stages.measure('target', () => this.#commitVm(task, shared, run));
      } catch (err) {
        run.committing = false;
        await this.#failVm(run, err);
        throw err;
      }
      run.settle({ ok: result });
      return this.#outcome(task, context, result, true);
    } finally {
      run.listeners.delete(listener);
      unwatch?.();
      reportStages();
    }
  }

  /** The outcome of a disk task from the VM's result; `vmWide`: this task reports the VM's warnings. */
  #outcome(task: TaskSpec, context: TaskContext, result: VmResult, vmWide: boolean): TaskOutcome {
    if (result.pointId) context.log('info', `disk ${task.disk.name} is in restore point ${result.pointId}`);
    const messages = vmWide ? [...result.warnings] : [];
    if (vmWide && result.consistency === 'crash' && !messages.some((m) => /crash/i.test(m))) messages.push('the restore point is crash-consistent (guest not quiesced)');
    return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
  }

  /** A health check: the VM's first task runs it for the whole VM, its other tasks wait for it. */
  async #executeHealthCheck(task: TaskSpec, context: TaskContext, settings: JobMethodSettings, run: VmRun, first: boolean): Promise<TaskOutcome> {
    const listener: RunListener = { disk: task.disk.name, hear: (e) => e.kind === 'log' && context.log(e.level, e.message) };
    if (first) {
      context.log('info', `checking VM ${task.vm} (all its disks)`);
      this.#healthCheckVm(task, settings, (level, message) => run.say(level, message)).then(
        (ok) => run.settle({ ok }),
        (error: unknown) => run.settle({ error }),
      );
    } else {
      context.log('info', `disk ${task.disk.name} is checked by the VM's check already going in this session`);
    }
    run.attach(listener);
    try {
      const result = await run.result;
      context.progress({ bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 });
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
