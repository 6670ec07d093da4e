// Network throttling rules, global on the backup server: traffic between a source IP range and a
// target IP range (either direction) is limited to N Mbit/s, optionally only in given hours on
// given days, evaluated in the server's time zone. Pure: time and zone are passed in. The agent
// enforces each matching rule with one token bucket shared by every stream the rule covers.
import net from 'node:net';

export type Weekday = 'mon' | 'tue' | 'wed' | 'thu' | 'fri' | 'sat' | 'sun';
export const WEEKDAYS: readonly Weekday[] = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];

/** Hours a rule applies: from `from` until `to` (HH:MM, local), on the days the window starts. */
export interface ThrottlingSchedule {
  readonly days: readonly Weekday[];
  readonly from: string;
  readonly to: string;
}

export interface ThrottlingRule {
  readonly name: string;
  /** Comma-separated CIDRs (10.0.0.0/24, fd00::/64), ranges (10.0.0.5-10.0.0.9) or addresses. */
  readonly source: string;
  readonly target: string;
  readonly mbps: number;
  /** Absent: always. A window with from > to runs past midnight into the next day. */
  readonly schedule?: ThrottlingSchedule | undefined;
  readonly enabled?: boolean | undefined;
}

/** Mbit/s (10^6 bits) to bytes per second. */
export function mbpsToBytesPerSecond(mbps: number): number {
  return (mbps * 1_000_000) / 8;
}

type Entry = { kind: 'subnet'; address: string; prefix: number; family: 'ipv4' | 'ipv6' } | { kind: 'range'; start: string; end: string; family: 'ipv4' | 'ipv6' };

function family(ip: string): 'ipv4' | 'ipv6' | undefined {
  const v = net.isIP(ip);
  return v === 4 ? 'ipv4' : v === 6 ? 'ipv6' : undefined;
}

/** Parses an address list; returns the entries, or the problems found in words. */
export function parseAddressList(text: string): { entries: Entry[]; errors: string[] } {
  const entries: Entry[] = [];
  const errors: string[] = [];
  const parts = text.split(',').map((p) => p.trim()).filter((p) => p !== '');
  if (parts.length === 0) errors.push('an address range is empty');
  for (const part of parts) {
    if (part.includes('/')) {
      const [address = '', prefixText = ''] = part.split('/');
      const fam = family(address);
      const prefix = Number(prefixText);
      const max = fam === 'ipv4' ? 32 : 128;
      if (!fam || !/^\d+$/.test(prefixText) || prefix > max) errors.push(`"${part}" is not a valid CIDR range`);
      else entries.push({ kind: 'subnet', address, prefix, family: fam });
    } else if (part.includes('-') && !part.includes(':')) {
      const [start = '', end = ''] = part.split('-').map((s) => s.trim());
      const fam = family(start);
      if (!fam || family(end) !== fam) errors.push(`"${part}" is not a valid address range`);
      else if (compareIpv4(start, end) > 0) errors.push(`"${part}" starts after it ends`);
      else entries.push({ kind: 'range', start, end, family: fam });
    } else {
      const fam = family(part);
      if (!fam) errors.push(`"${part}" is not an IP address`);
      else entries.push({ kind: 'subnet', address: part, prefix: fam === 'ipv4' ? 32 : 128, family: fam });
    }
  }
  return { entries, errors };
}

function compareIpv4(a: string, b: string): number {
  const n = (ip: string): number => ip.split('.').reduce((acc, o) => acc * 256 + Number(o), 0);
  return n(a) - n(b);
}

function blockList(text: string): net.BlockList {
  const list = new net.BlockList();
  for (const e of parseAddressList(text).entries) {
    if (e.kind === 'subnet') list.addSubnet(e.address, e.prefix, e.family);
    else list.addRange(e.start, e.end, e.family);
  }
  return list;
}

function inList(list: net.BlockList, ip: string): boolean {
  const fam = family(ip);
  return fam !== undefined && list.check(ip, fam);
}

const HHMM = /^([01]\d|2[0-3]):([0-5]\d)$/;

/** Problems with a rule, in words for the user (empty when valid). */
export function validateThrottlingRule(rule: ThrottlingRule): string[] {
  const errors = [
    ...parseAddressList(rule.source).errors.map((e) => `source: ${e}`),
    ...parseAddressList(rule.target).errors.map((e) => `target: ${e}`),
  ];
  if (!(rule.mbps > 0) || !Number.isFinite(rule.mbps)) errors.push('the limit must be a positive number of Mbit/s');
  if (rule.schedule) {
    if (!HHMM.test(rule.schedule.from)) errors.push(`"${rule.schedule.from}" is not a time (HH:MM)`);
    if (!HHMM.test(rule.schedule.to)) errors.push(`"${rule.schedule.to}" is not a time (HH:MM)`);
    if (rule.schedule.days.length === 0) errors.push('the schedule names no days');
    for (const d of rule.schedule.days) if (!WEEKDAYS.includes(d)) errors.push(`"${String(d)}" is not a day (mon..sun)`);
  }
  return errors;
}

function minutes(hhmm: string): number {
  const m = HHMM.exec(hhmm);
  return m ? Number(m[1]) * 60 + Number(m[2]) : 0;
}

