// Backup jobs: what to back up (VMs), where (repository), how (method, retention, block size,
// compression) and when (schedule, window, retries). A job with an open session is "running" and
// cannot be deleted.
import type { Selectable, Updateable } from 'kysely';
import { BulwarkError } from '../../common/errors.js';
import type { JobTable } from '../db/schema.js';
import {
  configFields,
  duplicate,
  findByNameOrId,
  invalid,
  isUniqueViolation,
  newId,
  notFound,
  nowIso,
  parseJson,
  updateVersioned,
  type ServiceContext,
} from './common.js';
import { checkName } from './infrastructure.js';
import {
  blockSizes,
  defaultJobBackupOptions,
  type BackupMethod,
  type BackupWindow,
  type Job,
  type JobBackupOptionValues,
  type JobCreate,
  type JobPatch,
  type PeriodicDays,
  type Retention,
  type Schedule,
} from './model.js';

/** Checks a schedule beyond its shape (time zones, cron syntax); the scheduler's validator is installed at start. */
export type ScheduleValidator = (schedule: Schedule) => void;
let scheduleValidator: ScheduleValidator = () => undefined;
export function setScheduleValidator(v: ScheduleValidator): void {
  scheduleValidator = v;
}

async function runningJobIds(ctx: ServiceContext): Promise<Set<string>> {
  const rows = await ctx.db.selectFrom('sessions').select('job_id').where('state', 'in', ['queued', 'running']).execute();
  return new Set(rows.flatMap((r) => (r.job_id ? [r.job_id] : [])));
}

/** The stored backup-method options of a job, with defaults for what was never set. */
export function backupOptionsOf(r: Pick<Selectable<JobTable>, 'backup_options'>): JobBackupOptionValues {
  const stored = parseJson<Partial<JobBackupOptionValues>>(r.backup_options, 'job backup options') ?? {};
  return { ...defaultJobBackupOptions, ...stored };
}

const optionKeys = Object.keys(defaultJobBackupOptions) as (keyof JobBackupOptionValues)[];

function pickOptions(input: Partial<JobBackupOptionValues>): Partial<JobBackupOptionValues> {
  const out: Partial<JobBackupOptionValues> = {};
  for (const k of optionKeys) if (input[k] !== undefined) (out as Record<string, unknown>)[k] = input[k];
  return out;
}

function checkDays(field: string, d: PeriodicDays | null): void {
  if (d === null) return;
  if ((d.weekdays?.length ?? 0) === 0 && (d.monthDays?.length ?? 0) === 0) {
    throw invalid(field, 'names no day: give weekdays (e.g. ["sat"]) and/or monthDays (1-31, -1 = the last day), or null to turn it off');
  }
  for (const [i, day] of (d.monthDays ?? []).entries()) {
    if (day === 0 || day < -1 || day > 31) throw invalid(`${field}.monthDays[${i}]`, `${day} is not a day of the month: use 1-31, or -1 for the last day`);
  }
}

/** Checks the backup-method options against each other, the method and the job's VMs. */
function checkBackupOptions(o: JobBackupOptionValues, method: BackupMethod, vms: readonly string[]): void {
  checkDays('activeFull', o.activeFull);
  checkDays('syntheticFull', o.syntheticFull);
  checkDays('healthCheck', o.healthCheck);
  checkDays('compact', o.compact);
  if (o.syntheticFull !== null && method !== 'forward') {
    throw invalid('syntheticFull', `a synthetic full is built for the forward method only (this job uses ${method}): set method to forward, or syntheticFull to null`);
  }
  if (o.activeFull !== null && method === 'forever-forward') {
    throw invalid('activeFull', 'forever-forward keeps one full and never takes another on a schedule: set method to forward (or reverse), or activeFull to null');
  }
  const seen = new Set<string>();
  for (const [i, entry] of o.excludeDisks.entries()) {
    const field = `excludeDisks[${i}]`;
    const colon = entry.lastIndexOf(':');
    const vm = colon >= 0 ? entry.slice(0, colon) : undefined;
    const disk = colon >= 0 ? entry.slice(colon + 1) : entry;
    if (disk.trim() === '' || /\s/.test(disk)) throw invalid(field, `"${entry}" names no disk: write VM:DISK (e.g. db1:vdb) or DISK (e.g. vdb) for every VM`);
    if (vm !== undefined && !vms.includes(vm)) throw invalid(field, `VM "${vm}" is not one of the job's VMs (${vms.join(', ')}): add it to vms, or fix the name`);
    if (seen.has(entry)) throw invalid(field, `"${entry}" is listed twice`);
    seen.add(entry);
  }
  if (o.removedVmRetentionDays < 0 || !Number.isInteger(o.removedVmRetentionDays)) {
    throw invalid('removedVmRetentionDays', `${o.removedVmRetentionDays} is not a whole number of days (0 or more)`);
  }
}

