import { describe, expect, it } from 'vitest';
import { parseSchedule, parseWindowPart, scheduleText, windowText } from './schedule-text.js';

describe('parseSchedule', () => {
  it.each([
    ['none', undefined, null],
    ['0 22 * * 1-5', undefined, { kind: 'cron', expression: '0 22 * * 1-5' }],
    ['cron 0 22 * * *', 'Europe/Paris', { kind: 'cron', expression: '0 22 * * *', timeZone: 'Europe/Paris' }],
    ['daily 22:30', undefined, { kind: 'daily', at: '22:30' }],
    ['daily 06:00 mon,Friday', undefined, { kind: 'daily', at: '06:00', days: ['mon', 'fri'] }],
    ['every 30m', 'UTC', { kind: 'periodic', every: 30, unit: 'minutes' }],
    ['every 4 hours', undefined, { kind: 'periodic', every: 4, unit: 'hours' }],
    ['after nightly', undefined, { kind: 'after-job', job: 'nightly' }],
    ['monthly 03:00 day 1', undefined, { kind: 'monthly', at: '03:00', on: { day: 1 } }],
    ['monthly 03:00 day last', undefined, { kind: 'monthly', at: '03:00', on: { day: 'last' } }],
    ['monthly 03:00 first sun', undefined, { kind: 'monthly', at: '03:00', on: { week: 'first', weekday: 'sun' } }],
    ['{"kind":"daily","at":"01:00"}', undefined, { kind: 'daily', at: '01:00' }],
  ])('%s (tz %s)', (text, tz, expected) => {
    expect(parseSchedule(text, tz)).toEqual(expected);
  });

  it.each(['daily 25:00', 'every often', 'after', 'monthly 03:00 day 32', '* *', 'daily 10:00 someday', '{bad'])(
    'refuses %s with a message naming --schedule',
    (text) => {
      expect(() => parseSchedule(text)).toThrow(/--schedule/);
    },
  );

  it('prints what it parses', () => {
    for (const text of ['daily 06:00 mon,fri', 'every 30 minutes', 'after nightly', 'monthly 03:00 first sun', 'cron 0 22 * * *']) {
      expect(scheduleText(parseSchedule(text))).toBe(text);
    }
    expect(scheduleText(null)).toBe('manual');
  });
});

describe('windows', () => {
  it('parses and prints allowed hours', () => {
    const allow = ['22:00-06:00', 'sat,sun 00:00-23:59'].map(parseWindowPart);
    expect(allow).toEqual([{ from: '22:00', to: '06:00' }, { days: ['sat', 'sun'], from: '00:00', to: '23:59' }]);
    expect(windowText({ allow, timeZone: 'UTC' })).toBe('22:00-06:00; sat,sun 00:00-23:59 UTC');
    expect(() => parseWindowPart('22-6')).toThrow(/--window/);
  });
});
