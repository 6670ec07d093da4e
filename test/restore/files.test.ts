// Guest paths, restore to a folder, vfat without a kernel driver, and the file index, on a
// guest-like disk built without booting: MBR with p1 ext4 root (etc/fstab mounts /srv by LABEL and
// /boot/efi by UUID), p2 ext4 labelled srv holding the test tree, p3 vfat (an ESP, filled with
// mtools). Served through the real mount pipeline (NBD server, nbdfuse, loop; mtools for vfat).
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openFileDisk } from '../../src/disk/file-disk.js';
import type { RandomAccessDisk } from '../../src/disk/types.js';
import { indexEntries, readIndex, searchIndexes, writeIndex, FILE_INDEX_FORMAT, type FileIndexEntry, type FileIndexHeader } from '../../src/restore/catalog/catalog.js';
import { fsName, guestLayout, resolveGuestPath } from '../../src/restore/mount/guest-paths.js';
import { mountDisks, type Mount } from '../../src/restore/mount/mount.js';
import type { PointMount } from '../../src/restore/mount/point-mount.js';
import { restoreFilesToDir } from '../../src/restore/mount/restore-files.js';
import { describeTree, makeSourceTree, MiB, mountsUnder, type TreeEntry } from './fixtures.js';

const run = promisify(execFile);
let dir: string;
let disk: RandomAccessDisk;
let mount: Mount;
let pm: PointMount;
let sourceTree: Record<string, TreeEntry>;
const ESP_UUID = '1234-ABCD';

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bulwark-files-'));
  const src = join(dir, 'src');
  const root = join(dir, 'root');
  await mkdir(src);
  await makeSourceTree(src);
  sourceTree = await describeTree(src);
  for (const d of ['etc', 'bin', 'srv', 'boot/efi', 'home/u/My Docs']) await mkdir(join(root, d), { recursive: true });
  await writeFile(join(root, 'etc/hostname'), 'guest-01\n');
  await writeFile(join(root, 'home/u/My Docs/letter.txt'), 'dear reader\n');
  await writeFile(join(root, 'etc/fstab'), `# a guest fstab\nLABEL=root / ext4 defaults 0 1\nLABEL=srv /srv ext4 defaults 0 2\nUUID=${ESP_UUID.toLowerCase()} /boot/efi vfat umask=0077 0 1\n/dev/vda9 /data ext4 defaults 0 2\n/dev/vdz1 none swap sw 0 0\n`);
  const image = join(dir, 'disk.raw');
  await writeFile(image, '');
  await truncate(image, 128 * MiB);
  const sf = execFile('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', image]);
  sf.stdin!.end('label: dos\nstart=2048,size=40MiB,type=83\nsize=40MiB,type=83\nsize=40MiB,type=ef\n');
  await new Promise((r) => sf.on('exit', r));
  await run('mkfs.ext4', ['-q', '-F', '-L', 'root', '-d', root, '-E', `offset=${MiB}`, image, '40M']);
  await run('mkfs.ext4', ['-q', '-F', '-L', 'srv', '-d', src, '-E', `offset=${41 * MiB}`, image, '40M']);
  await run('mkfs.vfat', ['-n', 'ESP', '-i', ESP_UUID.replace('-', ''), `--offset=${(81 * MiB) / 512}`, image, String((40 * MiB) / 1024)]);
  await run('mcopy', ['-s', '-p', '-m', '-i', `${image}@@${81 * MiB}`, join(src, 'dir with spaces'), '::/'], { env: { ...process.env, MTOOLS_SKIP_CHECK: '1' } });
  disk = await openFileDisk(image);
  mount = await mountDisks([{ name: 'vda', disk }], { at: join(dir, 'at'), runDir: join(dir, 'run') });
  pm = { point: { id: 'p1', vm: 'guest-01', time: new Date('2026-11-25T10:00:00Z') } as PointMount['point'], mount, layout: await guestLayout(mount.filesystems), close: () => mount.unmount() };
}, 120_000);

