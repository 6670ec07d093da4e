// One restore point mounted for file-level restore: the point opened from its repository, each
// disk read through a block cache, every recognised file system mounted read-only (mountDisks) —
// or, for `restore files`, only those its paths are on — and the guest's layout worked out (root,
// fstab mount points). close() undoes it all.
import { posix } from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { KdfParams } from '../../format/header.js';
import type { ChainKeys } from '../../repository/chain-keys.js';
import type { Repository, RestorePointInfo } from '../../repository/index.js';
import { withBlockCache } from '../nbd-server/block-cache.js';
import { EXPLICIT_PATH, fsName, guestLayout, matchFstabSpec, mountpointOf, parseFstab, readGuestFstab, type GuestLayout } from './guest-paths.js';
import { mountDisks, openDisks, volumeName, type DiskToMount, type FoundVolume, type Mount, type MountedFileSystem } from './mount.js';

const log = logger('point-mount');

/** What a mount needs to know of its point: id, VM and time (a catalog or repository point). */
export interface PointIdentity {
  readonly id: string;
  readonly vm: string;
  readonly time: Date;
}

export interface PointMount<P extends PointIdentity = RestorePointInfo> {
  readonly point: P;
  /** The chain's KDF parameters and keys when it is encrypted (to seal what is derived from the point). */
  readonly encryption?: { readonly kdf: KdfParams; readonly keys: ChainKeys } | null;
  readonly mount: Mount;
  readonly layout: GuestLayout;
  close(): Promise<void>;
}

/**
 * A point's disks ready to be mounted, from wherever they are read (a repository here, or another
 * agent's repository through the data mover: src/agent/remote/restore-reader.ts). close() closes
 * the disks and the point; mountPoint calls it when the mount is closed or fails.
 */
export interface MountablePoint<P extends PointIdentity = PointIdentity> {
  readonly point: P;
  readonly disks: readonly DiskToMount[];
  readonly encryption?: { readonly kdf: KdfParams; readonly keys: ChainKeys } | null;
  close(): Promise<void>;
}

/** A mounted file system as shown to users: device-like name and guest mount point. */
export interface FileSystemView {
  /** `vda` (whole disk) or `vdb2` (partition 2). */
  readonly name: string;
  readonly disk: string;
  readonly partition: number | null;
  readonly type: string;
  readonly label?: string;
  readonly uuid?: string;
  /** Host folder where it is mounted read-only. */
  readonly path: string;
  /** Where the guest mounted it (root `/`, or from its /etc/fstab), when known. */
  readonly mountpoint?: string;
}

export function describeFileSystems(m: Pick<PointMount<PointIdentity>, 'mount' | 'layout'>): FileSystemView[] {
  return m.mount.filesystems.map((f: MountedFileSystem) => {
    const mp = mountpointOf(m.layout, f);
    return {
      name: fsName(f),
      disk: f.disk,
      partition: f.partition,
      type: f.type,
      ...(f.label !== undefined ? { label: f.label } : {}),
      ...(f.uuid !== undefined ? { uuid: f.uuid } : {}),
      path: f.path,
      ...(mp !== undefined ? { mountpoint: mp } : {}),
    };
  });
}

/** Where and what to mount (mountPoint, mountRestorePoint). */
export interface MountWhere {
  /** Folder to mount under (created; must not hold anything). */
  readonly at: string;
  readonly runDir?: string;
  /**
   * Mount only the file systems these paths are on (as `restore files` takes them: a guest path
   * `/etc/hostname`, or `vdb2:/srv` naming its file system), not all of them. A guest path needs
   * the guest's mount points: the root is mounted first, then those its fstab places the paths on.
   */
  readonly paths?: readonly string[];
  /** With `paths`: named file systems must be placed in the guest too (its root is read; --to-guest). */
  readonly placeInGuest?: boolean;
}

export interface MountPointOptions extends MountWhere {
  readonly repository: Repository;
  readonly pointId: string;
  readonly password?: string;
  /** Block cache per disk (default 64 MiB). */
  readonly cacheBytes?: number;
}

/** Opens a point of a repository on this host for mounting: each disk read through a block cache. */
export async function openRepositoryPoint(repository: Repository, pointId: string, o: { password?: string; cacheBytes?: number } = {}): Promise<MountablePoint<RestorePointInfo>> {
  const point = await repository.openRestorePoint(pointId, o.password === undefined ? {} : { password: o.password });
  const disks = point.disks.map((d) => ({ name: d.name, disk: withBlockCache(point.openDisk(d.name), { maxBytes: o.cacheBytes ?? 64 * 1024 * 1024 }) }));
  const kdf = point.files[0]?.header.encryption ?? null;
  return {
    point: point.info,
    disks,
    encryption: kdf && point.keys ? { kdf, keys: point.keys } : null,
    close: async () => {
      for (const d of disks) await d.disk.close().catch((err: unknown) => log.warn({ disk: d.name, err: describeError(err) }, 'closing a restore point disk failed'));
      await point.close();
    },
  };
}

/** Mounts a restore point's file systems; on failure nothing is left mounted or open. */
export async function mountRestorePoint(o: MountPointOptions): Promise<PointMount> {
  const source = await openRepositoryPoint(o.repository, o.pointId, { ...(o.password !== undefined ? { password: o.password } : {}), ...(o.cacheBytes !== undefined ? { cacheBytes: o.cacheBytes } : {}) });
  return mountPoint(source, o);
}

