// The chain decisions around one VM's backup, wherever the repository folder is: the one-host
// executor (executor.ts) calls them in process, the repository agent of a remote repository
// (agent/remote/task-runner.ts) calls them for the server's backup-target and health-check tasks.
// "Before" plans what this run writes (full, incremental, synthetic full, reverse injection) and
// which blocks a health check found damaged must be re-read from the source; "after" builds the
// synthetic full, applies retention, and compacts and health-checks on their days. Every step is a
// line in the session log; a failed step after the commit is a warning (the new point is kept).
import { BulwarkError, describeError } from '../../common/errors.js';
import { ALL_VMS, planRetention, splitAllVmsDiskName, type BackupMethod, type PendingRepair, type Repository, type RestorePointInfo, type RetentionAction, type RunPlan, type TransformProgress, type TransformStep } from '../../repository/index.js';
import { dueOn, excludes, methodPolicy, planVmRun, type JobMethodSettings } from './chain-policy.js';

export type ChainLogLevel = 'info' | 'warning' | 'error';

/** One VM folder of a job, and how and when its chain is judged. */
export interface ChainRunContext {
  readonly repository: Repository;
  readonly job: string;
  /** The VM's name (its folder in the repository). */
  readonly vm: string;
  readonly settings: JobMethodSettings;
  /** The time days and retention are judged by (the server's clock). */
  readonly now: Date;
  /** The password of the folder's latest chain (the one the run continues or reads). */
  readonly password?: string | undefined;
  /** The password a new chain gets (the job's current one); after a full, the steps use it. Default: `password`. */
  readonly newChainPassword?: string | undefined;
  /** A line for the session log. */
  readonly say: (level: ChainLogLevel, message: string) => void;
  /** Live progress of the maintenance steps (merges, synthetic full, compaction, health check), throttled. */
  readonly progress?: ((p: MaintenanceProgress) => void) | undefined;
}

/** A maintenance step: the repository transforms' (TransformStep) and the health check. */
export type MaintenanceStep = TransformStep | 'health-check';

/**
 * How far a maintenance step on a chain has come (docs/backup-methods.md, "Progress of maintenance
 * steps"); also the `maintenance` field of a repository agent's `progress` events.
 */
export interface MaintenanceProgress {
  readonly step: MaintenanceStep;
  /** Disk bytes of the step's disks gone through (health check: of the checked points). */
  readonly bytesDone: number;
  readonly bytesTotal: number;
  /** Repository bytes read so far (health check: the disk bytes gone through, as bytesDone). */
  readonly bytesRead: number;
  readonly bytesWritten: number;
}

/** A step's progress as a session task shows it (TransferProgress.step): its name and disk bytes. */
export function stepOf(p: MaintenanceProgress): { name: MaintenanceStep; bytesDone: number; bytesTotal: number } {
  return { name: p.step, bytesDone: p.bytesDone, bytesTotal: p.bytesTotal };
}

/** A repository transform's progress as a maintenance step's. */
export function transformStepProgress(p: TransformProgress): MaintenanceProgress {
  return { step: p.step, bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, bytesRead: p.bytesRead, bytesWritten: p.bytesWritten };
}

/** The bytes a repository transform read and wrote (its result carries them as `io`). */
function ioOf(result: unknown): { bytesRead: number; bytesWritten: number } | null {
  const io = (result as { io?: { bytesRead?: unknown; bytesWritten?: unknown } } | null)?.io;
  return io && typeof io.bytesRead === 'number' && typeof io.bytesWritten === 'number' ? { bytesRead: io.bytesRead, bytesWritten: io.bytesWritten } : null;
}

const ioText = (io: { bytesRead: number; bytesWritten: number } | null): string => (io ? `; repository I/O: ${io.bytesRead} bytes read, ${io.bytesWritten} written` : '');

/** What a VM's backup must do, as "before" decided it. */
export interface VmBackupPlan {
  readonly plan: RunPlan;
  /** Blocks to read from the source and store fresh (damaged in the repository); empty for a full. */
  readonly repair: readonly PendingRepair[];
}

