import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { describe, expect, it } from 'vitest';
import { RateLimiter, SharedLimiters, TokenBucket, allOf, throttleStream } from './throttle.js';

describe('TokenBucket (pure, time passed in)', () => {
  it('lets a burst through, then makes callers wait in proportion to the debt', () => {
    const b = new TokenBucket({ bytesPerSecond: 1000, burst: 500 }, 0);
    expect(b.reserve(500, 0)).toBe(0);
    expect(b.reserve(100, 0)).toBeCloseTo(100); // 100 bytes of debt at 1000 B/s
    expect(b.reserve(100, 0)).toBeCloseTo(200); // queued behind the first
    expect(b.tokens(200)).toBeCloseTo(0);
    expect(b.reserve(1000, 200)).toBeCloseTo(1000); // larger than the burst still passes, later
  });

  it('refills at the rate and never above the burst', () => {
    const b = new TokenBucket({ bytesPerSecond: 1000, burst: 300 }, 0);
    b.reserve(300, 0);
    expect(b.tokens(100)).toBeCloseTo(100);
    expect(b.tokens(10_000)).toBe(300);
  });

  it('a rate of 0 or Infinity means unlimited', () => {
    for (const rate of [0, Infinity]) {
      const b = new TokenBucket({ bytesPerSecond: rate }, 0);
      expect(b.reserve(1e12, 0)).toBe(0);
    }
  });

  it('a rate change applies from then on', () => {
    const b = new TokenBucket({ bytesPerSecond: 1000, burst: 100 }, 0);
    b.reserve(100, 0);
    b.setRate(2000, 0, 100);
    expect(b.reserve(200, 0)).toBeCloseTo(100);
  });

  it('sustained throughput over a long simulated run equals the rate', () => {
    const b = new TokenBucket({ bytesPerSecond: 10_000, burst: 1000 }, 0);
    let now = 0;
    let sent = 0;
    while (now < 60_000) {
      now += b.reserve(700, now);
      sent += 700;
    }
    // 60 s at 10 kB/s plus the initial burst
    expect(sent / (now / 1000)).toBeGreaterThan(9_900);
    expect(sent / (now / 1000)).toBeLessThan(10_100);
  });
});

describe('RateLimiter shared by many callers', () => {
  it('one limit spans all callers: the total waits as if one caller sent everything', async () => {
    let t = 0;
    const limiter = new RateLimiter('rule', { bytesPerSecond: 1_000_000, burst: 1000 }, { now: () => t });
    const waits = await Promise.all([limiter.acquire(1000), limiter.acquire(1000), limiter.acquire(1000)]);
    expect(waits[0]).toBe(0);
    expect(waits[1]).toBeCloseTo(1);
    expect(waits[2]).toBeCloseTo(2);
    t = 100;
    expect(await limiter.acquire(500)).toBe(0);
  });

  it('allOf waits for the strictest limiter', async () => {
    const t = 0;
    const a = new RateLimiter('a', { bytesPerSecond: 1_000_000, burst: 100 }, { now: () => t });
    const b = new RateLimiter('b', { bytesPerSecond: 500_000, burst: 100 }, { now: () => t });
    expect(await allOf([a, b]).acquire(600)).toBeCloseTo(1); // b: 500 bytes of debt at 500 kB/s
  });

  it('throttleStream passes every byte through in order and reports its waits', async () => {
    const limiter = new RateLimiter('s', { bytesPerSecond: 10_000_000, burst: 4096 });
    const input = Array.from({ length: 20 }, (_, i) => Buffer.alloc(1024, i));
    const out: Buffer[] = [];
    let waited = 0;
    await pipeline(
      Readable.from(input),
      throttleStream(limiter, (ms) => (waited += ms)),
      new Writable({
        write(chunk: Buffer, _e, cb) {
          out.push(chunk);
          cb();
        },
      }),
    );
    expect(Buffer.concat(out)).toEqual(Buffer.concat(input));
    expect(waited).toBeGreaterThan(0);
  });
});

describe('SharedLimiters', () => {
  it('one limiter per rule, shared by every throttle that selects it; rates follow updates', async () => {
    let t = 0;
    const shared = new SharedLimiters({ now: () => t });
    const a = shared.throttleFor(() => [{ name: 'rule-1', bytesPerSecond: 1_000_000 }]);
    const b = shared.throttleFor(() => [{ name: 'rule-1', bytesPerSecond: 1_000_000 }]);
    expect(shared.limiter({ name: 'rule-1', bytesPerSecond: 1_000_000 })).toBe(shared.limiter({ name: 'rule-1', bytesPerSecond: 1_000_000 }));
    // the burst (1/8 s of the rate) is used up by the first task: the second one's bytes queue behind
    expect(await a.acquire(125_000)).toBe(0);
    expect(await b.acquire(1000)).toBeCloseTo(1);
    t = 1000;
    shared.limiter({ name: 'rule-1', bytesPerSecond: 2_000_000 });
    expect(shared.limiter({ name: 'rule-1', bytesPerSecond: 2_000_000 }).bytesPerSecond).toBe(2_000_000);
  });

  it('re-selects the applicable limits after the refresh interval (a rule window ends)', async () => {
    let t = 0;
    let active = true;
    const shared = new SharedLimiters({ now: () => t });
    const throttle = shared.throttleFor(() => (active ? [{ name: 'night', bytesPerSecond: 1_000_000 }] : []), 5000);
    await throttle.acquire(125_000);
    expect(await throttle.acquire(2000)).toBeCloseTo(2);
    active = false;
    expect(await throttle.acquire(2000)).toBeGreaterThan(0); // not re-evaluated yet
    t = 5000;
    expect(await throttle.acquire(10_000_000)).toBe(0);
  });
});