/**
 * Mounts the file systems of a point's disks (all, or those `paths` need) and works out the
 * guest's layout. Takes over `source`: it is closed with the mount, or at once on failure, when
 * nothing is left mounted.
 */
export async function mountPoint<P extends PointIdentity>(source: MountablePoint<P>, o: MountWhere): Promise<PointMount<P>> {
  const closeDisks = (): Promise<void> => source.close();
  let mount: Mount;
  try {
    const mountOptions = { at: o.at, ...(o.runDir !== undefined ? { runDir: o.runDir } : {}) };
    mount = o.paths === undefined ? await mountDisks(source.disks, mountOptions) : await openDisks(source.disks, mountOptions);
  } catch (err) {
    await closeDisks();
    throw err;
  }
  try {
    if (o.paths !== undefined) await mountForPaths(mount, o.paths, o.placeInGuest ?? false);
  } catch (err) {
    await mount.unmount().catch((cleanupErr: unknown) => log.error({ err: describeError(cleanupErr) }, 'unmounting after a failed mount was incomplete'));
    await closeDisks();
    throw err;
  }
  let layout: GuestLayout;
  try {
    layout = await guestLayout(mount.filesystems);
  } catch (err) {
    await mount.unmount();
    await closeDisks();
    throw err;
  }
  let closing: Promise<void> | undefined;
  return {
    point: source.point,
    encryption: source.encryption ?? null,
    mount,
    layout,
    close: () =>
      (closing ??= (async () => {
        try {
          await mount.unmount();
        } finally {
          await closeDisks();
        }
      })()),
  };
}

/** File system types a Linux guest's root can be (with an /etc/fstab). */
const ROOT_TYPES = new Set(['ext2', 'ext3', 'ext4', 'xfs', 'btrfs']);

/**
 * Mounts what `paths` need: each named file system, and for guest paths (or placeInGuest) the
 * guest's root plus the file systems its fstab mounts on a prefix of a path. The root is the first
 * found whose /etc/fstab mounts itself on `/`; when none does, everything is mounted (the layout
 * then falls back to the one file system that looks like a root, as for a full mount).
 */
async function mountForPaths(mount: Mount, paths: readonly string[], placeInGuest: boolean): Promise<void> {
  const names = new Map<string, string>();
  const guestPaths: string[] = [];
  for (const p of paths) {
    const explicit = EXPLICIT_PATH.exec(p);
    if (explicit === null) {
      // Not starting with /: refused with its reason when resolved.
      if (p.startsWith('/')) guestPaths.push(posix.normalize(p));
      continue;
    }
    const name = explicit[1]!;
    if (!mount.volumes.some((v) => volumeName(v) === name)) {
      throw new BulwarkError(`${p}: the restore point has no mounted file system ${name}`, {
        kind: 'not-found',
        context: { path: p },
        hint: `file systems: ${mount.volumes.map(fsName).join(', ') || 'none'}`,
      });
    }
    names.set(name, p);
  }
  if (guestPaths.length > 0 || (placeInGuest && names.size > 0)) {
    const root = await mountGuestRoot(mount);
    if (root === null) {
      await mount.mountVolumes(mount.volumes.map(volumeName));
      return;
    }
    const placed = root.fstab
      .filter((e) => e.mountpoint !== '/')
      .map((e) => ({ mountpoint: e.mountpoint, volume: matchFstabSpec(e.spec, mount.volumes) }))
      .filter((e): e is { mountpoint: string; volume: FoundVolume } => e.volume !== undefined && volumeName(e.volume) !== volumeName(root.fs))
      .sort((a, b) => b.mountpoint.length - a.mountpoint.length);
    for (const g of guestPaths) {
      const on = placed.find((e) => g === e.mountpoint || g.startsWith(`${e.mountpoint}/`));
      if (on) names.set(volumeName(on.volume), g);
    }
  }
  await mount.mountVolumes([...names.keys()]);
  for (const [name, p] of names) {
    const skipped = mount.skipped.find((s) => volumeName(s) === name);
    if (skipped && !mount.filesystems.some((f) => volumeName(f) === name)) {
      throw new BulwarkError(`${p}: file system ${name} cannot be mounted: ${skipped.reason}`, { kind: 'unavailable', context: { path: p, filesystem: name } });
    }
  }
}

/** Mounts candidates for the guest root one by one until one's /etc/fstab mounts itself on `/`. */
async function mountGuestRoot(mount: Mount): Promise<{ fs: MountedFileSystem; fstab: ReturnType<typeof parseFstab> } | null> {
  for (const v of mount.volumes) {
    if (!ROOT_TYPES.has(v.type)) continue;
    const [fs] = await mount.mountVolumes([volumeName(v)]);
    if (fs === undefined) continue;
    let fstab: ReturnType<typeof parseFstab>;
    try {
      // Not through a guest link leaving the file system (this host's own fstab): readGuestFstab.
      const text = await readGuestFstab(fs.path);
      if (text === null) continue;
      fstab = parseFstab(text);
    } catch {
      continue;
    }
    const rootEntry = fstab.find((e) => e.mountpoint === '/');
    const self = rootEntry === undefined ? undefined : matchFstabSpec(rootEntry.spec, mount.volumes);
    if (self !== undefined && volumeName(self) === volumeName(fs)) return { fs, fstab };
  }
  return null;
}