/** One retention step as a session log line. */
export function describeRetentionAction(a: RetentionAction): string {
  switch (a.kind) {
    case 'merge':
      return `retention: merged increment ${a.point} into the full (point ${a.removes} removed): ${a.reason}`;
    case 'delete-chain':
      return `retention: deleted chain ${a.chain} (${a.points.length} point(s), ${a.files.length} file(s)): ${a.reason}`;
    case 'delete-point':
      return `retention: deleted reverse point ${a.point}: ${a.reason}`;
    case 'none':
      return `retention: kept ${a.points.length > 0 ? `point(s) ${a.points.join(', ')}` : 'everything'} in chain ${a.chain}: ${a.reason}`;
  }
}

/** "Before": what this run writes (`fullRequested`: `job run --full`) and which blocks it repairs. */
export async function planVmBackup(c: ChainRunContext, fullRequested: boolean): Promise<VmBackupPlan> {
  if (c.settings.operation === 'quick') c.say('info', `quick backup of VM ${c.vm}: an incremental in job ${c.job}'s chain, outside the schedule`);
  const state = await c.repository.chainState(c.job, c.vm);
  const plan = planVmRun(state, c.settings, c.now, fullRequested);
  c.say('info', `this run: ${plan.kind} (${plan.reason})`);
  // A per-job chain (`_all`) names its disks VM/DISK.
  const excluded = (disk: string) => {
    const split = c.vm === ALL_VMS ? splitAllVmsDiskName(disk) : null;
    return c.settings.excludeDisks.some((e) => (split ? excludes(e, split.vm, split.disk) : excludes(e, c.vm, disk)));
  };
  const repair = plan.kind === 'full' ? [] : (state.repair?.disks ?? []).filter((r) => !excluded(r.disk) && r.blocks.length > 0);
  if (repair.length > 0) {
    c.say('info', `repair: re-reading ${repair.map((r) => `${r.disk} blocks ${r.blocks.join(', ')}`).join('; ')} from the source (damaged in the repository)`);
  }
  return { plan, repair };
}

/**
 * "After" the point `pointId` was committed: synthetic full (when planned), retention, and
 * compaction and health check on their days. Returns the warnings (failed steps, damage found).
 */
export async function maintainAfterBackup(chain: ChainRunContext, plan: RunPlan, pointId: string): Promise<string[]> {
  // A full started a new chain: the steps below work on it.
  const c: ChainRunContext = plan.kind === 'full' ? { ...chain, password: chain.newChainPassword ?? chain.password } : chain;
  const { repository, job, vm, settings, now, say } = c;
  const warnings: string[] = [];
  const step = async (what: string, fn: () => Promise<void>): Promise<void> => {
    try {
      await fn();
    } catch (err) {
      const w = `${what} failed: ${describeError(err)} (the new restore point ${pointId} is kept)`;
      warnings.push(w);
      say('warning', w);
    }
  };
  const pw = c.password === undefined ? {} : { password: c.password };
  // Each transform tells its progress as it goes (throttled), its end included.
  const live = c.progress ? { onProgress: (p: TransformProgress) => c.progress?.(transformStepProgress(p)) } : {};
  if (plan.kind === 'synthetic-full') {
    await step('synthetic full', async () => {
      const p = await repository.synthesizeFull(job, vm, { point: pointId, ...pw, ...live });
      const io = ioOf(p);
      say('info', `synthetic full built from the chain: point ${p.id} is now a full (${p.fileBytes} bytes, nothing read from the source)${ioText(io)}`);
    });
  }
  // A merge refused because of damaged points is a warning: the session says what and why.
  const retentionSays = (a: RetentionAction): void => {
    if (a.kind === 'none' && (a.damaged?.length ?? 0) > 0) {
      warnings.push(describeRetentionAction(a));
      say('warning', describeRetentionAction(a));
    } else say('info', describeRetentionAction(a));
  };
  await step('retention', async () => {
    // Only a folder retention changes is locked and rewritten.
    const planned = planRetention(await repository.chainState(job, vm), methodPolicy(settings), now);
    if (planned.every((a) => a.kind === 'none')) {
      for (const a of planned) if (a.points.length > 0) retentionSays(a);
      return;
    }
    const report = await repository.applyRetention(job, vm, methodPolicy(settings), { now, ...pw, ...live });
    const io = ioOf(report);
    for (const a of report.actions) retentionSays(a);
    if (report.removedPoints.length > 0) say('info', `retention removed ${report.removedPoints.length} restore point(s): ${report.removedPoints.join(', ')}${ioText(io)}`);
  });
  if (settings.operation === 'backup' && dueOn(settings.compact, now, settings.timeZone)) {
    await step('compact full', async () => {
      const r = await repository.compactFull(job, vm, live);
      const io = ioOf(r);
      say('info', `compacted the full ${r.file}: ${r.bytesBefore} -> ${r.bytesAfter} bytes${ioText(io)}`);
    });
  }
  if (settings.operation === 'backup' && settings.healthCheck && dueOn(settings.healthCheck, now, settings.timeZone)) {
    await step('health check', async () => {
      warnings.push(...(await checkVmChain(c, settings.healthCheck?.wholeChain === true)));
    });
  }
  return warnings;
}

