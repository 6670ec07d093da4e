// What retention removes from one VM folder (pure). Points are kept by count or by calendar days
// in the job's time zone; a point outside retention that a kept point depends on stays (forward),
// or is merged away (forever forward: the oldest increment goes into the full); a chain is deleted
// whole only when none of its points is kept; reverse chains lose their oldest .vrb files.
import type { RestorePointInfo } from '../restore-point.js';
import type { BackupChain } from '../folders.js';
import { instantOf, localParts } from './calendar.js';
import type { MethodPolicy, RetentionAction, VmChainState } from './types.js';

/** The instant before which points fall out of retention by `days` (same wall clock, `days` calendar days ago). */
export function retentionCutoff(now: Date, days: number, timeZone: string): Date {
  const p = localParts(now, timeZone);
  return instantOf({ ...p, day: p.day - days }, timeZone);
}

/** Ids of the points retention keeps (before dependencies are considered). */
export function keptPoints(chains: readonly BackupChain[], policy: MethodPolicy, now: Date): Set<string> {
  const all = chains.flatMap((c) => c.points).sort((a, b) => a.time.getTime() - b.time.getTime());
  const kept = new Set<string>();
  const r = policy.retention;
  if ('points' in r) {
    for (const p of all.slice(Math.max(0, all.length - Math.max(1, r.points)))) kept.add(p.id);
  } else {
    // A point exactly `days` calendar days old (same wall clock) is out: daily runs keep `days`
    // points on both sides of a daylight-saving change.
    const cutoff = retentionCutoff(now, r.days, policy.timeZone ?? 'UTC').getTime();
    for (const p of all) if (p.time.getTime() > cutoff) kept.add(p.id);
  }
  if ((policy.keepLatest ?? true) && all.length > 0) kept.add(all[all.length - 1]!.id);
  return kept;
}

/**
 * Retention actions for one VM, in the order to apply them.
 *
 * @example
 * for (const a of planRetention(await repo.chainState(job, vm), policy, new Date())) console.log(a.kind, a.reason);
 */
export function planRetention(state: VmChainState, policy: MethodPolicy, now: Date): RetentionAction[] {
  const kept = keptPoints(state.chains, policy, now);
  const out: RetentionAction[] = [];
  const what = 'points' in policy.retention ? `${policy.retention.points} points` : `${policy.retention.days} days`;
  for (const chain of state.chains) {
    const pts = chain.points;
    if (pts.length === 0) continue;
    const keptHere = pts.filter((p) => kept.has(p.id));
    if (keptHere.length === 0) {
      out.push({
        kind: 'delete-chain', chain: chain.id, points: pts.map((p) => p.id), files: pts.map((p) => p.file),
        reason: `no point of chain ${chain.id} is within retention (${what})`,
      });
      continue;
    }
    if (chain.method === 'reverse') {
      // Oldest first; each .vrb depends only on newer points, so any oldest run can go.
      for (const p of pts) {
        if (kept.has(p.id) || p.kind !== 'reverse') break;
        out.push({ kind: 'delete-point', chain: chain.id, point: p.id, files: [p.file], reason: `reverse point ${p.id} (${p.time.toISOString()}) is outside retention (${what})` });
      }
      continue;
    }
    // Forward chain: the points before the first kept one are outside retention.
    const firstKept = pts.findIndex((p) => kept.has(p.id));
    const outside = pts.slice(0, firstKept);
    if (outside.length === 0) continue;
    if (policy.method === 'forever-forward' && isLinear(pts)) {
      const full = pts[0]!;
      for (let i = 0; i < outside.length; i++) {
        const inc = pts[i + 1]!;
        out.push({
          kind: 'merge', chain: chain.id, point: inc.id, removes: pts[i]!.id, files: { increment: inc.file, full: full.file },
          reason: `point ${pts[i]!.id} (${pts[i]!.time.toISOString()}) is outside retention (${what}): merge increment ${inc.id} into the full`,
        });
      }
    } else {
      out.push({
        kind: 'none', chain: chain.id, points: outside.map((p) => p.id),
        reason: `${outside.length} point(s) outside retention (${what}) kept: point ${pts[firstKept]!.id} depends on them`,
      });
    }
  }
  return out;
}

/** A forward chain the merge can walk: a full, then increments each on the one before. */
function isLinear(pts: readonly RestorePointInfo[]): boolean {
  return pts[0]?.kind === 'full' && pts.every((p, i) => i === 0 || (p.kind === 'incremental' && p.base === pts[i - 1]!.id));
}
