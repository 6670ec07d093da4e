// Durable local file-system primitives the repository is built on: write to a temporary name,
// fsync, rename, fsync the directory; sweep temporaries left by a crash; a per-folder writer lock.
import { randomBytes } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import { spawn } from 'node:child_process';
import { mkdir, open, readdir, readFile, rename, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import path from 'node:path';
import { BulwarkError } from '../common/errors.js';
import { logger } from '../common/log.js';

const log = logger('local-fs');

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
 * An exclusive lock on a folder: flock(2) on `<dir>/writer.lock` (docs/formats/backup-files.md
 * section 2). The kernel holds it for a small `flock` helper process whose stdin is a pipe from
 * this process: when this process ends in any way (even SIGKILL) the pipe closes, the helper
 * exits and the kernel drops the lock. So a lock is never stale, pid reuse cannot fake a holder,
 * and of two processes racing for a free lock exactly one wins. Node has no flock() of its own.
 * The file itself stays (deleting a flock'ed file would let two holders lock two inodes); while
 * held it names its holder (pid, boot id, process start time, host) for humans and `inspect`.
 * Returns null when another holder (another process, or another lock in this one) has it.
 */
export async function tryLockFolder(dir: string): Promise<FolderLock | null> {
  const lockPath = path.join(dir, 'writer.lock');
  // flock(1) creates the file if needed, takes the lock without waiting (exit 75 when held),
  // says so on stdout, then holds it until its stdin ends.
  const helper = spawn('flock', ['--nonblock', '--conflict-exit-code', String(LOCK_BUSY), lockPath, 'sh', '-c', 'echo locked; exec cat >/dev/null'], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  helper.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => helper.once('close', (code) => resolve(code)));
  const spawned = await new Promise<'locked' | 'ended' | Error>((resolve) => {
    helper.once('error', (err) => resolve(err));
    helper.stdout.once('data', () => resolve('locked'));
    void exited.then(() => resolve('ended'));
  });
  if (spawned instanceof Error) {
    throw new BulwarkError(`cannot lock folder ${dir}: cannot run flock: ${spawned.message}`, { kind: 'unavailable', context: { folder: dir }, cause: spawned, hint: 'install util-linux (flock)' });
  }
  if (spawned === 'ended') {
    const code = await exited;
    if (code === LOCK_BUSY) return null;
    throw new BulwarkError(`cannot lock folder ${dir}: flock exited with ${code}: ${stderr.trim()}`, { kind: 'unavailable', context: { folder: dir, file: lockPath } });
  }
  // Held. The helper must not keep this process alive, nor outlive it.
  const handles = [helper, helper.stdin, helper.stdout, helper.stderr] as unknown as { ref?: () => void; unref?: () => void }[];
  for (const h of handles) h.unref?.();
  helper.stdin.on('error', () => undefined);
  let released = false;
  void exited.then((code) => {
    if (!released) log.error({ folder: dir, code }, 'the flock helper holding a folder lock ended: the lock is lost');
  });
  try {
    await writeFile(lockPath, `${await describeHolder()}\n`, { mode: 0o640 });
  } catch (err) {
    released = true;
    helper.stdin.end();
    await exited;
    throw err;
  }
  return {
    path: lockPath,
    release: async () => {
      if (released) return;
      released = true;
      // Emptied while still held: an empty lock file names no holder.
      await truncate(lockPath, 0).catch(() => undefined);
      // Waiting for the helper to end must keep this process alive until the lock is dropped.
      for (const h of handles) h.ref?.();
      helper.stdin.end();
      await exited;
    },
  };
}

const LOCK_BUSY = 75;

export interface FolderLock {
  readonly path: string;
  release(): Promise<void>;
}

/** Who holds a lock, as written into writer.lock. */
export interface LockHolder {
  readonly pid: number;
  readonly bootId: string;
  /** Process start time in clock ticks since boot (/proc/PID/stat field 22). */
  readonly startTicks: number;
  readonly host: string;
}

async function describeHolder(): Promise<string> {
  const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8').catch(() => 'unknown')).trim();
  return `pid=${process.pid} boot=${bootId} start=${await processStartTicks(process.pid)} host=${hostname()}`;
}

/** Start time of a process in clock ticks since boot, or -1 when it cannot be read. */
async function processStartTicks(pid: number): Promise<number> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces and parentheses): state is field 3.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[19]);
  } catch {
    return -1;
  }
}

/** The holder named in a lock file, or null (free, or written by an older Bulwark: a bare pid). */
export async function readLockHolder(lockPath: string): Promise<LockHolder | null> {
  try {
    const text = (await readFile(lockPath, 'utf8')).trim();
    const m = /^pid=(\d+) boot=(\S+) start=(-?\d+) host=(\S*)$/.exec(text);
    return m ? { pid: Number(m[1]), bootId: m[2]!, startTicks: Number(m[3]), host: m[4]! } : null;
  } catch {
    return null;
  }
}

/**
 * True when `dir`'s writer lock is held by some process (this one included). Looks at the
 * kernel's lock table, so it never takes the lock itself, not even briefly.
 */
export async function folderIsLocked(dir: string): Promise<boolean> {
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(path.join(dir, 'writer.lock'));
  } catch {
    return false;
  }
  const dev = Number(st.dev);
  const major = ((dev >> 8) & 0xfff) | (Math.floor(dev / 2 ** 32) & ~0xfff);
  const minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
  const id = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino}`;
  const table = await readFile('/proc/locks', 'utf8');
  return table.split('\n').some((line) => line.includes(' FLOCK ') && line.split(/\s+/).includes(id));
}
