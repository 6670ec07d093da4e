// Durable local file-system primitives the repository is built on: write to a temporary name,
// fsync, rename, fsync the directory; sweep temporaries left by a crash; a per-folder writer lock.
import { randomBytes } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import { link, mkdir, open, readdir, readFile, rename, rm, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';

/** Marker inside temporary names: `<final>.tmp-<pid>-<random>`. */
export const TMP_MARKER = '.tmp-';
const TMP_RE = /\.tmp-(\d+)-[0-9a-f]+$/;

export function temporaryNameFor(finalPath: string): string {
  return `${finalPath}${TMP_MARKER}${process.pid}-${randomBytes(4).toString('hex')}`;
}

/** The pid that wrote a temporary file, or null when `name` is not a temporary. */
export function temporaryOwner(name: string): number | null {
  const m = TMP_RE.exec(name);
  return m ? Number(m[1]) : null;
}

export function processIsAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export async function fsyncDirectory(dir: string): Promise<void> {
  const fh = await open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Makes `tmpPath` durable under `finalPath`: fsync was done by the caller; rename, fsync dir. */
export async function publish(tmpPath: string, finalPath: string): Promise<void> {
  await rename(tmpPath, finalPath);
  await fsyncDirectory(path.dirname(finalPath));
}

/**
 * Writes `data` to `finalPath` atomically and durably (temp, fsync, rename, fsync dir): a crash
 * leaves the old file or the new one, never half of one. `mode` (default 0640) is set exactly,
 * whatever the umask, before the file gets its name (keys are never readable, not even briefly).
 */
export async function writeFileAtomic(finalPath: string, data: Buffer | string, opts: { mode?: number } = {}): Promise<void> {
  const mode = opts.mode ?? 0o640;
  const tmp = temporaryNameFor(finalPath);
  const fh = await open(tmp, 'wx', mode);
  try {
    await fh.writeFile(data);
    await fh.chmod(mode);
    await fh.sync();
  } catch (err) {
    await fh.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  try {
    await publish(tmp, finalPath);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

export async function ensureDirectory(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o750 });
}

/** Removes temporaries in `dir` whose writer process is gone. Returns the names removed. */
export async function sweepTemporaries(dir: string): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await readdir(dir)) {
    const owner = temporaryOwner(name);
    if (owner === null || (owner !== process.pid && processIsAlive(owner))) continue;
    if (owner === process.pid && liveTemporaries.has(path.join(dir, name))) continue;
    await rm(path.join(dir, name), { force: true });
    removed.push(name);
  }
  return removed;
}

/** Temporaries this process is writing right now (never swept by ourselves). */
const liveTemporaries = new Set<string>();
export function trackTemporary(p: string): () => void {
  liveTemporaries.add(p);
  return () => liveTemporaries.delete(p);
}

/**
 * An exclusive lock on a folder held through `<dir>/writer.lock` (O_EXCL, content: pid). A lock
 * left by a dead process is stale and replaced. Returns null when a live process holds it.
 */
export async function tryLockFolder(dir: string): Promise<FolderLock | null> {
  const lockPath = path.join(dir, 'writer.lock');
  // The pid is written to a temporary and hard-linked into place, so a lock file is never seen
  // empty: link() is atomic and fails with EEXIST when the lock is held.
  const tmp = temporaryNameFor(lockPath);
  await writeFile(tmp, String(process.pid), { mode: 0o640 });
  try {
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await link(tmp, lockPath);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        if (await folderIsLocked(dir)) return null;
        await unlink(lockPath).catch(() => undefined); // stale: its process is gone
        continue;
      }
      heldLocks.add(lockPath);
      return {
        path: lockPath,
        release: async () => {
          heldLocks.delete(lockPath);
          await unlink(lockPath).catch(() => undefined);
        },
      };
    }
    return null;
  } finally {
    await unlink(tmp).catch(() => undefined);
  }
}

const heldLocks = new Set<string>();

export interface FolderLock {
  readonly path: string;
  release(): Promise<void>;
}

/** The pid in a lock file, or null if it cannot be read (being written, or garbage). */
export async function readLockHolder(lockPath: string): Promise<number | null> {
  try {
    const n = Number((await readFile(lockPath, 'utf8')).trim());
    return Number.isSafeInteger(n) && n > 0 ? n : null;
  } catch {
    return null;
  }
}

/** True when `dir` has a writer lock held by a live process (other than a stale one). */
export async function folderIsLocked(dir: string): Promise<boolean> {
  const lockPath = path.join(dir, 'writer.lock');
  const holder = await readLockHolder(lockPath);
  if (holder === null) return false; // no lock file, or garbage that cannot name a holder
  if (holder === process.pid) return heldLocks.has(lockPath);
  return processIsAlive(holder);
}
