import { describe, expect, it } from 'vitest';
import { StageTimes } from './stage-times.js';

describe('StageTimes', () => {
  it('accumulates measured and added time per stage, also when work throws', async () => {
    let t = 0;
    const s = new StageTimes(() => t);
    await s.measure('source', async () => {
      t += 30;
    });
    await expect(
      s.measure('network', async () => {
        t += 5;
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    s.add('throttling', 12);
    s.add('proxy', -1);
    s.add('proxy', NaN);
    s.merge({ source: 1, proxy: 2, network: 0, target: 4, throttling: 0 });
    expect(s.snapshot()).toEqual({ source: 31, proxy: 2, network: 5, target: 4, throttling: 12 });
  });
});
