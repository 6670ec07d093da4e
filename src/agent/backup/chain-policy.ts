// The backup-method settings of a job as the executor reads them (JobDefinition.settings, see
// /work/team-contracts.md), and the small pure decisions around a VM's run: which disks are
// excluded, which maintenance is due today, and what a quick backup or a health-check session is.
// What a run writes and what retention removes are the repository's pure planners (planRun,
// planRetention); this module only feeds them.
import type { DaySchedule, MethodPolicy, RunPlan, VmChainState } from '../../repository/index.js';
import { planRun } from '../../repository/index.js';

export type Weekday = 'mon' | 'tue' | 'wed' | 'thu' | 'fri' | 'sat' | 'sun';
const weekdays: readonly Weekday[] = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'];

/** What a session of the job does with each VM. */
export type Operation =
  /** A scheduled or manual run: plan (full / incremental / synthetic / reverse), retention, maintenance. */
  | 'backup'
  /** `bulwark backup quick VM`: an incremental inside the chain, no periodic full, no maintenance days. */
  | 'quick'
  /** `bulwark job health-check NAME`: verify the chain, record damage for the next run's repair. */
  | 'health-check';

export interface JobMethodSettings {
  readonly method: 'forever-forward' | 'forward' | 'reverse';
  readonly retention: { readonly points: number } | { readonly days: number };
  readonly activeFull: DaySchedule | null;
  readonly syntheticFull: DaySchedule | null;
  readonly healthCheck: (DaySchedule & { readonly wholeChain?: boolean }) | null;
  readonly compact: DaySchedule | null;
  readonly excludeDisks: readonly string[];
  readonly removedVmRetentionDays: number;
  readonly fileIndex: boolean;
  /** IANA time zone the days are counted in (default UTC). */
  readonly timeZone: string;
  readonly operation: Operation;
  /** Health-check sessions: verify every point of the chain. */
  readonly wholeChain: boolean;
  /** per-vm (default): a chain per VM; per-job: every VM of the job in one restore point (the `_all` folder). */
  readonly storage: 'per-vm' | 'per-job';
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

function days(v: unknown): DaySchedule | null {
  if (!isObject(v)) return null;
  const wd = Array.isArray(v.weekdays) ? v.weekdays.filter((d): d is Weekday => weekdays.includes(d as Weekday)) : [];
  const md = Array.isArray(v.monthDays) ? v.monthDays.filter((d): d is number => typeof d === 'number' && Number.isInteger(d)) : [];
  if (wd.length === 0 && md.length === 0) return null;
  return { ...(wd.length > 0 ? { weekdays: wd } : {}), ...(md.length > 0 ? { monthDays: md } : {}) };
}

/** Reads the job's settings, with the documented defaults for anything missing or malformed. */
export function methodSettings(settings: Readonly<Record<string, unknown>> | undefined): JobMethodSettings {
  const s = settings ?? {};
  const method = s.method === 'forward' || s.method === 'reverse' ? s.method : 'forever-forward';
  const r = s.retention;
  const retention =
    isObject(r) && typeof r.points === 'number' && r.points >= 1
      ? { points: r.points }
      : isObject(r) && typeof r.days === 'number' && r.days >= 1
        ? { days: r.days }
        : { points: 7 };
  const hc = days(s.healthCheck);
  const operation = s.operation === 'quick' || s.operation === 'health-check' ? s.operation : 'backup';
  return {
    method,
    retention,
    activeFull: days(s.activeFull),
    syntheticFull: days(s.syntheticFull),
    healthCheck: hc ? { ...hc, ...(isObject(s.healthCheck) && s.healthCheck.wholeChain === true ? { wholeChain: true } : {}) } : null,
    compact: days(s.compact),
    excludeDisks: Array.isArray(s.excludeDisks) ? s.excludeDisks.filter((d): d is string => typeof d === 'string') : [],
    removedVmRetentionDays: typeof s.removedVmRetentionDays === 'number' ? s.removedVmRetentionDays : 14,
    fileIndex: s.fileIndex === true,
    timeZone: typeof s.timeZone === 'string' ? s.timeZone : 'UTC',
    operation,
    wholeChain: s.wholeChain === true,
    storage: s.storage === 'per-job' ? 'per-job' : 'per-vm',
  };
}

/** The planners' view of the settings. A quick backup takes no scheduled full. */
export function methodPolicy(s: JobMethodSettings): MethodPolicy {
  const quick = s.operation === 'quick';
  return {
    method: s.method,
    retention: s.retention,
    activeFull: quick ? null : s.activeFull,
    syntheticFull: quick ? null : s.syntheticFull,
    timeZone: s.timeZone,
  };
}

/** Whether an exclusion entry (`VM:DISK` or `DISK`) names this disk of this VM. */
export function excludes(entry: string, vm: string, disk: string): boolean {
  const colon = entry.lastIndexOf(':');
  if (colon < 0) return entry === disk;
  return entry.slice(0, colon) === vm && entry.slice(colon + 1) === disk;
}

/** Splits a VM's disks into those backed up and those the job excludes. */
export function splitDisks(excludeDisks: readonly string[], vm: string, disks: readonly string[]): { included: string[]; excluded: string[] } {
  const included: string[] = [];
  const excluded: string[] = [];
  for (const d of disks) (excludeDisks.some((e) => excludes(e, vm, d)) ? excluded : included).push(d);
  return { included, excluded };
}

/** The weekday and day of the month of `now` in `timeZone`, and whether it is the month's last day. */
export function localDay(now: Date, timeZone: string): { weekday: Weekday; day: number; lastOfMonth: boolean } {
  const parts = new Intl.DateTimeFormat('en-US', { timeZone, weekday: 'short', day: 'numeric', month: 'numeric', year: 'numeric' }).formatToParts(now);
  const get = (t: string) => parts.find((p) => p.type === t)?.value ?? '';
  const weekday = get('weekday').slice(0, 3).toLowerCase() as Weekday;
  const day = Number(get('day'));
  const month = Number(get('month'));
  const year = Number(get('year'));
  const daysInMonth = new Date(Date.UTC(year, month, 0)).getUTCDate();
  return { weekday, day, lastOfMonth: day === daysInMonth };
}

/** Whether a maintenance operation scheduled on `d` is due on the day of `now`. */
export function dueOn(d: DaySchedule | null, now: Date, timeZone = 'UTC'): boolean {
  if (!d) return false;
  const t = localDay(now, timeZone);
  if (d.weekdays?.includes(t.weekday)) return true;
  return (d.monthDays ?? []).some((m) => m === t.day || (m === -1 && t.lastOfMonth));
}

/**
 * What this run of a VM writes: a full when asked for (`job run --full`), else the planner's
 * answer for the job's method and days (a quick backup never takes a scheduled full).
 */
export function planVmRun(state: VmChainState, s: JobMethodSettings, now: Date, fullRequested: boolean): RunPlan {
  const chainMethod = s.method === 'reverse' ? 'reverse' : 'forward';
  if (fullRequested && s.operation !== 'quick') return { kind: 'full', reason: 'a full backup was asked for', chainMethod, parent: null };
  return planRun(state, methodPolicy(s), now);
}
