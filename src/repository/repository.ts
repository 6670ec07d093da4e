// A repository folder: lists chains and restore points from the .vbm files (no database), starts
// new restore points (writer), opens existing ones (reader), and sweeps what crashes left.
// docs/formats/backup-files.md section 2 describes the tree and the commit order.
import { randomUUID } from 'node:crypto';
import { open, readdir, readFile, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError, describeError } from '../common/errors.js';
import { logger } from '../common/log.js';
import type { DiskBlock } from '../disk/types.js';
import {
  decodeChainMetadata,
  encodeChainMetadata,
  fileKindOfMagic,
  FormatError,
  isBlockSize,
  NIL_UUID,
  uuidToBytes,
  type ChainMetadata,
  type ChainRecord,
  type Compression,
  type FileHeader,
  type KdfParams,
  type PendingRepairRecord,
  type PointRecord,
} from '../format/index.js';
import {
  ensureDirectory,
  publish,
  sweepTemporaries,
  temporaryNameFor,
  trackTemporary,
  tryLockFolder,
  writeFileAtomic,
  type FolderLock,
} from '../storage/local-fs.js';
import { BackupFile, corrupt } from './backup-file.js';
import { BackupFileWriter, type DiskWriteStats, type ParentBlock, type WriteDiskOptions } from './backup-file-writer.js';
import { newChainKeys, sealConfig, unlockChain, type ChainKeys } from './chain-keys.js';
import { EncodePool } from './encode-pool.js';
import { BACKUP_FILE_RE, backupFileName, chainMetadataName, unescapeName, vmFolder } from './layout.js';
import { RestorePoint, type RestorePointInfo } from './restore-point.js';
import { chainsOfFolder, listVmFolders, type VmFolder } from './folders.js';
import { ALL_VMS, checkAllVmsDisks, findVmSlice, vmsOfRestorePoint, VmSlicePoint } from './single-file.js';
import type { HealthReport, MethodPolicy, PendingRepair, RetentionReport, SynthesizeFullOptions, VmChainState } from './plan/types.js';
import * as transforms from './transforms/maintenance.js';
import { recoverFolder } from './transforms/recover.js';
import { InjectWriter } from './transforms/inject-writer.js';
import type { TransformProgressListener, TransformProgressOptions } from './transforms/progress.js';

const log = logger('repository');

export type { BackupChain } from './folders.js';
import type { BackupChain } from './folders.js';

export interface StartRestorePointOptions {
  readonly job: string;
  readonly vm: string;
  /**
   * full starts a new chain; incremental continues the parent's forward chain; reverse injects
   * the new point into the full of the latest reverse chain and moves the blocks it replaces into
   * a new reverse increment (.vrb) of the point the full held (docs/formats/backup-files.md §5).
   */
  readonly kind: 'full' | 'incremental' | 'reverse';
  /** Full only: the method of the new chain (default forward; reverse for the reverse-incremental method). */
  readonly chainMethod?: 'forward' | 'reverse';
  /** Full only (an increment uses its chain's): 262144, 524288, 1048576 (default) or 4194304. */
  readonly blockSize?: number;
  /** Full only: default zstd. */
  readonly compression?: Compression;
  /** Full only: encrypt the new chain with a key derived from this password. */
  readonly encryption?: { readonly password: string; readonly hint?: string; /** scrypt cost, default 15 */ readonly log2N?: number };
  /** Incremental into an encrypted chain: its password. */
  readonly password?: string;
  /** Incremental / reverse: the point to continue from (default: the VM's latest point). Must be the tip of its chain. */
  readonly parent?: string;
  /** Point-in-time of the backup (default now). */
  readonly time?: Date;
  /** VM configuration stored with the point (libvirt XML, QEMU arguments…). */
  readonly vmConfig?: Buffer;
  readonly disks: readonly { readonly name: string; readonly size: number }[];
  /** Encoder threads (default min(2, cores); 0 = encode on this thread). */
  readonly threads?: number;
  /**
   * Encoder slots (blocks encoding or being written; default 12 MiB of blocks, 6 to 24). A
   * source that reads into lent slots (`RestorePointWriter.lendBuffer`) holds some for its reads:
   * give it room for them on top.
   */
  readonly slots?: number;
  /** Reverse: the progress of the commit's injection step (`inject`: the .vrb of the replaced blocks). */
  readonly onTransformProgress?: TransformProgressListener | undefined;
}

export interface SweepReport {
  /** Paths removed: temporaries and backup files no .vbm names. */
  readonly removed: readonly string[];
}


