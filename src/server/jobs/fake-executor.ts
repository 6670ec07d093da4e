// SIMULATION ONLY. A task executor that moves no data: it pretends to read a disk at a set pace,
// reports progress, and can be told to fail or warn. The server uses it until the data path
// (issue 5) provides the real executor; tests use it to drive the job engine.
import { BulwarkError } from '../../common/errors.js';
import { sleep, systemClock, type Clock } from '../scheduler/clock.js';
import type { DiskRef, DiskResolver, JobDefinition, TaskContext, TaskExecutor, TaskOutcome, TaskSpec } from './ports.js';

export interface FakeTaskExecutorOptions {
  clock?: Clock | undefined;
  /** Simulated time one task takes (default 1000 ms). */
  durationMs?: number | undefined;
  /** Progress reports per task (default 10). */
  steps?: number | undefined;
  /** Size assumed for a disk the resolver gave no size (default 1 GiB). */
  defaultDiskBytes?: number | undefined;
  /** Return a message to make the task fail halfway with it. */
  fail?: ((task: TaskSpec) => string | undefined) | undefined;
  /** Return a message to make the task end with this warning. */
  warn?: ((task: TaskSpec) => string | undefined) | undefined;
}

/** Simulated executor: reads nothing, stores nothing, says so in the session log. */
export class FakeTaskExecutor implements TaskExecutor {
  readonly #clock: Clock;
  readonly #durationMs: number;
  readonly #steps: number;
  readonly #defaultDiskBytes: number;
  readonly #fail: FakeTaskExecutorOptions['fail'];
  readonly #warn: FakeTaskExecutorOptions['warn'];
  /** Every task it was given, in start order (tests). */
  readonly started: TaskSpec[] = [];
  /** Tasks running right now, and the most at once (tests). */
  running = 0;
  maxRunning = 0;

  constructor(opts: FakeTaskExecutorOptions = {}) {
    this.#clock = opts.clock ?? systemClock;
    this.#durationMs = opts.durationMs ?? 1000;
    this.#steps = Math.max(1, opts.steps ?? 10);
    this.#defaultDiskBytes = opts.defaultDiskBytes ?? 1024 ** 3;
    this.#fail = opts.fail;
    this.#warn = opts.warn;
  }

  async execute(task: TaskSpec, context: TaskContext): Promise<TaskOutcome> {
    this.started.push(task);
    this.running++;
    this.maxRunning = Math.max(this.maxRunning, this.running);
    try {
      context.log('info', 'simulated backup (fake executor): no data is read or stored');
      const total = task.disk.sizeBytes ?? this.#defaultDiskBytes;
      const failure = this.#fail?.(task);
      for (let step = 1; step <= this.#steps; step++) {
        await sleep(this.#clock, this.#durationMs / this.#steps, context.signal);
        const bytesRead = Math.round((total * step) / this.#steps);
        context.progress({ bytesRead, bytesTransferred: Math.round(bytesRead / 2), bytesStored: Math.round(bytesRead / 3), total });
        if (failure !== undefined && step * 2 >= this.#steps) {
          throw new BulwarkError(failure, { context: { vm: task.vm, disk: task.disk.name } });
        }
      }
      const warning = this.#warn?.(task);
      return warning === undefined ? { state: 'success' } : { state: 'warning', messages: [warning] };
    } finally {
      this.running--;
    }
  }
}

/**
 * Disk resolver for the fake path: takes the disks from the job's settings
 * (`settings.disks = { [vm]: [{ name, sizeBytes }] }`), else one disk `vda` per VM.
 */
export class FakeDiskResolver implements DiskResolver {
  readonly #defaultDiskBytes: number;

  constructor(opts: { defaultDiskBytes?: number } = {}) {
    this.#defaultDiskBytes = opts.defaultDiskBytes ?? 1024 ** 3;
  }

  async resolveDisks(job: JobDefinition, vm: string, _signal: AbortSignal): Promise<DiskRef[]> {
    const configured = job.settings?.disks;
    if (configured !== undefined && typeof configured === 'object' && configured !== null) {
      const disks = (configured as Record<string, unknown>)[vm];
      if (disks === undefined) {
        throw new BulwarkError(`VM ${vm} is not known`, { kind: 'not-found', context: { vm, job: job.name } });
      }
      return (disks as Array<{ name: string; sizeBytes?: number }>).map((d) => ({ name: d.name, sizeBytes: d.sizeBytes }));
    }
    return [{ name: 'vda', sizeBytes: this.#defaultDiskBytes }];
  }
}
