// Schedules and backup windows as a person types and reads them on the command line, to and
// from the API's Schedule / BackupWindow objects (src/server/services/model.ts).
//   --schedule "0 22 * * 1-5"            cron expression
//   --schedule "daily 22:00 [mon,tue]"   every day (or those days) at a time
//   --schedule "monthly 03:00 day 1|last|first sun"
//   --schedule "every 30m" | "every 4h"  periodic
//   --schedule "after nightly"           when job "nightly" has finished
//   --schedule none                      manual only; a JSON object is passed as it is
//   --window  "22:00-06:00" | "mon,tue 22:00-06:00" (repeatable)
import { InvalidArgumentError } from 'commander';
import type { BackupWindow, Schedule } from '../server/services/model.js';

type Weekday = 'mon' | 'tue' | 'wed' | 'thu' | 'fri' | 'sat' | 'sun';
const weekdays: readonly Weekday[] = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];
const timeRe = /^([01][0-9]|2[0-3]):[0-5][0-9]$/;

function days(text: string, option: string): Weekday[] {
  const list = text.toLowerCase().split(',').map((d) => d.trim().slice(0, 3));
  for (const d of list) {
    if (!(weekdays as readonly string[]).includes(d)) throw new InvalidArgumentError(`${option}: "${d}" is not a weekday (mon … sun)`);
  }
  return list as Weekday[];
}

function time(text: string | undefined, option: string): string {
  if (!text || !timeRe.test(text)) throw new InvalidArgumentError(`${option}: "${text ?? ''}" is not a time of day HH:MM`);
  return text;
}

/** The API's schedule for `--schedule TEXT` (null = manual only), time zone applied where it fits. */
export function parseSchedule(text: string, timeZone?: string): Schedule | null {
  const t = text.trim();
  const tz = timeZone ? { timeZone } : {};
  if (t === 'none' || t === 'manual') return null;
  if (t.startsWith('{')) {
    try {
      return JSON.parse(t) as Schedule;
    } catch (err) {
      throw new InvalidArgumentError(`--schedule: not valid JSON: ${(err as Error).message}`);
    }
  }
  const words = t.split(/\s+/);
  const [first, second, third, fourth] = words;
  switch (first?.toLowerCase()) {
    case 'daily':
      return { kind: 'daily', at: time(second, '--schedule daily'), ...(third ? { days: days(third, '--schedule daily') } : {}), ...tz };
    case 'every': {
      const m = /^(\d+)\s*(m|min|minutes?|h|hours?)$/i.exec(words.slice(1).join(''));
      if (!m || Number(m[1]) < 1) throw new InvalidArgumentError(`--schedule every: say how often, e.g. "every 30m" or "every 4h", not "${t}"`);
      return { kind: 'periodic', every: Number(m[1]), unit: m[2]!.toLowerCase().startsWith('h') ? 'hours' : 'minutes' };
    }
    case 'after':
      if (!second || words.length !== 2) throw new InvalidArgumentError(`--schedule after: name one job, e.g. "after nightly", not "${t}"`);
      return { kind: 'after-job', job: second };
    case 'monthly': {
      const at = time(second, '--schedule monthly');
      const usage = `--schedule monthly: say "monthly HH:MM day N", "day last" or "first|second|third|fourth|last WEEKDAY", not "${t}"`;
      if (third === 'day' && fourth === 'last' && words.length === 4) return { kind: 'monthly', at, on: { day: 'last' }, ...tz };
      if (third === 'day' && fourth && /^\d+$/.test(fourth) && Number(fourth) >= 1 && Number(fourth) <= 31 && words.length === 4) {
        return { kind: 'monthly', at, on: { day: Number(fourth) }, ...tz };
      }
      const weeks = ['first', 'second', 'third', 'fourth', 'last'] as const;
      const week = weeks.find((w) => w === third);
      if (week && fourth && words.length === 4) return { kind: 'monthly', at, on: { week, weekday: days(fourth, '--schedule monthly')[0]! }, ...tz };
      throw new InvalidArgumentError(usage);
    }
    default: {
      const expression = t.replace(/^cron\s+/i, '');
      const fields = expression.split(/\s+/).length;
      if (fields < 5 || fields > 6) {
        throw new InvalidArgumentError(`--schedule: "${t}" is neither a cron expression (5 or 6 fields) nor daily/monthly/every/after/none`);
      }
      return { kind: 'cron', expression, ...tz };
    }
  }
}

/** A schedule for a table cell: "daily 22:00 mon,fri", "every 30 minutes", "manual". */
export function scheduleText(s: Schedule | null | undefined): string {
  if (!s) return 'manual';
  const tz = 'timeZone' in s && s.timeZone ? ` ${s.timeZone}` : '';
  switch (s.kind) {
    case 'cron':
      return `cron ${s.expression}${tz}`;
    case 'daily':
      return `daily ${s.at}${s.days ? ` ${s.days.join(',')}` : ''}${tz}`;
    case 'monthly':
      return `monthly ${s.at} ${'week' in s.on ? `${s.on.week} ${s.on.weekday}` : `day ${s.on.day}`}${tz}`;
    case 'periodic':
      return `every ${s.every} ${s.unit}`;
    case 'after-job':
      return `after ${s.job}`;
  }
}

/** One `--window` value: "22:00-06:00" or "mon,tue 22:00-06:00". */
export function parseWindowPart(text: string): BackupWindow['allow'][number] {
  const m = /^(?:([a-z,]+)\s+)?(\d\d:\d\d)-(\d\d:\d\d)$/i.exec(text.trim());
  if (!m) throw new InvalidArgumentError(`--window: "${text}" is not [DAYS ]HH:MM-HH:MM (e.g. "mon,tue 22:00-06:00")`);
  return { ...(m[1] ? { days: days(m[1], '--window') } : {}), from: time(m[2], '--window'), to: time(m[3], '--window') };
}

export function windowText(w: BackupWindow | null | undefined): string {
  if (!w) return 'none (any time)';
  return w.allow.map((a) => `${a.days ? `${a.days.join(',')} ` : ''}${a.from}-${a.to}`).join('; ') + (w.timeZone ? ` ${w.timeZone}` : '');
}
