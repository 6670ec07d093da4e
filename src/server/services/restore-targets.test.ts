import { mkdtemp, mkdir, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { resolveThroughLinks, withinFolders } from './restore-targets.js';

describe('withinFolders', () => {
  it.each([
    [['/srv/restore'], '/srv/restore', '/srv/restore'],
    [['/srv/restore'], '/srv/restore/a/b.raw', '/srv/restore'],
    [['/srv/restore/'], '/srv/restore/b.raw', '/srv/restore/'],
    [['/srv/restore'], '/srv/restores/b.raw', undefined],
    [['/srv/restore'], '/srv/restore/../etc/shadow', undefined],
    [['/srv/restore'], '/srv', undefined],
    [['/a', '/srv/restore'], '/srv/restore/x', '/srv/restore'],
    [[], '/srv/restore/x', undefined],
    [['/'], '/etc/shadow', '/'],
  ])('%j holds %s: %s', (folders, target, expected) => {
    expect(withinFolders(folders, target)).toBe(expected);
  });
});

describe('resolveThroughLinks', () => {
  it('follows links of the existing part and keeps the rest as written', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'bulwark-targets-'));
    try {
      await mkdir(path.join(dir, 'real'));
      await symlink(path.join(dir, 'real'), path.join(dir, 'link'));
      const base = await resolveThroughLinks(dir);
      expect(await resolveThroughLinks(path.join(dir, 'link', 'new', 'x.raw'))).toBe(path.join(base, 'real', 'new', 'x.raw'));
      expect(await resolveThroughLinks(path.join(dir, 'missing', '..', 'real', 'y'))).toBe(path.join(base, 'real', 'y'));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