/**
 * Opens a repository folder, creating it when `create` is set, and sweeps leftovers of crashed
 * writers (temporary files, uncommitted backup files) in every VM folder no live writer holds.
 *
 * @example
 * const repo = await openRepository('/srv/backup');
 * const w = await repo.startRestorePoint({ job: 'nightly', vm: 'web1', kind: 'full', disks: [{ name: 'vda', size }] });
 * await w.writeDisk('vda', blocks);
 * const point = await w.commit();
 */
export async function openRepository(root: string, opts: { create?: boolean } = {}): Promise<Repository> {
  const abs = path.resolve(root);
  try {
    const s = await stat(abs);
    if (!s.isDirectory()) throw new BulwarkError(`repository path ${abs} is not a folder`, { kind: 'invalid', context: { repository: abs } });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    if (!opts.create) throw new BulwarkError(`repository folder ${abs} does not exist`, { kind: 'not-found', context: { repository: abs }, cause: err });
    await ensureDirectory(abs);
  }
  const repo = new Repository(abs);
  await repo.sweep();
  return repo;
}

export interface ListOptions {
  /** Told of each VM folder skipped because its chain metadata cannot be read. */
  readonly onUnreadable?: (vbmPath: string, err: unknown) => void;
}

export class Repository {
  readonly root: string;

  constructor(root: string) {
    this.root = root;
  }

