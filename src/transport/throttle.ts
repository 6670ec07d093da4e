// Token-bucket rate limiting for data streams. `TokenBucket` is the pure core (time is passed in);
// `RateLimiter` puts it on a clock so any number of streams and tasks can share one limit (a
// throttling rule, a repository's share), and `throttleStream` wraps a Node stream with limiters.
import { Transform, type TransformCallback } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';

export interface TokenBucketOptions {
  /** Sustained rate in bytes per second; Infinity (or 0) means unlimited. */
  readonly bytesPerSecond: number;
  /** Bytes that may pass at once after idle time; default 1/8 s of the rate, at least 64 KiB. */
  readonly burst?: number;
}

/**
 * A token bucket where taking more tokens than are present is a reservation: the balance goes
 * negative and the caller waits until it would have refilled. Callers are thereby served in the
 * order they asked, and a request larger than the burst still passes (it just waits longer).
 */
export class TokenBucket {
  #rate: number;
  #burst: number;
  #tokens: number;
  #updatedAt: number;

  constructor(options: TokenBucketOptions, now: number) {
    this.#rate = normalizeRate(options.bytesPerSecond);
    this.#burst = burstFor(this.#rate, options.burst);
    this.#tokens = this.#burst;
    this.#updatedAt = now;
  }

  get bytesPerSecond(): number {
    return this.#rate;
  }

  /** Tokens available at `now` (negative while reservations are outstanding). */
  tokens(now: number): number {
    this.#refill(now);
    return this.#tokens;
  }

  /** Takes `bytes` tokens; returns how many milliseconds the caller must wait before sending. */
  reserve(bytes: number, now: number): number {
    if (this.#rate === Infinity) return 0;
    this.#refill(now);
    this.#tokens -= bytes;
    return this.#tokens >= 0 ? 0 : (-this.#tokens / this.#rate) * 1000;
  }

  /** Changes the rate from `now` on (outstanding reservations keep their debt). */
  setRate(bytesPerSecond: number, now: number, burst?: number): void {
    this.#refill(now);
    this.#rate = normalizeRate(bytesPerSecond);
    this.#burst = burstFor(this.#rate, burst);
    this.#tokens = Math.min(this.#tokens, this.#burst);
  }

  #refill(now: number): void {
    const elapsed = Math.max(0, now - this.#updatedAt);
    this.#updatedAt = Math.max(now, this.#updatedAt);
    if (this.#rate === Infinity) return;
    this.#tokens = Math.min(this.#burst, this.#tokens + (elapsed / 1000) * this.#rate);
  }
}

function normalizeRate(bytesPerSecond: number): number {
  if (!(bytesPerSecond > 0)) return Infinity;
  return bytesPerSecond;
}

function burstFor(rate: number, burst: number | undefined): number {
  if (burst !== undefined && burst > 0) return burst;
  if (rate === Infinity) return Infinity;
  return Math.max(64 * 1024, rate / 8);
}

/** Something that can hold bytes back: one limiter, or several that all must agree. */
export interface Throttle {
  /** Resolves when `bytes` may be sent; the promise's value is the milliseconds waited. */
  acquire(bytes: number): Promise<number>;
}

export interface Clock {
  now(): number;
}
const systemClock: Clock = { now: () => performance.now() };

/** A shared limit on a clock: every stream and task that holds the same instance shares the rate. */
export class RateLimiter implements Throttle {
  readonly name: string;
  readonly #bucket: TokenBucket;
  readonly #clock: Clock;

  constructor(name: string, options: TokenBucketOptions, clock: Clock = systemClock) {
    this.name = name;
    this.#clock = clock;
    this.#bucket = new TokenBucket(options, clock.now());
  }

  get bytesPerSecond(): number {
    return this.#bucket.bytesPerSecond;
  }

  setRate(bytesPerSecond: number, burst?: number): void {
    this.#bucket.setRate(bytesPerSecond, this.#clock.now(), burst);
  }

  async acquire(bytes: number): Promise<number> {
    const wait = this.#bucket.reserve(bytes, this.#clock.now());
    if (wait > 0) await sleep(wait);
    return wait;
  }
}

/** All limiters must allow the bytes: with several rules covering a stream the strictest wins. */
export function allOf(limiters: readonly Throttle[]): Throttle {
  if (limiters.length === 1) return limiters[0]!;
  return {
    async acquire(bytes: number): Promise<number> {
      const waits = await Promise.all(limiters.map((l) => l.acquire(bytes)));
      return Math.max(0, ...waits);
    },
  };
}

/** A Transform that passes chunks through only as fast as `throttle` allows. */
export function throttleStream(throttle: Throttle, onWait?: (ms: number) => void): Transform {
  return new Transform({
    transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback) {
      throttle.acquire(chunk.length).then(
        (ms) => {
          if (ms > 0) onWait?.(ms);
          callback(null, chunk);
        },
        (err: unknown) => callback(err instanceof Error ? err : new Error(String(err))),
      );
    },
  });
}

/** A limit to enforce: a throttling rule (by name) or a repository share, in bytes per second. */
export interface NamedLimit {
  readonly name: string;
  readonly bytesPerSecond: number;
}

/**
 * The agent's shared limiters: one RateLimiter per name (throttling rule, repository share), the
 * same instance for every stream and task it covers, so a rule's limit is its total. Which limits
 * apply can change while a task runs (a rule's hours begin or end; a repository share changes):
 * `throttleFor` re-asks `select` at most every `refreshMs`.
 */
export class SharedLimiters {
  readonly #limiters = new Map<string, RateLimiter>();
  readonly #clock: Clock;

  constructor(clock: Clock = systemClock) {
    this.#clock = clock;
  }

  /** The limiter for a name, created on first use; its rate follows the latest value given. */
  limiter(limit: NamedLimit): RateLimiter {
    let l = this.#limiters.get(limit.name);
    if (!l) {
      l = new RateLimiter(limit.name, { bytesPerSecond: limit.bytesPerSecond }, this.#clock);
      this.#limiters.set(limit.name, l);
    } else if (normalizeRate(limit.bytesPerSecond) !== l.bytesPerSecond) {
      l.setRate(limit.bytesPerSecond);
    }
    return l;
  }

  /** A Throttle over the limits `select` returns now, re-evaluated at most every `refreshMs`. */
  throttleFor(select: () => readonly NamedLimit[], refreshMs = 10_000): Throttle {
    let current: readonly RateLimiter[] = [];
    let selectedAt = -Infinity;
    return {
      acquire: async (bytes: number): Promise<number> => {
        const now = this.#clock.now();
        if (now - selectedAt >= refreshMs) {
          current = select().map((l) => this.limiter(l));
          selectedAt = now;
        }
        if (current.length === 0) return 0;
        return allOf(current).acquire(bytes);
      },
    };
  }
}
