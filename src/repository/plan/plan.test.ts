import { describe, expect, it } from 'vitest';
import type { BackupChain } from '../folders.js';
import type { RestorePointInfo } from '../restore-point.js';
import { dayMatches, instantOf, localDayNumber } from './calendar.js';
import { planRetention, retentionCutoff } from './plan-retention.js';
import { planRun } from './plan-run.js';
import type { MethodPolicy, RetentionAction, VmChainState } from './types.js';

// Chains written as strings: 'F I I I' (forward) or 'R R F' (reverse), one point per day starting
// at `start`; point ids are `<chain>-<n>` so expectations read plainly.
function chain(id: string, spec: string, start: string, stepHours = 24): BackupChain {
  const kinds = spec.split(' ');
  const method = kinds.includes('R') ? 'reverse' : 'forward';
  const t0 = Date.parse(start);
  const points: RestorePointInfo[] = kinds.map((k, i) => ({
    id: `${id}-${i}`, job: 'j', vm: 'v', chainId: id, method,
    kind: k === 'F' ? 'full' : k === 'I' ? 'incremental' : 'reverse',
    time: new Date(t0 + i * stepHours * 3600_000),
    file: `/r/j/v/${id}-${i}.${k === 'F' ? 'vbk' : k === 'I' ? 'vib' : 'vrb'}`, fileBytes: 1,
    base: k === 'F' ? null : k === 'I' ? `${id}-${i - 1}` : `${id}-${i + 1}`,
    disks: [], blockSize: 1048576, compression: 'zstd', encrypted: false,
  }));
  return { id, job: 'j', vm: 'v', method, blockSize: 1048576, compression: 'zstd', encrypted: false, passwordHint: null, points, folder: '/r/j/v' };
}
const state = (...chains: BackupChain[]): VmChainState => ({ chains, repair: null });
const brief = (a: RetentionAction) => {
  switch (a.kind) {
    case 'merge':
      return `merge ${a.point} (drops ${a.removes})`;
    case 'delete-chain':
      return `delete-chain ${a.chain}`;
    case 'delete-point':
      return `delete-point ${a.point}`;
    case 'none':
      return `keep ${a.points.join(',')}`;
  }
};

