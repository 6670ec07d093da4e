// Per-job storage (single-file mode, docs/formats/backup-files.md section 2): ONE restore point
// holding every VM of a job, in the job's `_all` folder. Each VM's backup (startVmBackup) writes
// through this target as if it had a restore point of its own: its previous checkpoint comes from
// its entry in the job's previous point; its startRestorePoint registers its disks and
// configuration and waits until every VM of the job has registered, then one writer
// (startJobRestorePoint) takes all of them; its writeDisk goes to that writer (disks of different
// VMs in flight together); its commit waits until every VM has asked, then the point is committed
// once. Any VM's failure or abort aborts the one writer: nothing becomes visible
// (docs/decisions/0007-per-job-storage.md).
import { deferred } from '../../common/deferred.js';
import { BulwarkError, describeError } from '../../common/errors.js';
import type { Checkpoint } from '../../hypervisor/types.js';
import {
  startJobRestorePoint,
  vmsOfRestorePoint,
  type JobRestorePointWriter,
  type JobVm,
  type PointVm,
  type Repository,
  type RestorePointInfo,
  type StartRestorePointOptions,
} from '../../repository/index.js';
import type { RestorePointSink, RestorePointTarget } from './disk-backup.js';
import { decodePointMetadata } from './point-metadata.js';

export interface JobPointOptions {
  readonly repository: Repository;
  readonly job: string;
  /** The VMs' names as their backups name them (VmInfo.name): the point holds exactly these. */
  readonly vms: readonly string[];
  /** The point: a full starts a new chain of the `_all` folder; the others continue `parent`. */
  readonly kind: 'full' | 'incremental' | 'reverse';
  /** Incremental and reverse: the `_all` point continued (the chain's latest). */
  readonly parent?: RestorePointInfo | undefined;
  /** Full: the new chain's method, block size, compression and encryption. */
  readonly chainMethod?: 'forward' | 'reverse' | undefined;
  readonly blockSize?: number | undefined;
  readonly compression?: 'none' | 'zstd' | 'lz4' | undefined;
  readonly encryption?: { readonly password: string; readonly hint?: string | undefined } | undefined;
  /** Incremental and reverse of an encrypted chain: the chain's password. */
  readonly password?: string | undefined;
  readonly time?: Date | undefined;
  readonly threads?: number | undefined;
  /** Reverse: the progress of the commit's injection step (RestorePointWriter, `inject`). */
  readonly onTransformProgress?: StartRestorePointOptions['onTransformProgress'];
}

const FAILED = (job: string) => `job ${job}'s restore point (all its VMs in one) is not written: `;

/** The error of everything waiting on a per-job point that failed: names the job, carries the cause (which names the VM). */
export function jobPointFailed(job: string, cause: unknown): BulwarkError {
  if (cause instanceof BulwarkError && cause.message.startsWith(FAILED(job))) return cause;
  return new BulwarkError(FAILED(job) + describeError(cause), {
    kind: cause instanceof BulwarkError ? cause.kind : 'internal',
    context: { job, ...(cause instanceof BulwarkError && typeof cause.context?.vm === 'string' ? { vm: cause.context.vm } : {}) },
    cause,
    hint: 'the job\'s previous restore points are kept; the next run (or a retry) writes the point again for every VM',
  });
}

/** The target the VMs of one per-job run share; `abort` (or `fail`) once anything goes wrong. */
export class JobPointTarget implements RestorePointTarget {
  // JobRestorePointWriter copies a block into an encoder slot before it pulls the next one.
  readonly reusesBlockBuffers = true;
  readonly #o: JobPointOptions;
  readonly #registered = new Map<string, JobVm>();
  readonly #writer = deferred<JobRestorePointWriter>();
  #started: Promise<JobRestorePointWriter> | null = null;
  readonly #committing = new Set<string>();
  readonly #committed = deferred<RestorePointInfo>();
  #failure: unknown = undefined;
  #aborted: Promise<void> | null = null;
  #parentVms: Promise<PointVm[]> | null = null;

  constructor(o: JobPointOptions) {
    if (o.kind !== 'full' && !o.parent) throw new BulwarkError(`a ${o.kind} point of job ${o.job} needs the point it continues`, { kind: 'internal', context: { job: o.job } });
    this.#o = o;
  }

  /** The VM's checkpoint in the job's previous point (null: a full, or the VM is not in it / another chain id). */
  async previousCheckpoint(_job: string, vm: string, chainId: string): Promise<{ point: RestorePointInfo; checkpoint: Checkpoint } | null> {
    const parent = this.#o.parent;
    if (this.#o.kind === 'full' || !parent) return null;
    this.#parentVms ??= (async () => {
      const opened = await this.#o.repository.openRestorePoint(parent.id, this.#o.password === undefined ? {} : { password: this.#o.password });
      try {
        return vmsOfRestorePoint(opened);
      } finally {
        await opened.close();
      }
    })();
    const entry = (await this.#parentVms).find((v) => v.name === vm);
    const meta = entry ? decodePointMetadata(entry.config) : null;
    if (!meta || meta.checkpoint.chainId !== chainId) return null;
    return { point: parent, checkpoint: meta.checkpoint };
  }

