// File-level restore from LVM logical volumes, on a kernel without device-mapper: two guest disks
// (MBR and GPT) whose one VG, made by LVM's own tools, holds an ext4 root LV in two separate
// segments, an xfs LV in one run, and an ext4 LV striped over both disks. The disks are backed up
// into a repository; then the restore point is mounted (our LVM reader, NBD server, nbdfuse,
// loop), files are restored by guest path (the root's fstab names /dev/mapper/vgt-root and
// /dev/vgt/data), the guest file index finds a file on an LV, and without the second disk the
// striped LV is refused with the reason. Nothing stays mounted.
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open as openFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DiskBlock } from '../../src/disk/types.js';
import { openFileDisk } from '../../src/disk/file-disk.js';
import { openRepository, type Repository } from '../../src/repository/index.js';
import { fileIndexPath, indexRestorePoint, searchIndexes } from '../../src/restore/catalog/catalog.js';
import { BulwarkError } from '../../src/common/errors.js';
import { fsName, resolveGuestPath } from '../../src/restore/mount/guest-paths.js';
import { mountDisks } from '../../src/restore/mount/mount.js';
import { describeFileSystems, mountRestorePoint, type PointMount } from '../../src/restore/mount/point-mount.js';
import { restoreFilesToDir } from '../../src/restore/mount/restore-files.js';
import { describeTree, makeSourceTree, mountsUnder, type TreeEntry } from './fixtures.js';
import { makeLvmDisks, MiB, type LvmDisks } from './lvm-fixtures.js';

const run = promisify(execFile);
let dir: string;
let disks: LvmDisks;
let repo: Repository;
let pointId: string;
let sourceTree: Record<string, TreeEntry>;
const BLOCK = MiB;
const ZERO = Buffer.alloc(BLOCK);

/** A raw image as blocks, all-zero blocks as holes. */
async function* imageBlocks(path: string): AsyncGenerator<DiskBlock> {
  const f = await openFile(path, 'r');
  try {
    const size = (await f.stat()).size;
    for (let i = 0; i * BLOCK < size; i++) {
      const n = Math.min(BLOCK, size - i * BLOCK);
      const b = Buffer.alloc(n);
      await f.read(b, 0, n, i * BLOCK);
      yield { index: i, data: b.equals(ZERO.subarray(0, n)) ? null : b };
    }
  } finally {
    await f.close();
  }
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bulwark-lvm-'));
  const data = join(dir, 'data-tree');
  const root = join(dir, 'root-tree');
  await mkdir(data);
  await makeSourceTree(data);
  sourceTree = await describeTree(data);
  for (const d of ['etc', 'usr/bin', 'var/lib/stripes', 'srv', 'home/u']) await mkdir(join(root, d), { recursive: true });
  await writeFile(join(root, 'etc/hostname'), 'rocky-guest\n');
  await writeFile(join(root, 'etc/fstab'), '/dev/mapper/vgt-root / ext4 defaults 0 0\n/dev/vgt/data /srv xfs defaults 0 0\nLABEL=stripes /var/lib/stripes ext4 defaults 0 0\n/dev/mapper/vgt-swap none swap defaults 0 0\n');
  await run('cp', ['-a', `${data}/.`, join(root, 'home/u')]);
  disks = await makeLvmDisks(dir, root, data);

  repo = await openRepository(join(dir, 'repo'), { create: true });
  const sizes = await Promise.all([disks.mbr, disks.gpt].map(async (p) => (await stat(p)).size));
  const w = await repo.startRestorePoint({ job: 'nightly', vm: 'rocky', kind: 'full', blockSize: BLOCK, disks: [{ name: 'vda', size: sizes[0]! }, { name: 'vdb', size: sizes[1]! }] });
  await w.writeDisk('vda', imageBlocks(disks.mbr));
  await w.writeDisk('vdb', imageBlocks(disks.gpt));
  pointId = (await w.commit()).id;
}, 180_000);

