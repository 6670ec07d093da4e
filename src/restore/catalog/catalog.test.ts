import { describe, expect, it } from 'vitest';
import { fileIndexPath, globToRegExp } from './catalog.js';

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
