// Backs up ONE VM into a repository, all its disks in one restore point (the one-host data path,
// docs/data-path.md): the per-VM part (`startVmBackup`) finds the chain's previous point and its
// checkpoint, takes the hypervisor's point-in-time view and starts the restore point; the per-disk
// part (`VmBackup.backupDisk`, one task per disk, side by side) streams a disk's changed blocks
// through the CBT reader into the restore point writer (bounded memory: the reader's and the
// writer's in-flight limits); then the point is committed and then the view (bitmap rotation).
// Any failure aborts both: no visible point, tracking kept. `backupVm` does it all in one call.
import { createHash } from 'node:crypto';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { DiskBlock } from '../../disk/types.js';
import { describeChanges } from '../../hypervisor/cbt/policy.js';
import { prepareBackupDisk, readBackupDisk, type ChangedBlockStats, type PreparedBackupDisk } from '../../hypervisor/cbt/reader.js';
import type { BackupDiskView, BackupView, Checkpoint, Consistency, Hypervisor } from '../../hypervisor/types.js';
import { validChainId } from '../../hypervisor/types.js';
import type { DiskWriteStats, Repository, RestorePointInfo, StartRestorePointOptions, WriteDiskOptions } from '../../repository/index.js';
import type { StageTimes } from '../../transport/stage-times.js';
import type { Throttle } from '../../transport/throttle.js';
import { decodePointMetadata, encodePointMetadata, POINT_METADATA_FORMAT } from './point-metadata.js';

const log = logger('agent-backup');

export type BackupLogLevel = 'info' | 'warning' | 'error';

/** Disks of a VM whose exports are opened while its restore point starts (4 NBD connections each). */
const PREPARED_DISKS = 4;

/** Running counters of one disk (or of the whole VM: the sum). */
export interface DiskBackupProgress {
  /**
   * Bytes of the disk passed so far: the reader's position (up to the end of the block it handed
   * on last; skipped zero, unallocated and unchanged blocks count as passed). The disk's size when done.
   */
  bytesProcessed: number;
  /** Bytes read from the view (data extents only). */
  bytesRead: number;
  /**
   * Bytes the target took for this disk so far (a repository here: encoded, after dedup; a
   * repository agent: the bytes handed to the network); when the disk ends, what it stored.
   */
  bytesStored: number;
  /** Virtual size of the disk. */
  size: number;
  done: boolean;
}

export interface BackupProgress {
  readonly disks: Readonly<Record<string, DiskBackupProgress>>;
  readonly bytesProcessed: number;
  readonly bytesRead: number;
  readonly bytesStored: number;
  readonly size: number;
  /** Bytes read per second since the reads began. */
  readonly rate: number;
}

/**
 * Where a backup's restore point is written: a repository on this machine (`repositoryTarget`),
 * or a repository agent across the network (src/agent/remote: the data-mover transport).
 */
export interface RestorePointTarget {
  /** The latest point of the job's VM and its checkpoint when it continues `chainId` (see `previousCheckpoint`). */
  previousCheckpoint(job: string, vm: string, chainId: string, password?: string): Promise<{ point: RestorePointInfo; checkpoint: Checkpoint } | null>;
  startRestorePoint(opts: StartRestorePointOptions): Promise<RestorePointSink>;
  /**
   * The sink's writeDisk copies each block's data before it asks for the next block, so the disk
   * reader may reuse its buffers (a bounded ring instead of one allocation per block).
   */
  readonly reusesBlockBuffers?: boolean;
}

/** The part of a RestorePointWriter a backup uses. */
export interface RestorePointSink {
  writeDisk(name: string, blocks: AsyncIterable<DiskBlock>, opts?: WriteDiskOptions): Promise<Pick<DiskWriteStats, 'storedBytes' | 'storedBlocks' | 'unchangedBlocks'>>;
  commit(): Promise<RestorePointInfo>;
  abort(): Promise<void>;
}

