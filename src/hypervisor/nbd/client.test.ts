import { describe, expect, it } from 'vitest';
import { allocationExtents, allocationKind, parseNbdUri } from './client.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from './protocol.js';

describe('allocation flags', () => {
  it.each([
    [0, 'data'],
    [NBD_STATE_ZERO, 'zero'],
    [NBD_STATE_HOLE | NBD_STATE_ZERO, 'hole'],
    // A hole not promised to read as zeroes must still be read.
    [NBD_STATE_HOLE, 'data'],
  ] as const)('flags %i -> %s', (flags, kind) => {
    expect(allocationKind(flags)).toBe(kind);
  });

  it('merges neighbours of the same kind only', () => {
    expect(
      allocationExtents([
        { offset: 0, length: 10, flags: 0 },
        { offset: 10, length: 5, flags: NBD_STATE_HOLE }, // data too
        { offset: 15, length: 5, flags: 3 },
        { offset: 20, length: 5, flags: 2 },
      ]),
    ).toEqual([
      { offset: 0, length: 15, kind: 'data' },
      { offset: 15, length: 5, kind: 'hole' },
      { offset: 20, length: 5, kind: 'zero' },
    ]);
  });
});

describe('parseNbdUri', () => {
  it('reads unix and TCP URIs', () => {
    expect(parseNbdUri('nbd+unix:///backup2?socket=/tmp/a%20b/nbd.sock')).toEqual({ endpoint: { socketPath: '/tmp/a b/nbd.sock' }, exportName: 'backup2' });
    expect(parseNbdUri('nbd://127.0.0.1:10810/vda')).toEqual({ endpoint: { host: '127.0.0.1', port: 10810 }, exportName: 'vda' });
    expect(parseNbdUri('nbd://host/')).toEqual({ endpoint: { host: 'host', port: 10809 }, exportName: '' });
    expect(() => parseNbdUri('http://x/')).toThrow(/unsupported NBD URI/);
  });
});
