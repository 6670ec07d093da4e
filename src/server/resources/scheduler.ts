// The resource scheduler: tasks wait here for a slot on a proxy and on their repository, start in
// queue order as slots free, and hold a lease that carries their current share of the
// repository's rate limit. A thin stateful shell around the pure planTaskSlots/splitRepositoryRates.
import { BulwarkError } from '../../common/errors.js';
import type { SlotLease, SlotRequest, TaskSlots } from '../jobs/ports.js';
import { splitRepositoryRates } from './rate-split.js';
import {
  planTaskSlots,
  type ProcessingMode,
  type ProxyConfig,
  type RepositoryLimits,
  type RunningTask,
  type TaskRequirements,
} from './task-slots.js';

export interface Lease {
  readonly taskId: string;
  readonly proxy: string;
  readonly repository: string;
  readonly via: 'pinned' | 'on-host' | 'off-host';
  /** This task's current share of its repository's rate limit (bytes/s); undefined = unlimited. */
  rateLimit(): number | undefined;
  /** Called whenever the share changes (tasks start or end on the same repository). Returns an unsubscribe. */
  watchRate(listener: (bytesPerSecond: number | undefined) => void): () => void;
  /** Frees the slots; call exactly once when the task ends (later calls do nothing). */
  release(): void;
}

export interface ResourceSchedulerOptions {
  readonly proxies: readonly ProxyConfig[];
  readonly repositories: readonly RepositoryLimits[];
  readonly mode?: ProcessingMode;
}

interface Waiter {
  readonly req: TaskRequirements;
  readonly onWaiting: ((reasons: readonly string[]) => void) | undefined;
  /** The reasons last told, so a change is told once. */
  told: string;
  readonly resolve: (lease: Lease) => void;
  readonly reject: (err: Error) => void;
  readonly cleanup: () => void;
}

interface Held extends RunningTask {
  readonly listeners: Set<(rate: number | undefined) => void>;
  rate: number | undefined;
}

export class ResourceScheduler {
  #proxies: readonly ProxyConfig[];
  #repositories: readonly RepositoryLimits[];
  #mode: ProcessingMode;
  readonly #queue: Waiter[] = [];
  readonly #running = new Map<string, Held>();

  constructor(options: ResourceSchedulerOptions) {
    this.#proxies = options.proxies;
    this.#repositories = options.repositories;
    this.#mode = options.mode ?? 'parallel';
  }

  /** Waits for a slot. Rejects with kind `unavailable` when no proxy or repository can ever take the task, or when `signal` aborts. */
  acquire(req: TaskRequirements, signal?: AbortSignal, onWaiting?: (reasons: readonly string[]) => void): Promise<Lease> {
    if (signal?.aborted) return Promise.reject(abortError(req, signal));
    if (this.#running.has(req.taskId) || this.#queue.some((w) => w.req.taskId === req.taskId)) {
      return Promise.reject(new BulwarkError(`task ${req.taskId} already holds or awaits a slot`, { kind: 'conflict' }));
    }
    return new Promise<Lease>((resolve, reject) => {
      const onAbort = (): void => {
        const i = this.#queue.indexOf(waiter);
        if (i >= 0) {
          this.#queue.splice(i, 1);
          reject(abortError(req, signal!));
          this.#pump();
        }
      };
      const waiter: Waiter = { req, onWaiting, told: '', resolve, reject, cleanup: () => signal?.removeEventListener('abort', onAbort) };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#queue.push(waiter);
      this.#pump();
    });
  }

