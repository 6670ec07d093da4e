import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SEALED_FILE_INDEX_MAGIC, SEALED_FILE_INDEX_MAGIC_NAME, SEALED_HEADER_SIZE } from '../../format/sealed-file-index.js';
import { newChainKeys, type ChainKeys } from '../../repository/chain-keys.js';
import type { KdfParams } from '../../format/header.js';
import { FILE_INDEX_FORMAT, readIndex, searchIndexes, writeIndex, type FileIndexEntry, type FileIndexHeader } from './catalog.js';

let dir: string;
let kdf: KdfParams;
let keys: ChainKeys;
let otherKeys: ChainKeys;
const POINT = 'a1b2c3d4-0000-4000-8000-000000000001';
const header: FileIndexHeader = {
  format: FILE_INDEX_FORMAT,
  point: POINT,
  job: 'j',
  vm: 'secret-vm',
  pointTime: '2026-11-26T00:00:00.000Z',
  created: '2026-11-26T00:01:00.000Z',
  filesystems: [{ name: 'vda', type: 'ext4', mountpoint: '/' }],
  skipped: [],
};
// Random names defeat compression, so the gzip stream spans several (32 KiB) frames.
const entries: FileIndexEntry[] = Array.from({ length: 10_000 }, (_, i) => ({ p: `/srv/payroll-${randomBytes(12).toString('hex')}/${i}.xlsx`, t: 'f', s: i, m: 1_700_000_000 + i }));
entries.push({ p: '/home/alice/Quarterly Secret Report.txt', t: 'f', s: 42, m: 1_710_000_000 });
const unlock = (k: ChainKeys | undefined) => async () => k;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bulwark-sealed-index-'));
  ({ params: kdf, keys } = await newChainKeys('correct horse', 10));
  ({ keys: otherKeys } = await newChainKeys('another one', 10));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function readAll(file: string, k: ChainKeys | undefined, pointId = POINT): Promise<{ header: FileIndexHeader; got: FileIndexEntry[] }> {
  const got: FileIndexEntry[] = [];
  const h = await readIndex(file, (e) => got.push(e), { unlock: unlock(k), pointId });
  return { header: h, got };
}

async function failure(p: Promise<unknown>): Promise<{ kind?: string; message: string }> {
  return p.then(
    () => ({ message: 'no error' }),
    (e: unknown) => e as { kind?: string; message: string },
  );
}

describe('sealed file index', () => {
  it('magic is derived from its versioned name', () => {
    expect(createHash('sha256').update(SEALED_FILE_INDEX_MAGIC_NAME).digest().subarray(0, 8)).toEqual(SEALED_FILE_INDEX_MAGIC);
  });

  it('round-trips in several frames; the file holds no path, VM name or gzip stream in clear', async () => {
    const file = join(dir, `${POINT}.files.gz`);
    expect(await writeIndex(file, header, entries, { seal: { kdf, keys, pointId: POINT, frameSize: 32 * 1024 } })).toBe(entries.length);
    const bytes = await readFile(file);
    expect(bytes.subarray(0, 8)).toEqual(SEALED_FILE_INDEX_MAGIC);
    expect(bytes.length).toBeGreaterThan(4 * 32 * 1024);
    for (const s of ['Quarterly Secret Report', 'payroll', 'secret-vm', FILE_INDEX_FORMAT]) expect(bytes.includes(Buffer.from(s)), s).toBe(false);
    const { header: h, got } = await readAll(file, keys);
    expect(h).toEqual(header);
    expect(got).toEqual(entries);
  });

  it('without keys or with another chain\'s keys: unauthorized, never damage', async () => {
    const file = join(dir, `${POINT}.files.gz`);
    expect(await failure(readAll(file, undefined))).toMatchObject({ kind: 'unauthorized', message: expect.stringContaining('no password for it is known') });
    expect(await failure(readAll(file, otherKeys))).toMatchObject({ kind: 'unauthorized', message: expect.stringContaining('wrong password') });
  });

  it('a flipped byte, a cut-off end, extra bytes, or another point\'s name: damaged', async () => {
    const good = await readFile(join(dir, `${POINT}.files.gz`));
    const cases: Array<[string, Buffer, RegExp, string?]> = [
      ['flip', Buffer.from(good).fill(good[SEALED_HEADER_SIZE + 5000]! ^ 1, SEALED_HEADER_SIZE + 5000, SEALED_HEADER_SIZE + 5001), /frame 0 .* failed authentication/],
      ['header', Buffer.from(good).fill(7, 90, 91), /CRC mismatch/],
      ['cut', good.subarray(0, good.length - 100), /cut short/],
      ['extra', Buffer.concat([good, Buffer.from([0])]), /bytes after the last frame/],
      ['moved', good, /failed authentication/, 'b0b0b0b0-0000-4000-8000-000000000002'],
    ];
    for (const [name, bytes, re, pointId] of cases) {
      const file = join(dir, `${name}.files.gz`);
      await writeFile(file, bytes);
      expect(await failure(readAll(file, keys, pointId ?? POINT)), name).toMatchObject({ kind: 'corrupt', message: expect.stringMatching(re) });
    }
    // Only whole frames: drop the last frame entirely (ends after frame N without the last flag).
    const firstFrameEnd = SEALED_HEADER_SIZE + 20 + good.readUInt32LE(SEALED_HEADER_SIZE) + 16;
    const file = join(dir, 'incomplete.files.gz');
    await writeFile(file, good.subarray(0, firstFrameEnd));
    expect(await failure(readAll(file, keys))).toMatchObject({ kind: 'corrupt', message: expect.stringMatching(/without the last frame/) });
  });

  it('search: a clear index (written before sealing existed) and a sealed one side by side; locked without the password', async () => {
    const clear = join(dir, 'clear.files.gz');
    await writeIndex(clear, { ...header, point: 'clear' }, [{ p: '/home/alice/Quarterly Secret Report.txt', t: 'f', s: 40, m: 1_700_000_000 }]);
    expect((await readFile(clear)).subarray(0, 2)).toEqual(Buffer.from([0x1f, 0x8b]));
    const sealed = join(dir, `${POINT}.files.gz`);
    const points = [
      { id: 'clear', time: '2026-11-25T00:00:00.000Z', vm: 'secret-vm', indexFile: clear },
      { id: POINT, time: '2026-11-26T00:00:00.000Z', vm: 'secret-vm', indexFile: sealed, unlock: unlock(keys) },
    ];
    const r = await searchIndexes(points, 'quarterly*');
    expect(r.pointsSearched).toBe(2);
    expect(r.matches[0]!.versions.map((v) => [v.size, v.points.map((p) => p.id)])).toEqual([[40, ['clear']], [42, [POINT]]]);
    const locked = await searchIndexes([points[0]!, { ...points[1]!, unlock: unlock(undefined) }], 'quarterly*');
    expect(locked.pointsSearched).toBe(1);
    expect(locked.pointsLocked).toEqual([expect.objectContaining({ id: POINT, reason: expect.stringContaining('sealed') })]);
    expect(locked.pointsWithoutIndex).toEqual([]);
  });
});