  /**
   * A VM's part of the point: registers its disks and configuration, waits for the job's other
   * VMs, then writes through the one writer. The VM's own kind, parent, block size and
   * encryption are the job's (this target's), whatever the VM asked for.
   */
  async startRestorePoint(opts: StartRestorePointOptions): Promise<RestorePointSink> {
    const { job, vms } = this.#o;
    if (this.#failure !== undefined) throw this.#failed();
    if (!vms.includes(opts.vm)) {
      throw new BulwarkError(`VM ${opts.vm} is not one of the VMs of job ${job}'s restore point (${vms.join(', ')})`, { kind: 'internal', context: { job, vm: opts.vm } });
    }
    if (this.#registered.has(opts.vm)) throw new BulwarkError(`VM ${opts.vm} started its part of job ${job}'s restore point twice`, { kind: 'conflict', context: { job, vm: opts.vm } });
    this.#registered.set(opts.vm, { name: opts.vm, disks: opts.disks, ...(opts.vmConfig ? { config: opts.vmConfig } : {}) });
    if (this.#registered.size === vms.length) this.#start();
    const w = await this.#writer.promise;
    const vm = opts.vm;
    return {
      writeDisk: (name, blocks, o) => w.writeDisk(vm, name, blocks, o),
      commit: () => this.#commit(vm),
      abort: () => this.abort(new BulwarkError(`the backup of VM ${vm} was aborted`, { kind: 'internal', context: { vm } })),
    };
  }

  #start(): void {
    const o = this.#o;
    // In the order of the job's VMs (the point's configuration lists them so).
    const vms = o.vms.map((name) => this.#registered.get(name)!);
    this.#started = startJobRestorePoint(o.repository, {
      job: o.job,
      kind: o.kind,
      ...(o.kind === 'full' && o.chainMethod !== undefined ? { chainMethod: o.chainMethod } : {}),
      ...(o.kind === 'full' && o.blockSize !== undefined ? { blockSize: o.blockSize } : {}),
      ...(o.kind === 'full' && o.compression !== undefined ? { compression: o.compression } : {}),
      ...(o.kind === 'full' && o.encryption !== undefined ? { encryption: { password: o.encryption.password, ...(o.encryption.hint ? { hint: o.encryption.hint } : {}) } } : {}),
      ...(o.kind !== 'full' ? { parent: o.parent!.id } : {}),
      ...(o.kind !== 'full' && o.password !== undefined ? { password: o.password } : {}),
      ...(o.time !== undefined ? { time: o.time } : {}),
      ...(o.threads !== undefined ? { threads: o.threads } : {}),
      ...(o.onTransformProgress ? { onTransformProgress: o.onTransformProgress } : {}),
      vms,
    });
    this.#started.then(
      async (w) => {
        // Failed meanwhile (another VM): the writer goes at once.
        if (this.#failure !== undefined) {
          await w.abort().catch(() => undefined);
          this.#writer.reject(this.#failed());
        } else this.#writer.resolve(w);
      },
      (err: unknown) => {
        this.#failure ??= err;
        this.#writer.reject(err);
      },
    );
  }

  /** One VM is done; the last one commits the point for all. Every VM's commit resolves with the job's point. */
  #commit(vm: string): Promise<RestorePointInfo> {
    if (this.#failure !== undefined) return Promise.reject(this.#failed());
    this.#committing.add(vm);
    if (this.#committing.size === this.#o.vms.length) {
      void this.#writer.promise.then((w) => w.commit()).then(
        (p) => this.#committed.resolve(p),
        (err: unknown) => {
          this.#failure ??= err;
          this.#committed.reject(err);
        },
      );
    }
    return this.#committed.promise;
  }

  #failed(): BulwarkError {
    return jobPointFailed(this.#o.job, this.#failure);
  }

  /** A VM failed before (or while) its part started: the other VMs stop waiting, the writer is aborted. */
  fail(reason: unknown): void {
    void this.abort(reason);
  }

  /** Aborts the point for every VM (idempotent): nothing is visible. */
  abort(reason: unknown): Promise<void> {
    this.#aborted ??= (async () => {
      this.#failure ??= reason;
      this.#writer.reject(this.#failed());
      this.#committed.reject(this.#failed());
      const w = await this.#started?.catch(() => null);
      await w?.abort();
    })();
    return this.#aborted;
  }
}