/**
 * Verifies a VM's chain (the latest point, or every point of its chain); logs every damaged block
 * (recorded in the .vbm for the next run's repair); returns the warnings for the task.
 */
export async function checkVmChain(c: ChainRunContext, wholeChain: boolean): Promise<string[]> {
  const { vm, say } = c;
  const what = vm === ALL_VMS ? `job ${c.job} (all its VMs)` : `VM ${vm}`;
  const report = await c.repository.healthCheck(c.job, vm, {
    wholeChain,
    ...(c.password === undefined ? {} : { password: c.password }),
    ...(c.progress
      ? { onProgress: (p: { bytesDone: number; bytesTotal: number }) => c.progress?.({ step: 'health-check', bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, bytesRead: p.bytesDone, bytesWritten: 0 }) }
      : {}),
  });
  const scope = wholeChain ? `the whole chain (${report.points.length} point(s))` : `the latest point ${report.points[0] ?? ''}`;
  if (report.ok) {
    say('info', `health check of ${what}: ${scope} verified, ${report.blocksChecked} block(s), no damage`);
    return [];
  }
  for (const d of report.damaged) {
    say('error', `health check: damaged block ${d.block} of disk ${d.disk} (disk offset ${d.diskOffset}) in ${d.file}, read by point ${d.point}: ${d.reason}`);
  }
  for (const p of report.metadataProblems) say('error', `health check: damaged metadata: ${p}`);
  const next = report.metadataDamaged ? 'the next run takes an active full' : 'the next run re-reads these blocks from the source (repair)';
  const w = `health check of ${what} found ${report.damaged.length} damaged block(s)${report.metadataDamaged ? ' and damaged metadata' : ''} in ${scope}: ${next}`;
  say('warning', w);
  return [w];
}

