// File-level restore: exposes the guest file systems of one or more disks (RandomAccessDisks,
// e.g. a restore point's) read-only under a folder. There is no kernel NBD client on our hosts,
// so the path is: our NBD server on a private unix socket -> nbdfuse (the disk as a FUSE file)
// -> loop mounts with offset/sizelimit, one per recognised file system (partition tables are
// read by us: loop devices have no partition support; so is LVM, whose logical volumes are loop
// offsets on a disk when contiguous, else NBD exports of their own: no device-mapper here).
// Everything is undone in reverse order on unmount(), on a failure halfway, at process exit, and
// by sweepStaleMounts() after a crash.
import type { ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { mkdir, rm, rmdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { RandomAccessDisk } from '../../disk/types.js';
import { detectFileSystem, type DetectedFileSystem, type FileSystemType } from '../fs-detect/fs-detect.js';
import { startNbdServer, type NbdServer } from '../nbd-server/server.js';
import { deviceMapperName, scanLvm, type FoundLogicalVolume, type PvCandidate } from '../lvm/scan.js';
import { readPartitionTable, type Partition } from '../partitions/partitions.js';
import { copyOut, type CopyOptions, type CopyReport } from './copy-out.js';
import { kernelFileSystems, mountedPaths, runSyncQuietly, runTool, startNbdfuse, waitExit } from './system.js';

const log = logger('mount');

/** A failed read of a mounted disk: its message, and whether the backup's data is damaged (kind corrupt). */
export interface ReadFailure {
  readonly message: string;
  readonly damaged: boolean;
}

export interface DiskToMount {
  /** The disk's name in the tree (`<at>/<name>/...`), e.g. `vda`. Letters, digits, `._-`. */
  readonly name: string;
  readonly disk: RandomAccessDisk;
}

export interface MountOptions {
  /** Folder to mount under; created if missing. */
  readonly at: string;
  /** Where sockets, FUSE views and state files live (default: see defaultRunDir()). */
  readonly runDir?: string;
  /**
   * Called for each file system mounted, once the file systems mounted side by side with it are
   * (progress); if it throws, everything is undone.
   */
  readonly onMounted?: (fs: MountedFileSystem) => void;
}

/** Which volume: a whole disk, a partition, or an LVM logical volume. */
export interface VolumeRef {
  /** The disk; for a logical volume, the first disk holding its extents. */
  readonly disk: string;
  /** Partition index, or null for a file system on the whole disk (or a logical volume). */
  readonly partition: number | null;
  /** Set for an LVM logical volume (read in user space: docs/formats/lvm2-reading.md). */
  readonly lv?: { readonly vg: string; readonly name: string };
}

/** The volume's device-like name: `vda`, `vdb2`, or `<vg>-<lv>` as /dev/mapper shows it. */
export function volumeName(v: VolumeRef): string {
  if (v.lv) return deviceMapperName(v.lv.vg, v.lv.name);
  return v.partition === null ? v.disk : `${v.disk}${v.partition}`;
}

export interface MountedFileSystem extends VolumeRef {
  readonly type: FileSystemType;
  readonly label?: string;
  readonly uuid?: string;
  /** Where it is mounted. */
  readonly path: string;
  /** Byte offset and size of the volume on the disk (on the logical volume's own view when served apart). */
  readonly offset: number;
  readonly size: number;
  /** Read in user space (vfat through mtools on a kernel without the driver): a copy, not a live view. */
  readonly userspace?: boolean;
}

/** A volume found on the disks with the file system it holds (before any mount). */
export interface FoundVolume extends VolumeRef {
  readonly type: FileSystemType;
  readonly label?: string;
  readonly uuid?: string;
}

/** A volume found but not mounted, and why (a thin LV, swap, unknown, ...). */
export interface SkippedVolume extends VolumeRef {
  readonly type: string;
  readonly reason: string;
}

/** A live file-level mount. Call unmount() when done (also undone at process exit, best effort). */
export interface Mount {
  readonly at: string;
  readonly filesystems: readonly MountedFileSystem[];
  readonly skipped: readonly SkippedVolume[];
  /** Partition-table warnings (damaged primary GPT, ...), prefixed with the disk name. */
  readonly warnings: readonly string[];
  /** Every volume found on the disks that holds a file system (mounted or not yet). */
  readonly volumes: readonly FoundVolume[];
  /**
   * Mounts the found volumes named (`volumeName`) that are not mounted yet, side by side; those
   * that cannot be mounted go to `skipped`. Returns the file systems mounted by this call.
   */
  mountVolumes(names: readonly string[]): Promise<MountedFileSystem[]>;
  /**
   * Disk reads that failed since the mount was set up, the first few only: damaged blocks of the
   * restore point (each naming file, disk and offset) or a source that could not be read (an
   * agent gone). The kernel turns them into EIO for the file being read; this says why.
   */
  readonly readFailures: readonly ReadFailure[];
  /**
   * Copies paths (relative to `at`, or absolute inside it) into toDir. A read the backup cannot
   * answer (EIO) fails with kind `corrupt`, naming the path and the damaged blocks.
   */
  copyOut(paths: readonly string[], toDir: string, options?: CopyOptions): Promise<CopyReport>;
  /** Unmounts everything in reverse order, stops nbdfuse and the NBD server. Idempotent. */
  unmount(): Promise<void>;
}

/** The default run dir: $BULWARK_RUN_DIR, /run/bulwark/mounts as root, else under the temp dir. */
export function defaultRunDir(): string {
  if (process.env.BULWARK_RUN_DIR) return process.env.BULWARK_RUN_DIR;
  if (process.getuid?.() === 0) return '/run/bulwark/mounts';
  return join(tmpdir(), `bulwark-mounts-${process.getuid?.() ?? 'user'}`);
}

/** Mount options per type: never write, never replay a journal (the image is read-only). */
const MOUNT_OPTIONS: Partial<Record<FileSystemType, string>> = {
  ext2: 'ro',
  ext3: 'ro,noload',
  ext4: 'ro,noload',
  xfs: 'ro,norecovery,nouuid',
  btrfs: 'ro',
  vfat: 'ro',
  ntfs: 'ro',
};
/** The kernel driver name per type, where it differs. */
const KERNEL_TYPE: Partial<Record<FileSystemType, string>> = { ntfs: 'ntfs3' };
/** MBR extended containers hold logical partitions, not a file system. */
const CONTAINER_TYPES = new Set(['0x05', '0x0f', '0x85']);
/** Largest vfat volume copied out with mtools when the kernel has no vfat driver. */
const USERSPACE_VFAT_MAX = 4 * 2 ** 30;

/** A volume of one disk: a partition or the whole disk, and what it holds. */
interface DiskVolume {
  readonly partition: number | null;
  readonly offset: number;
  readonly size: number;
  readonly fs: DetectedFileSystem | null;
}

/** A found volume with a file system, and how to mount it. */
interface PlannedVolume {
  readonly ref: VolumeRef;
  readonly fs: DetectedFileSystem;
  readonly path: string;
  readonly view: () => Promise<string>;
  readonly offset: number;
  readonly size: number;
}

/** What the state file in the run dir records, so a sweeper can undo a crashed process's mounts. */
interface MountState {
  pid: number;
  at: string;
  created: string;
  mountpoints: string[];
  fuseDirs: string[];
  nbdfusePids: number[];
  /** Directories we created (removed again when empty). */
  createdDirs: string[];
}

/**
 * Mounts every recognised file system of the given disks read-only under `options.at`, at
 * `<at>/<disk>/part<N>-<type>` (or `<at>/<disk>/whole-<type>` for a file system on the whole
 * disk), and those on LVM logical volumes at `<at>/lvm/<vg>/<lv>-<type>`. Throws after undoing everything when a step fails; a single file system that cannot be
 * mounted is listed in `skipped` instead. The disks stay open: the caller closes them after
 * unmount().
 */
export async function mountDisks(disks: readonly DiskToMount[], options: MountOptions): Promise<Mount> {
  const m = await openDisks(disks, options);
  try {
    await m.mountVolumes(m.volumes.map(volumeName));
  } catch (err) {
    await m.unmount().catch((cleanupErr: unknown) =>
      log.error({ err: describeError(cleanupErr) }, 'cleanup after a failed mount was incomplete'),
    );
    throw err;
  }
  return m;
}

/**
 * Reads what the disks hold (partition tables, file systems, LVM) and serves them, but mounts
 * nothing yet: `mountVolumes` then mounts the volumes a caller needs (restore files mounts only
 * the file systems its paths are on). Paths and the rest as mountDisks; unmount() undoes it all.
 */
export async function openDisks(disks: readonly DiskToMount[], options: MountOptions): Promise<Mount> {
  for (const d of disks) {
    if (!/^[A-Za-z0-9._-]+$/.test(d.name) || d.name.startsWith('.')) {
      throw new BulwarkError(`disk name "${d.name}" cannot be a folder name`, { kind: 'invalid' });
    }
  }
  const m = new MountSession(resolve(options.at), options.runDir ?? defaultRunDir(), options.onMounted);
  try {
    await m.setUp(disks);
  } catch (err) {
    await m.unmount().catch((cleanupErr: unknown) =>
      log.error({ err: describeError(cleanupErr) }, 'cleanup after a failed mount was incomplete'),
    );
    throw err;
  }
  return m;
}

class MountSession implements Mount {
  readonly at: string;
  readonly filesystems: MountedFileSystem[] = [];
  readonly skipped: SkippedVolume[] = [];
  readonly warnings: string[] = [];
  readonly volumes: FoundVolume[] = [];
  readonly readFailures: ReadFailure[] = [];
  readonly #dir: string;
  readonly #state: MountState;
  readonly #onMounted: MountOptions['onMounted'];
  #server: NbdServer | null = null;
  #kernelTypes: ReadonlySet<string> = new Set();
  /** nbdfuse per FUSE dir. */
  readonly #nbdfuse = new Map<string, ChildProcess>();
  /** FUSE file per NBD export, started on first need (once, however many mounts ask at once). */
  readonly #views = new Map<string, Promise<string>>();
  /** Found volumes with a file system, by volume name, in the order found; and those tried already. */
  readonly #planned = new Map<string, PlannedVolume>();
  readonly #tried = new Set<string>();
  /** Position of each volume in the order found: filesystems and skipped are listed in it. */
  readonly #order = new Map<string, number>();
  #mkdirs: Promise<void> = Promise.resolve();
  #copies = 0;
  #unmounting: Promise<void> | null = null;

  constructor(at: string, runDir: string, onMounted: MountOptions['onMounted']) {
    this.at = at;
    this.#onMounted = onMounted;
    this.#dir = join(runDir, randomUUID());
    this.#state = {
      pid: process.pid,
      at,
      created: new Date().toISOString(),
      mountpoints: [],
      fuseDirs: [],
      nbdfusePids: [],
      createdDirs: [],
    };
  }

  async setUp(given: readonly DiskToMount[]): Promise<void> {
    const disks = given.map((d) => ({ name: d.name, disk: recordingFailures(d.name, d.disk, this.readFailures) }));
    mkdirSync(this.#dir, { recursive: true, mode: 0o700 });
    this.#save();
    registerForExit(this);
    await this.#mkdirTracked(this.at);
    this.#kernelTypes = await kernelFileSystems();
    // What each disk holds is read straight through the disks; FUSE views come after, per need.
    const perDisk: Array<{ d: DiskToMount; volumes: DiskVolume[] }> = [];
    for (const d of disks) perDisk.push({ d, volumes: await this.#volumes(d) });
    const lvm = await this.#logicalVolumes(perDisk);
    this.#server = await startNbdServer({
      exports: [...disks.map((d) => ({ name: d.name, disk: d.disk })), ...lvm.exported.map((l) => ({ name: l.exportName, disk: l.disk }))],
      listen: { socketPath: join(this.#dir, 'nbd.sock') },
    });
    for (const { d, volumes } of perDisk) {
      const view = (): Promise<string> => this.#fuseView(d.name);
      for (const v of volumes) {
        const ref: VolumeRef = { disk: d.name, partition: v.partition };
        this.#order.set(volumeName(ref), this.#order.size);
        if (v.fs?.type === 'lvm2-pv') {
          // Its logical volumes are mounted below; only a PV that gives none is listed.
          const problem = lvm.pvProblems.get(volumeName(ref));
          if (problem !== undefined) this.skipped.push({ ...ref, type: 'lvm2-pv', reason: `LVM physical volume: ${problem}` });
          continue;
        }
        const leaf = `${v.partition === null ? 'whole' : `part${v.partition}`}-${v.fs?.type ?? 'unknown'}`;
        this.#plan(ref, v.fs, join(this.at, d.name, leaf), view, v.offset, v.size);
      }
    }
    for (const l of lvm.volumes) {
      const ref: VolumeRef = { disk: l.found.disks[0] ?? disks[0]?.name ?? '', partition: null, lv: { vg: l.found.vg, name: l.found.name } };
      this.#order.set(volumeName(ref), this.#order.size);
      if (l.found.refused !== null || l.found.disk === null) {
        this.skipped.push({ ...ref, type: 'lvm2-lv', reason: `LVM logical volume ${l.found.vg}/${l.found.name} cannot be read: ${l.found.refused ?? 'unknown'}` });
        continue;
      }
      const linear = l.found.disk.linear;
      const exportName = linear?.diskName ?? l.exportName;
      const view = (): Promise<string> => {
        if (exportName === null) throw new BulwarkError(`logical volume ${l.found.vg}/${l.found.name} is not served`, { kind: 'internal' });
        return this.#fuseView(exportName);
      };
      this.#plan(ref, l.fs, join(this.at, l.dir), view, linear?.offset ?? 0, l.found.size);
    }
  }

  /** Records a found volume: one without a recognised file system is skipped at once. */
  #plan(ref: VolumeRef, fs: DetectedFileSystem | null, path: string, view: () => Promise<string>, offset: number, size: number): void {
    if (fs === null) {
      this.skipped.push({ ...ref, type: 'unknown', reason: 'no recognised file system' });
      return;
    }
    this.#planned.set(volumeName(ref), { ref, fs, path, view, offset, size });
    this.volumes.push({ ...ref, type: fs.type, ...(fs.label !== undefined ? { label: fs.label } : {}), ...(fs.uuid !== undefined ? { uuid: fs.uuid } : {}) });
  }

  async mountVolumes(names: readonly string[]): Promise<MountedFileSystem[]> {
    const todo: PlannedVolume[] = [];
    for (const name of names) {
      const p = this.#planned.get(name);
      if (p === undefined) throw new BulwarkError(`no volume ${name} was found on the disks`, { kind: 'not-found', context: { volume: name } });
      if (this.#tried.has(name)) continue;
      this.#tried.add(name);
      todo.push(p);
    }
    const before = new Set(this.filesystems);
    // Side by side: each waits mostly on its own mount(8) and nbdfuse start.
    const results = await Promise.allSettled(todo.map((p) => this.#mountVolume(p.ref, p.fs, p.path, p.view, p.offset, p.size)));
    const rank = (v: VolumeRef): number => this.#order.get(volumeName(v)) ?? Number.MAX_SAFE_INTEGER;
    this.filesystems.sort((a, b) => rank(a) - rank(b));
    this.skipped.sort((a, b) => rank(a) - rank(b));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    const added = this.filesystems.filter((f) => !before.has(f));
    for (const f of added) this.#onMounted?.(f);
    return added;
  }

  /**
   * The LVM logical volumes on the disks' PVs, each with its file system and a folder under
   * `lvm/<vg>/`. An LV that is one run on one disk is mounted with a loop offset on that disk's
   * FUSE view; any other is served as an NBD export of its own (`lvm/<vg>/<lv>`) and gets its own.
   */
  async #logicalVolumes(perDisk: ReadonlyArray<{ d: DiskToMount; volumes: DiskVolume[] }>): Promise<{
    volumes: Array<{ found: FoundLogicalVolume; fs: DetectedFileSystem | null; dir: string; exportName: string | null }>;
    exported: Array<{ exportName: string; disk: RandomAccessDisk }>;
    pvProblems: Map<string, string>;
  }> {
    const candidates: PvCandidate[] = perDisk.flatMap(({ d, volumes }) =>
      volumes.filter((v) => v.fs?.type === 'lvm2-pv').map((v) => ({ diskName: d.name, volumeName: volumeName({ disk: d.name, partition: v.partition }), disk: d.disk, offset: v.offset, size: v.size })),
    );
    const out = { volumes: [] as Array<{ found: FoundLogicalVolume; fs: DetectedFileSystem | null; dir: string; exportName: string | null }>, exported: [] as Array<{ exportName: string; disk: RandomAccessDisk }>, pvProblems: new Map<string, string>() };
    if (candidates.length === 0) return out;
    const scan = await scanLvm(candidates);
    this.warnings.push(...scan.warnings);
    for (const pv of scan.physicalVolumes) if (pv.problem !== null) out.pvProblems.set(pv.volumeName, pv.problem);
    const vgFolders = new Map<string, string>();
    for (const found of scan.logicalVolumes) {
      if (![found.vg, found.name].every((n) => /^[A-Za-z0-9+_.-]+$/.test(n) && n !== '.' && n !== '..')) {
        this.warnings.push(`LVM logical volume ${JSON.stringify(`${found.vg}/${found.name}`)} has a name LVM does not allow; skipped`);
        continue;
      }
      // Two VGs of one name (different ids) must not share a folder.
      let vgFolder = vgFolders.get(found.vgId);
      if (vgFolder === undefined) {
        vgFolder = found.vg;
        for (let n = 2; [...vgFolders.values()].includes(vgFolder); n++) vgFolder = `${found.vg}.${n}`;
        vgFolders.set(found.vgId, vgFolder);
      }
      const fs = found.disk ? await detectFileSystem(found.disk) : null;
      const dir = join('lvm', vgFolder, `${found.name}-${fs?.type ?? 'unknown'}`);
      const exportName = found.disk !== null && fs !== null && found.disk.linear === null ? `lvm/${vgFolder}/${found.name}` : null;
      if (exportName !== null && found.disk !== null) out.exported.push({ exportName, disk: found.disk });
      out.volumes.push({ found, fs, dir, exportName });
    }
    return out;
  }

  /** The FUSE file showing an NBD export (a disk, or an LV served on its own); one nbdfuse per export. */
  #fuseView(exportName: string): Promise<string> {
    let view = this.#views.get(exportName);
    if (view === undefined) {
      view = this.#startFuseView(exportName, this.#views.size);
      this.#views.set(exportName, view);
    }
    return view;
  }

  async #startFuseView(exportName: string, i: number): Promise<string> {
    const fuseDir = join(this.#dir, `fuse-${i}`);
    await mkdir(fuseDir);
    this.#state.fuseDirs.push(fuseDir);
    this.#save();
    const fuse = await startNbdfuse(fuseDir, this.#server!.uri(exportName), join(this.#dir, `nbdfuse-${i}.pid`));
    this.#nbdfuse.set(fuseDir, fuse.child);
    if (fuse.child.pid !== undefined) this.#state.nbdfusePids.push(fuse.child.pid);
    this.#save();
    return fuse.image;
  }

  /** Mounts one volume (bytes [offset, offset + size) of `image`) read-only at `path`, or lists why not. */
  async #mountVolume(ref: VolumeRef, fs: DetectedFileSystem, path: string, view: () => Promise<string>, offset: number, size: number): Promise<void> {
    const name = volumeName(ref);
    if (fs.type === 'vfat' && !this.#kernelTypes.has('vfat')) {
      await this.#userspaceVfat(ref, path, offset, size, fs, await view());
      return;
    }
    const reason = unmountableReason(fs.type, this.#kernelTypes);
    if (reason !== null) {
      this.skipped.push({ ...ref, type: fs.type, reason });
      return;
    }
    const image = await view();
    await this.#mkdirTracked(path);
    const kernelType = KERNEL_TYPE[fs.type] ?? fs.type;
    const opts = `${MOUNT_OPTIONS[fs.type]},nodev,nosuid,noexec,loop,offset=${offset},sizelimit=${size}`;
    try {
      // Recorded before the call: a kill during mount(8) still leaves a trail for the sweeper.
      this.#state.mountpoints.push(path);
      this.#save();
      await runTool('mount', ['-t', kernelType, '-o', opts, image, path], `mounting ${name} (${fs.type})`);
    } catch (err) {
      this.#state.mountpoints = this.#state.mountpoints.filter((p) => p !== path);
      this.#save();
      this.skipped.push({ ...ref, type: fs.type, reason: describeError(err) });
      return;
    }
    const mounted: MountedFileSystem = {
      ...ref,
      type: fs.type,
      ...(fs.label !== undefined ? { label: fs.label } : {}),
      ...(fs.uuid !== undefined ? { uuid: fs.uuid } : {}),
      path,
      offset,
      size,
    };
    this.filesystems.push(mounted);
    log.info({ volume: name, type: fs.type, path }, 'file system mounted read-only');
  }

  /**
   * vfat on a kernel without the driver: read in user space with mtools (mcopy), copied into the
   * run dir and shown read-only through a bind mount at the usual place. A copy, not a live view:
   * fine for the small FAT volumes (EFI system partitions) guests have; larger ones are skipped.
   * mtools keeps file times but not folder times, and shows FAT attributes as fixed modes.
   */
  async #userspaceVfat(ref: VolumeRef, path: string, offset: number, size: number, fs: DetectedFileSystem, image: string): Promise<void> {
    const name = volumeName(ref);
    const skip = (reason: string): void => {
      this.skipped.push({ ...ref, type: 'vfat', reason });
    };
    if (size > USERSPACE_VFAT_MAX) {
      skip(`vfat file system: this kernel has no vfat driver, and at ${Math.round(size / 2 ** 30)} GiB it is too large to copy out with mtools (limit ${USERSPACE_VFAT_MAX / 2 ** 30} GiB); restore the disk instead`);
      return;
    }
    const copy = join(this.#dir, `vfat-${this.#copies++}`);
    await mkdir(copy);
    const env = { ...process.env, MTOOLS_SKIP_CHECK: '1', MTOOLS_NO_VFAT: '0' };
    const source = `${image}@@${offset}`;
    try {
      const listing = await runTool('mdir', ['-b', '-i', source, '::/'], `listing the vfat file system ${name}`, env);
      // Through NBD and FUSE a large volume takes a while: 10 minutes plus a minute per 256 MiB (4 MiB/s at worst).
      const deadlineMs = 600_000 + Math.ceil(size / 2 ** 28) * 60_000;
      if (listing.trim() !== '') await runTool('mcopy', ['-s', '-p', '-m', '-n', '-Q', '-i', source, '::/*', `${copy}/`], `copying the vfat file system ${name} (mtools)`, env, deadlineMs);
    } catch (err) {
      skip(`vfat file system: this kernel has no vfat driver and reading it with mtools failed: ${describeError(err)}`);
      return;
    }
    await this.#mkdirTracked(path);
    try {
      this.#state.mountpoints.push(path);
      this.#save();
      await runTool('mount', ['--bind', copy, path], `bind-mounting the vfat copy of ${name}`);
      await runTool('mount', ['-o', 'remount,bind,ro,nodev,nosuid,noexec', path], `making the vfat copy of ${name} read-only`);
    } catch (err) {
      skip(`vfat file system: ${describeError(err)}`);
      return;
    }
    const mounted: MountedFileSystem = {
      ...ref,
      type: 'vfat',
      ...(fs.label !== undefined ? { label: fs.label } : {}),
      ...(fs.uuid !== undefined ? { uuid: fs.uuid } : {}),
      path,
      offset,
      size,
      userspace: true,
    };
    this.filesystems.push(mounted);
    this.warnings.push(`${name}: ${relative(this.at, path)} was read with mtools (this kernel has no vfat driver): a read-only copy; folder times are not kept`);
    log.info({ volume: name, path }, 'vfat read in user space (mtools) and shown read-only');
  }

  /** The volumes of a disk: a whole-disk file system, or the partitions of its table. */
  async #volumes(d: DiskToMount): Promise<DiskVolume[]> {
    const whole = await detectFileSystem(d.disk);
    // A FAT or NTFS boot sector can look like an MBR; any other file system at sector 0 wins.
    if (whole && whole.type !== 'vfat' && whole.type !== 'ntfs') return [{ partition: null, offset: 0, size: d.disk.size, fs: whole }];
    let parts: readonly Partition[] = [];
    try {
      const table = await readPartitionTable(d.disk);
      this.warnings.push(...table.warnings.map((w) => `${d.name}: ${w}`));
      parts = table.partitions;
    } catch (err) {
      if (!whole) throw new BulwarkError(`cannot read the partition table of disk ${d.name}`, { kind: 'corrupt', context: { disk: d.name }, cause: err });
      this.warnings.push(`${d.name}: ${describeError(err)}`);
    }
    if (parts.length === 0) return whole ? [{ partition: null, offset: 0, size: d.disk.size, fs: whole }] : [];
    const out = [];
    for (const p of parts) {
      if (CONTAINER_TYPES.has(p.type)) continue;
      out.push({ partition: p.index, offset: p.start, size: p.size, fs: await detectFileSystem(d.disk, p.start, p.size) });
    }
    return out;
  }

  /** Creates `path` and any missing parents, each recorded so that unmount removes it again. */
  #mkdirTracked(path: string): Promise<void> {
    // One at a time: mounts side by side share parents (`<at>/vdb`).
    const next = this.#mkdirs.then(() => this.#mkdirNow(path));
    this.#mkdirs = next.catch(() => undefined);
    return next;
  }

  async #mkdirNow(path: string): Promise<void> {
    const missing: string[] = [];
    for (let p = path; !existsSync(p); p = dirname(p)) {
      missing.unshift(p);
      if (dirname(p) === p) break;
    }
    for (const p of missing) {
      // Owner only: the guest's files keep the guest's owners and modes, so below a folder others
      // can enter, a host user whose uid a guest user has (or anyone, for the guest's world-readable
      // files: /etc, home folders) would read them. The default place is in the data folder (0700).
      await mkdir(p, { mode: 0o700 });
      this.#state.createdDirs.push(p);
      this.#save();
    }
  }

  #save(): void {
    writeFileSync(join(this.#dir, 'state.json'), JSON.stringify(this.#state, null, 2));
  }

  async copyOut(paths: readonly string[], toDir: string, options?: CopyOptions): Promise<CopyReport> {
    const sources = paths.map((p) => {
      const abs = resolve(this.at, p);
      const rel = relative(this.at, abs);
      if (rel === '..' || rel.startsWith('../') || isAbsolute(rel)) {
        throw new BulwarkError(`${p} is outside the mounted restore point ${this.at}`, { kind: 'invalid', context: { path: p } });
      }
      return abs;
    });
    try {
      return await copyOut(sources, toDir, options);
    } catch (err) {
      throw damagedRead(err, this) ?? err;
    }
  }

  unmount(): Promise<void> {
    this.#unmounting ??= this.#teardown();
    return this.#unmounting;
  }

  async #teardown(): Promise<void> {
    const problems: string[] = [];
    // The mounts are side by side (none inside another): undone side by side, then their FUSE views.
    // A view still starting is waited for first, so its nbdfuse is not left behind.
    await Promise.allSettled(this.#views.values());
    await Promise.all(
      [...this.#state.mountpoints].reverse().map(async (path) => {
        try {
          await unmountPath(path);
          this.#state.mountpoints = this.#state.mountpoints.filter((p) => p !== path);
        } catch (err) {
          problems.push(describeError(err));
        }
      }),
    );
    await Promise.all(
      this.#state.fuseDirs.map(async (dir) => {
        if (mountedPaths().has(dir)) {
          try {
            await unmountFuse(dir);
          } catch (err) {
            problems.push(describeError(err));
          }
        }
        const child = this.#nbdfuse.get(dir);
        if (child) await waitExit(child);
      }),
    );
    await this.#server?.close();
    for (const dir of [...this.#state.createdDirs].reverse()) {
      if (!mountedPaths().has(dir)) await rmdir(dir).catch(() => undefined);
    }
    unregisterForExit(this);
    if (problems.length === 0) await rm(this.#dir, { recursive: true, force: true });
    else this.#save();
    if (problems.length > 0) {
      throw new BulwarkError(`some mounts under ${this.at} could not be undone: ${problems.join('; ')}`, {
        context: { at: this.at },
        hint: `close programs using files under ${this.at}, then run the stale-mount sweeper`,
      });
    }
    log.info({ at: this.at }, 'unmounted');
  }

  /** Synchronous last resort at process exit: lazy unmounts, nothing awaited. */
  exitCleanup(): void {
    for (const p of [...this.#state.mountpoints].reverse()) runSyncQuietly('umount', ['-l', p]);
    for (const d of this.#state.fuseDirs) runSyncQuietly('fusermount3', ['-uz', d]);
    for (const c of this.#nbdfuse.values()) c.kill('SIGTERM');
    for (const dir of [...this.#state.createdDirs].reverse()) rmSyncQuietly(dir);
    rmSync(this.#dir, { recursive: true, force: true });
  }
}

function unmountableReason(type: FileSystemType, kernel: ReadonlySet<string>): string | null {
  switch (type) {
    case 'lvm2-pv':
      // Physical volumes on partitions and disks are read (their LVs mounted); one inside an LV is not.
      return 'LVM physical volume inside a logical volume (nested LVM): not read; restore the disk instead';
    case 'swap':
      return 'swap space: holds no files';
    case 'ext2':
    case 'ext3':
    case 'ext4':
    case 'xfs':
    case 'btrfs':
    case 'vfat':
    case 'ntfs': {
      const k = KERNEL_TYPE[type] ?? type;
      return kernel.has(k) ? null : `${type} file system: this kernel has no ${k} driver (not in /proc/filesystems), so it cannot be mounted here`;
    }
  }
}

/** umount; when busy, retry briefly, then detach lazily (it goes away once no longer used). */
async function unmountPath(path: string): Promise<void> {
  if (!mountedPaths().has(path)) return;
  for (let attempt = 0; ; attempt++) {
    try {
      await runTool('umount', [path], `unmounting ${path}`);
      return;
    } catch (err) {
      if (attempt < 3) {
        await new Promise((r) => setTimeout(r, 100 * (attempt + 1)));
        continue;
      }
      await runTool('umount', ['-l', path], `lazy unmount of ${path}`);
      log.warn({ path, err: describeError(err) }, 'mount was busy; detached lazily');
      return;
    }
  }
}

/** Removes a directory only when empty; never throws (exit paths). */
/**
 * Unmounts a FUSE view. The kernel frees a loop device asynchronously after its umount, and
 * until then the loop still holds the FUSE file open (EBUSY), so wait for the loops to go first;
 * a view still busy after that is detached lazily (it goes once the loop lets go).
 */
async function unmountFuse(dir: string): Promise<void> {
  const image = join(dir, 'nbd');
  for (let i = 0; i < 50; i++) {
    const loops = await runTool('losetup', ['-j', image], 'listing loop devices').catch(() => '');
    if (loops.trim() === '') break;
    await new Promise((r) => setTimeout(r, 50));
  }
  for (let attempt = 0; ; attempt++) {
    try {
      await runTool('fusermount3', ['-u', dir], `unmounting FUSE view ${dir}`);
      return;
    } catch (err) {
      if (attempt < 3) {
        await new Promise((r) => setTimeout(r, 100 * (attempt + 1)));
        continue;
      }
      await runTool('fusermount3', ['-uz', dir], `lazy unmount of FUSE view ${dir}`);
      log.warn({ dir, err: describeError(err) }, 'FUSE view was busy; detached lazily');
      return;
    }
  }
}

function rmSyncQuietly(dir: string): void {
  try {
    rmdirSync(dir);
  } catch {
    /* not empty, gone, or still a mount point: leave it */
  }
}

// ---- process-exit hook ----------------------------------------------------------------------

const active = new Set<MountSession>();
const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function onExit(): void {
  for (const m of active) m.exitCleanup();
  active.clear();
}

function onSignal(signal: NodeJS.Signals): void {
  onExit();
  removeHooks();
  // Another handler decides what this signal means; else die of it as we would have.
  if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
}

function registerForExit(m: MountSession): void {
  if (active.size === 0) {
    process.on('exit', onExit);
    for (const s of SIGNALS) process.on(s, onSignal);
  }
  active.add(m);
}

function unregisterForExit(m: MountSession): void {
  if (!active.delete(m) || active.size > 0) return;
  removeHooks();
}

function removeHooks(): void {
  process.off('exit', onExit);
  for (const s of SIGNALS) process.off(s, onSignal);
}

// ---- stale-mount sweeper ----------------------------------------------------------------------

export interface SweptMount {
  readonly dir: string;
  readonly pid: number;
  readonly at: string;
  readonly unmounted: readonly string[];
}

/**
 * Undoes the mounts of processes that died without unmounting (killed, crashed), found through
 * the state files under runDir. Mounts of live processes are left alone.
 */
export async function sweepStaleMounts(runDir = defaultRunDir()): Promise<SweptMount[]> {
  if (!existsSync(runDir)) return [];
  const swept: SweptMount[] = [];
  for (const entry of readdirSync(runDir)) {
    const dir = join(runDir, entry);
    let state: MountState;
    try {
      state = JSON.parse(readFileSync(join(dir, 'state.json'), 'utf8')) as MountState;
    } catch {
      continue;
    }
    if (state.pid === process.pid ? [...active].some((m) => m.at === state.at) : processAlive(state.pid)) continue;
    const mounted = mountedPaths();
    const unmounted: string[] = [];
    for (const p of [...state.mountpoints].reverse()) {
      if (mounted.has(p) && runSyncQuietly('umount', ['-l', p])) unmounted.push(p);
    }
    for (const d of state.fuseDirs) if (mounted.has(d)) runSyncQuietly('fusermount3', ['-uz', d]);
    for (const pid of state.nbdfusePids) {
      if (processAlive(pid) && commandOf(pid) === 'nbdfuse') process.kill(pid, 'SIGTERM');
    }
    for (const d of [...state.createdDirs].reverse()) rmSyncQuietly(d);
    await rm(dir, { recursive: true, force: true });
    log.warn({ pid: state.pid, at: state.at, unmounted }, 'swept stale file-level restore mounts');
    swept.push({ dir, pid: state.pid, at: state.at, unmounted });
  }
  return swept;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function commandOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
}

/** Failed disk reads kept per mount for error messages (the first ones; later ones are alike). */
const READ_FAILURES_KEPT = 8;

/** `disk`, with the message of each failed read (a damaged block names itself) added to `failures`. */
function recordingFailures(name: string, disk: RandomAccessDisk, failures: ReadFailure[]): RandomAccessDisk {
  const note = (err: unknown): never => {
    const message = `${name}: ${describeError(err)}`;
    if (failures.length < READ_FAILURES_KEPT && !failures.some((f) => f.message === message)) {
      failures.push({ message, damaged: err instanceof BulwarkError && err.kind === 'corrupt' });
    }
    throw err;
  };
  return {
    size: disk.size,
    read: (offset, length) => disk.read(offset, length).catch(note),
    ...(disk.extents ? { extents: (offset: number, length: number) => disk.extents!(offset, length).catch(note) } : {}),
    close: () => disk.close(),
  };
}

/**
 * An EIO from reading a mounted restore point, as an error that says why, from the mount's failed
 * disk reads: damaged blocks (kind `corrupt`, each named) or a source that could not be read;
 * undefined for any other error.
 */
export function damagedRead(err: unknown, mount: Pick<Mount, 'at' | 'readFailures'>, what?: string): BulwarkError | undefined {
  const code = (e: unknown): string | undefined => (e as NodeJS.ErrnoException | undefined)?.code;
  const cause = err instanceof BulwarkError && err.cause !== undefined ? err.cause : err;
  if (code(err) !== 'EIO' && code(cause) !== 'EIO') return undefined;
  // The file that failed, as the mount shows it (`vda/part1-ext4/srv/x`), unless the caller names it.
  const failed = (err instanceof BulwarkError ? err.context.path : undefined) ?? (cause as NodeJS.ErrnoException).path;
  const path = what ?? (typeof failed === 'string' && failed.startsWith(`${mount.at}/`) ? relative(mount.at, failed) : (failed ?? mount.at));
  const failures = mount.readFailures;
  const damaged = failures.length > 0 && failures.every((f) => f.damaged);
  const why = failures.length === 0
    ? 'an input/output error (no failed read of the restore point was recorded: see the server log)'
    : damaged
      ? `the backup holds damaged data there: ${failures.map((f) => f.message).join('; ')}`
      : `the restore point could not be read: ${failures.map((f) => f.message).join('; ')}`;
  return new BulwarkError(`reading ${path} from the restore point failed: ${why}`, {
    kind: damaged ? 'corrupt' : 'internal',
    context: { path },
    hint: damaged
      ? 'restore it from another restore point (an older one, or the next one after a backup run repaired the damage), or restore the other paths without it'
      : 'check that the repository (and its agent) can be reached, then try again',
    cause: err,
  });
}
