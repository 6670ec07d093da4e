// Time as a port: the scheduler and the job engine read the time and set timers only through a
// Clock, so tests drive them with a ManualClock instead of sleeping.

export interface Timer {
  cancel(): void;
}

export interface Clock {
  now(): Date;
  /** Calls `fn` once, `delayMs` from now (at once when <= 0), unless cancelled. */
  setTimer(delayMs: number, fn: () => void): Timer;
}

/** setTimeout cannot wait longer than 2^31-1 ms (about 24.8 days); longer waits are chained. */
const maxTimeoutMs = 2 ** 31 - 1;

/** The real clock. */
export const systemClock: Clock = {
  now: () => new Date(),
  setTimer(delayMs, fn) {
    const due = Date.now() + Math.max(0, delayMs);
    let handle: NodeJS.Timeout;
    const arm = (): void => {
      const left = due - Date.now();
      handle = setTimeout(left > maxTimeoutMs ? arm : fn, Math.min(Math.max(0, left), maxTimeoutMs));
      handle.unref?.();
    };
    arm();
    return { cancel: () => clearTimeout(handle) };
  },
};

/** Resolves after `delayMs` on `clock`; rejects with the abort reason when `signal` aborts first. */
export async function sleep(clock: Clock, delayMs: number, signal?: AbortSignal): Promise<void> {
  signal?.throwIfAborted();
  return new Promise<void>((resolve, reject) => {
    const onAbort = (): void => {
      timer.cancel();
      reject(signal?.reason as Error);
    };
    const timer = clock.setTimer(delayMs, () => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    });
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * A clock that moves only when told. Timers fire in due order during {@link advance}, and the
 * promise callbacks they trigger run before the next timer fires.
 */
export class ManualClock implements Clock {
  #now: number;
  #timers: Array<{ due: number; seq: number; fn: () => void }> = [];
  #seq = 0;

  constructor(start: Date | string | number) {
    this.#now = new Date(start).getTime();
  }

  now(): Date {
    return new Date(this.#now);
  }

  setTimer(delayMs: number, fn: () => void): Timer {
    const entry = { due: this.#now + Math.max(0, delayMs), seq: this.#seq++, fn };
    this.#timers.push(entry);
    return { cancel: () => (this.#timers = this.#timers.filter((t) => t !== entry)) };
  }

  /** Number of timers not yet fired. */
  get pendingTimers(): number {
    return this.#timers.length;
  }

  /** Moves time forward by `ms`, firing every timer that falls due, in order. */
  async advance(ms: number): Promise<void> {
    await this.advanceTo(this.#now + ms);
  }

  /** Moves time forward to `at`, firing every timer due by then. */
  async advanceTo(at: Date | number | string): Promise<void> {
    const target = new Date(at).getTime();
    await flushPromises();
    for (;;) {
      this.#timers.sort((a, b) => a.due - b.due || a.seq - b.seq);
      const next = this.#timers[0];
      if (next === undefined || next.due > target) break;
      this.#timers.shift();
      this.#now = Math.max(this.#now, next.due);
      next.fn();
      await flushPromises();
    }
    this.#now = Math.max(this.#now, target);
    await flushPromises();
  }
}

/** Lets pending promise callbacks (and the I/O-free work they start) run. */
export async function flushPromises(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}
