// Where a task's time goes, stage by stage, so the server can name the bottleneck. The agent
// wraps each wait in `measure(stage, ...)` (or adds measured milliseconds) and reports
// `snapshot()`; the verdict itself is server policy (src/server/resources/bottleneck.ts).

/** Source: reading the disk. Proxy: compress/hash. Network: socket writes. Target: waiting for
 * the target to make data durable (credit). Throttling: held back by a rate limit or rule. */
export type Stage = 'source' | 'proxy' | 'network' | 'target' | 'throttling';
export const STAGES: readonly Stage[] = ['source', 'proxy', 'network', 'target', 'throttling'];

export type StageBusy = Record<Stage, number>;

export function emptyStageBusy(): StageBusy {
  return { source: 0, proxy: 0, network: 0, target: 0, throttling: 0 };
}

/** Accumulates busy milliseconds per stage. Pure apart from the injectable clock. */
export class StageTimes {
  readonly #busy: StageBusy = emptyStageBusy();
  readonly #now: () => number;

  constructor(now: () => number = () => performance.now()) {
    this.#now = now;
  }

  add(stage: Stage, ms: number): void {
    if (ms > 0 && Number.isFinite(ms)) this.#busy[stage] += ms;
  }

  /** Runs `work` and counts its duration to `stage`, whether it succeeds or throws. */
  async measure<T>(stage: Stage, work: () => Promise<T>): Promise<T> {
    const start = this.#now();
    try {
      return await work();
    } finally {
      this.add(stage, this.#now() - start);
    }
  }

  /** Adds another accumulator's totals (per-task times summed into a session). */
  merge(other: StageBusy): void {
    for (const s of STAGES) this.add(s, other[s]);
  }

  snapshot(): StageBusy {
    return { ...this.#busy };
  }
}
