// Which queued tasks may start now: per-proxy and per-repository task limits, FIFO order, and
// parallel or sequential processing. Pure: the stateful ResourceScheduler calls it after every
// change (a task queued, a task ended, an agent came or went).
import { selectProxy, type ProxyCandidate, type ProxyNeed } from './proxy-selection.js';

/**
 * parallel: tasks of a job run side by side, as slots allow.
 * sequential: within a job one VM disk at a time, in queue order; different jobs still run in parallel.
 */
export type ProcessingMode = 'parallel' | 'sequential';

export interface TaskRequirements {
  readonly taskId: string;
  readonly jobId: string;
  readonly repository: string;
  readonly need: ProxyNeed;
}

export interface RunningTask {
  readonly taskId: string;
  readonly jobId: string;
  readonly repository: string;
  readonly proxy: string;
}

export interface RepositoryLimits {
  readonly name: string;
  readonly maxTasks: number;
  /** Read/write limit in bytes per second for all tasks together; undefined = unlimited. */
  readonly rateLimit?: number | undefined;
}

/** An agent's configuration; how many tasks it runs is derived from the running tasks. */
export type ProxyConfig = Omit<ProxyCandidate, 'running'>;

export interface SlotPlanInput {
  /** Waiting tasks, oldest first. */
  readonly queue: readonly TaskRequirements[];
  readonly running: readonly RunningTask[];
  readonly proxies: readonly ProxyConfig[];
  readonly repositories: readonly RepositoryLimits[];
  readonly mode: ProcessingMode;
}

export interface SlotPlan {
  readonly start: ReadonlyArray<{ taskId: string; proxy: string; repository: string; via: 'pinned' | 'on-host' | 'off-host' }>;
  readonly waiting: ReadonlyArray<{ taskId: string; reasons: readonly string[] }>;
  /** Tasks no proxy or repository can ever take as configured: fail them with the reasons. */
  readonly impossible: ReadonlyArray<{ taskId: string; reasons: readonly string[] }>;
}

/**
 * Walks the queue oldest first. A task starts when its repository and a proxy both have a free
 * slot; a later task may overtake an earlier one only when the earlier one cannot start now (so a
 * full proxy does not hold up tasks that another proxy could run).
 */
export function planTaskSlots(input: SlotPlanInput): SlotPlan {
  const proxyRunning = new Map<string, number>();
  const repoRunning = new Map<string, number>();
  const busyJobs = new Set<string>();
  for (const r of input.running) {
    proxyRunning.set(r.proxy, (proxyRunning.get(r.proxy) ?? 0) + 1);
    repoRunning.set(r.repository, (repoRunning.get(r.repository) ?? 0) + 1);
    busyJobs.add(r.jobId);
  }
  const start: SlotPlan['start'][number][] = [];
  const waiting: SlotPlan['waiting'][number][] = [];
  const impossible: SlotPlan['impossible'][number][] = [];
  for (const t of input.queue) {
    if (input.mode === 'sequential' && busyJobs.has(t.jobId)) {
      waiting.push({ taskId: t.taskId, reasons: ['sequential processing: the job processes one disk at a time'] });
      continue;
    }
    // In sequential mode the first queued task of a job holds its place even while it waits.
    if (input.mode === 'sequential') busyJobs.add(t.jobId);
    const repo = input.repositories.find((r) => r.name === t.repository);
    if (!repo) {
      impossible.push({ taskId: t.taskId, reasons: [`repository ${t.repository} does not exist`] });
      continue;
    }
    const inRepo = repoRunning.get(repo.name) ?? 0;
    if (inRepo >= repo.maxTasks) {
      waiting.push({ taskId: t.taskId, reasons: [`repository ${repo.name} is at its task limit (${inRepo} of ${repo.maxTasks})`] });
      continue;
    }
    const candidates: ProxyCandidate[] = input.proxies.map((p) => ({ ...p, running: proxyRunning.get(p.name) ?? 0 }));
    const choice = selectProxy(t.need, candidates);
    switch (choice.kind) {
      case 'selected':
        start.push({ taskId: t.taskId, proxy: choice.proxy, repository: repo.name, via: choice.via });
        proxyRunning.set(choice.proxy, (proxyRunning.get(choice.proxy) ?? 0) + 1);
        repoRunning.set(repo.name, inRepo + 1);
        busyJobs.add(t.jobId);
        break;
      case 'wait':
        waiting.push({ taskId: t.taskId, reasons: choice.reasons });
        break;
      case 'none':
        impossible.push({ taskId: t.taskId, reasons: choice.reasons });
        break;
    }
  }
  return { start, waiting, impossible };
}
