import { describe, expect, it } from 'vitest';
import { fileIndexPath, globToRegExp, mergeSearchResults } from './catalog.js';

describe('file index', () => {
  it('globs match case-insensitively and whole strings only', () => {
    const m = (g: string, s: string): boolean => globToRegExp(g).test(s);
    expect(m('*.conf', 'NGINX.CONF')).toBe(true);
    expect(m('*.conf', 'nginx.conf.bak')).toBe(false);
    expect(m('host?ame', 'hostname')).toBe(true);
    expect(m('report-[0-9]*', 'report-7.txt')).toBe(true);
    expect(m('report-[!0-9]*', 'report-7.txt')).toBe(false);
    expect(m('a.b', 'axb')).toBe(false);
    expect(m('(x)+', '(x)+')).toBe(true);
    expect(m('/etc/*/n.conf', '/etc/nginx/n.conf')).toBe(true);
    expect(m('[', '[')).toBe(true);
  });

  it('lives beside the point file, named by point id', () => {
    expect(fileIndexPath({ id: 'abc', file: '/repo/job/vm/20261125T145500Z-abc.vbk' })).toBe('/repo/job/vm/abc.files.gz');
  });
});

describe('mergeSearchResults', () => {
  it('joins the same path across results: versions by type/size/mtime, points oldest first, counts summed', () => {
    const p = (id: string, time: string) => ({ id, time });
    const a = { pattern: 'x*', matches: [{ vm: 'v', path: '/x', versions: [{ type: 'f' as const, size: 1, mtime: 't1', points: [p('b', '2026-01-02')] }] }], pointsSearched: 1, pointsWithoutIndex: [], pointsLocked: [], truncated: false };
    const b = {
      pattern: 'x*',
      matches: [
        { vm: 'v', path: '/x', versions: [{ type: 'f' as const, size: 1, mtime: 't1', points: [p('a', '2026-01-01')] }, { type: 'f' as const, size: 2, mtime: 't0', points: [p('c', '2025-12-31')] }] },
        { vm: 'u', path: '/x2', versions: [] },
      ],
      pointsSearched: 2,
      pointsWithoutIndex: [{ ...p('d', '2026-01-03'), vm: 'v', reason: 'none' }],
      pointsLocked: [{ ...p('e', '2026-01-04'), vm: 'v', reason: 'locked' }],
      truncated: false,
    };
    const m = mergeSearchResults('x*', [a, b]);
    expect(m.matches.map((x) => x.path)).toEqual(['/x2', '/x']);
    expect(m.matches[1]!.versions.map((v) => [v.size, v.points.map((q) => q.id)])).toEqual([[2, ['c']], [1, ['a', 'b']]]);
    expect([m.pointsSearched, m.pointsWithoutIndex.length, m.pointsLocked.length, m.truncated]).toEqual([3, 1, 1, false]);
    expect(mergeSearchResults('x*', [a, b], 1)).toMatchObject({ truncated: true, matches: [{ path: '/x' }] });
  });
});