afterAll(async () => {
  await mount?.unmount();
  await disk?.close();
  const leaked = await mountsUnder(dir);
  for (const p of leaked.reverse()) await run('umount', ['-l', p]).catch(() => undefined);
  await rm(dir, { recursive: true, force: true });
  expect(leaked).toEqual([]);
});

describe('guest paths on a mounted restore point', () => {
  it('finds the root and places the other file systems by the guest fstab (LABEL, UUID)', () => {
    expect(mount.filesystems.map((f) => [fsName(f), f.type, f.label ?? null])).toEqual([
      ['vda1', 'ext4', 'root'],
      ['vda2', 'ext4', 'srv'],
      ['vda3', 'vfat', 'ESP'],
    ]);
    expect(pm.layout.root && fsName(pm.layout.root)).toBe('vda1');
    expect(pm.layout.mounts.map((m) => [m.mountpoint, fsName(m.fs)])).toEqual([
      ['/boot/efi', 'vda3'],
      ['/srv', 'vda2'],
      ['/', 'vda1'],
    ]);
    expect(pm.layout.notes).toEqual(['fstab: /dev/vda9 on /data matches no file system of this restore point']);
    const r = (p: string) => {
      const x = resolveGuestPath(pm.layout, mount.filesystems, p);
      return [fsName(x.fs), x.inside, x.guestPath];
    };
    expect(r('/etc/hostname')).toEqual(['vda1', '/etc/hostname', '/etc/hostname']);
    expect(r('/srv/dir with spaces')).toEqual(['vda2', '/dir with spaces', '/srv/dir with spaces']);
    expect(r('/srv')).toEqual(['vda2', '/', '/srv']);
    expect(r('/srvx/a')).toEqual(['vda1', '/srvx/a', '/srvx/a']);
    expect(r('/boot/efi/dir with spaces')).toEqual(['vda3', '/dir with spaces', '/boot/efi/dir with spaces']);
    expect(r('vda2:/private/../big.bin')).toEqual(['vda2', '/big.bin', '/srv/big.bin']);
    expect(() => r('vdb1:/x')).toThrow(/no mounted file system vdb1/);
    expect(() => r('etc/hostname')).toThrow(/starts with \//);
  });

  it('copies files and folders out by guest path: contents, modes, times, links, spaces; vfat through mtools', async () => {
    const out = join(dir, 'out');
    const report = await restoreFilesToDir(pm, ['/srv/dir with spaces', '/srv/private', '/srv/link to file', '/srv/dangling', '/home/u/My Docs', '/etc/hostname'], out);
    expect(report.items.map((i) => [i.filesystem, i.to])).toEqual([
      ['vda2', join(out, 'dir with spaces')],
      ['vda2', join(out, 'private')],
      ['vda2', join(out, 'link to file')],
      ['vda2', join(out, 'dangling')],
      ['vda1', join(out, 'My Docs')],
      ['vda1', join(out, 'hostname')],
    ]);
    const got = await describeTree(out);
    for (const k of Object.keys(sourceTree).filter((k) => /^(dir with spaces|private|link to file|dangling)/.test(k))) expect(got[k], k).toEqual(sourceTree[k]);
    expect(await readFile(join(out, 'My Docs', 'letter.txt'), 'utf8')).toBe('dear reader\n');
    expect(await readFile(join(out, 'hostname'), 'utf8')).toBe('guest-01\n');
    await expect(restoreFilesToDir(pm, ['/etc/hostname'], out)).rejects.toThrow(/exists|EEXIST/);
    await expect(restoreFilesToDir(pm, ['/etc/nothing-here'], out)).rejects.toThrow(/\/etc\/nothing-here does not exist in the restore point/);

    // vfat: file contents and file times kept (mtools), shown read-only.
    const esp = join(dir, 'out-esp');
    await restoreFilesToDir(pm, ['/boot/efi/dir with spaces'], esp);
    const e = await describeTree(esp);
    const name = 'dir with spaces/file name with spaces.txt';
    expect(e[name]?.sha256).toBe(sourceTree[name]!.sha256);
    // FAT keeps modification times in 2-second steps.
    expect(Math.abs(e[name]!.mtime - sourceTree[name]!.mtime)).toBeLessThanOrEqual(2);
    expect(e['dir with spaces/nested dir/odd.bin']?.sha256).toBe(sourceTree['dir with spaces/nested dir/odd.bin']!.sha256);
    await expect(run('touch', [join(mount.filesystems[2]!.path, 'x')])).rejects.toThrow(/Read-only/);
  });
});

describe('guest file index', () => {
  it('lists every file system by guest path, round-trips through the index file, and search names the points of each version', async () => {
    const entries: FileIndexEntry[] = [];
    for await (const e of indexEntries(pm)) entries.push(e);
    const byPath = new Map(entries.map((e) => [e.p, e]));
    expect(byPath.get('/etc/hostname')).toMatchObject({ t: 'f', s: 9 });
    expect(byPath.get('/srv/dir with spaces/nested dir/odd.bin')).toMatchObject({ t: 'f', s: 65536 * 3 + 511, m: sourceTree['dir with spaces/nested dir/odd.bin']!.mtime });
    expect(byPath.get('/srv/link to file')?.t).toBe('l');
    expect(byPath.get('/boot/efi/dir with spaces/file name with spaces.txt')?.t).toBe('f');
    expect(byPath.get('/home/u/My Docs')?.t).toBe('d');

    // Three points: the file changes in the third; the second has no index at all.
    const header = (id: string, time: string): FileIndexHeader => ({ format: FILE_INDEX_FORMAT, point: id, job: 'j', vm: 'guest-01', pointTime: time, created: time, filesystems: [], skipped: [] });
    const files = [join(dir, 'p1.files.gz'), join(dir, 'p2.files.gz'), join(dir, 'p3.files.gz'), join(dir, 'p4.files.gz')];
    expect(await writeIndex(files[0]!, header('p1', '2026-11-01T00:00:00.000Z'), entries)).toBe(entries.length);
    await writeIndex(files[1]!, header('p2', '2026-11-02T00:00:00.000Z'), entries);
    await writeIndex(files[2]!, header('p3', '2026-11-03T00:00:00.000Z'), entries.map((e) => (e.p === '/etc/hostname' ? { ...e, s: 20, m: e.m + 60 } : e)));
    let n = 0;
    expect((await readIndex(files[0]!, () => n++)).point).toBe('p1');
    expect(n).toBe(entries.length);

    const points = [
      { id: 'p3', time: '2026-11-03T00:00:00.000Z', vm: 'guest-01', indexFile: files[2]! },
      { id: 'p1', time: '2026-11-01T00:00:00.000Z', vm: 'guest-01', indexFile: files[0]! },
      { id: 'p2', time: '2026-11-02T00:00:00.000Z', vm: 'guest-01', indexFile: files[1]! },
      { id: 'p4', time: '2026-11-04T00:00:00.000Z', vm: 'guest-01', indexFile: files[3]! },
    ];
    const r = await searchIndexes(points, 'HOST*');
    expect(r.matches.map((m) => [m.path, m.versions.map((v) => [v.size, v.points.map((p) => p.id)])])).toEqual([['/etc/hostname', [[9, ['p1', 'p2']], [20, ['p3']]]]]);
    expect(r.pointsSearched).toBe(3);
    expect(r.pointsWithoutIndex.map((p) => [p.id, p.reason])).toEqual([['p4', 'no file index (indexing was off or failed)']]);
    expect((await searchIndexes(points, '/srv/dir with spaces/*/*.bin')).matches.map((m) => m.path)).toEqual(['/srv/dir with spaces/nested dir/odd.bin']);
    expect((await searchIndexes(points, '*.txt', { limit: 1 })).truncated).toBe(true);

    // A truncated index is reported, not half-read.
    const gz = await readFile(files[0]!);
    await writeFile(files[3]!, gz.subarray(0, Math.floor(gz.length / 2)));
    const damaged = await searchIndexes(points, 'hostname');
    expect(damaged.pointsWithoutIndex.map((p) => p.id)).toEqual(['p4']);
    expect(damaged.pointsWithoutIndex[0]!.reason).toMatch(/p4\.files\.gz/);
  });
});
