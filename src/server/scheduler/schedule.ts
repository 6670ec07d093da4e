// Job schedules and backup windows as pure functions of time: when a schedule fires next, whether
// a run was missed while the server was down, and when a backup window ends. Calendar schedules
// are turned into cron patterns and evaluated by croner in the schedule's time zone, so daylight
// saving transitions are handled in one place.
import { Cron } from 'croner';
import { BulwarkError } from '../../common/errors.js';

/** ISO-like weekday names; the cron numbers are 0 = sun … 6 = sat. */
export type Weekday = 'mon' | 'tue' | 'wed' | 'thu' | 'fri' | 'sat' | 'sun';
export const weekdays: readonly Weekday[] = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'];

/** A time of day, `HH:MM` in 24-hour form (`00:00` … `23:59`). */
export type TimeOfDay = string;

/**
 * When a job runs on its own. Every calendar schedule is read in `timeZone` (an IANA name such
 * as `Europe/Berlin`; default: the server's time zone).
 */
export type Schedule =
  /** A cron expression (5 fields, or 6 with seconds first), croner syntax (`L`, `#`, `W`). */
  | { kind: 'cron'; expression: string; timeZone?: string | undefined }
  /** Every day, or only on `days`, at `at`. */
  | { kind: 'daily'; at: TimeOfDay; days?: Weekday[] | undefined; timeZone?: string | undefined }
  /** Monthly on day N (1–31; months without it are skipped), the last day, or the first/…/last weekday. */
  | {
      kind: 'monthly';
      at: TimeOfDay;
      on: { day: number } | { day: 'last' } | { week: 'first' | 'second' | 'third' | 'fourth' | 'last'; weekday: Weekday };
      timeZone?: string | undefined;
    }
  /** Every N minutes or hours, counted from the previous run (or from when the scheduler starts). */
  | { kind: 'periodic'; every: number; unit: 'minutes' | 'hours' }
  /** After another job's session ends in success or warning. */
  | { kind: 'after-job'; job: string };

/**
 * Hours in which a job may run, e.g. nights and weekends. Each rule allows `from`–`to` (local time
 * in `timeZone`) on `days` (default every day); `to` at or before `from` runs past midnight into
 * the next day. A session still running when the allowed time ends is stopped.
 */
export interface BackupWindow {
  allow: Array<{ days?: Weekday[] | undefined; from: TimeOfDay; to: TimeOfDay }>;
  timeZone?: string | undefined;
}

const minuteMs = 60_000;

/** The cron pattern a calendar schedule stands for (exported for docs and tests). */
export function cronPatternOf(schedule: Extract<Schedule, { kind: 'cron' | 'daily' | 'monthly' }>): string {
  switch (schedule.kind) {
    case 'cron':
      return schedule.expression;
    case 'daily': {
      const { hour, minute } = parseTimeOfDay(schedule.at, 'at');
      const days = schedule.days === undefined || schedule.days.length === 0 ? '*' : schedule.days.map(weekdayNumber).join(',');
      return `${minute} ${hour} * * ${days}`;
    }
    case 'monthly': {
      const { hour, minute } = parseTimeOfDay(schedule.at, 'at');
      const on = schedule.on;
      if ('week' in on) {
        const nth = { first: '1', second: '2', third: '3', fourth: '4', last: 'L' }[on.week];
        return `${minute} ${hour} * * ${weekdayNumber(on.weekday)}#${nth}`;
      }
      if (on.day === 'last') return `${minute} ${hour} L * *`;
      if (!Number.isInteger(on.day) || on.day < 1 || on.day > 31) {
        throw invalid(`monthly day ${on.day} is not a day of the month`, 'on.day', 'use 1 to 31, or "last"');
      }
      return `${minute} ${hour} ${on.day} * *`;
    }
  }
}

/**
 * The first time strictly after `after` at which `schedule` fires, or undefined when it never
 * does on its own (`after-job` schedules, or a cron pattern with no future match).
 * For `periodic`, `after` is the previous run: the next one is one period later.
 * `defaultTimeZone` applies when the schedule names none.
 */
