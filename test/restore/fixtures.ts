// Test disks for file-level restore, built in a temp dir without booting anything: a source
// tree (files with unaligned sizes, names with spaces, symlinks, modes, old times), and raw
// images holding it: a whole-disk ext4, an MBR disk (ext4 + xfs), a GPT disk (ext4 + vfat +
// btrfs). Images stay sparse.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, lstat, mkdir, readdir, readFile, readlink, rm, symlink, truncate, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
export const MiB = 1024 * 1024;

/** Deterministic, offset-patterned content of a given size. */
function content(seed: number, size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 31 + seed * 7 + (i >> 8)) & 0xff;
  return b;
}

/** Builds the source tree that every test disk holds. */
export async function makeSourceTree(root: string): Promise<void> {
  const old = new Date('2021-03-04T05:06:07Z');
  await mkdir(join(root, 'dir with spaces', 'nested dir'), { recursive: true });
  await mkdir(join(root, 'private'), { recursive: true });
  await writeFile(join(root, 'big.bin'), content(1, MiB + 3));
  await writeFile(join(root, 'dir with spaces', 'file name with spaces.txt'), 'hello from a backup\n');
  await writeFile(join(root, 'dir with spaces', 'nested dir', 'odd.bin'), content(2, 65536 * 3 + 511));
  await writeFile(join(root, 'private', 'secret.sh'), '#!/bin/sh\necho secret\n');
  await writeFile(join(root, 'empty'), '');
  await chmod(join(root, 'private', 'secret.sh'), 0o750);
  await chmod(join(root, 'private'), 0o700);
  await chmod(join(root, 'empty'), 0o600);
  await symlink('dir with spaces/file name with spaces.txt', join(root, 'link to file'));
  await symlink('/nonexistent/target', join(root, 'dangling'));
  for (const p of ['big.bin', 'dir with spaces/file name with spaces.txt', 'dir with spaces/nested dir/odd.bin', 'private/secret.sh', 'empty']) {
    await utimes(join(root, p), old, old);
  }
  for (const p of ['dir with spaces/nested dir', 'dir with spaces', 'private']) await utimes(join(root, p), old, old);
}

export interface TreeEntry {
  type: 'file' | 'dir' | 'symlink';
  mode: number;
  mtime: number;
  sha256?: string;
  target?: string;
}

/** A comparable description of a tree: relative path -> type, mode, mtime (s), digest/target. */
export async function describeTree(root: string): Promise<Record<string, TreeEntry>> {
  const out: Record<string, TreeEntry> = {};
  const walk = async (rel: string): Promise<void> => {
    for (const name of (await readdir(join(root, rel))).sort()) {
      if (rel === '' && name === 'lost+found') continue;
      const r = rel ? `${rel}/${name}` : name;
      const p = join(root, r);
      const st = await lstat(p);
      const base = { mode: st.mode & 0o7777, mtime: Math.floor(st.mtimeMs / 1000) };
      if (st.isSymbolicLink()) out[r] = { type: 'symlink', ...base, target: await readlink(p) };
      else if (st.isDirectory()) {
        out[r] = { type: 'dir', ...base };
        await walk(r);
      } else out[r] = { type: 'file', ...base, sha256: createHash('sha256').update(await readFile(p)).digest('hex') };
    }
  };
  await walk('');
  return out;
}

async function sparseFile(path: string, size: number): Promise<void> {
  await writeFile(path, '');
  await truncate(path, size);
}

async function sfdisk(path: string, script: string): Promise<void> {
  const child = execFile('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', path]);
  let err = '';
  child.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  child.stdin!.end(script);
  await new Promise<void>((resolve, reject) =>
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`sfdisk exited ${code}: ${err}`)))),
  );
}

/** Copies a file-system image into a disk image at a byte offset, keeping holes. */
async function placeImage(fsImage: string, disk: string, offset: number): Promise<void> {
  await run('dd', [`if=${fsImage}`, `of=${disk}`, 'bs=1M', `seek=${offset / MiB}`, 'conv=sparse,notrunc', 'status=none']);
  await rm(fsImage);
}

/** A raw disk that is one ext4 file system (no partition table), made with mkfs.ext4 -d. */
export async function makeWholeDiskExt4(path: string, src: string): Promise<void> {
  await run('mkfs.ext4', ['-q', '-F', '-L', 'root', '-d', src, path, '48M']);
  // An unaligned tail after the file system: the disk size is no multiple of 512 or 64 KiB.
  await truncate(path, 48 * MiB + 777);
}

/** MBR: p1 ext4 (40 MiB), p2 xfs (320 MiB, the least xfs accepts is 300 MiB). */
export async function makeMbrDisk(path: string, src: string, work: string): Promise<void> {
  await sparseFile(path, 400 * MiB);
  await sfdisk(path, 'label: dos\nstart=2048,size=40MiB,type=83\nsize=320MiB,type=83\n');
  await run('mkfs.ext4', ['-q', '-F', '-L', 'mbr-root', '-d', src, '-E', `offset=${MiB}`, path, '40M']);
  const xfs = join(work, 'xfs.raw');
  await sparseFile(xfs, 320 * MiB);
  await run('mkfs.xfs', ['-q', '-L', 'srv', xfs]);
  await populateByLoop(xfs, src, join(work, 'xfs-mnt'));
  await placeImage(xfs, path, 41 * MiB);
}

/** GPT: p1 ext4 (32 MiB, named "root fs"), p2 vfat (34 MiB), p3 btrfs (128 MiB). */
export async function makeGptDisk(path: string, src: string, work: string): Promise<void> {
  await sparseFile(path, 200 * MiB);
  await sfdisk(
    path,
    'label: gpt\n' +
      'start=2048,size=32MiB,type=0FC63DAF-8483-4772-8E79-3D69D8477DE4,name="root fs"\n' +
      'size=34MiB,type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B,name=esp\n' +
      'size=128MiB,type=0FC63DAF-8483-4772-8E79-3D69D8477DE4,name=pool\n',
  );
  await run('mkfs.ext4', ['-q', '-F', '-L', 'gpt-root', '-d', src, '-E', `offset=${MiB}`, path, '32M']);
  await run('mkfs.vfat', ['-n', 'ESP', `--offset=${(33 * MiB) / 512}`, path, String((34 * MiB) / 1024)]);
  const btrfs = join(work, 'btrfs.raw');
  await sparseFile(btrfs, 128 * MiB);
  await run('mkfs.btrfs', ['-q', '-L', 'pool', '--rootdir', src, btrfs]);
  await placeImage(btrfs, path, 67 * MiB);
}

async function populateByLoop(image: string, src: string, mnt: string): Promise<void> {
  await mkdir(mnt, { recursive: true });
  await run('mount', ['-o', 'loop', image, mnt]);
  try {
    await run('cp', ['-a', `${src}/.`, mnt]);
  } finally {
    await run('umount', [mnt]);
    await rm(mnt, { recursive: true });
  }
}

/** Mount points in the kernel table under a folder (for leak checks). */
export async function mountsUnder(dir: string): Promise<string[]> {
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  return info
    .split('\n')
    .map((l) => (l.split(' ')[4] ?? '').replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((p) => p === dir || p.startsWith(`${dir}/`));
}