  async #vmFolders(): Promise<VmFolder[]> {
    return listVmFolders(this.root);
  }

  /** Removes leftovers of crashed writers; see SweepReport. Runs on open. */
  async sweep(): Promise<SweepReport> {
    const removed: string[] = [];
    for (const f of await this.#vmFolders()) {
      // Under the folder's writer lock: a writer between publishing its backup file and
      // committing the .vbm must never see that file swept.
      const lock = await tryLockFolder(f.dir);
      if (!lock) continue;
      try {
        removed.push(...(await sweepFolder(f)));
      } finally {
        await lock.release();
      }
    }
    if (removed.length > 0) log.info({ repository: this.root, removed }, 'swept leftovers of interrupted writes');
    return { removed };
  }

  /**
   * Chains of all VMs (or of one job / VM), read from the .vbm files. A damaged .vbm of one VM
   * does not hide the others: that folder is skipped (logged, and told to `onUnreadable`). Asked
   * for one VM (job and vm), its damaged .vbm is an error: an empty answer would read as "this VM
   * has no points", and callers that follow the folder would drop them from the catalog.
   */
  async listChains(filter: { job?: string; vm?: string } = {}, opts: ListOptions = {}): Promise<BackupChain[]> {
    const out: BackupChain[] = [];
    const oneVm = filter.job !== undefined && filter.vm !== undefined;
    for (const f of await this.#vmFolders()) {
      if (oneVm && f.dir !== vmFolder(this.root, filter.job!, filter.vm!)) continue;
      let meta: Awaited<ReturnType<typeof readChainMetadata>>;
      try {
        meta = await readChainMetadata(f.vbmPath);
      } catch (err) {
        if (oneVm) throw err;
        log.warn({ repository: this.root, file: f.vbmPath, err: describeError(err) }, 'skipping a VM folder whose chain metadata is damaged; run repo verify');
        opts.onUnreadable?.(f.vbmPath, err);
        continue;
      }
      if (!meta) continue;
      const { body } = meta;
      if ((filter.job !== undefined && body.job !== filter.job) || (filter.vm !== undefined && body.vm !== filter.vm)) continue;
      out.push(...chainsOfFolder(body, f.dir));
    }
    return out;
  }

  /** Restore points (oldest first within each VM), read from the .vbm files. */
  async listRestorePoints(filter: { job?: string; vm?: string } = {}, opts: ListOptions = {}): Promise<RestorePointInfo[]> {
    return (await this.listChains(filter, opts)).flatMap((c) => c.points);
  }

  /** Finds a point by id. */
  async findRestorePoint(id: string): Promise<{ chain: BackupChain; point: RestorePointInfo }> {
    for (const chain of await this.listChains()) {
      const point = chain.points.find((p) => p.id === id);
      if (point) return { chain, point };
    }
    throw new BulwarkError(`no restore point ${id} in repository ${this.root}`, { kind: 'not-found', context: { point: id, repository: this.root } });
  }

  /**
   * Opens a restore point for reading (all its disks). Encrypted chains need `password`; a wrong
   * one is an `unauthorized` error.
   */
  async openRestorePoint(id: string, opts: { password?: string } = {}): Promise<RestorePoint> {
    const found = await this.findRestorePoint(id).catch(async (err: unknown) => {
      // A VM's part of a single-file point, by its catalog id (single-file.ts, vmSliceId).
      const slice = err instanceof BulwarkError && err.kind === 'not-found' ? findVmSlice(await this.listRestorePoints({}), id) : null;
      if (!slice) throw err;
      return slice;
    });
    if ('vm' in found) {
      const whole = await this.openRestorePoint(found.point.id, opts);
      try {
        const vm = vmsOfRestorePoint(whole).find((v) => v.name === found.vm);
        if (!vm) throw new BulwarkError(`restore point ${found.point.id} does not hold VM ${found.vm}`, { kind: 'not-found', context: { point: id, vm: found.vm } });
        return new VmSlicePoint(whole, found.info, vm);
      } catch (err) {
        await whole.close();
        throw err;
      }
    }
    const { chain, point } = found;
    const byId = new Map(chain.points.map((p) => [p.id, p]));
    const files: BackupFile[] = [];
    try {
      let cur: RestorePointInfo | undefined = point;
      const seen = new Set<string>();
      while (cur) {
        if (seen.has(cur.id)) throw corrupt(`chain ${chain.id} has a cycle at point ${cur.id}`, { point: cur.id });
        seen.add(cur.id);
        const f = await BackupFile.open(cur.file, cur.generation !== undefined ? { generation: cur.generation } : {});
        files.push(f);
        checkFileMatches(f, chain, cur, files.length > 1 ? files[files.length - 2]! : null);
        cur = cur.base === null ? undefined : byId.get(cur.base);
      }
      let keys: ChainKeys | null = null;
      const enc = files[0]!.header.encryption;
      if (enc) keys = await unlockChain(opts.password, enc, { chain: chain.id, vm: chain.vm, point: id }, chain.passwordHint ?? undefined);
      return new RestorePoint(point, files, keys);
    } catch (err) {
      await Promise.all(files.map((f) => f.close()));
      throw err;
    }
  }

  /**
   * Starts a new restore point. The VM folder is locked until commit() or abort(); nothing is
   * visible to readers before commit() returns.
   */
  async startRestorePoint(opts: StartRestorePointOptions): Promise<RestorePointWriter> {
    if (opts.job.length === 0 || opts.vm.length === 0) throw new BulwarkError('job and VM names must not be empty', { kind: 'invalid' });
    if (opts.vm === ALL_VMS) checkAllVmsDisks(opts.disks); // single-file mode (single-file.ts)
    const dir = vmFolder(this.root, opts.job, opts.vm);
    await ensureDirectory(dir);
    const lock = await tryLockFolder(dir);
    if (!lock) {
      throw new BulwarkError(`another writer is writing a restore point of VM ${opts.vm} (job ${opts.job})`, {
        kind: 'conflict',
        context: { job: opts.job, vm: opts.vm, folder: dir },
      });
    }
    try {
      const folder = { dir, vbmPath: path.join(dir, chainMetadataName(opts.vm)) };
      await sweepFolder(folder);
      const meta = (await readChainMetadata(folder.vbmPath)) ?? {
        generation: 0,
        body: { version: 1, job: opts.job, vm: opts.vm, chains: [], journal: null } satisfies ChainMetadata,
      };
      return await RestorePointWriter.start(this, opts, folder, meta.body, lock);
    } catch (err) {
      await lock.release();
      throw err;
    }
  }
  /** Chains and pending repair of one VM folder: the input of planRun and planRetention. */
  async chainState(job: string, vm: string): Promise<VmChainState> {
    const dir = vmFolder(this.root, job, vm);
    const meta = await readChainMetadata(path.join(dir, chainMetadataName(vm)));
    if (!meta) return { chains: [], repair: null, damaged: [] };
    return { chains: chainsOfFolder(meta.body, dir), repair: meta.body.pendingRepair ?? null, damaged: meta.body.damagedPoints ?? [] };
  }

  /**
   * Applies the job's retention to one VM folder (planRetention, then each merge, chain and point
   * deletion, crash-safe and journaled). Holds the VM folder's writer lock meanwhile.
   */
  async applyRetention(job: string, vm: string, policy: MethodPolicy, opts: { now?: Date; password?: string } & TransformProgressOptions = {}): Promise<RetentionReport> {
    return this.#withFolder(job, vm, (f) => transforms.applyRetention(f, job, vm, policy, opts.now ?? new Date(), opts.password, opts));
  }

  /**
   * Turns the tip of a forward chain (default: the VM's latest point) into a full backup file of a
   * new chain built from the repository alone (no source read); the point keeps its id and time,
   * its increment file is deleted, and the old chain ends at the point before.
   */
  async synthesizeFull(job: string, vm: string, opts: SynthesizeFullOptions & TransformProgressOptions = {}): Promise<RestorePointInfo> {
    return this.#withFolder(job, vm, (f) => transforms.synthesizeFull(this, f, job, vm, opts));
  }

  /**
   * Rewrites the full backup file of the VM's latest chain without the records nothing references
   * any more (left by merges and reverse injections), in place of the old one, crash-safe.
   */
  async compactFull(job: string, vm: string, opts: { chain?: string } & TransformProgressOptions = {}): Promise<{ file: string; bytesBefore: number; bytesAfter: number }> {
    return this.#withFolder(job, vm, (f) => transforms.compactFull(f, opts.chain, opts));
  }

  /**
   * Verifies every block and the metadata of the VM's latest point (every point of its chain with
   * `wholeChain`). Damaged blocks are recorded in the .vbm as a pending repair (see pendingRepair);
   * damaged metadata makes the next planRun an active full.
   */
  async healthCheck(job: string, vm: string, opts: transforms.HealthCheckOptions = {}): Promise<HealthReport> {
    return this.#withFolder(job, vm, (f) => transforms.healthCheck(this, f, job, vm, opts));
  }

  /**
   * Blocks the next backup of this VM must read from the source and pass to writeDisk (they are
   * stored fresh, never inherited). Cleared for each block the next committed point stores.
   */
  async pendingRepair(job: string, vm: string): Promise<PendingRepair[]> {
    return [...((await this.chainState(job, vm)).repair?.disks ?? [])];
  }

  /** Runs `fn` under the VM folder's writer lock, after finishing or undoing any interrupted transform. */
  async #withFolder<T>(job: string, vm: string, fn: (f: VmFolder) => Promise<T>): Promise<T> {
    const dir = vmFolder(this.root, job, vm);
    const folder = { dir, vbmPath: path.join(dir, chainMetadataName(vm)) };
    const exists = await stat(folder.vbmPath).then(() => true, () => false);
    if (!exists) throw new BulwarkError(`VM ${vm} of job ${job} has no restore points in repository ${this.root}`, { kind: 'not-found', context: { job, vm } });
    const lock = await tryLockFolder(dir);
    if (!lock) {
      throw new BulwarkError(`another writer holds VM ${vm} (job ${job})`, { kind: 'conflict', context: { job, vm, folder: dir } });
    }
    try {
      await sweepFolder(folder);
      return await fn(folder);
    } finally {
      await lock.release();
    }
  }
}