function toJob(r: Selectable<JobTable>, repoName: string, running: boolean): Job {
  return {
    ...configFields(r),
    vms: parseJson<string[]>(r.objects, 'job objects') ?? [],
    repository: repoName,
    method: r.method,
    retention: parseJson<Retention>(r.retention, 'job retention') ?? { points: 7 },
    blockSize: r.block_size,
    compression: r.compression,
    schedule: parseJson<Schedule>(r.schedule, 'job schedule'),
    enabled: r.enabled === 1,
    retries: { count: r.retry_count, waitMinutes: r.retry_wait_minutes },
    window: parseJson<BackupWindow>(r.window, 'job window'),
    requireGuestProcessing: r.require_guest_processing === 1,
    proxy: r.proxy ?? null,
    ...backupOptionsOf(r),
    running,
  };
}

/** A pinned proxy must be an agent; null/undefined = automatic selection. */
async function proxyName(ctx: ServiceContext, name: string | null | undefined): Promise<string | null> {
  if (name === null || name === undefined || name === '') return null;
  const a = await ctx.db.selectFrom('agents').select('name').where('name', '=', name).executeTakeFirst();
  if (!a) throw new BulwarkError(`proxy: agent "${name}" not found`, { kind: 'not-found', context: { field: 'proxy', agent: name }, hint: 'bulwark agent list shows the agents' });
  return a.name;
}

async function repoNames(ctx: ServiceContext): Promise<Map<string, string>> {
  const rows = await ctx.db.selectFrom('repositories').select(['id', 'name']).execute();
  return new Map(rows.map((r) => [r.id, r.name]));
}

async function repoId(ctx: ServiceContext, name: string): Promise<string> {
  const r = await findByNameOrId(ctx, 'repositories', name);
  if (!r) throw new BulwarkError(`repository: repository "${name}" not found`, { kind: 'not-found', context: { field: 'repository', repository: name } });
  return r.id;
}

function checkVms(vms: string[]): void {
  if (vms.length === 0) throw invalid('vms', 'name at least one VM');
  const seen = new Set<string>();
  for (const vm of vms) {
    if (vm.trim() === '') throw invalid('vms', 'a VM name is empty');
    if (seen.has(vm)) throw invalid('vms', `VM "${vm}" is listed twice`);
    seen.add(vm);
  }
}

function checkBlockSize(bs: number): void {
  if (!blockSizes.includes(bs)) throw invalid('blockSize', `${bs} is not supported: use one of ${blockSizes.join(', ')} bytes`);
}

function checkWindow(w: BackupWindow | null): void {
  for (const [i, rule] of (w?.allow ?? []).entries()) {
    if (rule.from === rule.to) throw invalid(`window.allow[${i}]`, `from and to are the same time (${rule.from})`);
  }
}

export async function listJobs(ctx: ServiceContext): Promise<Job[]> {
  const [rows, repos, running] = await Promise.all([
    ctx.db.selectFrom('jobs').selectAll().orderBy('name').execute(),
    repoNames(ctx),
    runningJobIds(ctx),
  ]);
  return rows.map((r) => toJob(r, repos.get(r.repository_id) ?? '', running.has(r.id)));
}

export async function getJobRow(ctx: ServiceContext, name: string): Promise<Selectable<JobTable>> {
  const r = await findByNameOrId(ctx, 'jobs', name);
  if (!r) throw notFound('job', name);
  return r;
}

export async function getJob(ctx: ServiceContext, name: string): Promise<Job> {
  const r = await getJobRow(ctx, name);
  const [repos, running] = await Promise.all([repoNames(ctx), runningJobIds(ctx)]);
  return toJob(r, repos.get(r.repository_id) ?? '', running.has(r.id));
}

