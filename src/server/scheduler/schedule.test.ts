import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { cronPatternOf, isInsideWindow, missedRunSince, nextRun, validateSchedule, windowEndsAt, type BackupWindow, type Schedule } from './schedule.js';

const iso = (d: Date | undefined) => d?.toISOString();

describe('nextRun', () => {
  const cases: Array<[string, Schedule, string, string | undefined]> = [
    ['cron in a time zone', { kind: 'cron', expression: '0 22 * * *', timeZone: 'Europe/Berlin' }, '2026-03-02T10:00:00Z', '2026-03-02T21:00:00.000Z'],
    ['cron with seconds', { kind: 'cron', expression: '30 0 22 * * *', timeZone: 'UTC' }, '2026-03-02T10:00:00Z', '2026-03-02T22:00:30.000Z'],
    ['daily, strictly after', { kind: 'daily', at: '22:00', timeZone: 'UTC' }, '2026-03-02T22:00:00Z', '2026-03-03T22:00:00.000Z'],
    ['daily on chosen weekdays (Mon 2 Mar → Wed)', { kind: 'daily', at: '22:00', days: ['mon', 'wed', 'fri'], timeZone: 'UTC' }, '2026-03-02T23:00:00Z', '2026-03-04T22:00:00.000Z'],
    ['daily, weekend only (Fri → Sat)', { kind: 'daily', at: '08:15', days: ['sat', 'sun'], timeZone: 'UTC' }, '2026-03-06T12:00:00Z', '2026-03-07T08:15:00.000Z'],
    // DST: Europe/Berlin springs forward 2026-03-29 02:00 → 03:00; 02:30 does not exist that day
    // and runs at 03:30 CEST instead, once.
    ['DST spring forward: a time that does not exist runs an hour later', { kind: 'daily', at: '02:30', timeZone: 'Europe/Berlin' }, '2026-03-28T12:00:00Z', '2026-03-29T01:30:00.000Z'],
    ['DST spring forward: the day after is back to 02:30 CEST', { kind: 'daily', at: '02:30', timeZone: 'Europe/Berlin' }, '2026-03-29T12:00:00Z', '2026-03-30T00:30:00.000Z'],
    ['DST spring forward: 22:00 keeps its wall-clock time (UTC+2 now)', { kind: 'daily', at: '22:00', timeZone: 'Europe/Berlin' }, '2026-03-29T12:00:00Z', '2026-03-29T20:00:00.000Z'],
    // Falls back 2026-10-25 03:00 → 02:00: 02:30 happens twice; the job runs once.
    ['DST fall back: a time that happens twice runs once', { kind: 'daily', at: '02:30', timeZone: 'Europe/Berlin' }, '2026-10-24T12:00:00Z', '2026-10-25T01:30:00.000Z'],
    ['DST fall back: after that run, next is the next day', { kind: 'daily', at: '02:30', timeZone: 'Europe/Berlin' }, '2026-10-25T01:30:00Z', '2026-10-26T01:30:00.000Z'],
    ['DST in New York (8 Mar 2026)', { kind: 'daily', at: '09:00', timeZone: 'America/New_York' }, '2026-03-08T00:00:00Z', '2026-03-08T13:00:00.000Z'],
    ['monthly on day 15', { kind: 'monthly', at: '01:00', on: { day: 15 }, timeZone: 'UTC' }, '2026-03-15T01:00:00Z', '2026-04-15T01:00:00.000Z'],
    ['monthly on day 31 skips short months', { kind: 'monthly', at: '01:00', on: { day: 31 }, timeZone: 'UTC' }, '2026-03-31T12:00:00Z', '2026-05-31T01:00:00.000Z'],
    ['monthly on the last day (February)', { kind: 'monthly', at: '01:00', on: { day: 'last' }, timeZone: 'UTC' }, '2026-02-01T00:00:00Z', '2026-02-28T01:00:00.000Z'],
    ['monthly on the last day (leap February)', { kind: 'monthly', at: '01:00', on: { day: 'last' }, timeZone: 'UTC' }, '2028-02-01T00:00:00Z', '2028-02-29T01:00:00.000Z'],
    ['monthly on the first Monday', { kind: 'monthly', at: '01:00', on: { week: 'first', weekday: 'mon' }, timeZone: 'UTC' }, '2026-03-02T12:00:00Z', '2026-04-06T01:00:00.000Z'],
    ['monthly on the last Friday', { kind: 'monthly', at: '01:00', on: { week: 'last', weekday: 'fri' }, timeZone: 'UTC' }, '2026-03-02T12:00:00Z', '2026-03-27T01:00:00.000Z'],
    ['monthly on the third Sunday', { kind: 'monthly', at: '23:30', on: { week: 'third', weekday: 'sun' }, timeZone: 'UTC' }, '2026-03-01T00:00:00Z', '2026-03-15T23:30:00.000Z'],
    ['periodic every 90 minutes', { kind: 'periodic', every: 90, unit: 'minutes' }, '2026-03-02T10:00:00Z', '2026-03-02T11:30:00.000Z'],
    ['periodic every 4 hours across DST (absolute time)', { kind: 'periodic', every: 4, unit: 'hours' }, '2026-03-29T00:00:00Z', '2026-03-29T04:00:00.000Z'],
    ['after another job never fires on its own', { kind: 'after-job', job: 'nightly' }, '2026-03-02T10:00:00Z', undefined],
  ];
  it.each(cases)('%s', (_name, schedule, after, expected) => {
    expect(iso(nextRun(schedule, new Date(after)))).toBe(expected);
  });

  it('uses the default time zone when the schedule names none', () => {
    expect(iso(nextRun({ kind: 'daily', at: '22:00' }, new Date('2026-07-01T00:00:00Z'), 'Asia/Tokyo'))).toBe('2026-07-01T13:00:00.000Z');
  });

  it('turns calendar schedules into cron patterns', () => {
    expect(cronPatternOf({ kind: 'daily', at: '07:05', days: ['sun', 'sat'] })).toBe('5 7 * * 0,6');
    expect(cronPatternOf({ kind: 'monthly', at: '23:59', on: { week: 'last', weekday: 'sun' } })).toBe('59 23 * * 0#L');
    expect(cronPatternOf({ kind: 'monthly', at: '0:00', on: { day: 'last' } })).toBe('0 0 L * *');
  });
});

