// Copies files and folders out of a mounted restore point: regular files, directories and
// symlinks (kept as links, target verbatim), with permission bits, times and (as root) owners.
// Directory times are set after their contents, or copying children would change them again.
// Devices, FIFOs and sockets are reported as skipped, never recreated.
import { createReadStream, createWriteStream } from 'node:fs';
import { chmod, lchown, lstat, lutimes, mkdir, readdir, readlink, rm, symlink, utimes } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { BulwarkError } from '../../common/errors.js';

export interface CopyReport {
  files: number;
  directories: number;
  symlinks: number;
  bytes: number;
  /** Paths not copied, with the reason (special files). */
  skipped: Array<{ path: string; reason: string }>;
}

export interface CopyOptions {
  /** Replace files that exist at the destination (default false: fail on the first one). */
  readonly overwrite?: boolean;
}

/**
 * Copies each source (file, folder or symlink) into `toDir`, under its own base name.
 * `toDir` is created if missing.
 */
export async function copyOut(sources: readonly string[], toDir: string, options: CopyOptions = {}): Promise<CopyReport> {
  const report: CopyReport = { files: 0, directories: 0, symlinks: 0, bytes: 0, skipped: [] };
  await mkdir(toDir, { recursive: true });
  const asRoot = process.getuid?.() === 0;
  for (const src of sources) {
    await copyEntry(src, join(toDir, basename(src)), report, asRoot, options.overwrite ?? false);
  }
  return report;
}

/**
 * Makes way at `dest` for an entry of the restore point, never through a link: a folder goes into
 * an existing folder (merged); anything else already there (a file, or a link a guest's earlier
 * restore into the same folder put there, which may point anywhere on this host) is a conflict, or
 * with `overwrite` is removed itself (the link, not what it points at). A folder in the way of a
 * file or link is a conflict even with `overwrite` (its contents are not the restore's to drop).
 */
async function clearDestination(dest: string, isDirectory: boolean, overwrite: boolean): Promise<void> {
  let there;
  try {
    there = await lstat(dest);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (isDirectory && there.isDirectory()) return;
  const what = there.isSymbolicLink() ? 'a link' : there.isDirectory() ? 'a folder' : 'a file';
  if (!overwrite || there.isDirectory()) {
    throw new BulwarkError(`${dest} already exists (${what})`, {
      kind: 'conflict',
      context: { to: dest },
      hint: there.isDirectory() ? 'restore to another folder, or remove that folder first' : 'restore to another folder, or allow overwriting (--overwrite)',
    });
  }
  await rm(dest);
}

async function copyEntry(src: string, dest: string, report: CopyReport, asRoot: boolean, overwrite: boolean): Promise<void> {
  let st;
  try {
    st = await lstat(src);
  } catch (cause) {
    throw new BulwarkError(`cannot read ${src} in the restore point`, { kind: 'not-found', context: { path: src }, cause });
  }
  try {
    await clearDestination(dest, st.isDirectory(), overwrite);
    if (st.isSymbolicLink()) {
      const target = await readlink(src);
      await symlink(target, dest);
      if (asRoot) await lchown(dest, st.uid, st.gid);
      await lutimes(dest, st.atime, st.mtime);
      report.symlinks++;
    } else if (st.isDirectory()) {
      await mkdir(dest, { recursive: true });
      for (const name of await readdir(src)) await copyEntry(join(src, name), join(dest, name), report, asRoot, overwrite);
      if (asRoot) await lchown(dest, st.uid, st.gid);
      await chmod(dest, st.mode & 0o7777);
      await utimes(dest, st.atime, st.mtime);
      report.directories++;
    } else if (st.isFile()) {
      const copied = await copyContents(src, dest);
      if (copied !== st.size) {
        throw new BulwarkError(`${src} gave ${copied} bytes, but it is ${st.size} bytes long`, { kind: 'corrupt', context: { path: src, to: dest } });
      }
      // chown first: it clears set-id bits, which chmod then restores.
      if (asRoot) await lchown(dest, st.uid, st.gid);
      await chmod(dest, st.mode & 0o7777);
      await utimes(dest, st.atime, st.mtime);
      report.files++;
      report.bytes += st.size;
    } else {
      report.skipped.push({ path: src, reason: 'special file (device, FIFO or socket) not copied' });
    }
  } catch (cause) {
    if (cause instanceof BulwarkError) throw cause;
    if ((cause as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new BulwarkError(`${dest} already exists`, { kind: 'conflict', context: { path: src, to: dest }, cause, hint: 'restore to another folder, or allow overwriting (--overwrite)' });
    }
    throw new BulwarkError(`cannot copy ${src} to ${dest}`, { context: { path: src, to: dest }, cause });
  }
}

/**
 * Copies a file's bytes with plain reads and writes, returning the bytes copied. Not fs.copyFile:
 * when the source fails a read partway (EIO from a damaged block of the restore point), libuv's
 * copy_file_range falls back to a read/write copy that starts again at the chunk's first byte while
 * the destination's position has moved on, and reports success for a file that holds the wrong
 * bytes (seen on Node 20 with an ext4 point read through NBD and FUSE). Here every read error fails
 * the copy, and the partial file is removed.
 */
async function copyContents(src: string, dest: string): Promise<number> {
  let bytes = 0;
  const count = new Transform({
    transform(chunk: Buffer, _enc, done) {
      bytes += chunk.length;
      done(null, chunk);
    },
  });
  // Always a new file (O_EXCL): clearDestination removed what was there, and an exclusive create
  // never follows a link that appeared since.
  const out = createWriteStream(dest, { flags: 'wx', mode: 0o600 });
  let opened = false;
  out.once('open', () => (opened = true));
  try {
    await pipeline(createReadStream(src, { highWaterMark: 1 << 20 }), count, out);
  } catch (err) {
    // A partial file must not pass for the restored one.
    if (opened) await rm(dest, { force: true });
    throw err;
  }
  return bytes;
}