export function nextRun(schedule: Schedule, after: Date, defaultTimeZone?: string): Date | undefined {
  switch (schedule.kind) {
    case 'after-job':
      return undefined;
    case 'periodic':
      return new Date(after.getTime() + periodMs(schedule));
    case 'cron':
    case 'daily':
    case 'monthly': {
      const timezone = schedule.timeZone ?? defaultTimeZone;
      const cron = makeCron(cronPatternOf(schedule), timezone);
      return cron.nextRun(after) ?? undefined;
    }
  }
}

/**
 * Whether `schedule` should have fired after `lastRun` and by `now` — a run missed while the
 * server was down. Returns the first missed time (the scheduler runs the job once for all of
 * them), or undefined. `lastRun` is the start of the job's last session, or when the job was
 * created or last enabled.
 */
export function missedRunSince(schedule: Schedule, lastRun: Date, now: Date, defaultTimeZone?: string): Date | undefined {
  const next = nextRun(schedule, lastRun, defaultTimeZone);
  return next !== undefined && next.getTime() <= now.getTime() ? next : undefined;
}

/** Whether the instant `at` lies inside an allowed period of the window. */
export function isInsideWindow(window: BackupWindow, at: Date, defaultTimeZone?: string): boolean {
  const tz = window.timeZone ?? defaultTimeZone;
  const rules = compileWindow(window);
  return allowedAtLocal(rules, at.getTime() + zoneOffsetMs(at.getTime(), tz));
}

/**
 * When the allowed period containing `start` ends (adjacent rules join into one period).
 * Returns `start` itself when `start` is outside the window, and undefined when the window allows
 * every minute of the week (it never ends). Resolution: one minute.
 */
export function windowEndsAt(window: BackupWindow, start: Date, defaultTimeZone?: string): Date | undefined {
  if (!isInsideWindow(window, start, defaultTimeZone)) return start;
  const tz = window.timeZone ?? defaultTimeZone;
  const rules = compileWindow(window);
  // Walk minute boundaries (at most a week and a day: DST days have 23 or 25 hours). The zone
  // offset is looked up once per hour; an hour whose two ends differ (a DST change) is walked
  // with a lookup per minute.
  const hourMs = 60 * minuteMs;
  const limit = start.getTime() + 8 * 24 * hourMs;
  for (let chunk = Math.floor(start.getTime() / minuteMs) * minuteMs + minuteMs; chunk <= limit; chunk += hourMs) {
    const offset = zoneOffsetMs(chunk, tz);
    const steady = zoneOffsetMs(chunk + hourMs, tz) === offset;
    for (let t = chunk; t < chunk + hourMs; t += minuteMs) {
      if (!allowedAtLocal(rules, t + (steady ? offset : zoneOffsetMs(t, tz)))) return new Date(t);
    }
  }
  return undefined;
}

interface WindowRule {
  days: Set<number>;
  from: number;
  to: number;
}

function compileWindow(window: BackupWindow): WindowRule[] {
  return window.allow.map((rule) => ({
    days: new Set((rule.days === undefined || rule.days.length === 0 ? weekdays : rule.days).map(weekdayNumber)),
    from: minutesOf(rule.from, 'window.from'),
    to: minutesOf(rule.to, 'window.to'),
  }));
}

const dayMs = 24 * 60 * minuteMs;

/** `localMs`: local wall-clock time as if it were UTC, in ms since the epoch. */
function allowedAtLocal(rules: WindowRule[], localMs: number): boolean {
  const dayNumber = Math.floor(localMs / dayMs);
  const day = (((dayNumber + 4) % 7) + 7) % 7; // 1970-01-01 was a Thursday (4); 0 = Sunday
  const minute = Math.floor((localMs - dayNumber * dayMs) / minuteMs);
  const previous = (day + 6) % 7;
  return rules.some((r) =>
    r.to > r.from
      ? r.days.has(day) && minute >= r.from && minute < r.to
      : // Past midnight: the evening part belongs to the rule's day, the morning part to the day after.
        (r.days.has(day) && minute >= r.from) || (r.days.has(previous) && minute < r.to),
  );
}