describe('validateSchedule', () => {
  const bad: Array<[Schedule, string, string]> = [
    [{ kind: 'daily', at: '25:00' }, 'at', '"25:00" is not a time of day'],
    [{ kind: 'daily', at: '22:00', timeZone: 'Mars/Olympus' }, 'timeZone', 'unknown time zone "Mars/Olympus"'],
    [{ kind: 'cron', expression: '61 * * * *' }, 'schedule', 'the schedule pattern "61 * * * *" is not valid'],
    [{ kind: 'monthly', at: '01:00', on: { day: 32 } }, 'on.day', 'monthly day 32 is not a day of the month'],
    [{ kind: 'periodic', every: 0, unit: 'hours' }, 'every', '"every 0 hours" is not a period'],
    [{ kind: 'after-job', job: ' ' }, 'job', '"after job" names no job'],
  ];
  it.each(bad)('refuses %j naming field %s', (schedule, field, message) => {
    const err = (() => {
      try {
        validateSchedule(schedule);
      } catch (e) {
        return e;
      }
      return undefined;
    })() as BulwarkError;
    expect(err).toBeInstanceOf(BulwarkError);
    expect(err.kind).toBe('invalid');
    expect(err.context.field).toBe(field);
    expect(err.message).toContain(message);
  });

  it('accepts good schedules', () => {
    validateSchedule({ kind: 'cron', expression: '0 22 * * 1-5', timeZone: 'Europe/Berlin' });
    validateSchedule({ kind: 'monthly', at: '01:00', on: { week: 'second', weekday: 'tue' } });
  });
});

