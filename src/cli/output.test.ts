import { describe, expect, it } from 'vitest';
import { formatFields, formatTable, humanDuration, humanSize, localTime } from './output.js';

describe('humanSize', () => {
  it.each([
    [0, '0 B'],
    [1023, '1023 B'],
    [1024, '1.00 KiB'],
    [1536, '1.50 KiB'],
    [10 * 1024 * 1024 + 1, '10.0 MiB'],
    [150 * 1024 ** 3, '150 GiB'],
    [-2048, '-2.00 KiB'],
    [undefined, '-'],
    [null, '-'],
  ])('%s -> %s', (bytes, text) => expect(humanSize(bytes)).toBe(text));
});

describe('humanDuration', () => {
  it.each([
    [0, '0s'],
    [59.4, '59s'],
    [65, '1m05s'],
    [3600 * 2 + 7 * 60 + 9, '2h07m'],
    [-1, '-'],
  ])('%s -> %s', (s, text) => expect(humanDuration(s)).toBe(text));
});

describe('localTime', () => {
  it('prints an ISO time in the local zone, to the second', () => {
    const d = new Date(2026, 10, 25, 7, 3, 9); // local
    expect(localTime(d.toISOString())).toBe('2026-11-25 07:03:09');
  });
  it('marks absent times and keeps unparsable ones', () => {
    expect(localTime(undefined)).toBe('-');
    expect(localTime('soon')).toBe('soon');
  });
});

describe('formatTable', () => {
  it('aligns columns under upper-case headers, right-aligning numbers', () => {
    const text = formatTable(
      [
        { name: 'nightly', size: 5, on: true, vms: ['a', 'b'] },
        { name: 'x', size: 12345, on: false, vms: [] },
      ],
      [
        { header: 'name', value: (r) => r.name },
        { header: 'size', value: (r) => r.size, align: 'right' },
        { header: 'on', value: (r) => r.on },
        { header: 'vms', value: (r) => r.vms },
      ],
    );
    expect(text).toBe(['NAME      SIZE  ON   VMS', 'nightly      5  yes  a, b', 'x        12345  no   -', ''].join('\n'));
  });
  it('says (none) for no rows', () => {
    expect(formatTable([], [{ header: 'name', value: () => 'x' }])).toBe('(none)\n');
  });
});

describe('formatFields', () => {
  it('aligns values after the longest key', () => {
    expect(formatFields([['name', 'a'], ['max tasks', 4], ['agent', null]])).toBe('name:      a\nmax tasks: 4\nagent:     -\n');
  });
});