describe('planRun', () => {
  // 2026-11-22 is a Sunday, 2026-11-30 a Monday (last day of November).
  const ff: MethodPolicy = { method: 'forever-forward', retention: { points: 7 } };
  const fwd: MethodPolicy = { method: 'forward', retention: { points: 14 }, activeFull: { monthDays: [1] }, syntheticFull: { weekdays: ['sun'] } };
  const lastDay: MethodPolicy = { method: 'forward', retention: { points: 14 }, activeFull: { monthDays: [-1] } };
  const rev: MethodPolicy = { method: 'reverse', retention: { points: 7 }, activeFull: { weekdays: ['sat'] } };
  const cases: Array<[string, VmChainState, MethodPolicy, string, string]> = [
    ['empty folder', state(), ff, '2026-11-25T22:00:00Z', 'full'],
    ['forever forward continues', state(chain('a', 'F I I', '2026-11-20T22:00:00Z')), ff, '2026-11-25T22:00:00Z', 'incremental a-2'],
    ['forward, plain day', state(chain('a', 'F I I', '2026-11-19T22:00:00Z')), fwd, '2026-11-21T22:00:00Z', 'incremental a-2'],
    ['forward, synthetic full on sunday', state(chain('a', 'F I I', '2026-11-19T22:00:00Z')), fwd, '2026-11-22T22:00:00Z', 'synthetic-full a-2'],
    ['forward, synthetic already built sunday', state(chain('a', 'F I I', '2026-11-19T22:00:00Z'), chain('b', 'F', '2026-11-22T22:00:00Z')), fwd, '2026-11-23T22:00:00Z', 'incremental b-0'],
    ['forward, missed synthetic (sunday run failed) caught up monday', state(chain('a', 'F I I', '2026-11-19T22:00:00Z')), fwd, '2026-11-23T22:00:00Z', 'synthetic-full a-2'],
    ['forward, active full on the 1st wins over synthetic', state(chain('a', 'F I I', '2026-11-25T22:00:00Z')), fwd, '2026-12-01T22:00:00Z', 'full'],
    ['forward, active full on the last day (30 nov)', state(chain('a', 'F I', '2026-11-20T22:00:00Z')), lastDay, '2026-11-30T22:00:00Z', 'full'],
    ['forward, day before last day', state(chain('a', 'F I', '2026-11-20T22:00:00Z')), lastDay, '2026-11-29T22:00:00Z', 'incremental a-1'],
    ['forward, active full failed on the last day: retried next day', state(chain('a', 'F I I', '2026-11-28T22:00:00Z')), lastDay, '2026-12-01T22:00:00Z', 'full'],
    ['forward, active full taken today already', state(chain('a', 'F', '2026-11-30T01:00:00Z')), lastDay, '2026-11-30T22:00:00Z', 'incremental a-0'],
    ['reverse continues', state(chain('r', 'R R F', '2026-11-23T22:00:00Z')), rev, '2026-11-26T22:00:00Z', 'reverse r-2'],
    ['reverse, active full saturday', state(chain('r', 'R R F', '2026-11-23T22:00:00Z')), rev, '2026-11-28T22:00:00Z', 'full'],
    ['method changed forward -> reverse', state(chain('a', 'F I', '2026-11-23T22:00:00Z')), rev, '2026-11-25T22:00:00Z', 'full'],
    ['month day 31 in a 30-day month means its last day', state(chain('a', 'F I', '2026-11-20T22:00:00Z')), { ...lastDay, activeFull: { monthDays: [31] } }, '2026-11-30T22:00:00Z', 'full'],
    ['weekday in the job time zone (sunday 00:30 in Berlin is saturday UTC)', state(chain('a', 'F I', '2026-11-18T22:00:00Z')), { ...fwd, activeFull: null, timeZone: 'Europe/Berlin' }, '2026-11-21T23:30:00Z', 'synthetic-full a-1'],
  ];
  for (const [name, s, policy, now, want] of cases) {
    it(name, () => {
      const plan = planRun(s, policy, new Date(now));
      expect(`${plan.kind}${plan.parent ? ` ${plan.parent}` : ''}`).toBe(want);
      expect(plan.reason.length).toBeGreaterThan(0);
      expect(plan.chainMethod).toBe(policy.method === 'reverse' ? 'reverse' : 'forward');
    });
  }
  it('an encrypted chain gets its synthetic full too (its blocks are re-encrypted for the new chain)', () => {
    const c = { ...chain('a', 'F I I', '2026-11-19T22:00:00Z'), encrypted: true };
    expect(planRun(state(c), fwd, new Date('2026-11-22T22:00:00Z')).kind).toBe('synthetic-full');
  });
  it('damaged metadata found by a health check forces an active full', () => {
    const s: VmChainState = { chains: [chain('a', 'F I', '2026-11-20T22:00:00Z')], repair: { detectedAt: '2026-11-25T00:00:00Z', point: 'a-1', metadataDamaged: true, disks: [] } };
    expect(planRun(s, ff, new Date('2026-11-25T22:00:00Z')).kind).toBe('full');
    const blocksOnly: VmChainState = { ...s, repair: { ...s.repair!, metadataDamaged: false, disks: [{ disk: 'vda', blocks: [3] }] } };
    expect(planRun(blocksOnly, ff, new Date('2026-11-25T22:00:00Z')).kind).toBe('incremental');
  });
});

