// The job engine's data path on the one-host install: TaskExecutor and DiskResolver over the
// hypervisor adapters of the configured hosts and a repository folder on this machine (data moves
// in-process; the multi-host path sends it through src/transport). The engine runs one task per VM
// disk, but a restore point holds all disks of a VM: the first task of a VM (per session and
// attempt) runs the VM's work, and every disk task of that VM reports its own disk's progress and
// result from that one run. A VM's work is, by the session's operation (chain-policy.ts; the
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
import { openRepository, type Repository, type RestorePointInfo } from '../../repository/index.js';
import type { DiskRef, DiskResolver, JobDefinition, LogLevel, TaskContext, TaskExecutor, TaskOutcome, TaskSpec } from '../../server/jobs/ports.js';
import { methodSettings, splitDisks, type JobMethodSettings } from './chain-policy.js';
import { healthCheckSession, maintainAfterBackup, planVmBackup, type ChainRunContext } from './chain-run.js';
import { backupVm, type BackupProgress, type BackupVmSummary } from './disk-backup.js';
import { diskProgress, isBoolean, isCompression, isMode, isNumber, KEEP_SETTLED_MS, setting } from './job-settings.js';

const log = logger('local-data-path');

export interface LocalDataPathOptions {
  /** The hypervisor connections a job's VMs may be on (server: the hosts table), searched in order. */
  hosts(job: JobDefinition): Promise<readonly HypervisorConnection[]>;
  /** The repository folder of a job (server: the `path` of the repository named by `job.repository`). */
  repositoryPath(job: JobDefinition): Promise<string>;
  /** Password of the job's encrypted chains, if any. */
  password?(job: JobDefinition): Promise<string | undefined>;
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

/** One VM's work within a session attempt, shared by its disk tasks. */
interface VmRun {
  readonly result: Promise<VmResult>;
  readonly listeners: Set<(e: RunEvent) => void>;
  /** Latest progress, for tasks that join late. */
  progress: BackupProgress | null;
  settledAt: number | null;
}

type RunEvent = { kind: 'progress'; progress: BackupProgress } | { kind: 'log'; level: LogLevel; message: string; disk: string | undefined };

/** What `exportVm` writes: a standalone full outside any job's chain. */
export interface ExportVmOptions {
  /** Where the VM's hosts are looked up (the server passes every host). */
  readonly hosts: readonly HypervisorConnection[];
  readonly repositoryPath: string;
  readonly vm: string;
  /** Encrypt the export with this password. */
  readonly password?: string;
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

  #startRun(task: TaskSpec, signal: AbortSignal): VmRun {
    const listeners = new Set<(e: RunEvent) => void>();
    const emit = (e: RunEvent) => {
      for (const l of listeners) l(e);
    };
    const run: VmRun = {
      listeners,
      progress: null,
      settledAt: null,
      result: (async () => {
        const settings = methodSettings(task.job.settings);
        const say = (level: LogLevel, message: string, disk?: string) => emit({ kind: 'log', level, message, disk });
        return settings.operation === 'health-check'
          ? this.#healthCheckVm(task, settings, say)
          : this.#backupVm(task, settings, signal, say, (progress) => {
              run.progress = progress;
              emit({ kind: 'progress', progress });
            });
      })(),
    };
    run.result.then(
      () => (run.settledAt = Date.now()),
      () => (run.settledAt = Date.now()),
    );
    return run;
  }

  async #backupVm(
    task: TaskSpec,
    settings: JobMethodSettings,
    signal: AbortSignal,
    say: (level: LogLevel, message: string, disk?: string) => void,
    onProgress: (p: BackupProgress) => void,
  ): Promise<VmResult> {
    const { job } = task;
    const { hypervisor, vm } = await this.#locate(job, task.vm);
    const repository = await this.#repository(await this.#opts.repositoryPath(job));
    const password = await this.#opts.password?.(job);
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

    const summary = await backupVm({
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
      signal,
      time: now,
      onProgress,
      onLog: (level, message, disk) => say(level, message, disk),
      ...(this.#opts.onView ? { onView: (view: BackupView) => this.#opts.onView!(task, view) } : {}),
    });
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

  async execute(task: TaskSpec, context: TaskContext): Promise<TaskOutcome> {
    this.#sweepRuns();
    const key = `${task.sessionId}\0${task.vm}\0${task.attempt}`;
    let run = this.#runs.get(key);
    const owner = run === undefined;
    const healthCheck = methodSettings(task.job.settings).operation === 'health-check';
    if (!run) {
      run = this.#startRun(task, context.signal);
      this.#runs.set(key, run);
      context.log('info', healthCheck ? `checking VM ${task.vm} (all its disks)` : `backing up VM ${task.vm} (all its disks in one restore point)`);
    } else {
      context.log('info', `disk ${task.disk.name} is handled by the VM's run already going in this session`);
    }
    const listener = (e: RunEvent) => {
      switch (e.kind) {
        case 'progress':
          context.progress(diskProgress(e.progress, task.disk.name));
          break;
        case 'log':
          // VM-wide lines go to the task that runs the VM's work; disk lines to their disk's task.
          if (e.disk === undefined ? owner : e.disk === task.disk.name) context.log(e.level, e.message);
          break;
      }
    };
    run.listeners.add(listener);
    if (run.progress) context.progress(diskProgress(run.progress, task.disk.name));
    try {
      const result = await run.result;
      const disk = result.disks.find((d) => d.name === task.disk.name);
      if (!disk && !healthCheck) {
        throw new BulwarkError(`disk ${task.disk.name} of VM ${task.vm} is not in restore point ${result.pointId ?? '-'} (removed from the VM?)`, {
          kind: 'not-found',
          context: { vm: task.vm, disk: task.disk.name, point: result.pointId ?? '' },
        });
      }
      const read = disk?.bytesRead ?? 0;
      context.progress({ bytesRead: read, bytesTransferred: read, bytesStored: disk?.bytesStored ?? 0, total: read });
      if (!owner && result.pointId) context.log('info', `disk ${task.disk.name} is in restore point ${result.pointId}`);
      const messages = owner ? [...result.warnings] : [];
      if (owner && result.consistency === 'crash' && !messages.some((m) => /crash/i.test(m))) messages.push('the restore point is crash-consistent (guest not quiesced)');
      return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
    } catch (err) {
      if (!owner) log.debug({ vm: task.vm, disk: task.disk.name, err: describeError(err) }, 'the VM run this disk task joined failed');
      throw err;
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