/** Checks that a backup file is the one the .vbm names (ids, kind, base link). */
export function checkFileMatches(f: BackupFile, chain: BackupChain, p: RestorePointInfo, inheritor: BackupFile | null): void {
  const h = f.header;
  const problems: string[] = [];
  if (h.chainId !== chain.id) problems.push(`chain id ${h.chainId}, expected ${chain.id}`);
  // A file transformed in place (generation > 1: merged into, injected into, compacted) keeps the
  // header of the point it was created for; the .vbm names the point it holds now, and its file id.
  if (h.pointId !== p.id && (p.generation ?? 1) <= 1) problems.push(`point id ${h.pointId}, expected ${p.id}`);
  if (p.fileId !== undefined && h.fileId !== p.fileId) problems.push(`file id ${h.fileId}, expected ${p.fileId}`);
  const expectedKind = p.kind === 'full' ? 'full' : p.kind === 'incremental' ? 'forward' : 'reverse';
  if (h.kind !== expectedKind) problems.push(`file kind ${h.kind}, expected ${expectedKind}`);
  if (inheritor && inheritor.header.baseFileId !== h.fileId && !(p.aliasFileIds ?? []).includes(inheritor.header.baseFileId)) {
    problems.push(`file id ${h.fileId} is not the base ${inheritor.header.baseFileId} of ${inheritor.path}`);
  }
  if (problems.length > 0) throw corrupt(`backup file ${f.path} does not match the chain metadata: ${problems.join('; ')}`, { file: f.path, point: p.id });
}

