// Guest paths on a mounted restore point: which mounted file system is the guest's root, where
// the others were mounted in the guest (its /etc/fstab), and which host path a guest path such as
// `/home/u/My Docs` or an explicit `vdb2:/srv/data` is. File systems are named like the guest's
// block devices: `vda` for a file system on a whole disk, `vdb2` for partition 2 of disk vdb,
// `rhel-root` for LVM logical volume root of volume group rhel (as /dev/mapper/ names it).
// Never use synchronous file calls on a mount here: the disks may be served by an NBD server in
// this same process, which a blocked event loop could not answer (deadlock).
import { lstat, readFile, realpath } from 'node:fs/promises';
import { join, posix } from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import { volumeName, type MountedFileSystem, type VolumeRef } from './mount.js';

/**
 * The file system's device-like name: `vda` (whole disk), `vdb2` (partition 2 of vdb), or
 * `rhel-root` for LVM logical volume root of VG rhel (its /dev/mapper name).
 */
export function fsName(fs: VolumeRef): string {
  return volumeName(fs);
}

export interface GuestMountPoint {
  /** Guest path where the file system is mounted (`/`, `/srv`, …). */
  readonly mountpoint: string;
  readonly fs: MountedFileSystem;
}

export interface GuestLayout {
  /** The guest's root file system, when one was recognised. */
  readonly root: MountedFileSystem | null;
  /** Mount points of the guest, longest first (the root last). */
  readonly mounts: readonly GuestMountPoint[];
  /** Why a root was (not) recognised, or fstab lines that match no mounted file system. */
  readonly notes: readonly string[];
}

/** A guest path resolved to a mounted file system. */
export interface ResolvedGuestPath {
  /** As the user wrote it. */
  readonly spec: string;
  readonly fs: MountedFileSystem;
  /** The path inside that file system (starts with /). */
  readonly inside: string;
  /** The guest path it restores to: the mountpoint joined with `inside` (or `inside` alone). */
  readonly guestPath: string;
  /** Where it is on this host (inside the read-only mount). */
  readonly hostPath: string;
}

interface FstabEntry {
  readonly spec: string;
  readonly mountpoint: string;
  readonly type: string;
}

/** Parses /etc/fstab text: spec, mount point, type; `\040`-style escapes decoded. */
export function parseFstab(text: string): FstabEntry[] {
  const out: FstabEntry[] = [];
  const unescape = (s: string): string => s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const [spec, mountpoint, type] = line.split(/\s+/);
    if (!spec || !mountpoint || !type || !mountpoint.startsWith('/')) continue;
    out.push({ spec: unescape(spec), mountpoint: posix.normalize(unescape(mountpoint)), type });
  }
  return out;
}

/**
 * The mounted file system an fstab device spec names (UUID=, LABEL=, /dev/vdb2, by-uuid/by-label
 * links, /dev/mapper/VG-LV, /dev/VG/LV).
 */
export function matchFstabSpec<F extends VolumeRef & { readonly uuid?: string; readonly label?: string }>(spec: string, filesystems: readonly F[]): F | undefined {
  const eq = /^(UUID|LABEL)=(.*)$/.exec(spec);
  const byLink = /^\/dev\/disk\/by-(uuid|label)\/(.*)$/.exec(spec);
  const key = eq ? eq[1]!.toLowerCase() : byLink ? byLink[1]! : undefined;
  const value = (eq ? eq[2]! : byLink ? byLink[2]! : '').replace(/^"(.*)"$/, '$1');
  if (key === 'uuid') return filesystems.find((f) => f.uuid !== undefined && f.uuid.toLowerCase() === value.toLowerCase());
  if (key === 'label') return filesystems.find((f) => f.label === value);
  const mapper = /^\/dev\/mapper\/([A-Za-z0-9+._-]+)$/.exec(spec);
  if (mapper) return filesystems.find((f) => f.lv !== undefined && fsName(f) === mapper[1]);
  const vgLv = /^\/dev\/([A-Za-z0-9+._-]+)\/([A-Za-z0-9+._-]+)$/.exec(spec);
  if (vgLv) return filesystems.find((f) => f.lv !== undefined && f.lv.vg === vgLv[1] && f.lv.name === vgLv[2]);
  const dev = /^\/dev\/([A-Za-z0-9._-]+)$/.exec(spec);
  if (!dev) return undefined;
  // /dev/sda1 in the guest may be disk vda in the backup (virtio vs SCSI naming): match the name
  // first, then the same disk letter and partition number on another bus prefix.
  const name = dev[1]!;
  const exact = filesystems.find((f) => fsName(f) === name);
  if (exact) return exact;
  const m = /^(?:[shv]d|xvd)([a-z]+)(\d*)$/.exec(name);
  if (!m) return undefined;
  const same = filesystems.filter((f) => {
    if (f.lv) return false;
    const d = /^(?:[shv]d|xvd)([a-z]+)$/.exec(f.disk);
    return d?.[1] === m[1] && (f.partition === null ? m[2] === '' : String(f.partition) === m[2]);
  });
  return same.length === 1 ? same[0] : undefined;
}

async function looksLikeRoot(path: string): Promise<boolean> {
  const dir = async (p: string): Promise<boolean> => lstat(join(path, p)).then((s) => s.isDirectory(), () => false);
  return (await dir('etc')) && ((await dir('bin')) || (await dir('usr')) || (await dir('sbin')));
}

/**
 * A mounted guest file system's /etc/fstab, or null when /etc or the file is a link that leads
 * out of the file system: this host's kernel would follow a guest's absolute link to this host's
 * files. Throws the read's error (ENOENT: no fstab).
 */
