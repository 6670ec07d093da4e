import { describe, expect, it } from 'vitest';
import { resolveDataDir } from './data-dir.js';

describe('resolveDataDir', () => {
  it.each([
    [{ flag: '/x/y', env: { BULWARK_DATA: '/e' }, uid: 0 }, '/x/y'],
    [{ env: { BULWARK_DATA: '/e' }, uid: 0 }, '/e'],
    [{ env: {}, uid: 0 }, '/var/lib/bulwark'],
    [{ env: {}, uid: 1000, home: '/home/ann' }, '/home/ann/.local/share/bulwark'],
    [{ env: { HOME: '/home/bob' }, uid: 1000 }, '/home/bob/.local/share/bulwark'],
  ])('%j -> %s', (sources, want) => {
    expect(resolveDataDir(sources)).toBe(want);
  });
});