/** Reads a .vbm; null when there is none. A damaged one is a `corrupt` error. */
export async function readChainMetadata(vbmPath: string): Promise<{ generation: number; body: ChainMetadata } | null> {
  let raw: Buffer;
  try {
    raw = await readFile(vbmPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  try {
    return decodeChainMetadata(raw);
  } catch (err) {
    if (err instanceof FormatError) throw corrupt(`damaged chain metadata ${vbmPath}: ${err.message}`, { file: vbmPath }, err);
    throw err;
  }
}

async function isBulwarkBackupFile(p: string): Promise<boolean> {
  try {
    const fh = await open(p, 'r');
    try {
      const magic = Buffer.alloc(8);
      const { bytesRead } = await fh.read(magic, 0, 8, 0);
      return bytesRead === 8 && fileKindOfMagic(magic) !== null;
    } finally {
      await fh.close();
    }
  } catch {
    return false;
  }
}

async function sweepFolder(f: VmFolder): Promise<string[]> {
  // An interrupted transform is finished or undone first: it may need files the sweep would remove.
  try {
    await recoverFolder(f);
  } catch {
    return []; // logged by recoverFolder; remove nothing until it can be recovered
  }
  const removed = (await sweepTemporaries(f.dir)).map((n) => path.join(f.dir, n));
  let meta: Awaited<ReturnType<typeof readChainMetadata>>;
  try {
    meta = await readChainMetadata(f.vbmPath);
  } catch {
    return removed; // a damaged .vbm: remove nothing else, verify will report it
  }
  // No .vbm at all (renamed by hand, or copied in before its backup files' metadata): keep every
  // backup file, since each may be a restorable point that a rescan can still find.
  if (!meta) return removed;
  const named = new Set([...meta.body.chains.flatMap((c) => c.points.map((p) => p.file)), ...(meta.body.journal?.files.map((x) => x.name) ?? [])]);
  for (const name of await readdir(f.dir)) {
    // Only files that are ours (Bulwark magic): other products use the same extensions.
    if (BACKUP_FILE_RE.test(name) && !named.has(name) && (await isBulwarkBackupFile(path.join(f.dir, name)))) {
      await rm(path.join(f.dir, name), { force: true });
      removed.push(path.join(f.dir, name));
    }
  }
  return removed;
}

/** remainingRepair for a point written into the full: `inherits(disk, block)` says what the new point inherits. */
function remainingRepairOf(
  pending: PendingRepairRecord | null | undefined, has: (disk: string) => boolean, inherits: (disk: string, block: number) => boolean,
): PendingRepairRecord | null {
  if (!pending) return null;
  const disks: PendingRepairRecord['disks'][number][] = [];
  for (const d of pending.disks) {
    if (!has(d.disk)) continue;
    const left = d.blocks.filter((b) => inherits(d.disk, b));
    if (left.length > 0) disks.push({ disk: d.disk, blocks: left });
  }
  return disks.length === 0 && !pending.metadataDamaged ? null : { ...pending, disks };
}

/** A parent digest no block hashes to: a block pending repair is always stored fresh. */
const NEVER_EQUAL_DIGEST = Buffer.alloc(32, 0xff);

/**
 * What is left of a pending repair once the file at `file` (a new point's, committed) is a point:
 * blocks it stores (or marks zero/hole) are repaired; blocks it inherits stay pending. A full
 * clears everything, metadata damage included.
 */
async function remainingRepair(pending: PendingRepairRecord | null | undefined, file: string, kind: 'full' | 'incremental' | 'reverse'): Promise<PendingRepairRecord | null> {
  if (!pending) return null;
  if (kind === 'full') return null;
  const f = await BackupFile.open(file);
  try {
    const disks: PendingRepairRecord['disks'][number][] = [];
    for (const d of pending.disks) {
      if (!f.disk(d.disk)) continue;
      const left: number[] = [];
      for (const b of d.blocks) if ((await f.entry(d.disk, b)).kind === 'inherit') left.push(b);
      if (left.length > 0) disks.push({ disk: d.disk, blocks: left });
    }
    return disks.length === 0 && !pending.metadataDamaged ? null : { ...pending, disks };
  } finally {
    await f.close();
  }
}

/**
 * Writes one restore point: every declared disk through writeDisk(), then commit() (or abort()).
 * Obtain one from Repository.startRestorePoint().
 */
export class RestorePointWriter {
  /** Id of the restore point being written. */
  readonly pointId: string;
  readonly #repo: Repository;
  readonly #folder: VmFolder;
  readonly #lock: FolderLock;
  /** A new file (full, increment), or the full of a reverse chain written into in place. */
  readonly #file: BackupFileWriter | InjectWriter;
  readonly #finalPath: string;
  readonly #untrack: () => void;
  readonly #pool: EncodePool;
  readonly #keys: ChainKeys | null;
  readonly #chain: ChainRecord;
  readonly #newChain: boolean;
  readonly #parent: RestorePointInfo | null;
  readonly #opts: StartRestorePointOptions;
  readonly #time: Date;
  #parentPoint: Promise<RestorePoint> | null = null;
  #finished = false;
  /** Blocks a health check found damaged: never inherited from the parent (compareWithParent). */
  readonly #repair: Map<string, Set<number>>;

  private constructor(init: {
    repo: Repository; folder: VmFolder; lock: FolderLock; file: BackupFileWriter | InjectWriter; finalPath: string; untrack: () => void; pool: EncodePool;
    keys: ChainKeys | null; chain: ChainRecord; newChain: boolean; parent: RestorePointInfo | null; opts: StartRestorePointOptions; time: Date; pointId: string;
    repair: Map<string, Set<number>>;
  }) {
    this.#repair = init.repair;
    this.#repo = init.repo;
    this.#folder = init.folder;
    this.#lock = init.lock;
    this.#file = init.file;
    this.#finalPath = init.finalPath;
    this.#untrack = init.untrack;
    this.#pool = init.pool;
    this.#keys = init.keys;
    this.#chain = init.chain;
    this.#newChain = init.newChain;
    this.#parent = init.parent;
    this.#opts = init.opts;
    this.#time = init.time;
    this.pointId = init.pointId;
  }

  /** @internal used by Repository.startRestorePoint */
  static async start(repo: Repository, opts: StartRestorePointOptions, folder: VmFolder, body: ChainMetadata, lock: FolderLock): Promise<RestorePointWriter> {
    const time = opts.time ?? new Date();
    const pointId = randomUUID();
    const fileId = randomUUID();
    let chain: ChainRecord;
    let keys: ChainKeys | null = null;
    let kdf: KdfParams | null = null;
    let parent: RestorePointInfo | null = null;
    let baseFileId = NIL_UUID;
    if (opts.kind === 'full') {
      const blockSize = opts.blockSize ?? 1048576;
      if (!isBlockSize(blockSize)) throw new BulwarkError(`block size ${blockSize} is not 256K, 512K, 1M or 4M`, { kind: 'invalid', context: { blockSize } });
      let encryption: ChainRecord['encryption'] = null;
      if (opts.encryption) {
        const k = await newChainKeys(opts.encryption.password, opts.encryption.log2N);
        keys = k.keys;
        kdf = k.params;
        encryption = {
          algorithm: 'aes-256-gcm', kdf: 'scrypt', log2N: kdf.log2N, r: kdf.r, p: kdf.p,
          salt: kdf.salt.toString('hex'), keyCheck: kdf.keyCheck.toString('hex'), hint: opts.encryption.hint ?? '',
        };
      }
      chain = { id: randomUUID(), method: opts.chainMethod ?? 'forward', blockSize, compression: opts.compression ?? 'zstd', encryption, points: [] };
    } else {
      const chains = chainsOfFolder(body, folder.dir);
      const all = chains.flatMap((c) => c.points);
      parent = opts.parent ? (all.find((p) => p.id === opts.parent) ?? null) : (chains[chains.length - 1]?.points.at(-1) ?? null);
      if (!parent) {
        throw new BulwarkError(opts.parent ? `parent restore point ${opts.parent} not found for VM ${opts.vm}` : `VM ${opts.vm} has no restore point to continue: run a full backup first`, {
          kind: 'not-found',
          context: { job: opts.job, vm: opts.vm, parent: opts.parent },
        });
      }
      chain = body.chains.find((c) => c.id === parent!.chainId)!;
      const tip = chain.points[chain.points.length - 1]!;
      const wanted = opts.kind === 'reverse' ? 'reverse' : 'forward';
      if (chain.method !== wanted || tip.id !== parent.id) {
        throw new BulwarkError(
          opts.kind === 'reverse'
            ? `restore point ${parent.id} is not the full of a reverse chain; reverse injection needs the latest point of a reverse chain (take a full with chainMethod 'reverse' first)`
            : `restore point ${parent.id} is not the tip of a forward chain; an increment can only follow the latest point`,
          { kind: 'conflict', context: { vm: opts.vm, parent: parent.id, tip: tip.id } },
        );
      }
      baseFileId = tip.fileId;
      if (chain.encryption) {
        const e = chain.encryption;
        kdf = { log2N: e.log2N, r: e.r, p: e.p, salt: Buffer.from(e.salt, 'hex'), keyCheck: Buffer.from(e.keyCheck, 'hex') };
        keys = await unlockChain(opts.password ?? opts.encryption?.password, kdf, { chain: chain.id, vm: opts.vm }, e.hint);
      }
    }
    // A reverse point is written straight into the full (beyond its committed length), with the
    // header a forward increment on the full would have; commit() injects it (docs/formats/backup-files.md section 5).
    const header: FileHeader = {
      kind: opts.kind === 'full' ? 'full' : 'forward',
      formatMinor: 0,
      blockSize: chain.blockSize,
      fileId,
      chainId: chain.id,
      pointId,
      baseFileId,
      timeMs: time.getTime(),
      compression: chain.compression,
      encryption: kdf,
    };
    const reverse = opts.kind === 'reverse' ? parent! : null;
    const finalPath = reverse ? reverse.file : path.join(folder.dir, backupFileName(time, pointId, opts.kind === 'full' ? 'vbk' : 'vib'));
    const tmp = temporaryNameFor(finalPath);
    const untrack = reverse ? () => undefined : trackTemporary(tmp);
    const pool = new EncodePool({ blockSize: chain.blockSize, compression: chain.compression, keys, aad: uuidToBytes(chain.id), threads: opts.threads, ...(opts.slots !== undefined ? { slots: opts.slots } : {}) });
    let file: BackupFileWriter | InjectWriter;
    try {
      file = reverse
        ? await InjectWriter.open(reverse.file, reverse.generation ?? 1, header, pool, keys, opts.disks)
        : await BackupFileWriter.create(tmp, header, pool, opts.disks);
    } catch (err) {
      untrack();
      await pool.close();
      throw err;
    }
    const repair = new Map<string, Set<number>>();
    for (const d of body.pendingRepair?.disks ?? []) repair.set(d.disk, new Set(d.blocks));
    return new RestorePointWriter({ repo, folder, lock, file, finalPath, untrack, pool, keys, chain, newChain: opts.kind === 'full', parent, opts, time, pointId, repair });
  }

  #parentOpen(): Promise<RestorePoint> {
    this.#parentPoint ??= this.#repo.openRestorePoint(this.#parent!.id, { password: this.#opts.password ?? this.#opts.encryption?.password });
    return this.#parentPoint;
  }

  /**
   * Writes the blocks of one declared disk. Blocks must come in increasing index order; a block
   * not given is a hole (full) or unchanged (incremental). With `compareWithParent`, blocks equal
   * to the parent point's are not stored (increment from a source without changed-block tracking).
   * Each block's data has been copied or consumed before the next block is requested, so a source
   * may reuse its buffers. Several disks may be written concurrently.
   */
  async writeDisk(name: string, blocks: AsyncIterable<DiskBlock>, opts: WriteDiskOptions = {}): Promise<DiskWriteStats> {
    let parentBlock: ((i: number) => Promise<ParentBlock>) | undefined;
    if (opts.compareWithParent) {
      if (!this.#parent) throw new BulwarkError('compareWithParent applies to incremental restore points only', { kind: 'invalid' });
      const parent = await this.#parentOpen();
      const hasDisk = parent.disks.some((d) => d.name === name);
      const repair = this.#repair.get(name);
      parentBlock = async (i) => {
        if (!hasDisk) return { kind: 'hole' };
        if (repair?.has(i)) return { kind: 'stored', digest: NEVER_EQUAL_DIGEST };
        const r = await parent.resolve(name, i);
        return r.kind === 'stored' ? { kind: 'stored', digest: r.entry.digest } : { kind: r.kind };
      };
    }
    return this.#file.writeDisk(name, blocks, { ...opts, parentBlock });
  }

  /**
   * A block-size buffer in a free encoder slot: a source that reads its next block into it and
   * yields a view of it from its start has it encoded in place, without a copy (WRITER,
   * backup-file-writer.ts). Waits for a free slot; lend a few at most. Unused: giveBackBuffer().
   */
  lendBuffer(): Promise<Buffer> {
    // Reverse injection writes through its own writer: a plain buffer there (copied as before).
    return this.#file instanceof BackupFileWriter ? this.#file.lendBuffer() : Promise.resolve(Buffer.allocUnsafe(this.#chain.blockSize));
  }

  /** Gives back a buffer from lendBuffer() that was not yielded to writeDisk. */
  giveBackBuffer(buf: Buffer): void {
    if (this.#file instanceof BackupFileWriter) this.#file.giveBackBuffer(buf);
  }

  /** Commits: the file is fsynced and renamed, then the .vbm names the new point. */
  async commit(): Promise<RestorePointInfo> {
    if (this.#finished) throw new BulwarkError('restore point already committed or aborted', { kind: 'invalid' });
    this.#finished = true;
    try {
      const config = sealConfig(this.#opts.vmConfig ?? Buffer.alloc(0), this.#keys, uuidToBytes(this.#chain.id));
      if (this.#file instanceof InjectWriter) {
        const inject = this.#file;
        const before = (await readChainMetadata(this.#folder.vbmPath))!.body;
        const fullPoint = before.chains.find((x) => x.id === this.#chain.id)?.points.at(-1);
        if (!fullPoint || fullPoint.id !== this.#parent?.id) throw new BulwarkError(`the full of chain ${this.#chain.id} changed while point ${this.pointId} was written`, { kind: 'conflict' });
        const repair = remainingRepairOf(before.pendingRepair, (disk) => this.#opts.disks.some((d) => d.name === disk), (disk, block) => inject.inherits(disk, block));
        await inject.commit(this.#folder, { chainId: this.#chain.id, fullPoint, point: { id: this.pointId, time: this.#time }, config, repair, onProgress: this.#opts.onTransformProgress });
        const body = (await readChainMetadata(this.#folder.vbmPath))!.body;
        const c = body.chains.find((x) => x.id === this.#chain.id)!;
        return chainsOfFolder({ ...body, chains: [c] }, this.#folder.dir)[0]!.points.at(-1)!;
      }
      const { fileLength } = await this.#file.commit(config);
      // Re-read under the lock: the .vbm is the only record, never overwrite a newer one blindly.
      const before = await readChainMetadata(this.#folder.vbmPath);
      const repair = await remainingRepair(before?.body.pendingRepair, this.#file.path, this.#opts.kind);
      // The folder's first point: an empty .vbm goes first, so that a crash between the rename
      // below and the .vbm naming the point leaves a file the sweep removes (a folder without any
      // .vbm keeps its backup files: they may have been copied in for a rescan). docs/formats/backup-files.md, "Commit and sweep".
      if (!before) await writeFileAtomic(this.#folder.vbmPath, encodeChainMetadata(1, { version: 1, job: this.#opts.job, vm: this.#opts.vm, chains: [], journal: null }));
      await publish(this.#file.path, this.#finalPath);
      this.#untrack();
      const current = (await readChainMetadata(this.#folder.vbmPath)) ?? {
        generation: 0,
        body: { version: 1 as const, job: this.#opts.job, vm: this.#opts.vm, chains: [], journal: null },
      };
      const point: PointRecord = {
        id: this.pointId,
        time: this.#time.toISOString(),
        kind: this.#opts.kind,
        file: path.basename(this.#finalPath),
        fileId: this.#file.header.fileId,
        base: this.#parent?.id ?? null,
        generation: 1,
        disks: this.#opts.disks.map((d) => ({ name: d.name, size: d.size })),
        fileBytes: fileLength,
      };
      const chains = this.#newChain
        ? [...current.body.chains, { ...this.#chain, points: [point] }]
        : current.body.chains.map((c) => (c.id === this.#chain.id ? { ...c, points: [...c.points, point] } : c));
      const body: ChainMetadata = { ...current.body, chains, pendingRepair: repair };
      await writeFileAtomic(this.#folder.vbmPath, encodeChainMetadata(current.generation + 1, body));
      const c = body.chains.find((x) => x.id === this.#chain.id)!;
      return chainsOfFolder({ ...body, chains: [c] }, this.#folder.dir)[0]!.points.at(-1)!;
    } catch (err) {
      // A new file is removed; the full of a reverse chain is never (InjectWriter undid its part).
      if (this.#file instanceof BackupFileWriter) await rm(this.#file.path, { force: true });
      throw err;
    } finally {
      this.#untrack();
      await this.#cleanup();
    }
  }

  /** Abandons the point: removes the temporary file; nothing becomes visible. */
  async abort(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    try {
      await this.#file.abort();
    } finally {
      this.#untrack();
      await this.#cleanup();
    }
  }

  async #cleanup(): Promise<void> {
    await this.#pool.close();
    if (this.#parentPoint) await this.#parentPoint.then((p) => p.close(), () => undefined);
    await this.#lock.release();
  }
}

/** Escaped folder name back to the display name (for tools that only see folders). */
export { unescapeName };
