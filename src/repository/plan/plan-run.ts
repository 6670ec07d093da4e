// What one run of a VM must write, from its chains and the job's method (pure).
// docs/formats/backup-files.md section 5 describes the transforms each kind leads to.
import type { BackupChain } from '../folders.js';
import { dayMatches, dayName, localDayNumber } from './calendar.js';
import { planRetention } from './plan-retention.js';
import type { DaySchedule, MethodPolicy, RunPlan, VmChainState } from './types.js';

/** How far back a missed scheduled full is still caught up (days). */
const CATCH_UP_DAYS = 62;

/**
 * Decides the kind of this run.
 * - no point yet, damaged metadata (health check), or a chain of the other method: `full`;
 * - an active-full day (or one missed since the latest full, e.g. that run failed): `full`;
 * - forward with a synthetic-full day since the latest full: `synthetic-full`;
 * - otherwise `incremental` (forward, forever-forward) or `reverse`.
 *
 * @example
 * planRun(await repo.chainState('nightly', 'web1'), { method: 'forward', retention: { points: 14 }, syntheticFull: { weekdays: ['sat'] } }, new Date())
 */
export function planRun(state: VmChainState, policy: MethodPolicy, now: Date): RunPlan {
  const tz = policy.timeZone ?? 'UTC';
  const chainMethod = policy.method === 'reverse' ? 'reverse' : 'forward';
  const full = (reason: string): RunPlan => ({ kind: 'full', reason, chainMethod, parent: null });
  const chain = latestChain(state.chains);
  const tip = chain?.points.at(-1);
  if (!chain || !tip) return full('no restore point yet');
  if (state.repair?.metadataDamaged) return full(`a health check found damaged metadata in point ${state.repair.point}: an active full is needed`);
  if (chain.method !== chainMethod) return full(`the latest chain is ${chain.method} but the job's method is ${policy.method}`);
  // The day the latest chain's full was taken (a reverse chain's full holds its newest point; its
  // oldest point is when the chain started).
  const chainStart = localDayNumber(chain.points[0]!.time, tz);
  const today = localDayNumber(now, tz);
  const activeDay = scheduledSince(policy.activeFull, chainStart, today);
  if (activeDay !== null) {
    return full(activeDay === today ? `active full scheduled on ${dayName(today)}` : `the active full scheduled on ${dayName(activeDay)} was not taken`);
  }
  if (policy.method === 'forever-forward') {
    // Retention refused to merge a damaged point of this chain into its full: start a new chain.
    const blocked = planRetention(state, policy, now).find((a) => a.kind === 'none' && a.chain === chain.id && (a.damaged?.length ?? 0) > 0);
    if (blocked) return full(`retention cannot merge damaged point(s) ${(blocked.kind === 'none' ? blocked.damaged ?? [] : []).join(', ')} into the full: active full (the old chain is deleted once no point of it is kept)`);
  }
  if (chainMethod === 'reverse') return { kind: 'reverse', reason: 'reverse incremental: inject the changes into the full', chainMethod, parent: tip.id };
  if (policy.method === 'forward') {
    // An encrypted chain's synthetic full re-encrypts its blocks for the new chain (same key).
    const synthDay = scheduledSince(policy.syntheticFull, chainStart, today);
    if (synthDay !== null) {
      return {
        kind: 'synthetic-full',
        reason: synthDay === today ? `synthetic full scheduled on ${dayName(today)}` : `the synthetic full scheduled on ${dayName(synthDay)} was not built`,
        chainMethod,
        parent: tip.id,
      };
    }
  }
  return { kind: 'incremental', reason: `incremental on ${tip.kind} point ${tip.id}`, chainMethod, parent: tip.id };
}

/** The latest scheduled day in (after, today], or null. */
function scheduledSince(s: DaySchedule | null | undefined, after: number, today: number): number | null {
  if (!s || ((s.weekdays?.length ?? 0) === 0 && (s.monthDays?.length ?? 0) === 0)) return null;
  for (let d = today; d > after && d > today - CATCH_UP_DAYS; d--) if (dayMatches(d, s)) return d;
  return null;
}

/** The chain holding the VM's newest point. */
export function latestChain(chains: readonly BackupChain[]): BackupChain | undefined {
  let best: BackupChain | undefined;
  for (const c of chains) {
    const t = c.points.at(-1)?.time.getTime();
    if (t === undefined) continue;
    if (!best || t >= best.points.at(-1)!.time.getTime()) best = c;
  }
  return best;
}
