import { describe, expect, it } from 'vitest';
import { limitFor, localTime, matchingThrottlingRules, mbpsToBytesPerSecond, ruleActiveAt, ruleCovers, throttlingRuleProblems, validateThrottlingRule, type ThrottlingRule } from './throttling-rules.js';

const rule = (extra: Partial<ThrottlingRule> = {}): ThrottlingRule => ({ name: 'wan', source: '10.1.0.0/16', target: '10.2.0.0/24, 192.168.5.10-192.168.5.20', mbps: 100, ...extra });

describe('ruleCovers (either direction)', () => {
  it.each<[string, string, string, boolean]>([
    ['source range to target CIDR', '10.1.3.4', '10.2.0.9', true],
    ['the reverse direction too', '10.2.0.9', '10.1.3.4', true],
    ['target given as a dash range', '10.1.0.1', '192.168.5.15', true],
    ['range end is inclusive', '10.1.0.1', '192.168.5.20', true],
    ['outside the range', '10.1.0.1', '192.168.5.21', false],
    ['both ends in the source range', '10.1.0.1', '10.1.0.2', false],
    ['outside the target CIDR', '10.1.0.1', '10.2.1.1', false],
    ['not an address', 'host.example', '10.2.0.1', false],
  ])('%s: %s <-> %s', (_n, a, b, expected) => {
    expect(ruleCovers(rule(), a, b)).toBe(expected);
  });

  it('IPv6 CIDRs and single addresses', () => {
    const r = rule({ source: 'fd00:1::/64', target: 'fd00:2::5' });
    expect(ruleCovers(r, 'fd00:1::abcd', 'fd00:2::5')).toBe(true);
    expect(ruleCovers(r, 'fd00:1::abcd', 'fd00:2::6')).toBe(false);
  });
});

describe('ruleActiveAt (time zone and day injected)', () => {
  // 2026-11-23 is a Monday.
  const at = (iso: string): Date => new Date(iso);
  const office = rule({ schedule: { days: ['mon', 'tue', 'wed', 'thu', 'fri'], from: '08:00', to: '18:00' } });
  const night = rule({ schedule: { days: ['fri'], from: '22:00', to: '06:00' } });
  it.each<[string, ThrottlingRule, string, string, boolean]>([
    ['office hours, Monday 09:00 Berlin', office, '2026-11-23T08:00:00Z', 'Europe/Berlin', true],
    ['same instant, New York is 03:00', office, '2026-11-23T08:00:00Z', 'America/New_York', false],
    ['end is exclusive', office, '2026-11-23T17:00:00Z', 'Europe/Berlin', false],
    ['start is inclusive', office, '2026-11-23T07:00:00Z', 'Europe/Berlin', true],
    ['Saturday is not a workday', office, '2026-11-28T10:00:00Z', 'UTC', false],
    ['overnight window, Friday 23:00', night, '2026-11-27T23:00:00Z', 'UTC', true],
    ['overnight window runs into Saturday 05:59', night, '2026-11-28T05:59:00Z', 'UTC', true],
    ['overnight window over at Saturday 06:00', night, '2026-11-28T06:00:00Z', 'UTC', false],
    ['overnight window, Friday 05:00 belongs to Thursday night', night, '2026-11-27T05:00:00Z', 'UTC', false],
    ['no schedule: always', rule(), '2026-11-28T03:00:00Z', 'UTC', true],
    ['disabled: never', rule({ enabled: false }), '2026-11-28T03:00:00Z', 'UTC', false],
    ['from == to: the whole day', rule({ schedule: { days: ['sat'], from: '00:00', to: '00:00' } }), '2026-11-28T23:59:00Z', 'UTC', true],
  ])('%s', (_n, r, iso, zone, expected) => {
    expect(ruleActiveAt(r, at(iso), zone)).toBe(expected);
  });

  it('localTime reads the zone, not the host', () => {
    expect(localTime(new Date('2026-11-23T23:30:00Z'), 'Asia/Tokyo')).toEqual({ day: 'tue', minute: 8 * 60 + 30 });
  });
});