/** A repository on this machine as a backup's target. */
export function repositoryTarget(repository: Repository): RestorePointTarget {
  return {
    previousCheckpoint: (job, vm, chainId, password) => previousCheckpoint(repository, job, vm, chainId, password),
    startRestorePoint: (opts) => repository.startRestorePoint(opts),
    // RestorePointWriter copies a block into an encoder slot before it pulls the next one.
    reusesBlockBuffers: true,
  };
}

export interface BackupVmOptions {
  readonly hypervisor: Hypervisor;
  /** The repository on this machine; or give `target` (a remote repository agent) instead. */
  readonly repository?: Repository;
  readonly target?: RestorePointTarget;
  /** Job name: keys the repository folder together with the VM name. */
  readonly job: string;
  /** VM name or adapter id. */
  readonly vm: string;
  /** online: guest freeze (default); offline: pause the VM around the snapshot. */
  readonly mode?: 'online' | 'offline';
  readonly requireGuestProcessing?: boolean;
  /** Start a new chain with a full read of every disk. */
  readonly full?: boolean;
  /** Why `full` (the run plan's reason), said in each disk's full-read line. */
  readonly fullReason?: string;
  /** Hypervisor chain id (bitmap names). Default: derived from job and VM (see `chainIdFor`). */
  readonly chainId?: string;
  /** New chains only: repository block size (default 1 MiB) and compression (default zstd). */
  readonly blockSize?: number;
  readonly compression?: 'none' | 'zstd' | 'lz4';
  /** New chains only: encrypt with this password. Increments of an encrypted chain: its password (unless `chainPassword`). */
  readonly password?: string;
  /**
   * The password of the encrypted chain an increment continues, when it is not `password` (the
   * job's password changed: the chain keeps the key it was created with until the next full).
   */
  readonly chainPassword?: string;
  /** New encrypted chains only: a hint for the password, stored in the chain's metadata. */
  readonly passwordHint?: string;
  /** Back up only these disks. Default: all. */
  readonly disks?: readonly string[];
  /** New chains only: the chain's method (default forward; reverse for the reverse-incremental method). */
  readonly chainMethod?: 'forward' | 'reverse';
  /**
   * Blocks a health check found damaged: read from the source and stored fresh even when the
   * bitmap does not mark them (the repair of the chain).
   */
  readonly repair?: readonly { readonly disk: string; readonly blocks: readonly number[] }[];
  /**
   * Keep change tracking for the next backup of this chain (default true). False for a
   * standalone full (export): the view is ended without leaving a checkpoint behind.
   */
  readonly keepTracking?: boolean;
  /**
   * The VM is written into an increment even when it has no previous checkpoint of its own (a
   * per-job point: the job's increment, a VM new to it): blocks not read are given as explicit
   * zeroes, never left to inherit. `blockSize` must then be the chain's.
   */
  readonly intoIncrement?: boolean;
  /** Point-in-time recorded for the restore point (default: now). */
  readonly time?: Date;
  /** NBD connections per disk (default 4) and blocks in flight per disk (default 4 MiB of blocks, at least 8). */
  readonly connections?: number;
  readonly concurrency?: number;
  /** Encoder threads of the repository writer (default: the repository's). */
  readonly threads?: number;
  readonly freezeTimeoutMs?: number;
  readonly signal?: AbortSignal;
  readonly onProgress?: (progress: BackupProgress) => void;
  /** A line for the session log; `disk` when it is about one disk. */
  readonly onLog?: (level: BackupLogLevel, message: string, disk?: string) => void;
  /**
   * Called once the view exists, before any block is read (the view is read-only and stays
   * until this returns). For hooks that need the point-in-time view itself, e.g. tests taking a
   * reference copy.
   */
  readonly onView?: (view: BackupView) => Promise<void>;
}

