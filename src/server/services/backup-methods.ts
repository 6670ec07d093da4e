// The server's side of the backup methods (issue 6): the catalog follows the repository after
// transforms (retention removes points, merges and synthetic fulls change their kind); quick
// backups find the one job of a VM; exports are recorded with their expiry; and a periodic sweep
// deletes expired exports and the points of VMs removed from their jobs once their days are over.
import { open, readdir, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { openSharedRepository, type RestorePointInfo } from '../../repository/index.js';
import { findByNameOrId, invalid, newId, notFound, parseJson, type ServiceContext } from './common.js';
import { getRepository } from './infrastructure.js';
import { backupOptionsOf } from './jobs.js';
import type { RestorePoint } from './model.js';
import { recordRestorePoint } from './sessions.js';

const log = logger('backup-methods');

/** Whether a repository folder is on this host (the one-host install's local agent, or none). */
export function isLocalRepository(r: { agent: string | null }): boolean {
  return r.agent === null || r.agent === 'local';
}

/** The catalog's type of a repository point: full, incremental (forward) or reverse. */
const typeOf = (p: RestorePointInfo): RestorePoint['type'] => p.kind;

/** The catalog's state: `corrupt` while the folder's last health check of the point found damage. */
const stateOf = (p: RestorePointInfo): RestorePoint['state'] => (p.damage ? 'corrupt' : 'ready');

/**
 * Makes the catalog's points of one job's VM in one repository equal to `points` (the VM's points
 * as its folder holds them now): adds what is missing, removes what is gone, updates kind, chain
 * and size of what a transform changed. Returns what changed.
 */
export async function syncVmPoints(
  ctx: ServiceContext,
  o: { repositoryId: string; jobId: string | null; job: string; vm: string; points: readonly RestorePointInfo[]; sessionId?: string | null },
): Promise<{ added: string[]; removed: string[]; updated: string[] }> {
  let q = ctx.db.selectFrom('restore_points').selectAll().where('repository_id', '=', o.repositoryId).where('vm', '=', o.vm);
  q = o.jobId === null ? q.where('job_id', 'is', null) : q.where('job_id', '=', o.jobId);
  const known = new Map((await q.execute()).map((r) => [r.id, r]));
  const out = { added: [] as string[], removed: [] as string[], updated: [] as string[] };
  for (const p of o.points) {
    const row = known.get(p.id);
    if (!row) {
      await recordRestorePoint(ctx, {
        id: p.id,
        vm: o.vm,
        disks: p.disks.map((d) => ({ name: d.name, size: d.size })),
        time: p.time.toISOString(),
        type: typeOf(p),
        chainId: p.chainId,
        size: p.fileBytes,
        repositoryId: o.repositoryId,
        jobId: o.jobId,
        sessionId: o.sessionId ?? null,
        state: stateOf(p),
      });
      out.added.push(p.id);
    } else if (row.type !== typeOf(p) || row.chain_id !== p.chainId || Number(row.size) !== p.fileBytes || row.state !== stateOf(p)) {
      await ctx.db.updateTable('restore_points').set({ type: typeOf(p), chain_id: p.chainId, size: p.fileBytes, state: stateOf(p) }).where('id', '=', p.id).execute();
      out.updated.push(p.id);
    }
  }
  const found = new Set(o.points.map((p) => p.id));
  for (const id of known.keys()) {
    if (found.has(id)) continue;
    await ctx.db.deleteFrom('restore_points').where('id', '=', id).execute();
    out.removed.push(id);
  }
  return out;
}

/**
 * The job a quick backup of `vm` runs in: the one job listing it, or `job` when given (which must
 * list it). Refuses with what to do when the VM is in no job or in several.
 */
export async function jobForQuickBackup(ctx: ServiceContext, vm: string, job?: string): Promise<{ id: string; name: string }> {
  if (job !== undefined) {
    const r = await findByNameOrId(ctx, 'jobs', job);
    if (!r) throw notFound('job', job);
    const vms = parseJson<string[]>(r.objects, 'job objects') ?? [];
    if (!vms.includes(vm)) throw invalid('job', `job ${r.name} does not back up VM ${vm} (its VMs: ${vms.join(', ')}): name a job that does, or add the VM to it`);
    return { id: r.id, name: r.name };
  }
  const rows = await ctx.db.selectFrom('jobs').select(['id', 'name', 'objects']).orderBy('name').execute();
  const holding = rows.filter((r) => (parseJson<string[]>(r.objects, 'job objects') ?? []).includes(vm));
  if (holding.length === 0) {
    throw new BulwarkError(`VM ${vm} is in no job: a quick backup continues a job's chain`, {
      kind: 'not-found',
      context: { vm },
      hint: `add it to a job (bulwark job edit NAME --vm … ${vm}), or take a standalone full with: bulwark export ${vm} --repo REPO`,
    });
  }
  if (holding.length > 1) {
    throw new BulwarkError(`VM ${vm} is in ${holding.length} jobs (${holding.map((h) => h.name).join(', ')}): say which chain to continue`, {
      kind: 'invalid',
      context: { vm, field: 'job' },
      hint: `add --job NAME, e.g. bulwark backup quick ${vm} --job ${holding[0]!.name}`,
    });
  }
  return { id: holding[0]!.id, name: holding[0]!.name };
}

/** "30d", "12h", "2w", "90" (days) -> milliseconds. */
export function parseDeleteAfter(text: string): number {
  const m = /^(\d+)\s*([hdw]?)$/i.exec(text.trim());
  if (!m || Number(m[1]) === 0) throw invalid('deleteAfter', `"${text}" is not a duration: write e.g. 30d (days), 12h (hours) or 2w (weeks)`);
  const unit = (m[2] ?? '').toLowerCase();
  const hours = unit === 'h' ? 1 : unit === 'w' ? 24 * 7 : 24;
  return Number(m[1]) * hours * 3600 * 1000;
}

export interface ExportRecord {
  id: string;
  vm: string;
  repository: string;
  folder: string;
  pointId: string;
  encrypted: boolean;
  createdAt: string;
  expiresAt: string | null;
}

/** Records a written export: its point in the catalog (no job) and its expiry. */
export async function recordExport(
  ctx: ServiceContext,
  o: { repository: string; vm: string; folder: string; point: RestorePointInfo; encrypted: boolean; deleteAfterMs?: number | undefined },
): Promise<ExportRecord> {
  const repo = await getRepository(ctx, o.repository);
  await recordRestorePoint(ctx, {
    id: o.point.id,
    vm: o.vm,
    disks: o.point.disks.map((d) => ({ name: d.name, size: d.size })),
    time: o.point.time.toISOString(),
    type: 'full',
    chainId: o.point.chainId,
    size: o.point.fileBytes,
    repositoryId: repo.id,
    jobId: null,
  });
  const now = ctx.clock.now();
  const rec = {
    id: newId(),
    vm: o.vm,
    repository_id: repo.id,
    folder: o.folder,
    point_id: o.point.id,
    encrypted: o.encrypted ? 1 : 0,
    created_at: now.toISOString(),
    expires_at: o.deleteAfterMs === undefined ? null : new Date(now.getTime() + o.deleteAfterMs).toISOString(),
  };
  await ctx.db.insertInto('exports').values(rec).execute();
  return { id: rec.id, vm: rec.vm, repository: repo.name, folder: rec.folder, pointId: rec.point_id, encrypted: o.encrypted, createdAt: rec.created_at, expiresAt: rec.expires_at };
}

/**
 * Deletes an export folder: its chain metadata first (from then on no point exists there), then
 * its backup files and folders. Only `_export-*` folders of the repository root are touched.
 */
export async function deleteExportFolder(repositoryRoot: string, folder: string): Promise<void> {
  if (!/^_export-[^/]+$/.test(folder)) throw new BulwarkError(`${folder} is not an export folder`, { kind: 'invalid', context: { folder } });
  const dir = path.join(repositoryRoot, folder);
  const vms = await readdir(dir, { withFileTypes: true }).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [];
    throw err;
  });
  for (const v of vms) {
    if (!v.isDirectory()) continue;
    for (const f of await readdir(path.join(dir, v.name))) if (f.endsWith('.vbm')) await rm(path.join(dir, v.name, f));
    const h = await open(path.join(dir, v.name), 'r');
    try {
      await h.sync();
    } finally {
      await h.close();
    }
  }
  await rm(dir, { recursive: true, force: true });
}

