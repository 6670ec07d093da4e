// What retention removes from one VM folder (pure). Points are kept by count or by calendar days
// in the job's time zone; a point outside retention that a kept point depends on stays (forward),
// or is merged away (forever forward: the oldest increment goes into the full); a chain is deleted
// whole only when none of its points is kept; reverse chains lose their oldest .vrb files.
import type { RestorePointInfo } from '../restore-point.js';
import type { BackupChain } from '../folders.js';
import { instantOf, localParts } from './calendar.js';
import type { DamagedPointRecord, MethodPolicy, RetentionAction, VmChainState } from './types.js';

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
  const damaged = damagedPoints(state);
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
        // Never merge damage into the full: neither the point the full holds (its blocks the
        // increment inherits would stay) nor the increment (its blocks would become the full's).
        const hurt = [pts[i]!, inc].filter((p) => damaged.has(p.id));
        if (hurt.length > 0) {
          out.push({
            kind: 'none', chain: chain.id, points: outside.slice(i).map((p) => p.id), damaged: hurt.map((p) => p.id),
            reason: `merge refused: ${hurt.map((p) => `point ${p.id} (${p.time.toISOString()}) has ${describeDamage(damaged.get(p.id)!)}`).join('; ')}; merging would make the damage the full's. ${outside.length - i} point(s) are kept beyond retention (${what}) until an active full starts a new chain (the next run takes one) and this chain is deleted whole`,
          });
          break;
        }
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

/** Damaged points by id: every point a health check recorded, and the one a repair is pending for. */
export function damagedPoints(state: VmChainState): Map<string, DamagedPointRecord> {
  const out = new Map<string, DamagedPointRecord>();
  for (const d of state.damaged ?? []) out.set(d.point, d);
  const r = state.repair;
  if (r && !out.has(r.point) && (r.metadataDamaged || r.disks.some((d) => d.blocks.length > 0))) out.set(r.point, { ...r });
  return out;
}

function describeDamage(d: DamagedPointRecord): string {
  const blocks = d.disks.filter((x) => x.blocks.length > 0).map((x) => `${x.disk} block(s) ${x.blocks.slice(0, 8).join(', ')}${x.blocks.length > 8 ? ', ...' : ''}`);
  const parts = [...(d.metadataDamaged ? ['damaged metadata'] : []), ...(blocks.length > 0 ? [`damaged ${blocks.join('; ')}`] : [])];
  return `${parts.join(' and ') || 'damage'} (health check ${d.detectedAt})`;
}

/** A forward chain the merge can walk: a full, then increments each on the one before. */
function isLinear(pts: readonly RestorePointInfo[]): boolean {
  return pts[0]?.kind === 'full' && pts.every((p, i) => i === 0 || (p.kind === 'incremental' && p.base === pts[i - 1]!.id));
}