export interface DiskBackupSummary {
  readonly name: string;
  readonly size: number;
  /** bitmap: incremental from changed block tracking; full: every data extent was read. */
  readonly read: 'bitmap' | 'full';
  /** Why a full read (when `read` is full). */
  readonly fullReason?: string | undefined;
  /** Full read into an increment: blocks equal to the parent's were not stored. */
  readonly comparedWithParent: boolean;
  readonly bytesRead: number;
  /** Bytes the dirty bitmap marked (incremental reads). */
  readonly bytesChanged: number;
  readonly bytesStored: number;
  readonly storedBlocks: number;
  readonly unchangedBlocks: number;
}

export interface BackupVmSummary {
  readonly pointId: string;
  readonly point: RestorePointInfo;
  readonly kind: 'full' | 'incremental';
  readonly vm: string;
  readonly chainId: string;
  readonly checkpoint: Checkpoint;
  readonly consistency: Consistency;
  readonly freezeWindowMs: number | null;
  readonly pauseWindowMs: number | null;
  readonly disks: readonly DiskBackupSummary[];
  readonly warnings: readonly string[];
  readonly durationMs: number;
}

/** The hypervisor chain id of a job's VM: stable across fulls, valid in bitmap names. */
export function chainIdFor(job: string, vm: string): string {
  return `bw-${createHash('sha256').update(`${job}\0${vm}`).digest('hex').slice(0, 24)}`;
}

/** The latest point of a job's VM and the checkpoint stored with it (null when none is usable). */
export async function previousCheckpoint(
  repository: Repository,
  job: string,
  vm: string,
  chainId: string,
  password?: string,
): Promise<{ point: RestorePointInfo; checkpoint: Checkpoint } | null> {
  const points = await repository.listRestorePoints({ job, vm });
  // The tip of the newest chain (points are oldest first per chain; chains in creation order).
  const point = points.at(-1);
  if (!point) return null;
  const opened = await repository.openRestorePoint(point.id, password === undefined ? {} : { password });
  try {
    const meta = decodePointMetadata(opened.vmConfig);
    if (!meta || meta.checkpoint.chainId !== chainId) return null;
    return { point, checkpoint: meta.checkpoint };
  } finally {
    await opened.close();
  }
}

/**
 * A full read into an increment: the reader skips blocks that read as zeroes, but in an increment a
 * missing block means "unchanged", so every gap is given as an explicit zero block.
 */
async function* withExplicitZeroes(blocks: AsyncIterable<DiskBlock>, blockCount: number): AsyncGenerator<DiskBlock> {
  let next = 0;
  for await (const b of blocks) {
    while (next < b.index) yield { index: next++, data: null };
    yield b;
    next = b.index + 1;
  }
  while (next < blockCount) yield { index: next++, data: null };
}

async function* checkedSignal(blocks: AsyncIterable<DiskBlock>, signal: AbortSignal | undefined): AsyncGenerator<DiskBlock> {
  for await (const b of blocks) {
    signal?.throwIfAborted();
    yield b;
  }
}

/** Counts the time the consumer waits for each next block to Source. */
async function* timedSource(blocks: AsyncIterable<DiskBlock>, stages: StageTimes): AsyncGenerator<DiskBlock> {
  const it = blocks[Symbol.asyncIterator]();
  try {
    for (;;) {
      const t = performance.now();
      const r = await it.next();
      stages.add('source', performance.now() - t);
      if (r.done) return;
      yield r.value;
    }
  } finally {
    await it.return?.();
  }
}

/** Holds each data block back until `throttle` lets its bytes pass; the waits count to Throttling. */
async function* throttled(blocks: AsyncIterable<DiskBlock>, throttle: Throttle, stages: StageTimes | undefined): AsyncGenerator<DiskBlock> {
  for await (const b of blocks) {
    if (b.data) {
      const waited = await throttle.acquire(b.data.length);
      stages?.add('throttling', waited);
    }
    yield b;
  }
}

/** What one disk's work is given by the task that runs it. */
export interface DiskWorkHooks {
  /** Aborts this disk's reads (default: the VM backup's signal). */
  readonly signal?: AbortSignal;
  /** Busy time per stage of this disk's work (Source, Proxy, Target, Throttling). */
  readonly stages?: StageTimes;
  /** A rate limit (the task's share of its repository's rate): data blocks wait for it. */
  readonly throttle?: Throttle;
}