/** The removed-VM sweep of a job's folder in a repository of another agent (src/server/dispatch); undefined: the repository is this server's. */
export type RemoteVmSweep = (
  repository: { readonly agent: string | null; readonly path: string },
  args: { job: string; method: 'forever-forward' | 'forward' | 'reverse'; vms: readonly string[]; days: number; now: Date },
) => Promise<{ vms: ReadonlyArray<{ vm: string; removedPoints: readonly string[]; points: readonly RestorePointInfo[] }> }> | undefined;

export interface SweepResult {
  exportsDeleted: string[];
  removedVmPoints: string[];
  errors: string[];
}

/**
 * The server's periodic sweep: deletes exports past their expiry, and the restore points of VMs
 * no longer in their job once `removedVmRetentionDays` have passed since their newest point.
 * Work that fails (a folder locked by a running backup) is retried at the next sweep.
 */
export async function sweepExpired(ctx: ServiceContext, opts: { remote?: RemoteVmSweep } = {}): Promise<SweepResult> {
  const now = ctx.clock.now();
  const out: SweepResult = { exportsDeleted: [], removedVmPoints: [], errors: [] };
  const expired = await ctx.db.selectFrom('exports').selectAll().where('expires_at', 'is not', null).where('expires_at', '<=', now.toISOString()).execute();
  for (const e of expired) {
    try {
      const repo = await getRepository(ctx, e.repository_id);
      await deleteExportFolder(repo.path, e.folder);
      await ctx.db.deleteFrom('restore_points').where('id', '=', e.point_id).execute();
      await ctx.db.deleteFrom('exports').where('id', '=', e.id).execute();
      out.exportsDeleted.push(e.folder);
      log.info({ export: e.folder, vm: e.vm, repository: repo.name }, 'expired export deleted');
    } catch (err) {
      out.errors.push(`export ${e.folder}: ${describeError(err)}`);
    }
  }

  const jobs = await ctx.db.selectFrom('jobs').selectAll().execute();
  for (const j of jobs) {
    try {
      const vms = new Set(parseJson<string[]>(j.objects, 'job objects') ?? []);
      const days = backupOptionsOf(j).removedVmRetentionDays;
      const repo = await getRepository(ctx, j.repository_id);
      // A remote agent's folder is swept by that agent; the catalog follows what it reports.
      const remote = isLocalRepository(repo) ? undefined : opts.remote?.(repo, { job: j.name, method: j.method, vms: [...vms], days, now });
      if (remote) {
        for (const v of (await remote).vms) {
          out.removedVmPoints.push(...v.removedPoints);
          await syncVmPoints(ctx, { repositoryId: repo.id, jobId: j.id, job: j.name, vm: v.vm, points: v.points });
          log.info({ job: j.name, vm: v.vm, days, removed: v.removedPoints.length, agent: repo.agent }, 'points of a VM removed from its job deleted');
        }
        continue;
      }
      // Only folders on this host (a remote agent's folder is not here), and only existing ones.
      if (!isLocalRepository(repo) || !(await stat(repo.path).then((st) => st.isDirectory(), () => false))) continue;
      const repository = await openSharedRepository(repo.path);
      const byVm = new Map<string, RestorePointInfo[]>();
      for (const p of await repository.listRestorePoints({ job: j.name })) {
        if (vms.has(p.vm)) continue;
        byVm.set(p.vm, [...(byVm.get(p.vm) ?? []), p]);
      }
      for (const [vm, points] of byVm) {
        const newest = Math.max(...points.map((p) => p.time.getTime()));
        if (newest + days * 86_400_000 > now.getTime()) continue;
        try {
          const report = await repository.applyRetention(j.name, vm, { method: j.method, retention: { days: 0 }, keepLatest: false }, { now });
          out.removedVmPoints.push(...report.removedPoints);
          await syncVmPoints(ctx, { repositoryId: repo.id, jobId: j.id, job: j.name, vm, points: await repository.listRestorePoints({ job: j.name, vm }) });
          log.info({ job: j.name, vm, days, removed: report.removedPoints.length }, 'points of a VM removed from its job deleted');
        } catch (err) {
          out.errors.push(`VM ${vm} of job ${j.name}: ${describeError(err)}`);
        }
      }
    } catch (err) {
      out.errors.push(`job ${j.name}: ${describeError(err)}`);
    }
  }
  for (const e of out.errors) log.warn({ err: e }, 'sweep step failed; retried at the next sweep');
  return out;
}

