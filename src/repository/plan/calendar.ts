// Calendar arithmetic in an IANA time zone with nothing but Intl: local dates of instants, the
// instant of a local wall-clock time, schedule days (weekdays, month days, last day of month).
import { BulwarkError } from '../../common/errors.js';
import type { DaySchedule, Weekday } from './types.js';

export interface LocalParts {
  readonly year: number;
  readonly month: number; // 1-12
  readonly day: number;
  readonly hour: number;
  readonly minute: number;
  readonly second: number;
  readonly ms: number;
}

const formats = new Map<string, Intl.DateTimeFormat>();
function formatFor(timeZone: string): Intl.DateTimeFormat {
  let f = formats.get(timeZone);
  if (!f) {
    try {
      f = new Intl.DateTimeFormat('en-US', {
        timeZone, hourCycle: 'h23', year: 'numeric', month: 'numeric', day: 'numeric', hour: 'numeric', minute: 'numeric', second: 'numeric',
      });
    } catch (err) {
      throw new BulwarkError(`unknown time zone ${timeZone}`, { kind: 'invalid', context: { timeZone }, cause: err });
    }
    formats.set(timeZone, f);
  }
  return f;
}

/** Wall-clock parts of `t` in `timeZone`. */
export function localParts(t: Date, timeZone: string): LocalParts {
  const parts: Record<string, number> = {};
  for (const p of formatFor(timeZone).formatToParts(t)) if (p.type !== 'literal') parts[p.type] = Number(p.value);
  return { year: parts.year!, month: parts.month!, day: parts.day!, hour: parts.hour! % 24, minute: parts.minute!, second: parts.second!, ms: t.getUTCMilliseconds() };
}

/** Milliseconds `timeZone` is ahead of UTC at instant `t`. */
function offsetAt(t: number, timeZone: string): number {
  const p = localParts(new Date(t), timeZone);
  return Date.UTC(p.year, p.month - 1, p.day, p.hour, p.minute, p.second, p.ms) - t;
}

/**
 * The instant at which `timeZone` shows wall-clock `p` (day may overflow: normalized). In a gap
 * (spring forward) the later offset applies; in an overlap (fall back) the earlier instant.
 */
export function instantOf(p: LocalParts, timeZone: string): Date {
  const asUtc = Date.UTC(p.year, p.month - 1, p.day, p.hour, p.minute, p.second, p.ms);
  let t = asUtc - offsetAt(asUtc, timeZone);
  t = asUtc - offsetAt(t, timeZone);
  // Overlap: prefer the earlier of the two instants showing this wall clock.
  const earlier = t - 3600_000;
  if (asUtc - offsetAt(earlier, timeZone) === earlier) return new Date(earlier);
  return new Date(t);
}

/** Local calendar day of `t` as a day number (days since 1970-01-01 in that zone's calendar). */
export function localDayNumber(t: Date, timeZone: string): number {
  const p = localParts(t, timeZone);
  return Math.round(Date.UTC(p.year, p.month - 1, p.day) / 86400_000);
}

const WEEKDAYS: readonly Weekday[] = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'];

/** Does the calendar day `dayNumber` match the schedule? */
export function dayMatches(dayNumber: number, s: DaySchedule): boolean {
  const d = new Date(dayNumber * 86400_000);
  if (s.weekdays?.includes(WEEKDAYS[d.getUTCDay()]!)) return true;
  if (s.monthDays && s.monthDays.length > 0) {
    const dom = d.getUTCDate();
    const last = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 0)).getUTCDate();
    for (const m of s.monthDays) {
      if (m === dom || (m === -1 && dom === last) || (m > last && dom === last)) return true;
    }
  }
  return false;
}

/** Names a day number as YYYY-MM-DD (ddd). */
export function dayName(dayNumber: number): string {
  const d = new Date(dayNumber * 86400_000);
  return `${d.toISOString().slice(0, 10)} (${WEEKDAYS[d.getUTCDay()]!})`;
}