/**
 * One VM's backup in progress: its point-in-time view and its restore point writer, shared by the
 * VM's disks. Each disk is backed up once with `backupDisk` (disks may run concurrently, each in
 * its own task); then `commit` makes the point visible and rotates the bitmaps. On any failure the
 * caller calls `abort` (idempotent): no visible point, tracking kept.
 */
export interface VmBackup {
  /** The VM's name. */
  readonly vm: string;
  readonly chainId: string;
  readonly incremental: boolean;
  readonly view: BackupView;
  /** The disks of the point, in the view's order. */
  readonly disks: readonly string[];
  backupDisk(name: string, hooks?: DiskWorkHooks): Promise<DiskBackupSummary>;
  /** After every disk is backed up: commits the point, then the view (`keepTracking`). */
  commit(): Promise<BackupVmSummary>;
  /** Aborts the writer and the view; `reason` is logged. Safe to call more than once. */
  abort(reason: unknown): Promise<void>;
}

/**
 * The per-VM part of a backup: finds the chain's previous point and checkpoint, takes the
 * hypervisor's view, starts the restore point. The disks are then backed up with `backupDisk`.
 */
export async function startVmBackup(o: BackupVmOptions): Promise<VmBackup> {
  const started = Date.now();
  const say = (level: BackupLogLevel, message: string, disk?: string) => {
    log[level === 'warning' ? 'warn' : level]({ job: o.job, vm: o.vm, disk }, message);
    o.onLog?.(level, message, disk);
  };
  const vmInfo = await o.hypervisor.getVm(o.vm);
  const vmName = vmInfo.name;
  const chainId = o.chainId ?? chainIdFor(o.job, vmName);
  if (!validChainId(chainId)) throw new BulwarkError(`chain id ${chainId} is not valid in bitmap names`, { kind: 'invalid', context: { chainId } });
  o.signal?.throwIfAborted();

  const target = o.target ?? (o.repository ? repositoryTarget(o.repository) : undefined);
  if (!target) throw new BulwarkError('backupVm needs a repository or a target', { kind: 'invalid' });
  const chainPassword = o.chainPassword ?? o.password;
  const prev = await target.previousCheckpoint(o.job, vmName, chainId, chainPassword);
  if (prev) say('info', `previous restore point ${prev.point.id} (${prev.point.kind}, ${prev.point.time.toISOString()}), checkpoint ${prev.checkpoint.name}`);
  else say('info', 'no previous restore point of this chain: full backup');
  const incremental = prev !== null && o.full !== true;

  const view = await o.hypervisor.beginBackup(vmInfo.id, {
    mode: o.mode ?? 'online',
    requireGuestProcessing: o.requireGuestProcessing ?? false,
    chainId,
    previous: prev?.checkpoint ?? null,
    ...(o.disks ? { disks: o.disks } : {}),
    ...(o.full ? { full: true, ...(o.fullReason !== undefined ? { fullReason: o.fullReason } : {}) } : {}),
    ...(o.freezeTimeoutMs !== undefined ? { freezeTimeoutMs: o.freezeTimeoutMs } : {}),
  });
  let writer: RestorePointSink | null = null;
  let ended: 'committed' | 'aborted' | null = null;
  const blockSize = incremental ? prev.point.blockSize : (o.blockSize ?? 1048576);
  /** Exports opened ahead of their disk's reads (see below); a disk's backup takes its own. */
  const prepared = new Map<string, PreparedBackupDisk>();
  const closePrepared = () => Promise.all([...prepared.values()].map((p) => p.close())).then(() => prepared.clear());
  const abort = async (reason: unknown): Promise<void> => {
    if (ended !== null) return;
    ended = 'aborted';
    say('error', `backup of VM ${vmName} failed: ${describeError(reason)}`);
    await closePrepared();
    if (writer) await writer.abort().catch((e: unknown) => log.error({ vm: vmName, err: describeError(e) }, 'aborting the restore point writer failed'));
    await view.abort(reason);
  };
  try {
    say(
      'info',
      view.consistency === 'application'
        ? `point in time taken, application-consistent (file systems frozen ${view.freezeWindowMs ?? 0} ms)`
        : `point in time taken, crash-consistent${view.pauseWindowMs !== null ? ` (VM paused ${view.pauseWindowMs} ms)` : ''}`,
    );
    for (const w of view.warnings) say('warning', w);
    if (o.onView) await o.onView(view);
    o.signal?.throwIfAborted();
    // The first disks' exports open (NBD handshakes) and their first window's block status is
    // asked while the restore point starts (repository lock, file, encoder threads): the first
    // read no longer waits for both in turn. A few disks only, to bound the connections held.
    for (const d of view.disks.slice(0, PREPARED_DISKS)) {
      prepared.set(d.disk.name, prepareBackupDisk(d, { blockSize, ...(o.connections !== undefined ? { connections: o.connections } : {}) }));
    }

    const meta = encodePointMetadata({
      format: POINT_METADATA_FORMAT,
      hypervisor: o.hypervisor.kind,
      vm: { name: view.vm.name, id: view.vm.id, uuid: view.vm.uuid },
      configuration: view.vm.configuration,
      checkpoint: view.checkpoint,
      consistency: view.consistency,
      freezeWindowMs: view.freezeWindowMs,
      warnings: view.warnings,
    });
    writer = await target.startRestorePoint({
      job: o.job,
      vm: vmName,
      // Reverse chains take the changes as a reverse injection into their full.
      kind: incremental ? (prev.point.method === 'reverse' ? 'reverse' : 'incremental') : 'full',
      ...(!incremental && o.chainMethod !== undefined ? { chainMethod: o.chainMethod } : {}),
      ...(o.time !== undefined ? { time: o.time } : {}),
      ...(incremental ? { parent: prev.point.id } : {}),
      ...(!incremental && o.blockSize !== undefined ? { blockSize: o.blockSize } : {}),
      ...(!incremental && o.compression !== undefined ? { compression: o.compression } : {}),
      ...(!incremental && o.password !== undefined ? { encryption: { password: o.password, ...(o.passwordHint !== undefined ? { hint: o.passwordHint } : {}) } } : {}),
      ...(incremental && chainPassword !== undefined ? { password: chainPassword } : {}),
      ...(o.threads !== undefined ? { threads: o.threads } : {}),
      vmConfig: meta,
      disks: view.disks.map((d) => ({ name: d.disk.name, size: d.size })),
    });
  } catch (err) {
    await abort(err);
    throw err;
  }
  const sink: RestorePointSink = writer;

  const progress: Record<string, DiskBackupProgress> = {};
  for (const d of view.disks) progress[d.disk.name] = { bytesProcessed: 0, bytesRead: 0, bytesStored: 0, size: d.size, done: false };
  const readStart = Date.now();
  const report = () => {
    if (!o.onProgress) return;
    const all = Object.values(progress);
    const sum = (f: (p: DiskBackupProgress) => number) => all.reduce((a, p) => a + f(p), 0);
    const bytesRead = sum((p) => p.bytesRead);
    const secs = (Date.now() - readStart) / 1000;
    o.onProgress({
      disks: progress,
      bytesProcessed: sum((p) => p.bytesProcessed),
      bytesRead,
      bytesStored: sum((p) => p.bytesStored),
      size: sum((p) => p.size),
      rate: secs > 0 ? bytesRead / secs : 0,
    });
  };
  const summaries = new Map<string, DiskBackupSummary>();
  const claimed = new Set<string>();
  const reusable = target.reusesBlockBuffers === true;

  return {
    vm: vmName,
    chainId,
    incremental,
    view,
    disks: view.disks.map((d) => d.disk.name),
    async backupDisk(name, hooks = {}) {
      const d = view.disks.find((v) => v.disk.name === name);
      if (!d) {
        throw new BulwarkError(`disk ${name} is not in the backup of VM ${vmName} (disks: ${view.disks.map((v) => v.disk.name).join(', ')})`, {
          kind: 'not-found',
          context: { vm: vmName, disk: name },
        });
      }
      if (claimed.has(name)) throw new BulwarkError(`disk ${name} of VM ${vmName} is already being backed up`, { kind: 'conflict', context: { vm: vmName, disk: name } });
      if (ended !== null) throw new BulwarkError(`the backup of VM ${vmName} has ${ended === 'aborted' ? 'failed' : 'ended'}`, { kind: 'conflict', context: { vm: vmName, disk: name } });
      claimed.add(name);
      const ahead = prepared.get(name);
      prepared.delete(name);
      // The writer takes several disks at once (records interleave in the file).
      const summary = await backupDisk(d, sink, { blockSize, incremental: incremental || o.intoIncrement === true, progress: progress[name]!, report, say, o, hooks, reusable, prepared: ahead }).finally(
        // Closed by the reader when it ran; closing again is a no-op (and closes it when it never ran).
        () => ahead?.close(),
      );
      summaries.set(name, summary);
      return summary;
    },
    async commit() {
      const missing = view.disks.filter((d) => !summaries.has(d.disk.name)).map((d) => d.disk.name);
      if (missing.length > 0) {
        throw new BulwarkError(`restore point of VM ${vmName} cannot be committed: disk(s) ${missing.join(', ')} not backed up`, { kind: 'internal', context: { vm: vmName } });
      }
      if (ended !== null) throw new BulwarkError(`the backup of VM ${vmName} has already ${ended === 'aborted' ? 'failed' : 'been committed'}`, { kind: 'conflict', context: { vm: vmName } });
      await closePrepared();
      const point = await sink.commit();
      ended = 'committed';
      say('info', `restore point ${point.id} committed (${incremental ? 'incremental' : 'full'}, ${point.fileBytes} bytes)`);
      const warnings = [...view.warnings];
      try {
        if (o.keepTracking === false) await view.abort();
        else await view.commit();
      } catch (err) {
        // The point is stored; the next backup finds the bitmaps unrotated and reads in full with digests.
        const w = `the restore point is stored, but ending the hypervisor backup failed (the next backup may read in full): ${describeError(err)}`;
        warnings.push(w);
        say('warning', w);
      }
      return {
        pointId: point.id,
        point,
        kind: incremental ? 'incremental' : 'full',
        vm: vmName,
        chainId,
        checkpoint: view.checkpoint,
        consistency: view.consistency,
        freezeWindowMs: view.freezeWindowMs,
        pauseWindowMs: view.pauseWindowMs,
        disks: view.disks.map((v) => summaries.get(v.disk.name)!),
        warnings,
        durationMs: Date.now() - started,
      };
    },
    abort,
  };
}

