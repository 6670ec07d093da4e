// A console that goes away in the middle of `restore disk` (Ctrl-C, killed) stops the restore:
// the server sees its connection close before the answer, aborts the restore, and no image (nor
// a temporary) is left in the target folder; the restore's session says why. Before, the server
// finished the restore unseen and published the image seconds later.
// Real SQLite, a real repository with a 256 MiB point, the route over a real unix socket.
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openRepository } from '../../src/repository/index.js';
import { buildApi } from '../../src/server/api/app.js';
import { restorePlugin } from '../../src/server/api/restore.js';
import { openDatabase, type ConfigDatabase } from '../../src/server/db/connect.js';
import { systemClock, type ServiceContext } from '../../src/server/services/common.js';
import { createRepository } from '../../src/server/services/infrastructure.js';
import { listSessions, recordRestorePoint, SessionEvents } from '../../src/server/services/sessions.js';
import type { DiskBlock } from '../../src/disk/types.js';

const BS = 1 << 20;
const BLOCKS = 256;
let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let pointId: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-restore-cancel-'));
  cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  const repo = await openRepository(path.join(dir, 'repo'), { create: true });
  const repositoryId = (await createRepository(ctx, { name: 'main', path: repo.root })).id;
  const size = BLOCKS * BS;
  const w = await repo.startRestorePoint({ job: 'j', vm: 'vm1', kind: 'full', blockSize: BS, compression: 'none', disks: [{ name: 'vda', size }] });
  // Every block different (no in-file dedup), none zero.
  async function* blocks(): AsyncGenerator<DiskBlock> {
    for (let i = 0; i < BLOCKS; i++) {
      const data = Buffer.alloc(BS, (i % 251) + 1);
      data.writeUInt32LE(i, 0);
      yield { index: i, data };
    }
  }
  await w.writeDisk('vda', blocks());
  const p = await w.commit();
  pointId = p.id;
  await recordRestorePoint(ctx, { id: p.id, vm: 'vm1', disks: [{ name: 'vda', size }], time: p.time.toISOString(), type: 'full', chainId: p.chainId, size: p.fileBytes, repositoryId, jobId: null });
}, 120_000);

afterAll(async () => {
  await cdb?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('restore disk whose console goes away', () => {
  it('is stopped: no image and no temporary left; its session says why', async () => {
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't', plugins: [restorePlugin(ctx)] });
    const socketPath = path.join(dir, 'api.sock');
    const out = path.join(dir, 'out');
    await mkdir(out);
    const to = path.join(out, 'vda.raw');
    await app.listen({ path: socketPath });
    try {
      const req = http.request({ socketPath, method: 'POST', path: `/api/v1/restore-points/${pointId}/restore-disk`, headers: { 'content-type': 'application/json' } });
      const answered = new Promise<number | string>((resolve) => {
        req.on('response', (res) => resolve(res.statusCode ?? 0));
        req.on('error', (err) => resolve(err.message));
      });
      req.end(JSON.stringify({ disk: 'vda', to }));
      // The console goes away once the restore is writing (its temporary is in the folder).
      for (let i = 0; i < 2000 && (await readdir(out)).length === 0; i++) await new Promise((r) => setTimeout(r, 5));
      expect(await readdir(out), 'the restore started writing').not.toEqual([]);
      req.destroy();
      expect(await answered).toMatch(/socket hang up|aborted|ECONNRESET/);
      let session = (await listSessions(ctx, { kind: 'restore-disk' }))[0];
      for (let i = 0; i < 1000 && session?.state === 'running'; i++) {
        await new Promise((r) => setTimeout(r, 20));
        session = (await listSessions(ctx, { kind: 'restore-disk' }))[0];
      }
      expect(session?.state).toBe('failed');
      expect(JSON.stringify(session)).toMatch(/went away/);
      expect(existsSync(to)).toBe(false);
      expect(await readdir(out)).toEqual([]);
    } finally {
      await app.close();
    }
  }, 120_000);
});