/** A health-check session's work on one VM: which scope, then the check. */
export async function healthCheckSession(c: ChainRunContext): Promise<string[]> {
  const wholeChain = c.settings.wholeChain || c.settings.healthCheck?.wholeChain === true;
  c.say('info', `health check of ${c.vm === ALL_VMS ? `job ${c.job}'s restore points (all its VMs in one)` : `VM ${c.vm} in job ${c.job}`} (${wholeChain ? 'whole chain' : 'latest restore point'})`);
  return checkVmChain(c, wholeChain);
}

/**
 * The password of VM folder `vm`'s latest chain — the chain an increment, a synthetic full, a
 * health check continue or read: the first of `candidates` (the job's current password first,
 * then its older ones) that opens the chain's latest point. A chain keeps the key it was created
 * with; a changed job password applies from the next full (docs/encryption.md). Returns
 * `candidates[0]` when the folder has no chain, undefined when its latest chain is plain, and
 * `null` when it is encrypted and no candidate opens it.
 */
export async function latestChainPassword(repository: Repository, job: string, vm: string, candidates: readonly string[]): Promise<string | undefined | null> {
  const latest = (await repository.listChains({ job, vm })).at(-1);
  const tip = latest?.points.at(-1);
  if (!latest || !tip) return candidates[0];
  if (!latest.encrypted) return undefined;
  for (const password of new Set(candidates)) {
    try {
      const opened = await repository.openRestorePoint(tip.id, { password });
      await opened.close();
      return password;
    } catch (err) {
      if (err instanceof BulwarkError && err.kind === 'unauthorized') continue;
      // Damaged or unreadable: the step that reads it reports that (a health check names the damage).
      return candidates[0];
    }
  }
  return null;
}

/** The passwords of a run on one folder: the job's current one (a new chain's) and the one its latest chain keeps. */
export interface RunPasswords {
  /** The job's current password: a full (a new chain) is encrypted with it. */
  readonly password: string | undefined;
  /** The password the folder's latest chain was created with (its increments, synthetic full, merges, health check). */
  readonly chainPassword: string | undefined;
}

/**
 * Picks the passwords of a run on folder `folder` (a VM's, or the job's `_all`): `current` is the
 * job's active password, `known` every other password that may open its chains (newest first,
 * then those added by hand). Says in the session log when the latest chain keeps another password
 * than the current one, or one nobody knows (then its increment fails as a wrong password and the
 * line says what to do). Where the folder is: the server for its own repositories, the repository
 * agent for the others (the server sends the candidates in the task).
 */
export async function runPasswords(
  repository: Repository,
  job: string,
  folder: string,
  current: string | undefined,
  known: readonly string[],
  say: (level: ChainLogLevel, message: string) => void,
): Promise<RunPasswords> {
  const candidates = [...(current === undefined ? [] : [current]), ...known];
  const found = await latestChainPassword(repository, job, folder, candidates);
  const what = folder === ALL_VMS ? `job ${job}` : `VM ${folder}`;
  if (found === null) {
    say('warning', `the latest chain of ${what} is encrypted with a password this server does not know: an increment of it fails; the next full starts a new chain (bulwark job run ${job} --full), or add the password (bulwark password add)`);
  } else if (found !== current) {
    say('info', `the latest chain of ${what} is ${found === undefined ? 'not encrypted' : "encrypted with the job's earlier password"}: its increments keep that; the job's current setting applies from the next full`);
  }
  return { password: current, chainPassword: found === null ? current : found };
}

/** What the removed-VM sweep did to one VM folder of a job. */
export interface RemovedVmSweep {
  readonly vm: string;
  readonly removedPoints: readonly string[];
  /** The VM's points left in the folder (none once everything is deleted). */
  readonly points: readonly RestorePointInfo[];
}

/**
 * The points of VMs no longer in job `job` (not in `vms`), once `days` have passed since their
 * newest point, are deleted (a retention of zero days that keeps not even the newest). The job's
 * current VMs are untouched. Where the folder is: the server for its own repositories, the
 * repository agent for the others.
 */
export async function sweepRemovedVms(
  repository: Repository,
  o: { readonly job: string; readonly method: BackupMethod; readonly vms: readonly string[]; readonly days: number; readonly now: Date },
): Promise<RemovedVmSweep[]> {
  const keep = new Set(o.vms);
  const byVm = new Map<string, RestorePointInfo[]>();
  for (const p of await repository.listRestorePoints({ job: o.job })) {
    // The job's per-job set (`_all`) is no VM: its points go by the job's own retention (a VM
    // removed from a per-job job leaves with the points that held it).
    if (p.vm === ALL_VMS) continue;
    if (!keep.has(p.vm)) byVm.set(p.vm, [...(byVm.get(p.vm) ?? []), p]);
  }
  const out: RemovedVmSweep[] = [];
  for (const [vm, points] of byVm) {
    const newest = Math.max(...points.map((p) => p.time.getTime()));
    if (newest + o.days * 86_400_000 > o.now.getTime()) continue;
    const report = await repository.applyRetention(o.job, vm, { method: o.method, retention: { days: 0 }, keepLatest: false }, { now: o.now });
    out.push({ vm, removedPoints: report.removedPoints, points: await repository.listRestorePoints({ job: o.job, vm }) });
  }
  return out;
}
