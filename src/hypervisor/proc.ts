// Which processes hold something open: a scan of every /proc/PID/fd link, what fuser and lsof do.
// It finds the QEMU behind a QMP socket (the link names the listening socket's inode) and the
// process that still has a VM's disk or variable store open (a restore over a VM that is not off
// is refused), without asking the hypervisor, which may not know the process.
import { readdir, readFile, readlink, realpath } from 'node:fs/promises';
import path from 'node:path';

/** A process holding one of the wanted targets open. */
export interface FdHolder {
  readonly pid: number;
  /** Its command name (/proc/PID/comm), '?' when it could not be read. */
  readonly comm: string;
  /** The /proc/PID/fd link target it holds (the first one found). */
  readonly target: string;
}

export interface FdScanOptions {
  /** Stop at the first holder found. */
  readonly first?: boolean;
  /** Scan the processes whose command name passes this first (the likely holders): a `first` scan ends sooner. */
  readonly prefer?: (comm: string) => boolean;
  /** Leave this process out (it may hold the file itself, e.g. while it restores into it). */
  readonly exceptSelf?: boolean;
}

const readComm = async (pid: string): Promise<string> => (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '?')).trim();

/**
 * Processes with an open descriptor whose /proc link is one of `targets`: absolute real paths of
 * files (symlinks resolved, as the kernel shows them) or `socket:[INODE]`. One entry per process.
 * Processes that end, or whose descriptors this user may not read, during the scan are skipped.
 */
export async function fdHolders(targets: ReadonlySet<string>, o: FdScanOptions = {}): Promise<FdHolder[]> {
  if (targets.size === 0) return [];
  let pids = (await readdir('/proc')).filter((n) => /^\d+$/.test(n));
  if (o.exceptSelf) pids = pids.filter((p) => Number(p) !== process.pid);
  const comms = new Map<string, string>();
  if (o.prefer) {
    const prefer = o.prefer;
    await Promise.all(pids.map(async (p) => comms.set(p, await readComm(p))));
    pids = [...pids.filter((p) => prefer(comms.get(p) ?? '')), ...pids.filter((p) => !prefer(comms.get(p) ?? ''))];
  }
  const out: FdHolder[] = [];
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = await readdir(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
      if (!targets.has(target)) continue;
      out.push({ pid: Number(pid), comm: comms.get(pid) ?? (await readComm(pid)), target });
      if (o.first) return out;
      break;
    }
  }
  return out;
}

/**
 * Processes other than this one that hold one of `files` open, with the file as the caller named
 * it (a path through a symlink matches the file it points to).
 */
export async function processesHolding(files: readonly string[], o: { readonly includeSelf?: boolean } = {}): Promise<{ pid: number; comm: string; file: string }[]> {
  const wanted = new Map<string, string>();
  for (const f of files) wanted.set(await realpath(f).catch(() => path.resolve(f)), f);
  const holders = await fdHolders(new Set(wanted.keys()), { exceptSelf: o.includeSelf !== true });
  return holders.map((h) => ({ pid: h.pid, comm: h.comm, file: wanted.get(h.target) ?? h.target }));
}
