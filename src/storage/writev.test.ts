import { mkdtempSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { unwritten, writevAll, writevAllSync } from './writev.js';

const b = (s: string) => Buffer.from(s);

describe('unwritten', () => {
  it.each([
    [0, ['abc', 'de', 'f']],
    [1, ['bc', 'de', 'f']],
    [3, ['de', 'f']],
    [4, ['e', 'f']],
    [5, ['f']],
    [6, []],
  ])('after %i bytes of abc|de|f: %j', (n, want) => {
    expect(unwritten([b('abc'), b('de'), b('f')], n).map(String)).toEqual(want);
  });
});

describe('writevAll', () => {
  it('writes every buffer at the offset, async and sync', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'bulwark-writev-'));
    try {
      const file = path.join(dir, 'f');
      const fh = await open(file, 'w+');
      try {
        await writevAll(fh, [b('xy'), b('z')], 2, 3);
      } finally {
        await fh.close();
      }
      const fd = openSync(file, 'r+');
      try {
        writevAllSync(fd, [b('12'), b('3')], 5);
      } finally {
        closeSync(fd);
      }
      expect(readFileSync(file)).toEqual(Buffer.concat([Buffer.alloc(2), b('xyz123')]));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
