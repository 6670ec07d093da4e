// `restore files`: copies guest paths out of a mounted restore point, either to a folder on this
// host (copyOut: modes, times, symlinks, owners as root) or back into the running original VM
// through its guest agent (guest-file-open/write for contents; one guest shell script per batch
// for folders, symlinks, modes, owners and times, which the file API cannot set).
import { randomUUID } from 'node:crypto';
import { lstat, open, readdir, readlink, realpath } from 'node:fs/promises';
import { dirname, join, posix } from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { GuestAgent } from '../../hypervisor/qga/guest-agent.js';
import type { CopyReport } from './copy-out.js';
import { damagedRead, type Mount } from './mount.js';
import { resolveGuestPath, fsName, type ResolvedGuestPath } from './guest-paths.js';
import type { PointIdentity, PointMount } from './point-mount.js';

const log = logger('restore-files');

export type GuestConflict = 'overwrite' | 'keep-both' | 'fail';

export interface RestoredItem {
  /** As asked (`/etc/hostname`, `vdb2:/srv`). */
  readonly path: string;
  /** File system it came from (`vda`, `vdb2`) and the path inside it. */
  readonly filesystem: string;
  readonly inside: string;
  /** Where it was written: a host path (--to) or a guest path (--to-guest). */
  readonly to: string;
}

export interface RestoreFilesResult extends CopyReport {
  readonly items: RestoredItem[];
}

function resolveAll(m: PointMount<PointIdentity>, paths: readonly string[]): ResolvedGuestPath[] {
  if (paths.length === 0) throw new BulwarkError('no path to restore was given', { kind: 'invalid', hint: 'name one or more guest paths with --path' });
  return paths.map((p) => resolveGuestPath(m.layout, m.mount.filesystems, p, m.mount.volumes));
}

/** Copies guest paths into a host folder, each under its own name. */
export async function restoreFilesToDir(m: PointMount<PointIdentity>, paths: readonly string[], toDir: string, opts: { overwrite?: boolean } = {}): Promise<RestoreFilesResult> {
  const resolved = resolveAll(m, paths);
  for (const r of resolved) await assertExists(r, m.mount);
  const report = await m.mount.copyOut(
    resolved.map((r) => r.hostPath),
    toDir,
    { overwrite: opts.overwrite ?? false },
  );
  const items = resolved.map((r) => ({ path: r.spec, filesystem: fsName(r.fs), inside: r.inside, to: join(toDir, posix.basename(r.inside) || fsName(r.fs)) }));
  return { ...report, items };
}

/**
 * The path's folders must stay inside its file system on this host: a guest link on the way
 * (srv/data -> /etc) is followed by this host's kernel, to this host's /etc, which the server
 * would then copy out as root. A link as the last component is fine: it is copied as a link.
 */
async function assertInside(r: ResolvedGuestPath): Promise<void> {
  const root = await realpath(r.fs.path);
  const parent = await realpath(dirname(r.hostPath));
  if (parent !== root && !parent.startsWith(`${root}/`)) {
    throw new BulwarkError(`${r.spec} passes through a link in the guest that points outside its file system (${fsName(r.fs)} at ${r.inside}): the link would be followed on this host`, {
      kind: 'invalid',
      context: { path: r.spec, filesystem: fsName(r.fs) },
      hint: 'name the path the link points to inside the guest instead (mount the point to look at the link), or restore the link itself',
    });
  }
}

/** Only a path that is not there is "does not exist": a read the backup cannot answer says so (EIO). */
async function assertExists(r: ResolvedGuestPath, mount: Pick<Mount, 'at' | 'readFailures'>): Promise<void> {
  try {
    await lstat(r.hostPath);
    await assertInside(r);
  } catch (err) {
    if (err instanceof BulwarkError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new BulwarkError(`${r.spec} does not exist in the restore point (looked in ${fsName(r.fs)} at ${r.inside})`, {
        kind: 'not-found',
        context: { path: r.spec, filesystem: fsName(r.fs) },
      });
    }
    throw damagedRead(err, mount, r.spec) ?? new BulwarkError(`${r.spec} cannot be read in the restore point (${fsName(r.fs)} at ${r.inside}): ${describeError(err)}`, {
      context: { path: r.spec, filesystem: fsName(r.fs) },
      cause: err,
    });
  }
}

