// One restore point mounted for file-level restore: the point opened from its repository, each
// disk read through a block cache, every recognised file system mounted read-only (mountDisks),
// and the guest's layout worked out (root, fstab mount points). close() undoes it all.
import { describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { Repository, RestorePointInfo } from '../../repository/index.js';
import { withBlockCache } from '../nbd-server/block-cache.js';
import { fsName, guestLayout, mountpointOf, type GuestLayout } from './guest-paths.js';
import { mountDisks, type Mount, type MountedFileSystem } from './mount.js';

const log = logger('point-mount');

export interface PointMount {
  readonly point: RestorePointInfo;
  readonly mount: Mount;
  readonly layout: GuestLayout;
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

export function describeFileSystems(m: Pick<PointMount, 'mount' | 'layout'>): FileSystemView[] {
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

export interface MountPointOptions {
  readonly repository: Repository;
  readonly pointId: string;
  /** Folder to mount under (created; must not hold anything). */
  readonly at: string;
  readonly runDir?: string;
  readonly password?: string;
  /** Block cache per disk (default 64 MiB). */
  readonly cacheBytes?: number;
}

/** Mounts a restore point's file systems; on failure nothing is left mounted or open. */
export async function mountRestorePoint(o: MountPointOptions): Promise<PointMount> {
  const point = await o.repository.openRestorePoint(o.pointId, o.password === undefined ? {} : { password: o.password });
  const disks = point.disks.map((d) => ({ name: d.name, disk: withBlockCache(point.openDisk(d.name), { maxBytes: o.cacheBytes ?? 64 * 1024 * 1024 }) }));
  const closeDisks = async (): Promise<void> => {
    for (const d of disks) await d.disk.close().catch((err: unknown) => log.warn({ disk: d.name, err: describeError(err) }, 'closing a restore point disk failed'));
    await point.close();
  };
  let mount: Mount;
  try {
    mount = await mountDisks(disks, { at: o.at, ...(o.runDir !== undefined ? { runDir: o.runDir } : {}) });
  } catch (err) {
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
    point: point.info,
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