export async function readGuestFstab(fsRoot: string): Promise<string | null> {
  const root = await realpath(fsRoot);
  const file = await realpath(join(fsRoot, 'etc', 'fstab'));
  if (!file.startsWith(`${root}/`)) return null;
  return readFile(file, 'utf8');
}

/**
 * Works out the guest's layout: the root is the file system whose /etc/fstab mounts itself on
 * `/`, else the only one that looks like a root (`etc` plus `bin`, `sbin` or `usr`); the root's
 * fstab then places the others.
 */
export async function guestLayout(filesystems: readonly MountedFileSystem[]): Promise<GuestLayout> {
  const notes: string[] = [];
  const fstabs = new Map<MountedFileSystem, FstabEntry[]>();
  for (const fs of filesystems) {
    try {
      const text = await readGuestFstab(fs.path);
      if (text === null) notes.push(`${fsName(fs)}: /etc/fstab is a link that leaves the file system (on this host it would be another file): not read`);
      else fstabs.set(fs, parseFstab(text));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') notes.push(`${fsName(fs)}: /etc/fstab cannot be read`);
    }
  }
  let root: MountedFileSystem | null = null;
  for (const [fs, entries] of fstabs) {
    const rootEntry = entries.find((e) => e.mountpoint === '/');
    if (rootEntry && matchFstabSpec(rootEntry.spec, filesystems) === fs) {
      root = fs;
      break;
    }
  }
  if (root === null) {
    const candidates: MountedFileSystem[] = [];
    for (const f of filesystems) if (await looksLikeRoot(f.path)) candidates.push(f);
    if (candidates.length === 1) root = candidates[0]!;
    else if (candidates.length > 1) notes.push(`several file systems look like a root (${candidates.map(fsName).join(', ')}); name one explicitly, e.g. ${fsName(candidates[0]!)}:/etc/hostname`);
    else notes.push('no file system looks like a guest root (no /etc with /bin, /sbin or /usr); name file systems explicitly, e.g. vda1:/path');
  }
  const mounts: GuestMountPoint[] = [];
  if (root) {
    mounts.push({ mountpoint: '/', fs: root });
    for (const e of fstabs.get(root) ?? []) {
      if (e.mountpoint === '/') continue;
      const fs = matchFstabSpec(e.spec, filesystems);
      if (fs && fs !== root) mounts.push({ mountpoint: e.mountpoint, fs });
      else if (!fs && !['swap', 'proc', 'sysfs', 'tmpfs', 'devpts', 'none'].includes(e.type)) notes.push(`fstab: ${e.spec} on ${e.mountpoint} matches no file system of this restore point`);
    }
  }
  mounts.sort((a, b) => b.mountpoint.length - a.mountpoint.length);
  return { root, mounts, notes };
}

/** The guest mount point of a file system, if the layout places it. */
export function mountpointOf(layout: GuestLayout, fs: MountedFileSystem): string | undefined {
  return layout.mounts.find((m) => m.fs === fs)?.mountpoint;
}

/** `NAME:/path`: a path inside the file system NAME (`vdb2:/srv`). */
export const EXPLICIT_PATH = /^([A-Za-z0-9+._-]+):(\/.*)$/;

/**
 * Resolves `spec`: a guest path (`/etc/hostname`, through the guest's mount points) or an
 * explicit `NAME:/path` (`vdb2:/srv`, `vda:/etc`), where NAME is a file system's device-like name.
 */
export function resolveGuestPath(layout: GuestLayout, filesystems: readonly MountedFileSystem[], spec: string, known: readonly VolumeRef[] = filesystems): ResolvedGuestPath {
  const explicit = EXPLICIT_PATH.exec(spec);
  let fs: MountedFileSystem;
  let inside: string;
  let guestPath: string;
  if (explicit) {
    const name = explicit[1]!;
    const found = filesystems.find((f) => fsName(f) === name);
    if (!found) {
      throw new BulwarkError(`${spec}: the restore point has no mounted file system ${name}`, {
        kind: 'not-found',
        context: { path: spec },
        hint: `file systems: ${known.map(fsName).join(', ') || 'none'}`,
      });
    }
    fs = found;
    inside = posix.normalize(explicit[2]!);
    const mp = mountpointOf(layout, fs);
    guestPath = mp === undefined ? inside : posix.join(mp, inside);
  } else {
    if (!spec.startsWith('/')) {
      throw new BulwarkError(`${spec}: a guest path starts with / (or names its file system: vda1:/path)`, { kind: 'invalid', context: { path: spec } });
    }
    guestPath = posix.normalize(spec);
    const m = layout.mounts.find((x) => x.mountpoint === '/' || guestPath === x.mountpoint || guestPath.startsWith(`${x.mountpoint}/`));
    if (!m) {
      throw new BulwarkError(`${spec}: the guest's root file system was not recognised, so a plain guest path cannot be placed`, {
        kind: 'invalid',
        context: { path: spec },
        hint: `${layout.notes.join('; ')}${layout.notes.length ? '; ' : ''}name the file system: ${filesystems.map((f) => `${fsName(f)}:${spec}`).slice(0, 3).join(' or ')}`,
      });
    }
    fs = m.fs;
    inside = m.mountpoint === '/' ? guestPath : guestPath.slice(m.mountpoint.length) || '/';
  }
  if (inside.split('/').includes('..')) throw new BulwarkError(`${spec}: .. is not allowed in a guest path`, { kind: 'invalid', context: { path: spec } });
  return { spec, fs, inside, guestPath, hostPath: join(fs.path, inside) };
}
