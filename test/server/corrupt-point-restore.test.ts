// A restore point the last health check found damaged (catalog state `corrupt`) is still a
// restore point: its undamaged blocks read as they were, and every damaged one fails naming the
// block (reads are CRC-checked). `restore disk` always worked on it; `restore files` and `mount`
// refused it outright ("is corrupt, not ready", no hint), so one flipped byte in a forever-forward
// full made files of every point of the chain unreachable. Real SQLite, a real repository holding
// an ext4 image, the real mount pipeline (NBD server, nbdfuse, loop).
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackupFile } from '../../src/repository/backup-file.js';
import { BulwarkError } from '../../src/common/errors.js';
import { openRepository } from '../../src/repository/index.js';
import { iterate } from '../../src/repository/test-helpers.js';
import { MountSessions } from '../../src/restore/mount/sessions.js';
import { buildApi } from '../../src/server/api/app.js';
import { filesPlugin, restoreFiles } from '../../src/server/api/files.js';
import { openDatabase, type ConfigDatabase } from '../../src/server/db/connect.js';
import { systemClock, type ServiceContext } from '../../src/server/services/common.js';
import { createRepository } from '../../src/server/services/infrastructure.js';
import { getRestorePoint, recordRestorePoint, SessionEvents } from '../../src/server/services/sessions.js';

const run = promisify(execFile);
const BS = 262144;
const SIZE = 32 << 20;
let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let pointId: string;
let damagedIndex: number;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-corrupt-restore-'));
  const src = path.join(dir, 'src');
  await mkdir(src);
  await writeFile(path.join(src, 'letter.txt'), 'dear reader\n');
  // Random: identical blocks would be stored once (in-file dedup) and one flip would hit them all.
  await writeFile(path.join(src, 'damaged.bin'), randomBytes(4 << 20));
  const image = path.join(dir, 'disk.raw');
  await run('mkfs.ext4', ['-q', '-F', '-L', 'data', '-d', src, image, '32M']);
  const bytes = await readFile(image);
  cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  const repo = await openRepository(path.join(dir, 'repo'), { create: true });
  const repositoryId = (await createRepository(ctx, { name: 'main', path: repo.root })).id;
  const w = await repo.startRestorePoint({ job: 'j', vm: 'vm1', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: SIZE }] });
  const blocks = Array.from({ length: SIZE / BS }, (_, i) => {
    const data = bytes.subarray(i * BS, (i + 1) * BS);
    return { index: i, data: data.every((b) => b === 0) ? null : Buffer.from(data) };
  });
  await w.writeDisk('vda', iterate(blocks));
  const p = await w.commit();
  pointId = p.id;
  // Damage the stored block that holds damaged.bin's data 2 MiB into the file (nothing else lives there).
  const fsBlockSize = Number(/Block size:\s+(\d+)/.exec((await run('dumpe2fs', ['-h', image])).stdout)![1]);
  const fsBlock = Number((await run('debugfs', ['-R', `bmap /damaged.bin ${(2 << 20) / fsBlockSize}`, image])).stdout.trim());
  damagedIndex = Math.floor((fsBlock * fsBlockSize) / BS);
  const f = await BackupFile.open(p.file);
  const e = await f.entry('vda', damagedIndex);
  await f.close();
  if (e.kind !== 'stored') throw new Error(`block ${damagedIndex} should be stored`);
  const h = await open(p.file, 'r+');
  const at = e.recordOffset + 32 + Math.floor(e.storedLength / 2);
  const b = Buffer.alloc(1);
  await h.read(b, 0, 1, at);
  b[0] = b[0]! ^ 0x40;
  await h.write(b, 0, 1, at);
  await h.close();
  // As the catalog holds it after a health check found damage in it (backup-methods.ts stateOf).
  await recordRestorePoint(ctx, { id: p.id, vm: 'vm1', disks: [{ name: 'vda', size: SIZE }], time: p.time.toISOString(), type: 'full', chainId: p.chainId, size: p.fileBytes, repositoryId, jobId: null, state: 'corrupt' });
}, 60_000);

afterAll(async () => {
  await cdb?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('a point marked corrupt by a health check', () => {
  it('restore files copies what can be read from it', async () => {
    expect((await getRestorePoint(ctx, pointId)).state).toBe('corrupt');
    const out = path.join(dir, 'out');
    const r = await restoreFiles(ctx, pointId, { paths: ['vda:/letter.txt'], to: out }, path.join(dir, 'run'));
    expect(r.items.map((i) => i.to)).toEqual([path.join(out, 'letter.txt')]);
    expect(await readFile(path.join(out, 'letter.txt'), 'utf8')).toBe('dear reader\n');
    // A file on the damaged block: the error says the backup's data is damaged and names the block.
    const bad = await restoreFiles(ctx, pointId, { paths: ['vda:/damaged.bin'], to: path.join(dir, 'out2') }, path.join(dir, 'run')).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(bad).toBeInstanceOf(BulwarkError);
    expect((bad as BulwarkError).kind).toBe('corrupt');
    expect((bad as BulwarkError).message).toMatch(/^reading vda\/whole-ext4\/damaged\.bin from the restore point failed: the backup holds damaged data there: vda: damaged block in /);
    expect((bad as BulwarkError).message).toContain(`offset ${damagedIndex * BS}`);
    expect((bad as BulwarkError).hint).toMatch(/another restore point/);
    // No partial file passes for the restored one (fs.copyFile wrote a wrong one and said nothing).
    expect(existsSync(path.join(dir, 'out2', 'damaged.bin'))).toBe(false);
  }, 60_000);

  it('mount opens it read-only; unmount undoes it', async () => {
    const mounts = new MountSessions({ defaultRoot: path.join(dir, 'mounts') });
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't', plugins: [filesPlugin(ctx, mounts)] });
    try {
      const m = await app.inject({ method: 'POST', url: '/api/v1/mounts', payload: { point: pointId, detached: true } });
      expect(m.statusCode, m.body).toBe(201);
      const info = m.json<{ id: string; filesystems: Array<{ path: string }> }>();
      try {
        const fs = info.filesystems[0]!;
        expect(await readFile(path.join(fs.path, 'letter.txt'), 'utf8')).toBe('dear reader\n');
        // The damaged block is an error to whoever reads it, never other bytes.
        await expect(readFile(path.join(fs.path, 'damaged.bin'))).rejects.toThrow(/EIO/);
        const h = await open(path.join(fs.path, 'new.txt'), 'w').catch((err: NodeJS.ErrnoException) => err);
        expect((h as NodeJS.ErrnoException).code).toBe('EROFS');
      } finally {
        const u = await app.inject({ method: 'DELETE', url: `/api/v1/mounts/${info.id}` });
        expect(u.statusCode, u.body).toBe(200);
      }
      expect(mounts.list()).toEqual([]);
    } finally {
      await mounts.closeAll();
      await app.close();
    }
  }, 60_000);
});
