// The executor's reading of job settings and its small pure decisions: exclusions, maintenance
// days, quick-backup and health-check operations; and the reader's extra (repair) blocks.
import { describe, expect, it } from 'vitest';
import { planBlocks } from '../../hypervisor/cbt/reader.js';
import { dueOn, localDay, methodPolicy, methodSettings, planVmRun, splitDisks } from './chain-policy.js';
import { describeRetentionAction, exportName } from './executor.js';

describe('chain policy', () => {
  it('reads settings with defaults and ignores malformed values', () => {
    expect(methodSettings(undefined)).toMatchObject({ method: 'forever-forward', retention: { points: 7 }, excludeDisks: [], removedVmRetentionDays: 14, operation: 'backup' });
    const s = methodSettings({ method: 'forward', retention: { days: 3 }, syntheticFull: { weekdays: ['sat', 'bogus'] }, activeFull: {}, healthCheck: { monthDays: [-1], wholeChain: true }, operation: 'quick' });
    expect(s).toMatchObject({ method: 'forward', retention: { days: 3 }, syntheticFull: { weekdays: ['sat'] }, activeFull: null, healthCheck: { monthDays: [-1], wholeChain: true }, operation: 'quick' });
    // A quick backup never takes a scheduled full.
    expect(methodPolicy(s)).toMatchObject({ activeFull: null, syntheticFull: null });
    expect(methodPolicy({ ...s, operation: 'backup' }).syntheticFull).toEqual({ weekdays: ['sat'] });
  });

  it('splits disks by VM:DISK and DISK entries', () => {
    expect(splitDisks(['db:vdb', 'vdc'], 'db', ['vda', 'vdb', 'vdc'])).toEqual({ included: ['vda'], excluded: ['vdb', 'vdc'] });
    expect(splitDisks(['db:vdb', 'vdc'], 'web', ['vda', 'vdb'])).toEqual({ included: ['vda', 'vdb'], excluded: [] });
  });

  it('maintenance days: weekday, month day and the last day of the month, in the time zone', () => {
    const sat = new Date('2026-11-28T12:00:00Z');
    expect(localDay(sat, 'UTC')).toEqual({ weekday: 'sat', day: 28, lastOfMonth: false });
    expect(dueOn({ weekdays: ['sat'] }, sat)).toBe(true);
    expect(dueOn({ weekdays: ['sun'] }, sat)).toBe(false);
    expect(dueOn({ monthDays: [-1] }, new Date('2026-11-30T23:30:00Z'))).toBe(true);
    // 23:30 UTC on the 30th is already December 1st in Berlin.
    expect(dueOn({ monthDays: [-1] }, new Date('2026-11-30T23:30:00Z'), 'Europe/Berlin')).toBe(false);
    expect(dueOn({ monthDays: [1] }, new Date('2026-11-30T23:30:00Z'), 'Europe/Berlin')).toBe(true);
    expect(dueOn(null, sat)).toBe(false);
  });

  it('a full asked for is a full, except in a quick backup', () => {
    const empty = { chains: [], repair: null };
    const s = methodSettings({ method: 'reverse' });
    expect(planVmRun(empty, s, new Date(), true)).toMatchObject({ kind: 'full', chainMethod: 'reverse', reason: 'a full backup was asked for' });
    expect(planVmRun(empty, { ...s, operation: 'quick' }, new Date(), true)).toMatchObject({ kind: 'full', reason: 'no restore point yet' });
  });

  it('log lines and export names', () => {
    expect(describeRetentionAction({ kind: 'delete-point', chain: 'c', point: 'p1', files: ['/x.vrb'], reason: 'outside retention' })).toBe('retention: deleted reverse point p1: outside retention');
    expect(exportName('web1', new Date('2026-11-25T17:00:00.123Z'))).toBe('_export-web1-20261125T170000Z');
  });

  it('the reader plans repair blocks the bitmap does not mark', () => {
    const bs = 1024;
    const allocation = [{ offset: 0, length: 4096, kind: 'data' as const }];
    const dirty = [
      { offset: 0, length: 1024, dirty: true },
      { offset: 1024, length: 3072, dirty: false },
    ];
    expect(planBlocks(bs, 0, 4096, allocation, dirty).map((b) => b.index)).toEqual([0]);
    expect(planBlocks(bs, 0, 4096, allocation, dirty, new Set([2])).map((b) => b.index)).toEqual([0, 2]);
  });
});