  /** What runs and what waits, for the console and tests. */
  snapshot(): { running: RunningTask[]; queued: string[] } {
    return {
      running: [...this.#running.values()].map(({ taskId, jobId, repository, proxy }) => ({ taskId, jobId, repository, proxy })),
      queued: this.#queue.map((w) => w.req.taskId),
    };
  }

  /** Agents came, went or changed limits; waiting tasks are planned again. */
  setProxies(proxies: readonly ProxyConfig[]): void {
    this.#proxies = proxies;
    this.#pump();
  }

  setRepositories(repositories: readonly RepositoryLimits[]): void {
    this.#repositories = repositories;
    this.#pump();
  }

  setMode(mode: ProcessingMode): void {
    this.#mode = mode;
    this.#pump();
  }

  #pump(): void {
    for (;;) {
      const plan = planTaskSlots({
        queue: this.#queue.map((w) => w.req),
        running: [...this.#running.values()],
        proxies: this.#proxies,
        repositories: this.#repositories,
        mode: this.#mode,
      });
      for (const s of plan.start) {
        const waiter = this.#take(s.taskId);
        const held: Held = { taskId: s.taskId, jobId: waiter.req.jobId, repository: s.repository, proxy: s.proxy, listeners: new Set(), rate: undefined };
        this.#running.set(s.taskId, held);
        waiter.resolve(this.#lease(held, s.via));
      }
      for (const i of plan.impossible) {
        const waiter = this.#take(i.taskId);
        const r = waiter.req;
        waiter.reject(new BulwarkError(`no proxy or repository can process disk ${r.need.disk} of VM ${r.need.vm}: ${i.reasons.join('; ')}`, {
          kind: 'unavailable',
          context: { task: r.taskId, vm: r.need.vm, disk: r.need.disk, repository: r.repository },
          hint: 'add an agent on the VM host or one that reaches its storage, or fix the job proxy/repository',
        }));
      }
      this.#updateRates();
      for (const w of plan.waiting) this.#tell(w.taskId, w.reasons);
      // Removing an impossible task can unblock later tasks of its job (sequential mode).
      if (plan.impossible.length === 0) return;
    }
  }

  #tell(taskId: string, reasons: readonly string[]): void {
    const waiter = this.#queue.find((q) => q.req.taskId === taskId);
    const text = reasons.join('; ');
    if (!waiter?.onWaiting || waiter.told === text) return;
    waiter.told = text;
    try {
      waiter.onWaiting(reasons);
    } catch {
      // A listener's failure must not stop the queue.
    }
  }

  #take(taskId: string): Waiter {
    const i = this.#queue.findIndex((w) => w.req.taskId === taskId);
    const [waiter] = this.#queue.splice(i, 1);
    waiter!.cleanup();
    return waiter!;
  }

  #lease(held: Held, via: Lease['via']): Lease {
    let released = false;
    return {
      taskId: held.taskId,
      proxy: held.proxy,
      repository: held.repository,
      via,
      rateLimit: () => held.rate,
      watchRate: (listener) => {
        held.listeners.add(listener);
        return () => held.listeners.delete(listener);
      },
      release: () => {
        if (released) return;
        released = true;
        this.#running.delete(held.taskId);
        held.listeners.clear();
        this.#pump();
      },
    };
  }

  #updateRates(): void {
    const limits = new Map(this.#repositories.map((r) => [r.name, r.rateLimit]));
    const shares = splitRepositoryRates([...this.#running.values()], limits);
    for (const held of this.#running.values()) {
      const rate = shares.get(held.taskId);
      if (rate === held.rate) continue;
      held.rate = rate;
      for (const l of held.listeners) l(rate);
    }
  }
}

function abortError(req: TaskRequirements, signal: AbortSignal): BulwarkError {
  return new BulwarkError(`task ${req.taskId} stopped while waiting for a slot`, { kind: 'conflict', cause: signal.reason });
}

/**
 * The job engine's TaskSlots port over a ResourceScheduler. `describe` maps the engine's request
 * to what scheduling needs (the VM's host and the disk's storage, typically from the disk's
 * `location`).
 */
export class SchedulerTaskSlots implements TaskSlots {
  readonly #scheduler: ResourceScheduler;
  readonly #describe: (request: SlotRequest) => TaskRequirements;

  constructor(scheduler: ResourceScheduler, describe: (request: SlotRequest) => TaskRequirements = describeSlotRequest) {
    this.#scheduler = scheduler;
    this.#describe = describe;
  }

  async acquire(request: SlotRequest, signal: AbortSignal): Promise<SlotLease> {
    const lease = await this.#scheduler.acquire(this.#describe(request), signal, request.onWaiting);
    return { proxy: lease.proxy, rateLimit: () => lease.rateLimit(), watchRate: (l) => lease.watchRate(l), release: () => lease.release() };
  }
}

/** Default mapping: `disk.location.host` is the VM's host, `disk.location.storage` its shared storage, `disk.location.agent` the agent that found it. */
export function describeSlotRequest(request: SlotRequest): TaskRequirements {
  return {
    taskId: request.taskId,
    jobId: request.jobId,
    repository: request.repository,
    need: {
      vm: request.vm,
      disk: request.disk.name,
      vmHost: request.disk.location?.host ?? '',
      storage: request.disk.location?.storage,
      pinned: request.proxy,
      foundBy: request.disk.location?.agent,
    },
  };
}