describe('planRetention', () => {
  const at = '2026-11-30T22:00:00Z';
  const cases: Array<[string, VmChainState, MethodPolicy, string, string[]]> = [
    ['forever forward within retention', state(chain('a', 'F I I', '2026-11-20T22:00:00Z')), { method: 'forever-forward', retention: { points: 3 } }, at, []],
    ['forever forward: two oldest merged', state(chain('a', 'F I I I I', '2026-11-20T22:00:00Z')), { method: 'forever-forward', retention: { points: 3 } }, at, ['merge a-1 (drops a-0)', 'merge a-2 (drops a-1)']],
    ['forever forward after an active full: old chain deleted once none kept', state(chain('a', 'F I', '2026-11-20T22:00:00Z'), chain('b', 'F I I', '2026-11-22T22:00:00Z')), { method: 'forever-forward', retention: { points: 3 } }, at, ['delete-chain a']],
    ['forever forward, old chain partly kept: merged inside it', state(chain('a', 'F I I', '2026-11-20T22:00:00Z'), chain('b', 'F I', '2026-11-23T22:00:00Z')), { method: 'forever-forward', retention: { points: 3 } }, at, ['merge a-1 (drops a-0)', 'merge a-2 (drops a-1)']],
    ['forward: a point kept by a dependent', state(chain('a', 'F I I I', '2026-11-20T22:00:00Z'), chain('b', 'F I', '2026-11-24T22:00:00Z')), { method: 'forward', retention: { points: 3 } }, at, ['keep a-0,a-1,a-2']],
    ['forward: chain deleted when no kept point depends on it', state(chain('a', 'F I I I', '2026-11-16T22:00:00Z'), chain('b', 'F I I', '2026-11-20T22:00:00Z')), { method: 'forward', retention: { points: 3 } }, at, ['delete-chain a']],
    ['reverse: oldest .vrb deleted', state(chain('r', 'R R R R F', '2026-11-20T22:00:00Z')), { method: 'reverse', retention: { points: 2 } }, at, ['delete-point r-0', 'delete-point r-1', 'delete-point r-2']],
    ['a failed last run deletes nothing more', state(chain('a', 'F I I', '2026-11-20T22:00:00Z')), { method: 'forever-forward', retention: { points: 3 } }, '2026-12-09T22:00:00Z', []],
    ['by days, runs failed for weeks: the latest point stays', state(chain('a', 'F I I', '2026-11-01T22:00:00Z')), { method: 'forever-forward', retention: { days: 7 } }, at, ['merge a-1 (drops a-0)', 'merge a-2 (drops a-1)']],
    ['by days, removed VM (keepLatest false): the chain goes', state(chain('a', 'F I I', '2026-11-01T22:00:00Z')), { method: 'forward', retention: { days: 14 }, keepLatest: false }, at, ['delete-chain a']],
    ['by days, forward 7 days, daily', state(chain('a', 'F I I I I I I I I I', '2026-11-21T22:00:00Z')), { method: 'forward', retention: { days: 7 } }, at, ['keep a-0,a-1,a-2']],
  ];
  for (const [name, s, policy, now, want] of cases) {
    it(name, () => {
      expect(planRetention(s, policy, new Date(now)).map(brief)).toEqual(want);
    });
  }

  it('by days across daylight-saving changes keeps exactly N daily points (Europe/Berlin)', () => {
    // Daily at 02:30 local. Spring forward 2026-03-29 (23 h day), fall back 2026-10-25 (25 h day).
    for (const [first, now] of [['2026-03-20', '2026-03-31'], ['2026-10-16', '2026-10-27']] as const) {
      const tz = 'Europe/Berlin';
      const base = Date.parse(`${first}T00:00:00Z`);
      const days = Array.from({ length: 12 }, (_, i) => {
        const d = new Date(base + i * 86400_000);
        return instantOf({ year: d.getUTCFullYear(), month: d.getUTCMonth() + 1, day: d.getUTCDate(), hour: 2, minute: 30, second: 0, ms: 0 }, tz);
      });
      const c = chain('a', Array.from({ length: 12 }, (_, i) => (i === 0 ? 'F' : 'I')).join(' '), first);
      const pts = c.points.map((p, i) => ({ ...p, time: days[i]! }));
      const s = state({ ...c, points: pts });
      const nowT = days.find((d) => d.toISOString().startsWith(now))!;
      const actions = planRetention(s, { method: 'forever-forward', retention: { days: 7 }, timeZone: tz }, nowT);
      // The point exactly 7 calendar days before now (same wall clock) is out; 7 points stay,
      // although 7 days are 167 h or 169 h here.
      const merged = actions.filter((a) => a.kind === 'merge').length;
      const nowIndex = days.indexOf(nowT);
      expect(nowIndex + 1 - merged, `${first}..${now}`).toBe(7);
      const hours = (nowT.getTime() - retentionCutoff(nowT, 7, tz).getTime()) / 3600_000;
      expect(hours).not.toBe(168);
    }
  });
});