/**
 * Backs up one VM, its disks one after another: see the file comment. Resolves with the summary
 * of the committed point; on failure rejects after aborting the writer (no visible point) and the
 * view (tracking kept).
 */
export async function backupVm(o: BackupVmOptions): Promise<BackupVmSummary> {
  const b = await startVmBackup(o);
  try {
    for (const name of b.disks) await b.backupDisk(name);
    return await b.commit();
  } catch (err) {
    await b.abort(err);
    throw err;
  }
}

async function backupDisk(
  d: BackupDiskView,
  writer: RestorePointSink,
  ctx: {
    blockSize: number;
    incremental: boolean;
    progress: DiskBackupProgress;
    report: () => void;
    say: (level: BackupLogLevel, message: string, disk?: string) => void;
    o: BackupVmOptions;
    hooks: DiskWorkHooks;
    /** The sink copies each block before it asks for the next: the reader may reuse its buffers. */
    reusable: boolean;
    /** The disk's export, opened ahead (startVmBackup), if it was. */
    prepared: PreparedBackupDisk | undefined;
  },
): Promise<DiskBackupSummary> {
  const { o, progress, hooks } = ctx;
  const signal = hooks.signal ?? o.signal;
  const name = d.disk.name;
  signal?.throwIfAborted();
  ctx.say('info', describeChanges(name, d.changes), name);
  let stats: ChangedBlockStats | undefined;
  const repair = ctx.incremental ? o.repair?.find((r) => r.disk === name)?.blocks ?? [] : [];
  if (repair.length > 0) ctx.say('info', `${name}: re-reading ${repair.length} block(s) a health check found damaged (repair)`, name);
  let source: AsyncIterable<DiskBlock> = readBackupDisk(d, {
    blockSize: ctx.blockSize,
    ...(repair.length > 0 ? { extraBlocks: new Set(repair) } : {}),
    ...(o.concurrency !== undefined ? { concurrency: o.concurrency } : {}),
    ...(o.connections !== undefined ? { connections: o.connections } : {}),
    ...(signal ? { signal } : {}),
    ...(ctx.reusable ? { reuseBuffers: true } : {}),
    ...(ctx.prepared ? { prepared: ctx.prepared } : {}),
    onStats: (s) => (stats = s),
  });
  if (hooks.stages) source = timedSource(source, hooks.stages);
  if (hooks.throttle) source = throttled(source, hooks.throttle, hooks.stages);
  const full = d.changes.kind === 'full';
  // Full read into an increment: explicit zeroes, and digests compared with the parent's blocks
  // when the disk was in it at the same size (a resized disk is stored whole).
  // A repair never compares with the parent: the parent's copy of a damaged block is what it replaces.
  const compare = ctx.incremental && d.changes.kind === 'full' && d.changes.compareDigests && d.changes.reason !== 'disk-resized' && repair.length === 0;
  if (ctx.incremental && full) source = withExplicitZeroes(source, Math.ceil(d.size / ctx.blockSize));
  source = checkedSignal(source, signal);
  let lastReport = 0;
  const stages = hooks.stages;
  const ws = await writer.writeDisk(name, source, {
    compareWithParent: compare,
    // Proxy (encoders) and Target (file writes) as the writer waits for them.
    ...(stages ? { onWait: (stage: 'proxy' | 'target', ms: number) => stages.add(stage, ms) } : {}),
    onProgress: (_done: number, storedBytes: number) => {
      if (stats) {
        progress.bytesProcessed = stats.bytesMapped;
        progress.bytesRead = stats.bytesRead;
      }
      // Live: what the target took so far (a repository here: encoded bytes; across the network: wire bytes).
      progress.bytesStored = storedBytes;
      const now = Date.now();
      if (now - lastReport >= 250) {
        lastReport = now;
        ctx.report();
      }
    },
  }).catch((err: unknown) => {
    throw new BulwarkError(`disk ${name}: ${describeError(err)}`, { kind: err instanceof BulwarkError ? err.kind : 'internal', context: { disk: name, vm: o.vm }, cause: err });
  });
  progress.bytesProcessed = d.size;
  progress.bytesRead = stats?.bytesRead ?? 0;
  progress.bytesStored = ws.storedBytes;
  progress.done = true;
  ctx.report();
  const summary: DiskBackupSummary = {
    name,
    size: d.size,
    read: d.changes.kind,
    fullReason: d.changes.kind === 'full' ? d.changes.reason : undefined,
    comparedWithParent: compare,
    bytesRead: stats?.bytesRead ?? 0,
    bytesChanged: d.changes.kind === 'bitmap' ? (stats?.bytesDirty ?? 0) : d.size,
    bytesStored: ws.storedBytes,
    storedBlocks: ws.storedBlocks,
    unchangedBlocks: ws.unchangedBlocks,
  };
  ctx.say(
    'info',
    `${name}: read ${summary.bytesRead} bytes${d.changes.kind === 'bitmap' ? ` (${summary.bytesChanged} changed)` : ''}, stored ${summary.bytesStored} bytes in ${summary.storedBlocks} blocks` +
      (compare ? `, ${summary.unchangedBlocks} blocks equal to the previous point` : ''),
    name,
  );
  return summary;
}