/** Shell single-quoting. */
export function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Runs shell lines in the guest in batches (a guest-exec argument stays well under 128 KiB). */
async function runGuestScript(qga: GuestAgent, lines: readonly string[], what: string): Promise<string> {
  let out = '';
  let batch: string[] = [];
  let size = 0;
  const flush = async (): Promise<void> => {
    if (batch.length === 0) return;
    const script = `set -e\n${batch.join('\n')}\n`;
    batch = [];
    size = 0;
    const r = await qga.exec('/bin/sh', ['-c', script], { timeoutMs: 120_000 });
    if (r.exitCode !== 0) {
      throw new BulwarkError(`${what} in the guest failed (exit ${r.exitCode}): ${r.stderr.toString('utf8').trim() || r.stdout.toString('utf8').trim()}`, { kind: 'internal' });
    }
    out += r.stdout.toString('utf8');
  };
  for (const l of lines) {
    if (size + l.length > 60_000) await flush();
    batch.push(l);
    size += l.length + 1;
  }
  await flush();
  return out;
}

/** The name a restored item gets beside an existing one (keep-both): `name.restored-<point time>`. */
export function keepBothName(guestPath: string, pointTime: Date, n = 0): string {
  const stamp = pointTime.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  return `${guestPath}.restored-${stamp}${n > 0 ? `-${n}` : ''}`;
}

interface GuestPlan {
  pre: string[];
  /** Each file is written to `tmp` beside its place and moved there in `post` (never half-written in place). */
  files: Array<{ host: string; guest: string; tmp: string; size: number }>;
  post: string[];
  report: CopyReport;
}

async function planEntry(host: string, guest: string, plan: GuestPlan): Promise<void> {
  const st = await lstat(host);
  const meta = [`chown -h ${st.uid}:${st.gid} ${shq(guest)}`];
  const time = `touch -h -d @${Math.floor(st.mtimeMs / 1000)} ${shq(guest)}`;
  if (st.isSymbolicLink()) {
    plan.post.push(`rm -rf ${shq(guest)}`, `ln -s ${shq(await readlink(host))} ${shq(guest)}`, ...meta, time);
    plan.report.symlinks++;
  } else if (st.isDirectory()) {
    plan.pre.push(`if [ -L ${shq(guest)} ] || { [ -e ${shq(guest)} ] && [ ! -d ${shq(guest)} ]; }; then rm -f ${shq(guest)}; fi`, `mkdir -p ${shq(guest)}`);
    for (const name of (await readdir(host)).sort()) await planEntry(join(host, name), posix.join(guest, name), plan);
    // Folders last (after their contents), deepest first, so writing children does not change their times.
    plan.post.push(...meta, `chmod ${(st.mode & 0o7777).toString(8)} ${shq(guest)}`, time);
    plan.report.directories++;
  } else if (st.isFile()) {
    // Written beside its place first: a copy that fails halfway (a damaged block of the point, the
    // agent timing out) leaves the guest's own file as it was, not truncated or half-restored.
    const tmp = posix.join(posix.dirname(guest), `.${posix.basename(guest)}.bulwark-restore-${randomUUID().slice(0, 8)}`);
    plan.files.push({ host, guest, tmp, size: st.size });
    // chown before chmod: chown clears set-id bits.
    plan.post.push(
      `if [ -L ${shq(guest)} ] || [ -d ${shq(guest)} ]; then rm -rf ${shq(guest)}; fi`,
      `mv -f ${shq(tmp)} ${shq(guest)}`,
      ...meta,
      `chmod ${(st.mode & 0o7777).toString(8)} ${shq(guest)}`,
      time,
    );
    plan.report.files++;
    plan.report.bytes += st.size;
  } else {
    plan.report.skipped.push({ path: guest, reason: 'special file (device, FIFO or socket) not restored' });
  }
}

/**
 * Writes guest paths of the restore point back into the running VM at their original guest
 * paths. `conflict`: overwrite (replace files, merge folders), keep-both (an existing item stays;
 * the restored one is written beside it as `NAME.restored-<point time>`), fail (default).
 */