describe('missedRunSince', () => {
  const daily: Schedule = { kind: 'daily', at: '22:00', timeZone: 'UTC' };
  const cases: Array<[string, Schedule, string, string, string | undefined]> = [
    ['nothing due yet', daily, '2026-03-02T22:00:00Z', '2026-03-03T21:59:00Z', undefined],
    ['one run missed', daily, '2026-03-02T22:00:00Z', '2026-03-03T23:00:00Z', '2026-03-03T22:00:00.000Z'],
    ['several missed: reports the first (runs once)', daily, '2026-03-02T22:00:00Z', '2026-03-09T08:00:00Z', '2026-03-03T22:00:00.000Z'],
    ['due exactly now counts', daily, '2026-03-02T22:00:00Z', '2026-03-03T22:00:00Z', '2026-03-03T22:00:00.000Z'],
    ['periodic overdue', { kind: 'periodic', every: 6, unit: 'hours' }, '2026-03-02T00:00:00Z', '2026-03-02T07:00:00Z', '2026-03-02T06:00:00.000Z'],
    ['periodic not yet', { kind: 'periodic', every: 6, unit: 'hours' }, '2026-03-02T00:00:00Z', '2026-03-02T05:59:59Z', undefined],
    ['after-job is never missed', { kind: 'after-job', job: 'x' }, '2026-03-02T00:00:00Z', '2027-01-01T00:00:00Z', undefined],
    ['missed across the spring-forward night', { kind: 'daily', at: '02:30', timeZone: 'Europe/Berlin' }, '2026-03-28T01:30:00Z', '2026-03-29T08:00:00Z', '2026-03-29T01:30:00.000Z'],
  ];
  it.each(cases)('%s', (_n, schedule, lastRun, now, expected) => {
    expect(iso(missedRunSince(schedule, new Date(lastRun), new Date(now)))).toBe(expected);
  });
});

describe('backup windows', () => {
  const nights: BackupWindow = { allow: [{ from: '22:00', to: '06:00' }], timeZone: 'Europe/Berlin' };
  const workNightsAndWeekends: BackupWindow = {
    timeZone: 'UTC',
    allow: [
      { days: ['mon', 'tue', 'wed', 'thu', 'fri'], from: '20:00', to: '06:00' },
      { days: ['sat', 'sun'], from: '00:00', to: '24:00' },
    ],
  };
  const cases: Array<[string, BackupWindow, string, boolean, string | undefined]> = [
    ['inside, before midnight (CET = UTC+1)', nights, '2026-03-02T22:00:00Z', true, '2026-03-03T05:00:00.000Z'],
    ['inside, after midnight', nights, '2026-03-03T03:00:00Z', true, '2026-03-03T05:00:00.000Z'],
    ['outside: ends at once (returns start)', nights, '2026-03-03T12:00:00Z', false, '2026-03-03T12:00:00.000Z'],
    ['starts exactly at the opening', nights, '2026-03-02T21:00:00Z', true, '2026-03-03T05:00:00.000Z'],
    ['exactly at the close is outside', nights, '2026-03-03T05:00:00Z', false, '2026-03-03T05:00:00.000Z'],
    ['the spring-forward night ends at 06:00 CEST = 04:00 UTC', nights, '2026-03-28T22:00:00Z', true, '2026-03-29T04:00:00.000Z'],
    ['the fall-back night ends at 06:00 CET = 05:00 UTC', nights, '2026-10-24T22:00:00Z', true, '2026-10-25T05:00:00.000Z'],
    // The Mon–Fri rule's early-morning part belongs to the evening before: Monday 00:00–06:00 is
    // Sunday night, which that rule does not cover.
    ['Friday night joins the weekend and ends as Monday begins', workNightsAndWeekends, '2026-03-06T23:00:00Z', true, '2026-03-09T00:00:00.000Z'],
    ['Saturday noon, same period', workNightsAndWeekends, '2026-03-07T12:00:00Z', true, '2026-03-09T00:00:00.000Z'],
    ['Thursday night runs into Friday 06:00', workNightsAndWeekends, '2026-03-05T21:00:00Z', true, '2026-03-06T06:00:00.000Z'],
    ['Monday night ends Tuesday 06:00', workNightsAndWeekends, '2026-03-09T21:00:00Z', true, '2026-03-10T06:00:00.000Z'],
    ['Wednesday noon is outside', workNightsAndWeekends, '2026-03-04T12:00:00Z', false, '2026-03-04T12:00:00.000Z'],
    ['00:00–00:00 is the whole day (weekend rule)', { timeZone: 'UTC', allow: [{ days: ['sat', 'sun'], from: '00:00', to: '00:00' }] }, '2026-03-07T12:00:00Z', true, '2026-03-09T00:00:00.000Z'],
    ['a window allowing the whole week never ends', { allow: [{ from: '00:00', to: '24:00' }] }, '2026-03-04T12:00:00Z', true, undefined],
  ];
  it.each(cases)('%s', (_n, window, start, inside, ends) => {
    expect(isInsideWindow(window, new Date(start))).toBe(inside);
    expect(iso(windowEndsAt(window, new Date(start)))).toBe(ends);
  });
});
