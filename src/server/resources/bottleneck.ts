// The bottleneck verdict: which stage of a task (or a whole session) was busy the largest share of
// the time. Busy times come from the agents (src/transport/stage-times.ts). Throttling counts as a
// stage, so a rate limit or rule that held data back is named as the bottleneck.
import { STAGES, type Stage, type StageBusy } from '../../transport/stage-times.js';

export interface BottleneckVerdict {
  /** The busiest stage, or undefined when nothing was measured. */
  readonly bottleneck: Stage | undefined;
  /** Share of the elapsed time each stage was busy, 0..1. */
  readonly shares: Readonly<Record<Stage, number>>;
  /** For session logs: "Source 35% > Proxy 10% > Network 80% > Target 20%; bottleneck: Network". */
  readonly summary: string;
}

const LABEL: Record<Stage, string> = { source: 'Source', proxy: 'Proxy', network: 'Network', target: 'Target', throttling: 'Throttling' };

export function stageLabel(stage: Stage): string {
  return LABEL[stage];
}

/**
 * Shares are busy time over elapsed wall time, capped at 1 (busy time summed over parallel
 * streams can exceed the elapsed time). Ties go to the earlier stage in the pipeline.
 */
export function bottleneckVerdict(busy: StageBusy, elapsedMs: number): BottleneckVerdict {
  const shares = {} as Record<Stage, number>;
  for (const s of STAGES) shares[s] = elapsedMs > 0 ? Math.min(1, Math.max(0, busy[s]) / elapsedMs) : 0;
  let bottleneck: Stage | undefined;
  for (const s of STAGES) if (shares[s] > 0 && (bottleneck === undefined || shares[s] > shares[bottleneck])) bottleneck = s;
  const pct = (s: Stage): string => `${LABEL[s]} ${Math.round(shares[s] * 100)}%`;
  const pipeline = (['source', 'proxy', 'network', 'target'] as const).map(pct).join(' > ');
  const throttled = shares.throttling > 0 ? `, ${pct('throttling')}` : '';
  const summary = `${pipeline}${throttled}; bottleneck: ${bottleneck ? LABEL[bottleneck] : 'none'}`;
  return { bottleneck, shares, summary };
}

/** Sums per-task busy times into a session's. */
export function sumStageBusy(tasks: readonly StageBusy[]): StageBusy {
  const total: StageBusy = { source: 0, proxy: 0, network: 0, target: 0, throttling: 0 };
  for (const t of tasks) for (const s of STAGES) total[s] += t[s];
  return total;
}

/** What the API shows of a task's or session's stages: busy ms, shares, the bottleneck, the summary line. */
export interface StageStatsView {
  busyMs: StageBusy;
  shares: StageBusy;
  bottleneck: Stage | null;
  summary: string;
}

export function stageStatsView(busy: StageBusy, elapsedMs: number): StageStatsView {
  const v = bottleneckVerdict(busy, elapsedMs);
  return { busyMs: { ...busy }, shares: { ...v.shares }, bottleneck: v.bottleneck ?? null, summary: v.summary };
}

/** Reads a stored StageBusy (JSON); undefined when absent or not one. */
export function parseStageBusy(text: string | null | undefined): StageBusy | undefined {
  if (text === null || text === undefined) return undefined;
  try {
    const v = JSON.parse(text) as Record<string, unknown>;
    const busy = {} as StageBusy;
    for (const s of STAGES) busy[s] = typeof v[s] === 'number' && Number.isFinite(v[s]) ? v[s] : 0;
    return busy;
  } catch {
    return undefined;
  }
}

/**
 * A session's stages from its tasks': busy times summed, over the tasks' running times summed (a
 * session of parallel tasks is judged by what its tasks waited on, not by its wall time).
 */
export function sessionStageStats(tasks: ReadonlyArray<{ busy: StageBusy | undefined; elapsedMs: number }>): StageStatsView | undefined {
  const measured = tasks.filter((t): t is { busy: StageBusy; elapsedMs: number } => t.busy !== undefined);
  if (measured.length === 0) return undefined;
  return stageStatsView(sumStageBusy(measured.map((t) => t.busy)), measured.reduce((a, t) => a + Math.max(0, t.elapsedMs), 0));
}