describe('merging with damaged points (health check)', () => {
  const ff: MethodPolicy = { method: 'forever-forward', retention: { points: 3 } };
  const at = '2026-11-30T22:00:00Z';
  const mark = (point: string, blocks: number[], metadataDamaged = false) => ({ point, detectedAt: '2026-11-26T01:00:00Z', metadataDamaged, disks: blocks.length > 0 ? [{ disk: 'vda', blocks }] : [] });
  const repairOf = (point: string, blocks: number[]) => ({ detectedAt: '2026-11-26T01:00:00Z', point, metadataDamaged: false, disks: [{ disk: 'vda', blocks }] });
  const a5 = chain('a', 'F I I I I', '2026-11-20T22:00:00Z'); // a-0..a-4; keeping 3 merges a-1 and a-2
  const b = chain('b', 'F I', '2026-11-29T22:00:00Z');
  // [name, state, retention (brief), next run (planRun kind)]
  const cases: Array<[string, VmChainState, string[], string]> = [
    ['no damage: merges as usual', { chains: [a5], repair: null }, ['merge a-1 (drops a-0)', 'merge a-2 (drops a-1)'], 'incremental'],
    ['the increment to merge is damaged (recorded): refused, active full next', { chains: [a5], repair: null, damaged: [mark('a-1', [3])] }, ['keep a-0,a-1 (damaged a-1)'], 'full'],
    ['the full\'s point is damaged: refused (its blocks the increment inherits would stay)', { chains: [a5], repair: null, damaged: [mark('a-0', [7])] }, ['keep a-0,a-1 (damaged a-0)'], 'full'],
    ['a later increment damaged: earlier merges go on, then refused', { chains: [a5], repair: null, damaged: [mark('a-2', [1, 2])] }, ['merge a-1 (drops a-0)', 'keep a-1 (damaged a-2)'], 'full'],
    ['a pending repair (not yet run) marks its point too', { chains: [a5], repair: repairOf('a-1', [4]) }, ['keep a-0,a-1 (damaged a-1)'], 'full'],
    ['damaged metadata of the merged point', { chains: [a5], repair: null, damaged: [mark('a-2', [], true)] }, ['merge a-1 (drops a-0)', 'keep a-1 (damaged a-2)'], 'full'],
    ['damage in a kept point only: merges go on', { chains: [a5], repair: null, damaged: [mark('a-4', [9])] }, ['merge a-1 (drops a-0)', 'merge a-2 (drops a-1)'], 'incremental'],
    ['after the active full: the old chain waits, then is deleted whole; no second full', { chains: [chain('a', 'F I I', '2026-11-26T22:00:00Z'), b], repair: null, damaged: [mark('a-0', [3])] }, ['keep a-0,a-1 (damaged a-0)'], 'incremental'],
    ['old damaged chain out of retention: deleted whole', { chains: [chain('a', 'F I I', '2026-11-20T22:00:00Z'), chain('b', 'F I I', '2026-11-28T22:00:00Z')], repair: null, damaged: [mark('a-1', [3])] }, ['delete-chain a'], 'incremental'],
    ['forward method (no merges): damage changes nothing', { chains: [chain('a', 'F I I I', '2026-11-20T22:00:00Z'), b], repair: null, damaged: [mark('a-1', [3])] }, ['keep a-0,a-1,a-2'], 'incremental'],
  ];
  for (const [name, s, retention, next] of cases) {
    it(name, () => {
      const policy: MethodPolicy = name.startsWith('forward method') ? { ...ff, method: 'forward' } : ff;
      const actions = planRetention(s, policy, new Date(at));
      expect(actions.map((x) => `${brief(x)}${x.kind === 'none' && x.damaged ? ` (damaged ${x.damaged.join(',')})` : ''}`)).toEqual(retention);
      for (const x of actions) if (x.kind === 'none' && x.damaged) expect(x.reason).toMatch(/merge refused: point .* has (damaged vda block|damaged metadata).*active full/);
      expect(planRun(s, policy, new Date(at)).kind).toBe(next);
    });
  }
});

describe('calendar', () => {
  it('matches weekdays, month days and the last day', () => {
    const day = (s: string) => localDayNumber(new Date(`${s}T12:00:00Z`), 'UTC');
    expect(dayMatches(day('2026-11-22'), { weekdays: ['sun'] })).toBe(true);
    expect(dayMatches(day('2026-11-23'), { weekdays: ['sun'] })).toBe(false);
    expect(dayMatches(day('2026-02-28'), { monthDays: [-1] })).toBe(true);
    expect(dayMatches(day('2028-02-28'), { monthDays: [-1] })).toBe(false);
    expect(dayMatches(day('2028-02-29'), { monthDays: [30] })).toBe(true);
    expect(dayMatches(day('2026-11-15'), { monthDays: [1, 15] })).toBe(true);
  });
  it('converts wall clock to instants across a DST gap and overlap', () => {
    const tz = 'Europe/Berlin';
    expect(instantOf({ year: 2026, month: 7, day: 1, hour: 12, minute: 0, second: 0, ms: 0 }, tz).toISOString()).toBe('2026-07-01T10:00:00.000Z');
    expect(instantOf({ year: 2026, month: 1, day: 1, hour: 12, minute: 0, second: 0, ms: 0 }, tz).toISOString()).toBe('2026-01-01T11:00:00.000Z');
    // 02:30 on 2026-10-25 happens twice: the earlier (CEST) instant.
    expect(instantOf({ year: 2026, month: 10, day: 25, hour: 2, minute: 30, second: 0, ms: 0 }, tz).toISOString()).toBe('2026-10-25T00:30:00.000Z');
  });
});