/** Checks a schedule's fields; throws a BulwarkError naming the bad field. */
export function validateSchedule(schedule: Schedule): void {
  switch (schedule.kind) {
    case 'periodic':
      if (!Number.isInteger(schedule.every) || schedule.every < 1) {
        throw invalid(`"every ${schedule.every} ${schedule.unit}" is not a period`, 'every', 'use a whole number of at least 1');
      }
      return;
    case 'after-job':
      if (schedule.job.trim() === '') throw invalid('"after job" names no job', 'job');
      return;
    case 'cron':
    case 'daily':
    case 'monthly': {
      const timezone = schedule.timeZone;
      if (timezone !== undefined) checkTimeZone(timezone);
      makeCron(cronPatternOf(schedule), timezone);
      return;
    }
  }
}

function periodMs(schedule: Extract<Schedule, { kind: 'periodic' }>): number {
  if (!Number.isInteger(schedule.every) || schedule.every < 1) validateSchedule(schedule);
  return schedule.every * (schedule.unit === 'hours' ? 60 : 1) * minuteMs;
}

function makeCron(pattern: string, timezone: string | undefined): Cron {
  if (timezone !== undefined) checkTimeZone(timezone);
  try {
    return new Cron(pattern, { paused: true, ...(timezone === undefined ? {} : { timezone }) });
  } catch (cause) {
    throw invalid(`the schedule pattern "${pattern}" is not valid: ${cause instanceof Error ? cause.message : String(cause)}`, 'schedule', undefined, cause);
  }
}

function checkTimeZone(timeZone: string): void {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone });
  } catch (cause) {
    throw invalid(`unknown time zone "${timeZone}"`, 'timeZone', 'use an IANA name such as Europe/Berlin or UTC', cause);
  }
}

function weekdayNumber(day: Weekday): number {
  const n = weekdays.indexOf(day);
  if (n < 0) throw invalid(`"${String(day)}" is not a weekday`, 'days', `use ${weekdays.join(', ')}`);
  return n;
}

function parseTimeOfDay(text: string, field: string): { hour: number; minute: number } {
  const m = /^([01]?\d|2[0-3]):([0-5]\d)$/.exec(text);
  if (!m) throw invalid(`"${text}" is not a time of day`, field, 'use HH:MM, 24-hour, e.g. 22:30');
  return { hour: Number(m[1]), minute: Number(m[2]) };
}

function minutesOf(text: string, field: string): number {
  if (text === '24:00') return 24 * 60;
  const { hour, minute } = parseTimeOfDay(text, field);
  return hour * 60 + minute;
}

const formatters = new Map<string, Intl.DateTimeFormat>();

/** Local time minus UTC at instant `t` (ms since the epoch) in zone `tz` (server zone when undefined). */
export function zoneOffsetMs(t: number, tz: string | undefined): number {
  const key = tz ?? '';
  let f = formatters.get(key);
  if (f === undefined) {
    if (tz !== undefined) checkTimeZone(tz);
    f = new Intl.DateTimeFormat('en-US', {
      timeZone: tz,
      year: 'numeric',
      month: 'numeric',
      day: 'numeric',
      hour: 'numeric',
      minute: 'numeric',
      second: 'numeric',
      hourCycle: 'h23',
    });
    formatters.set(key, f);
  }
  const p: Record<string, number> = {};
  for (const part of f.formatToParts(new Date(t))) if (part.type !== 'literal') p[part.type] = Number(part.value);
  const asUtc = Date.UTC(p.year!, p.month! - 1, p.day, p.hour, p.minute, p.second);
  return asUtc - Math.floor(t / 1000) * 1000;
}

function invalid(message: string, field: string, hint?: string, cause?: unknown): BulwarkError {
  return new BulwarkError(message, { kind: 'invalid', context: { field }, hint, cause });
}