afterAll(async () => {
  const leaked = dir ? await mountsUnder(dir) : [];
  for (const p of leaked.reverse()) await run('umount', ['-l', p]).catch(() => undefined);
  if (dir) await rm(dir, { recursive: true, force: true });
  expect(leaked).toEqual([]);
});

describe('LVM logical volumes of a restore point', () => {
  it('mounts each LV (two segments, one run, striped over two disks) and restores files bit-exact by guest path', async () => {
    const at = join(dir, 'at');
    const m = await mountRestorePoint({ repository: repo, pointId, at, runDir: join(dir, 'run') });
    try {
      expect(describeFileSystems(m).map((f) => [f.name, f.type, f.label, f.mountpoint, f.path])).toEqual([
        ['vgt-root', 'ext4', 'lvroot', '/', join(at, 'lvm/vgt/root-ext4')],
        ['vgt-data', 'xfs', 'lvdata', '/srv', join(at, 'lvm/vgt/data-xfs')],
        ['vgt-striped', 'ext4', 'stripes', '/var/lib/stripes', join(at, 'lvm/vgt/striped-ext4')],
      ]);
      expect(m.mount.skipped).toEqual([]);
      expect(m.layout.notes).toEqual([]);
      await expect(run('touch', [join(at, 'lvm/vgt/root-ext4/new')])).rejects.toThrow(/Read-only/);

      const out = join(dir, 'out');
      const picks = ['dir with spaces', 'private', 'link to file', 'dangling', 'big.bin', 'empty'];
      const report = await restoreFilesToDir(m, ['/etc/hostname', ...picks.map((p) => `/srv/${p}`)], join(out, 'srv'));
      expect(report.items.map((i) => i.filesystem)).toEqual(['vgt-root', ...picks.map(() => 'vgt-data')]);
      await restoreFilesToDir(m, picks.map((p) => `/home/u/${p}`), join(out, 'root'));
      await restoreFilesToDir(m, picks.map((p) => `vgt-striped:/${p}`), join(out, 'striped'));
      const want = Object.fromEntries(Object.entries(sourceTree).filter(([k]) => picks.some((p) => k === p || k.startsWith(`${p}/`))));
      for (const where of ['srv', 'root', 'striped']) {
        const got = await describeTree(join(out, where));
        delete got.hostname;
        // Contents, modes, file times and link targets; folder times changed when xfs was filled by cp.
        const strip = (t: Record<string, TreeEntry>) => Object.fromEntries(Object.entries(t).map(([k, v]) => [k, v.type === 'file' ? v : v.type === 'symlink' ? { type: v.type, target: v.target } : { ...v, mtime: 0 }]));
        expect(strip(got), where).toEqual(strip(want));
      }
    } finally {
      await m.close();
    }
    expect(await mountsUnder(at)).toEqual([]);
  });

  it('restore files mounts only the file systems its paths are on: the root first for guest paths, a named one alone', async () => {
    const base = { repository: repo, pointId, runDir: join(dir, 'run') };
    const mounted = async (paths: string[], placeInGuest: boolean, check: (m: PointMount) => Promise<void>): Promise<string[]> => {
      const at = join(dir, `only-${paths.length}-${String(placeInGuest)}`);
      const m = await mountRestorePoint({ ...base, at, paths, placeInGuest });
      try {
        await check(m);
        return m.mount.filesystems.map(fsName);
      } finally {
        await m.close();
        expect(await mountsUnder(at)).toEqual([]);
      }
    };
    // A guest path: the root (its fstab places /srv), then the /srv LV; not the striped LV.
    const out = join(dir, 'out-only');
    expect(
      await mounted(['/srv/big.bin', '/etc/hostname'], false, async (m) => {
        const r = await restoreFilesToDir(m, ['/srv/big.bin', '/etc/hostname'], out);
        expect(r.items.map((i) => [i.filesystem, i.inside])).toEqual([['vgt-data', '/big.bin'], ['vgt-root', '/etc/hostname']]);
      }),
    ).toEqual(['vgt-root', 'vgt-data']);
    const got = await describeTree(out);
    expect(got['big.bin']).toEqual(sourceTree['big.bin']);
    // A named file system to a folder: that one alone (no root needed).
    expect(await mounted(['vgt-striped:/big.bin'], false, async () => undefined)).toEqual(['vgt-striped']);
    // Placed in the guest (--to-guest): the root too, for its mount point.
    expect(
      await mounted(['vgt-striped:/big.bin'], true, async (m) => {
        expect(resolveGuestPath(m.layout, m.mount.filesystems, 'vgt-striped:/big.bin').guestPath).toBe('/var/lib/stripes/big.bin');
      }),
    ).toEqual(['vgt-root', 'vgt-striped']);
    // An unknown name: the path named and every file system listed; nothing left mounted or open.
    const err = await mountRestorePoint({ ...base, at: join(dir, 'only-unknown'), paths: ['/etc/hostname', 'vgt-nope:/x'] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect((err as BulwarkError).message).toBe('vgt-nope:/x: the restore point has no mounted file system vgt-nope');
    expect((err as BulwarkError).hint).toBe('file systems: vgt-root, vgt-data, vgt-striped');
    expect(existsSync(join(dir, 'only-unknown'))).toBe(false);
    expect(await mountsUnder(dir)).toEqual([]);
  });

  it('indexes the LVs by guest path and search finds a file on an LV', async () => {
    const r = await indexRestorePoint({ repository: repo, pointId, runDir: join(dir, 'run') });
    expect(r.filesystems).toBe(3);
    const opened = await repo.openRestorePoint(pointId);
    const point = opened.info;
    await opened.close();
    const found = await searchIndexes([{ id: pointId, time: point.time.toISOString(), vm: 'rocky', indexFile: fileIndexPath(point) }], 'odd.bin');
    expect(found.matches.map((x) => x.path).sort()).toEqual(['/home/u/dir with spaces/nested dir/odd.bin', '/srv/dir with spaces/nested dir/odd.bin', '/var/lib/stripes/dir with spaces/nested dir/odd.bin']);
    expect(await mountsUnder(dir)).toEqual([]);
  });

  it('refuses an LV whose other disk is missing, naming the PV; the rest still mounts', async () => {
    const vda = await openFileDisk(disks.mbr);
    try {
      const m = await mountDisks([{ name: 'vda', disk: vda }], { at: join(dir, 'only-vda'), runDir: join(dir, 'run') });
      try {
        expect(m.filesystems.map((f) => [fsName(f), f.type])).toEqual([
          ['vgt-root', 'ext4'],
          ['vgt-data', 'xfs'],
        ]);
        // The data LV is one run on vda: mounted with a loop offset on the disk's own view.
        expect(m.filesystems[1]!.offset).toBe(MiB + MiB + 12 * disks.extentSize);
        expect(m.skipped.map((s) => [fsName(s), s.type])).toEqual([['vgt-striped', 'lvm2-lv']]);
        expect(m.skipped[0]!.reason).toMatch(/vgt\/striped cannot be read: it has extents on a missing physical volume: physical volume pv1 \(the guest's \/dev\/loop\d+\), UUID \S+, is not in this restore point/);
      } finally {
        await m.unmount();
      }
      // A failure after an LV served on its own was mounted undoes it all: loop, its FUSE view, the server.
      const failAt = join(dir, 'fail');
      await expect(
        mountDisks([{ name: 'vda', disk: vda }], {
          at: failAt,
          runDir: join(dir, 'run-fail'),
          onMounted: (f) => {
            if (f.lv?.name === 'root') throw new Error('stop after the served LV');
          },
        }),
      ).rejects.toThrow(/stop after the served LV/);
      expect(existsSync(failAt)).toBe(false);
      expect(await readdir(join(dir, 'run-fail'))).toEqual([]);
    } finally {
      await vda.close();
    }
    expect(await mountsUnder(dir)).toEqual([]);
  });
});