describe('matchingThrottlingRules and validation', () => {
  it('returns every rule that covers the connection now (the strictest then wins)', () => {
    const rules = [rule({ name: 'a', mbps: 100 }), rule({ name: 'b', mbps: 20, source: '10.1.3.0/24' }), rule({ name: 'c', source: '10.9.0.0/16' })];
    const m = matchingThrottlingRules(rules, { sourceIp: '10.1.3.4', targetIp: '10.2.0.1', at: new Date(), timeZone: 'UTC' });
    expect(m.map((r) => r.name)).toEqual(['a', 'b']);
  });

  it('Mbit/s are 10^6 bits', () => {
    expect(mbpsToBytesPerSecond(100)).toBe(12_500_000);
  });

  it.each<[string, Partial<ThrottlingRule>, string[]]>([
    ['valid', {}, []],
    ['bad CIDR', { source: '10.1.0.0/33' }, ['source: "10.1.0.0/33" is not a valid CIDR range']],
    ['reversed range', { target: '10.0.0.9-10.0.0.1' }, ['target: "10.0.0.9-10.0.0.1" starts after it ends']],
    ['empty', { source: ' , ' }, ['source: an address range is empty']],
    ['garbage', { target: 'somewhere' }, ['target: "somewhere" is not an IP address']],
    ['zero limit', { mbps: 0 }, ['the limit must be a positive number of Mbit/s']],
    ['bad schedule', { schedule: { days: [], from: '25:00', to: '8:00' } }, ['"25:00" is not a time (HH:MM)', '"8:00" is not a time (HH:MM)', 'the schedule names no days']],
  ])('validate: %s', (_n, extra, errors) => {
    expect(validateThrottlingRule(rule(extra))).toEqual(errors);
  });
});

describe('limitFor (the strictest rule covering a connection now)', () => {
  // 2026-11-23 is a Monday; Europe/Berlin is UTC+1 in November.
  const rules: ThrottlingRule[] = [
    { name: 'wan', source: '10.1.0.0/16', target: '10.2.0.0/16', mbps: 100 },
    { name: 'office-hours', source: '10.1.0.0/16', target: '10.2.5.0/24', mbps: 20, schedule: { days: ['mon', 'tue', 'wed', 'thu', 'fri'], from: '08:00', to: '18:00' } },
    { name: 'night', source: '10.3.0.1-10.3.0.9', target: '10.2.0.0/16', mbps: 500, schedule: { days: ['mon'], from: '22:00', to: '06:00' } },
    { name: 'off', source: '0.0.0.0/0', target: '0.0.0.0/0', mbps: 1, enabled: false },
  ];
  it.each<[string, string, string, string, string | undefined, number | undefined]>([
    ['no rule covers it', '10.9.0.1', '10.2.0.1', '2026-11-23T10:00:00Z', undefined, undefined],
    ['one rule, either direction', '10.2.0.1', '10.1.0.1', '2026-11-23T03:00:00Z', 'wan', 100],
    ['two rules: the stricter wins in office hours', '10.1.0.1', '10.2.5.7', '2026-11-23T10:00:00Z', 'office-hours', 20],
    ['office hours end at 18:00 Berlin (17:00 UTC)', '10.1.0.1', '10.2.5.7', '2026-11-23T17:00:00Z', 'wan', 100],
    ['not on Saturday', '10.1.0.1', '10.2.5.7', '2026-11-28T10:00:00Z', 'wan', 100],
    ['a night window runs past midnight into Tuesday', '10.3.0.5', '10.2.0.1', '2026-11-24T04:00:00Z', 'night', 500],
    ['but not into Wednesday', '10.3.0.5', '10.2.0.1', '2026-11-25T04:00:00Z', undefined, undefined],
    ['a disabled rule never applies', '1.2.3.4', '5.6.7.8', '2026-11-23T10:00:00Z', undefined, undefined],
  ])('%s', (_what, a, b, at, rule, mbps) => {
    const limit = limitFor(rules, a, b, new Date(at), 'Europe/Berlin');
    expect(limit?.rule).toBe(rule);
    expect(limit?.mbps).toBe(mbps);
    if (limit) {
      expect(limit.bytesPerSecond).toBe(mbpsToBytesPerSecond(limit.mbps));
      expect(limit.rules.map((r) => r.name)).toContain(limit.rule);
    }
  });

  it('lists every matching rule (each has its own shared bucket)', () => {
    const limit = limitFor(rules, '10.1.0.1', '10.2.5.7', new Date('2026-11-23T10:00:00Z'), 'Europe/Berlin');
    expect(limit?.rules.map((r) => r.name).sort()).toEqual(['office-hours', 'wan']);
  });
});

describe('throttlingRuleProblems names the field', () => {
  it.each<[string, Partial<ThrottlingRule>, string]>([
    ['bad source CIDR', { source: '10.0.0.0/33' }, 'source'],
    ['empty target', { target: ' , ' }, 'target'],
    ['zero limit', { mbps: 0 }, 'mbps'],
    ['bad from', { schedule: { days: ['mon'], from: '8am', to: '18:00' } }, 'from'],
    ['bad to', { schedule: { days: ['mon'], from: '08:00', to: '24:00' } }, 'to'],
    ['no days', { schedule: { days: [], from: '08:00', to: '18:00' } }, 'days'],
  ])('%s', (_what, change, field) => {
    expect(throttlingRuleProblems(rule(change)).map((p) => p.field)).toEqual([field]);
  });
  it('a valid rule has none', () => {
    expect(throttlingRuleProblems(rule({ schedule: { days: ['sat', 'sun'], from: '00:00', to: '00:00' } }))).toEqual([]);
  });
});