export async function createJob(ctx: ServiceContext, input: JobCreate): Promise<Job> {
  checkName(input.name);
  checkVms(input.vms);
  const blockSize = input.blockSize ?? 1024 * 1024;
  checkBlockSize(blockSize);
  const schedule = input.schedule ?? null;
  if (schedule !== null) scheduleValidator(schedule);
  const window = input.window ?? null;
  checkWindow(window);
  const options = { ...defaultJobBackupOptions, ...pickOptions(input) };
  checkBackupOptions(options, input.method ?? 'forever-forward', input.vms);
  const repositoryId = await repoId(ctx, input.repository);
  const proxy = await proxyName(ctx, input.proxy);
  const now = nowIso(ctx);
  try {
    await ctx.db
      .insertInto('jobs')
      .values({
        id: newId(),
        name: input.name,
        version: 1,
        created_at: now,
        updated_at: now,
        objects: JSON.stringify(input.vms),
        repository_id: repositoryId,
        method: input.method ?? 'forever-forward',
        retention: JSON.stringify(input.retention ?? { points: 7 }),
        block_size: blockSize,
        compression: input.compression ?? 'zstd',
        schedule: schedule === null ? null : JSON.stringify(schedule),
        enabled: input.enabled === false ? 0 : 1,
        retry_count: input.retries?.count ?? 3,
        retry_wait_minutes: input.retries?.waitMinutes ?? 10,
        window: window === null ? null : JSON.stringify(window),
        require_guest_processing: input.requireGuestProcessing ? 1 : 0,
        scheduled_since: now,
        backup_options: JSON.stringify(options),
        proxy,
      })
      .execute();
  } catch (err) {
    if (isUniqueViolation(err)) throw duplicate('job', input.name);
    throw err;
  }
  return getJob(ctx, input.name);
}

export async function updateJob(ctx: ServiceContext, name: string, patch: JobPatch): Promise<Job> {
  const r = await getJobRow(ctx, name);
  const values: Updateable<JobTable> = {};
  if (patch.vms !== undefined) {
    checkVms(patch.vms);
    values.objects = JSON.stringify(patch.vms);
  }
  if (patch.repository !== undefined) values.repository_id = await repoId(ctx, patch.repository);
  if (patch.method !== undefined) values.method = patch.method;
  if (patch.retention !== undefined) values.retention = JSON.stringify(patch.retention);
  if (patch.blockSize !== undefined) {
    checkBlockSize(patch.blockSize);
    values.block_size = patch.blockSize;
  }
  if (patch.compression !== undefined) values.compression = patch.compression;
  if (patch.schedule !== undefined) {
    if (patch.schedule !== null) scheduleValidator(patch.schedule);
    values.schedule = patch.schedule === null ? null : JSON.stringify(patch.schedule);
  }
  if (patch.enabled !== undefined) {
    values.enabled = patch.enabled ? 1 : 0;
    if (patch.enabled && r.enabled === 0) values.scheduled_since = nowIso(ctx);
  }
  if (patch.retries !== undefined) {
    values.retry_count = patch.retries.count;
    values.retry_wait_minutes = patch.retries.waitMinutes;
  }
  if (patch.window !== undefined) {
    checkWindow(patch.window);
    values.window = patch.window === null ? null : JSON.stringify(patch.window);
  }
  if (patch.requireGuestProcessing !== undefined) values.require_guest_processing = patch.requireGuestProcessing ? 1 : 0;
  if (patch.proxy !== undefined) values.proxy = await proxyName(ctx, patch.proxy);
  const changedOptions = pickOptions(patch);
  if (Object.keys(changedOptions).length > 0 || patch.method !== undefined || patch.vms !== undefined) {
    const options = { ...backupOptionsOf(r), ...changedOptions };
    checkBackupOptions(options, patch.method ?? r.method, patch.vms ?? parseJson<string[]>(r.objects, 'job objects') ?? []);
    values.backup_options = JSON.stringify(options);
  }
  await updateVersioned(ctx, 'jobs', 'job', r, patch.version, values);
  return getJob(ctx, r.id);
}

/** Enable/disable without a version check: a switch, not an edit of fields someone else read. */
export async function setJobEnabled(ctx: ServiceContext, name: string, enabled: boolean): Promise<Job> {
  const r = await getJobRow(ctx, name);
  const values: Partial<JobTable> = { enabled: enabled ? 1 : 0 };
  if (enabled && r.enabled === 0) values.scheduled_since = nowIso(ctx);
  await updateVersioned(ctx, 'jobs', 'job', r, r.version, values);
  return getJob(ctx, r.id);
}

export async function cloneJob(ctx: ServiceContext, name: string, newName: string): Promise<Job> {
  const j = await getJob(ctx, name);
  return createJob(ctx, {
    name: newName,
    vms: j.vms,
    repository: j.repository,
    method: j.method,
    retention: j.retention,
    blockSize: j.blockSize,
    compression: j.compression,
    schedule: j.schedule,
    enabled: false,
    retries: j.retries,
    window: j.window,
    requireGuestProcessing: j.requireGuestProcessing,
    proxy: j.proxy,
    ...pickOptions(j),
  });
}

export async function deleteJob(ctx: ServiceContext, name: string): Promise<void> {
  const r = await getJobRow(ctx, name);
  if ((await runningJobIds(ctx)).has(r.id)) {
    throw new BulwarkError(`job "${r.name}" is running: stop its session first`, { kind: 'conflict', context: { job: r.name } });
  }
  await ctx.db.deleteFrom('jobs').where('id', '=', r.id).execute();
}
