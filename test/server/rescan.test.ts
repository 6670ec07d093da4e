// Repository rescan: the catalog follows a repository folder read from its chain metadata alone
// (points written without the server are added with their job; points gone are removed).
import { mkdtempSync, rmSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openRepository, vmFolder } from '../../src/repository/index.js';
import { iterate } from '../../src/repository/test-helpers.js';
import { startServer, type RunningServer } from '../../src/server/main.js';
import { call } from './http.js';

let tmp: string;
let server: RunningServer;

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'bulwark-rescan-'));
  server = await startServer({ dataDir: join(tmp, 'data'), listen: 'none', simulate: true, configBackupAt: false, print: () => undefined });
});

afterAll(async () => {
  await server?.close();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

describe('POST /repositories/{name}/rescan', () => {
  it('adds points found in the folder and removes those gone from it', async () => {
    const sock = { socketPath: server.socketPath };
    const repoPath = join(server.dataDir, 'repository');
    expect((await call(sock, 'POST', '/api/v1/jobs', { name: 'nightly', vms: ['web'], repository: 'default' })).status).toBe(201);

    // Two points written straight into the folder, as another server (or a copy) would leave them.
    const repo = await openRepository(repoPath);
    const size = 3 * 262144 + 17;
    const full = await repo.startRestorePoint({ job: 'nightly', vm: 'web', kind: 'full', blockSize: 262144, disks: [{ name: 'vda', size }], threads: 0 });
    await full.writeDisk('vda', iterate([{ index: 0, data: Buffer.alloc(262144, 1) }]));
    const p1 = await full.commit();
    const incr = await repo.startRestorePoint({ job: 'nightly', vm: 'web', kind: 'incremental', parent: p1.id, blockSize: 262144, disks: [{ name: 'vda', size }], threads: 0 });
    await incr.writeDisk('vda', iterate([{ index: 1, data: Buffer.alloc(262144, 2) }]));
    const p2 = await incr.commit();

    const first = await call(sock, 'POST', '/api/v1/repositories/default/rescan');
    expect(first.status).toBe(200);
    expect(first.json()).toEqual({ repository: 'default', points: 2, added: 2, removed: 0 });
    const listed = (await call(sock, 'GET', '/api/v1/restore-points?vm=web')).json<{ items: Array<{ id: string; type: string; job: string | null; repository: string; disks: unknown[] }> }>().items;
    expect(listed.map((p) => [p.id, p.type, p.job, p.repository]).sort()).toEqual(
      [
        [p1.id, 'full', 'nightly', 'default'],
        [p2.id, 'incremental', 'nightly', 'default'],
      ].sort(),
    );
    expect(listed[0]!.disks).toEqual([{ name: 'vda', size }]);

    // Again: nothing new. Then the VM's folder is gone: its points leave the catalog.
    expect((await call(sock, 'POST', '/api/v1/repositories/default/rescan')).json()).toMatchObject({ points: 2, added: 0, removed: 0 });
    await rm(vmFolder(repoPath, 'nightly', 'web'), { recursive: true });
    expect((await call(sock, 'POST', '/api/v1/repositories/default/rescan')).json()).toMatchObject({ points: 0, added: 0, removed: 2 });
    expect((await call(sock, 'GET', '/api/v1/restore-points?vm=web')).json<{ items: unknown[] }>().items).toEqual([]);
  });

  it('names an unknown repository', async () => {
    const r = await call({ socketPath: server.socketPath }, 'POST', '/api/v1/repositories/nope/rescan');
    expect(r.status).toBe(404);
    expect(r.body).toContain('nope');
  });
});