/** Weekday and minute of the day of `at` in `timeZone` (an IANA name such as Europe/Berlin). */
export function localTime(at: Date, timeZone: string): { day: Weekday; minute: number } {
  const parts = new Intl.DateTimeFormat('en-US', { timeZone, weekday: 'short', hour: '2-digit', minute: '2-digit', hourCycle: 'h23' }).formatToParts(at);
  const get = (type: string): string => parts.find((p) => p.type === type)?.value ?? '';
  const day = get('weekday').toLowerCase().slice(0, 3) as Weekday;
  return { day, minute: Number(get('hour')) * 60 + Number(get('minute')) };
}

/** Whether a rule's schedule covers `at` (always, without a schedule; never when disabled). */
export function ruleActiveAt(rule: ThrottlingRule, at: Date, timeZone: string): boolean {
  if (rule.enabled === false) return false;
  const s = rule.schedule;
  if (!s) return true;
  const { day, minute } = localTime(at, timeZone);
  const from = minutes(s.from);
  const to = minutes(s.to);
  const today = s.days.includes(day);
  if (from === to) return today; // the whole day
  if (from < to) return today && minute >= from && minute < to;
  const yesterday = WEEKDAYS[(WEEKDAYS.indexOf(day) + 6) % 7]!;
  return (today && minute >= from) || (s.days.includes(yesterday) && minute < to);
}

/** Whether traffic between two addresses falls under a rule, in either direction. */
export function ruleCovers(rule: ThrottlingRule, a: string, b: string): boolean {
  const src = blockList(rule.source);
  const dst = blockList(rule.target);
  return (inList(src, a) && inList(dst, b)) || (inList(src, b) && inList(dst, a));
}

/**
 * The rules that limit a connection between `sourceIp` and `targetIp` at `at`. All of them apply
 * (each with the bucket it shares with its other connections), so the strictest one wins.
 */
export function matchingThrottlingRules<R extends ThrottlingRule>(
  rules: readonly R[],
  connection: { sourceIp: string; targetIp: string; at: Date; timeZone: string },
): R[] {
  return rules.filter((r) => ruleActiveAt(r, connection.at, connection.timeZone) && ruleCovers(r, connection.sourceIp, connection.targetIp));
}

/** A problem with a rule, naming the field (source, target, mbps, days, from, to) for the API edge. */
export interface RuleProblem {
  readonly field: 'source' | 'target' | 'mbps' | 'days' | 'from' | 'to';
  readonly message: string;
}

/** Like `validateThrottlingRule`, each problem with the field it is about. */
export function throttlingRuleProblems(rule: ThrottlingRule): RuleProblem[] {
  const problems: RuleProblem[] = [
    ...parseAddressList(rule.source).errors.map((message) => ({ field: 'source' as const, message })),
    ...parseAddressList(rule.target).errors.map((message) => ({ field: 'target' as const, message })),
  ];
  if (!(rule.mbps > 0) || !Number.isFinite(rule.mbps)) problems.push({ field: 'mbps', message: `${String(rule.mbps)} is not a positive number of Mbit/s` });
  const s = rule.schedule;
  if (s) {
    if (!HHMM.test(s.from)) problems.push({ field: 'from', message: `"${s.from}" is not a time (HH:MM)` });
    if (!HHMM.test(s.to)) problems.push({ field: 'to', message: `"${s.to}" is not a time (HH:MM)` });
    if (s.days.length === 0) problems.push({ field: 'days', message: 'the schedule names no days' });
    for (const d of s.days) if (!WEEKDAYS.includes(d)) problems.push({ field: 'days', message: `"${String(d)}" is not a day (mon..sun)` });
  }
  return problems;
}

/** The limit on a connection: the strictest rule that covers it now. */
export interface ThrottleLimit {
  /** The rule whose limit applies (the strictest of those that match). */
  readonly rule: string;
  readonly mbps: number;
  readonly bytesPerSecond: number;
  /** Every rule that matches (each enforced with one bucket shared by all streams it covers). */
  readonly rules: ReadonlyArray<{ readonly name: string; readonly mbps: number; readonly bytesPerSecond: number }>;
}

/**
 * What limits traffic between `sourceIp` and `targetIp` (either direction) at `now`, evaluated in
 * `zone` (IANA time zone of the server); undefined when no enabled rule covers it at that time.
 * Pure. The transport enforces every rule in `rules` with its shared bucket; `bytesPerSecond` is
 * the strictest of them (what one stream alone can get at most).
 */
export function limitFor(rules: readonly ThrottlingRule[], sourceIp: string, targetIp: string, now: Date, zone: string): ThrottleLimit | undefined {
  const matching = matchingThrottlingRules(rules, { sourceIp, targetIp, at: now, timeZone: zone });
  if (matching.length === 0) return undefined;
  const all = matching.map((r) => ({ name: r.name, mbps: r.mbps, bytesPerSecond: mbpsToBytesPerSecond(r.mbps) }));
  const strictest = all.reduce((a, b) => (b.mbps < a.mbps ? b : a));
  return { rule: strictest.name, mbps: strictest.mbps, bytesPerSecond: strictest.bytesPerSecond, rules: all };
}
