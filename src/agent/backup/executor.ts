// The job engine's data path on the one-host install: TaskExecutor and DiskResolver over the
// hypervisor adapters of the configured hosts and a repository folder on this machine (data moves
// in-process; the multi-host path sends it through src/transport). The engine runs one task per VM
// disk, but a restore point holds all disks of a VM: the first task of a VM (per session and
// attempt) runs the VM's backup (`backupVm`), and every disk task of that VM reports its own disk's
// progress and result from that one run.
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { openHypervisor, type HypervisorConnection } from '../../hypervisor/index.js';
import type { Hypervisor, VmInfo } from '../../hypervisor/types.js';
import { openRepository, type Repository } from '../../repository/index.js';
import type { DiskRef, DiskResolver, JobDefinition, LogLevel, TaskContext, TaskExecutor, TaskOutcome, TaskSpec, TransferProgress } from '../../server/jobs/ports.js';
import { backupVm, type BackupProgress, type BackupVmSummary } from './disk-backup.js';

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
  onRestorePoint?(job: JobDefinition, task: TaskSpec, summary: BackupVmSummary): Promise<void>;
}

/** One VM's backup within a session attempt, shared by its disk tasks. */
interface VmRun {
  readonly result: Promise<BackupVmSummary>;
  readonly listeners: Set<(e: RunEvent) => void>;
  /** Latest progress, for tasks that join late. */
  progress: BackupProgress | null;
  settledAt: number | null;
}

type RunEvent = { kind: 'progress'; progress: BackupProgress } | { kind: 'log'; level: LogLevel; message: string; disk: string | undefined };

const KEEP_SETTLED_MS = 60 * 60 * 1000;

function connectionKey(c: HypervisorConnection): string {
  return JSON.stringify(c);
}

function diskProgress(p: BackupProgress, disk: string): TransferProgress {
  const d = p.disks[disk];
  if (!d) return { bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 };
  // total: an upper bound of what is left to read that shrinks to bytesRead when the disk is done
  // (zero and unchanged extents are never read, so the disk's size would never be reached).
  const total = d.done ? d.bytesRead : d.bytesRead + (d.size - d.bytesProcessed);
  return { bytesRead: d.bytesRead, bytesTransferred: d.bytesRead, bytesStored: d.bytesStored, total };
}

function setting<T>(job: JobDefinition, key: string, check: (v: unknown) => v is T): T | undefined {
  const v = job.settings?.[key];
  return check(v) ? v : undefined;
}
const isNumber = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v);
const isBoolean = (v: unknown): v is boolean => typeof v === 'boolean';
const isCompression = (v: unknown): v is 'none' | 'zstd' | 'lz4' => v === 'none' || v === 'zstd' || v === 'lz4';
const isMode = (v: unknown): v is 'online' | 'offline' => v === 'online' || v === 'offline';

/** TaskExecutor + DiskResolver of the one-host install; `close()` when the server stops. */
export class LocalDataPathExecutor implements TaskExecutor, DiskResolver {
  readonly #opts: LocalDataPathOptions;
  readonly #adapters = new Map<string, Hypervisor>();
  readonly #repositories = new Map<string, Promise<Repository>>();
  readonly #runs = new Map<string, VmRun>();

  constructor(options: LocalDataPathOptions) {
    this.#opts = options;
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
  async #locate(job: JobDefinition, vm: string): Promise<{ hypervisor: Hypervisor; vm: VmInfo; connection: HypervisorConnection }> {
    const hosts = await this.#opts.hosts(job);
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
      context: { vm, job: job.name },
    });
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

  async resolveDisks(job: JobDefinition, vm: string, signal: AbortSignal): Promise<DiskRef[]> {
    signal.throwIfAborted();
    const { vm: info, connection } = await this.#locate(job, vm);
    return info.disks.map((d) => ({
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
        const { job } = task;
        const { hypervisor, vm } = await this.#locate(job, task.vm);
        const repository = await this.#repository(await this.#opts.repositoryPath(job));
        const password = await this.#opts.password?.(job);
        const blockSize = setting(job, 'blockSize', isNumber);
        const compression = setting(job, 'compression', isCompression);
        const mode = setting(job, 'mode', isMode);
        const summary = await backupVm({
          hypervisor,
          repository,
          job: job.name,
          vm: vm.id,
          full: task.full,
          requireGuestProcessing: setting(job, 'requireGuestProcessing', isBoolean) ?? false,
          ...(mode ? { mode } : {}),
          ...(blockSize !== undefined ? { blockSize } : {}),
          ...(compression ? { compression } : {}),
          ...(password !== undefined ? { password } : {}),
          signal,
          onProgress: (progress) => {
            run.progress = progress;
            emit({ kind: 'progress', progress });
          },
          onLog: (level, message, disk) => emit({ kind: 'log', level, message, disk }),
        });
        if (this.#opts.onRestorePoint) {
          try {
            await this.#opts.onRestorePoint(job, task, summary);
          } catch (err) {
            log.error({ vm: task.vm, point: summary.pointId, err: describeError(err) }, 'restore point committed but not recorded in the catalog');
            emit({ kind: 'log', level: 'warning', message: `restore point ${summary.pointId} is in the repository but could not be recorded in the catalog: ${describeError(err)} (rescan the repository)`, disk: undefined });
          }
        }
        return summary;
      })(),
    };
    run.result.then(
      () => (run.settledAt = Date.now()),
      () => (run.settledAt = Date.now()),
    );
    return run;
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
    if (!run) {
      run = this.#startRun(task, context.signal);
      this.#runs.set(key, run);
      context.log('info', `backing up VM ${task.vm} (all its disks in one restore point)`);
    } else {
      context.log('info', `disk ${task.disk.name} is backed up by the VM's backup already running in this session`);
    }
    const listener = (e: RunEvent) => {
      switch (e.kind) {
        case 'progress':
          context.progress(diskProgress(e.progress, task.disk.name));
          break;
        case 'log':
          // VM-wide lines go to the task that runs the VM's backup; disk lines to their disk's task.
          if (e.disk === undefined ? owner : e.disk === task.disk.name) context.log(e.level, e.message);
          break;
      }
    };
    run.listeners.add(listener);
    if (run.progress) context.progress(diskProgress(run.progress, task.disk.name));
    try {
      const summary = await run.result;
      const disk = summary.disks.find((d) => d.name === task.disk.name);
      if (!disk) {
        throw new BulwarkError(`disk ${task.disk.name} of VM ${task.vm} is not in restore point ${summary.pointId} (removed from the VM?)`, {
          kind: 'not-found',
          context: { vm: task.vm, disk: task.disk.name, point: summary.pointId },
        });
      }
      context.progress({ bytesRead: disk.bytesRead, bytesTransferred: disk.bytesRead, bytesStored: disk.bytesStored, total: disk.bytesRead });
      if (!owner) context.log('info', `disk ${disk.name} is in restore point ${summary.pointId}`);
      const messages = [...summary.warnings];
      if (summary.consistency === 'crash' && !messages.some((m) => /crash/i.test(m))) messages.push('the restore point is crash-consistent (guest not quiesced)');
      return messages.length > 0 ? { state: 'warning', messages } : { state: 'success' };
    } catch (err) {
      if (!owner) log.debug({ vm: task.vm, disk: task.disk.name, err: describeError(err) }, 'the VM backup this disk task joined failed');
      throw err;
    } finally {
      run.listeners.delete(listener);
    }
  }

  /** Closes the hypervisor connections. */
  async close(): Promise<void> {
    await Promise.allSettled([...this.#adapters.values()].map((a) => a.close()));
    this.#adapters.clear();
  }
}