export async function restoreFilesToGuest(
  m: PointMount<PointIdentity>,
  paths: readonly string[],
  qga: GuestAgent,
  opts: { conflict?: GuestConflict } = {},
): Promise<RestoreFilesResult> {
  const conflict = opts.conflict ?? 'fail';
  const resolved = resolveAll(m, paths);
  for (const r of resolved) {
    await assertExists(r, m.mount);
    if (r.guestPath === '/') throw new BulwarkError(`${r.spec}: restoring a whole root file system into the running guest is refused`, { kind: 'invalid', hint: 'restore the disk or the VM instead, or name folders inside it' });
  }
  // Which targets exist in the guest now (one round trip).
  const probe = (p: string): string => `if [ -e ${shq(p)} ] || [ -L ${shq(p)} ]; then printf '%s\\0' ${shq(p)}; fi`;
  const candidates = resolved.flatMap((r) => [r.guestPath, ...[0, 1, 2, 3].map((n) => keepBothName(r.guestPath, m.point.time, n))]);
  const existing = new Set((await runGuestScript(qga, candidates.map(probe), 'checking what exists')).split('\0').filter(Boolean));
  const items: RestoredItem[] = [];
  const plan: GuestPlan = { pre: [], files: [], post: [], report: { files: 0, directories: 0, symlinks: 0, bytes: 0, skipped: [] } };
  for (const r of resolved) {
    let dest = r.guestPath;
    if (existing.has(dest)) {
      if (conflict === 'fail') {
        throw new BulwarkError(`${dest} exists in the guest`, { kind: 'conflict', context: { path: dest }, hint: 'choose --conflict overwrite or --conflict keep-both' });
      }
      if (conflict === 'keep-both') {
        const free = [0, 1, 2, 3].map((n) => keepBothName(r.guestPath, m.point.time, n)).find((c) => !existing.has(c));
        if (!free) throw new BulwarkError(`${dest} was restored beside itself too often already`, { kind: 'conflict', context: { path: dest } });
        dest = free;
      }
    }
    plan.pre.push(`mkdir -p ${shq(posix.dirname(dest))}`);
    await planEntry(r.hostPath, dest, plan).catch((err: unknown) => {
      throw damagedRead(err, m.mount, r.spec) ?? err;
    });
    items.push({ path: r.spec, filesystem: fsName(r.fs), inside: r.inside, to: dest });
  }
  await runGuestScript(qga, plan.pre, 'creating folders');
  try {
    for (const f of plan.files) {
      await writeGuestFile(qga, f.host, f.tmp, f.guest).catch((err: unknown) => {
        throw damagedRead(err, m.mount, f.guest) ?? err;
      });
    }
  } catch (err) {
    // Nothing of the guest's own was replaced yet: take the copies written so far away again.
    await runGuestScript(qga, plan.files.map((f) => `rm -f ${shq(f.tmp)}`), 'removing the partial copies').catch((cleanup: unknown) =>
      log.warn({ vm: m.point.vm, err: describeError(cleanup) }, 'partial copies in the guest could not be removed'),
    );
    throw err;
  }
  await runGuestScript(qga, plan.post, 'moving the files into place, setting links, owners, modes and times');
  log.info({ point: m.point.id, vm: m.point.vm, items: items.map((i) => i.to), files: plan.report.files, bytes: plan.report.bytes }, 'files restored into the guest');
  return { ...plan.report, items };
}

/** Streams one host file into the guest file `to` with guest-file-open/write (created or truncated), in the channel's largest writes; `guest` names it in errors. */
async function writeGuestFile(qga: GuestAgent, host: string, to: string, guest: string): Promise<void> {
  const h = await qga.fileOpen(to, 'w');
  const src = await open(host, 'r');
  try {
    const chunk = qga.maxWriteBytes;
    const buf = Buffer.alloc(chunk);
    let pos = 0;
    for (;;) {
      const { bytesRead } = await src.read(buf, 0, chunk, pos);
      if (bytesRead === 0) break;
      const n = await qga.fileWrite(h, buf.subarray(0, bytesRead));
      if (n !== bytesRead) throw new BulwarkError(`short write to guest file ${guest}: ${n} of ${bytesRead} bytes at ${pos}`, { context: { path: guest, offset: pos } });
      pos += bytesRead;
    }
    await qga.execute('guest-file-flush', { handle: h });
  } catch (err) {
    throw new BulwarkError(`cannot write ${guest} in the guest`, { context: { path: guest }, cause: err });
  } finally {
    await src.close();
    await qga.fileClose(h).catch(() => undefined);
  }
}

