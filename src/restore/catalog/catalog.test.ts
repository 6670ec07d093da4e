import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { compileGlob, FILE_INDEX_FORMAT, fileIndexPath, mergeSearchResults, searchIndexes, writeIndex, type FileIndexEntry, type FileIndexHeader } from './catalog.js';

describe('file index', () => {
  it('globs match case-insensitively and whole strings only', () => {
    const m = (g: string, s: string): boolean => compileGlob(g).test(s);
    expect(m('*.conf', 'NGINX.CONF')).toBe(true);
    expect(m('*.conf', 'nginx.conf.bak')).toBe(false);
    expect(m('host?ame', 'hostname')).toBe(true);
    expect(m('report-[0-9]*', 'report-7.txt')).toBe(true);
    expect(m('report-[!0-9]*', 'report-7.txt')).toBe(false);
    expect(m('a.b', 'axb')).toBe(false);
    expect(m('(x)+', '(x)+')).toBe(true);
    expect(m('/etc/*/n.conf', '/etc/nginx/n.conf')).toBe(true);
    expect(m('[', '[')).toBe(true);
    expect(m('[]x]', ']')).toBe(true);
    expect(m('[a-]', '-')).toBe(true);
    expect(m('[A-C]*', 'beta')).toBe(true);
    expect(m('*', '')).toBe(true);
    expect(m('?', '')).toBe(false);
    expect(m('a*b*c', 'aXbYbZc')).toBe(true);
    expect(m('a*b*c', 'aXbYbZ')).toBe(false);
    expect(m('**x', 'ax')).toBe(true);
    expect(m('caf?', 'café')).toBe(true);
  });

  it('matches in time linear in the path, whatever the stars (a regular expression took minutes on this one)', () => {
    // `^.*a.*a…$` backtracks through every way to place 14 stars in 60 characters.
    const evil = `${'*a'.repeat(14)}*b`;
    const path = 'a'.repeat(60);
    for (let i = 0; i < 1000; i++) expect(compileGlob(evil).test(path)).toBe(false);
    expect(compileGlob(evil).test(`${path}b`)).toBe(true);
  });

  it('refuses a range written backwards, as a usage error naming it', () => {
    let err: unknown;
    try {
      compileGlob('report-[9-0]');
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ kind: 'invalid', message: expect.stringContaining('[9-0]') });
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

describe('searchIndexes', () => {
  it('a point whose index breaks partway contributes no match: it is listed as without index only', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'bulwark-search-'));
    try {
      // Entries of incompressible names, so half of the gzip file holds many whole entries.
      const entries: FileIndexEntry[] = Array.from({ length: 4000 }, (_, i) => ({ p: `/srv/f-${i}-${(i * 2654435761) % 1000003}.log`, t: 'f', s: i, m: 1_700_000_000 + i }));
      const header = (id: string): FileIndexHeader => ({ format: FILE_INDEX_FORMAT, point: id, job: 'j', vm: 'v', pointTime: '2026-11-01T00:00:00.000Z', created: '2026-11-01T00:00:00.000Z', filesystems: [], skipped: [] });
      const good = path.join(dir, 'p1.files.gz');
      const broken = path.join(dir, 'p2.files.gz');
      await writeIndex(good, header('p1'), entries);
      await writeIndex(broken, header('p2'), entries);
      const gz = await readFile(broken);
      await writeFile(broken, gz.subarray(0, Math.floor(gz.length / 2)));
      const r = await searchIndexes(
        [
          { id: 'p1', time: '2026-11-01T00:00:00.000Z', vm: 'v', indexFile: good },
          { id: 'p2', time: '2026-11-02T00:00:00.000Z', vm: 'v', indexFile: broken },
        ],
        'f-1*',
      );
      expect(r.matches.length).toBeGreaterThan(100);
      expect(r.pointsWithoutIndex.map((p) => p.id)).toEqual(['p2']);
      expect(r.pointsSearched).toBe(1);
      const cited = new Set(r.matches.flatMap((m) => m.versions.flatMap((v) => v.points.map((p) => p.id))));
      expect([...cited]).toEqual(['p1']);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
