// The restore-disk route: the image SHA-256 is opt-in (`digest: true` computes it and answers
// `sha256`; without it the reply has no such field), and the file is the disk either way. The
// rescan route refuses a repository on another agent's host (its folder is not on this host), and
// removes nothing from the catalog while a VM folder's chain metadata cannot be read.
// Real SQLite, real repository, the route through Fastify's inject.
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { cp, mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openRepository, vmFolder } from '../../repository/index.js';
import { DiskModel, iterate } from '../../repository/test-helpers.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import { systemClock, type ServiceContext } from '../services/common.js';
import { createRepository } from '../services/infrastructure.js';
import { getSettings, updateSettings } from '../services/settings.js';
import { createUser, login } from '../services/users.js';
import { listRestorePoints, recordRestorePoint, SessionEvents } from '../services/sessions.js';
import { buildApi } from './app.js';
import { MountSessions } from '../../restore/mount/sessions.js';
import { filesPlugin } from './files.js';
import { restorePlugin } from './restore.js';

const BS = 262144;
let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let pointId: string;
let image: Buffer;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-restore-api-'));
  cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  const repo = await openRepository(path.join(dir, 'repo'), { create: true });
  const repositoryId = (await createRepository(ctx, { name: 'main', path: repo.root })).id;
  const m = new DiskModel(3 * BS + 100, BS);
  const w = await repo.startRestorePoint({ job: 'j', vm: 'vm1', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: m.size }] });
  await w.writeDisk('vda', iterate(m.change([[0, 'data'], [2, 'zero'], [3, 'data']])));
  const p = await w.commit();
  image = Buffer.from(m.bytes);
  pointId = p.id;
  await recordRestorePoint(ctx, { id: p.id, vm: 'vm1', disks: [{ name: 'vda', size: m.size }], time: p.time.toISOString(), type: 'full', chainId: p.chainId, size: p.fileBytes, repositoryId, jobId: null });
});
afterAll(async () => {
  await cdb?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('POST /restore-points/:id/restore-disk', () => {
  it('answers the image SHA-256 only when asked for with digest', async () => {
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't', plugins: [restorePlugin(ctx)] });
    try {
      const plain = path.join(dir, 'plain.raw');
      const r1 = await app.inject({ method: 'POST', url: `/api/v1/restore-points/${pointId}/restore-disk`, payload: { disk: 'vda', to: plain } });
      expect(r1.statusCode, r1.body).toBe(200);
      expect(r1.json()).toMatchObject({ point: pointId, disk: 'vda', path: plain, format: 'raw', size: image.length });
      expect(r1.json()).not.toHaveProperty('sha256');
      expect((await readFile(plain)).equals(image)).toBe(true);

      const digested = path.join(dir, 'digested.raw');
      const r2 = await app.inject({ method: 'POST', url: `/api/v1/restore-points/${pointId}/restore-disk`, payload: { disk: 'vda', to: digested, digest: true } });
      expect(r2.statusCode, r2.body).toBe(200);
      expect(r2.json<{ sha256: string }>().sha256).toBe(createHash('sha256').update(image).digest('hex'));
      expect((await readFile(digested)).equals(image)).toBe(true);
    } finally {
      await app.close();
    }
  });
});

describe('restore targets of users who are not administrators (decision 0009)', () => {
  it('confines restore disk --to to the restore folders (links followed), administrators write anywhere', async () => {
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'tcp', version: 't', plugins: [restorePlugin(ctx)] });
    try {
      await createUser(ctx, { name: 'rita', password: 'restore-pw', role: 'restore-operator' });
      await createUser(ctx, { name: 'ada', password: 'admin-pw-12', role: 'administrator' });
      const token = async (user: string, password: string) => (await login(ctx, user, password)).token;
      const rita = await token('rita', 'restore-pw');
      const ada = await token('ada', 'admin-pw-12');
      const restoreTo = (to: string, bearer: string) =>
        app.inject({ method: 'POST', url: `/api/v1/restore-points/${pointId}/restore-disk`, payload: { disk: 'vda', to }, headers: { authorization: `Bearer ${bearer}` } });
      const allowed = path.join(dir, 'restores');
      const outside = path.join(dir, 'elsewhere');
      await mkdir(allowed);
      await mkdir(outside);
      await symlink(outside, path.join(allowed, 'link-out'));

      // No restore folder set: nothing for rita, and nothing is written.
      const none = await restoreTo(path.join(allowed, 'a.raw'), rita);
      expect(none.statusCode, none.body).toBe(403);
      expect(none.json<{ error: { message: string; hint: string } }>().error.message).toContain('no restore folder is set');
      expect(existsSync(path.join(allowed, 'a.raw'))).toBe(false);

      await updateSettings(ctx, { version: (await getSettings(ctx)).version, restoreFolders: [allowed] });
      const inside = await restoreTo(path.join(allowed, 'sub', '..', 'a.raw'), rita);
      expect(inside.statusCode, inside.body).toBe(200);
      expect((await readFile(path.join(allowed, 'a.raw'))).equals(image)).toBe(true);

      for (const bad of [path.join(outside, 'b.raw'), path.join(allowed, '..', 'elsewhere', 'c.raw'), path.join(allowed, 'link-out', 'd.raw'), `${allowed}-x/e.raw`]) {
        const r = await restoreTo(bad, rita);
        expect(r.statusCode, `${bad}: ${r.body}`).toBe(403);
        const e = r.json<{ error: { message: string; hint: string } }>().error;
        expect(e.message).toContain(`restore disk --to ${bad}`);
        expect(e.hint).toContain('restore-folders');
      }
      expect(await readdir(outside)).toEqual([]);

      const admin = await restoreTo(path.join(outside, 'f.raw'), ada);
      expect(admin.statusCode, admin.body).toBe(200);
    } finally {
      await app.close();
    }
  });

  it('confines restore files --to and mount --at the same way, before anything is mounted', async () => {
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const mounts = new MountSessions({ defaultRoot: path.join(dir, 'mounts') });
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'tcp', version: 't', plugins: [filesPlugin(ctx, mounts)] });
    try {
      const rita = (await login(ctx, 'rita', 'restore-pw')).token;
      const headers = { authorization: `Bearer ${rita}` };
      const outside = path.join(dir, 'elsewhere', 'files');
      const files = await app.inject({ method: 'POST', url: `/api/v1/restore-points/${pointId}/restore-files`, payload: { paths: ['/etc'], to: outside }, headers });
      expect(files.statusCode, files.body).toBe(403);
      expect(files.json<{ error: { message: string } }>().error.message).toContain(`restore files --to ${outside}`);
      const mount = await app.inject({ method: 'POST', url: '/api/v1/mounts', payload: { point: pointId, at: outside }, headers });
      expect(mount.statusCode, mount.body).toBe(403);
      expect(mount.json<{ error: { message: string } }>().error.message).toContain(`mount --at ${outside}`);
      expect(existsSync(outside)).toBe(false);
      expect(mounts.list()).toEqual([]);
    } finally {
      await app.close();
    }
  });
});

describe('POST /repositories/:name/rescan', () => {
  it('refuses a repository on another agent\'s host, naming the agent, and leaves its catalog alone', async () => {
    // The worst case: a folder of the same path exists on the server host (here: the local repository's).
    const now = new Date().toISOString();
    await ctx.db
      .insertInto('agents')
      .values({ id: 'a-kvm07', name: 'kvm-07', version: 1, created_at: now, updated_at: now, hostname: 'kvm-07', agent_version: 't', cores: 2, last_seen_at: null, cert_fingerprint: null, state: 'online' })
      .execute();
    const remoteRepo = await createRepository(ctx, { name: 'offsite', path: path.join(dir, 'repo'), agent: 'kvm-07' });
    const pointOnAgent = 'p-on-agent';
    await recordRestorePoint(ctx, { id: pointOnAgent, vm: 'vm2', disks: [{ name: 'vda', size: BS }], time: new Date().toISOString(), type: 'full', chainId: 'c-agent', size: BS, repositoryId: remoteRepo.id, jobId: null });
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't', plugins: [restorePlugin(ctx)] });
    try {
      const r = await app.inject({ method: 'POST', url: '/api/v1/repositories/offsite/rescan', payload: {} });
      expect(r.statusCode, r.body).toBe(400);
      expect(r.json<{ error: { message: string; hint: string } }>().error.message).toBe('repository offsite is on the host of agent kvm-07: rescan reads repository folders on this server\'s host only');
      expect((await listRestorePoints(ctx, { vm: 'vm2' })).map((p) => p.id)).toEqual([pointOnAgent]);
      // The same folder as this host's repository rescans fine.
      const local = await app.inject({ method: 'POST', url: '/api/v1/repositories/main/rescan', payload: {} });
      expect(local.statusCode, local.body).toBe(200);
      expect(local.json()).toMatchObject({ repository: 'main', points: 1, added: 0, removed: 0 });
    } finally {
      await app.close();
    }
  });
});

describe('POST /repositories/:name/rescan with damaged chain metadata', () => {
  it('keeps the points of a VM whose .vbm cannot be read, names the file, and removes nothing', async () => {
    const repo = await openRepository(path.join(dir, 'repo'));
    const w = await repo.startRestorePoint({ job: 'j', vm: 'vm3', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: BS }] });
    await w.writeDisk('vda', iterate([{ index: 0, data: Buffer.alloc(BS, 3) }]));
    const p3 = await w.commit();
    const repositoryId = (await ctx.db.selectFrom('repositories').select('id').where('name', '=', 'main').executeTakeFirstOrThrow()).id;
    await recordRestorePoint(ctx, { id: p3.id, vm: 'vm3', disks: [{ name: 'vda', size: BS }], time: p3.time.toISOString(), type: 'full', chainId: p3.chainId, size: p3.fileBytes, repositoryId, jobId: null });
    const folder = vmFolder(repo.root, 'j', 'vm3');
    const vbm = path.join(folder, (await readdir(folder)).find((n) => n.endsWith('.vbm'))!);
    const original = await readFile(vbm);
    await writeFile(vbm, Buffer.concat([original.subarray(0, 40), Buffer.from('damage'), original.subarray(46)]));
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't', plugins: [restorePlugin(ctx)] });
    try {
      const r = await app.inject({ method: 'POST', url: '/api/v1/repositories/main/rescan', payload: {} });
      expect(r.statusCode, r.body).toBe(200);
      const body = r.json<{ points: number; added: number; removed: number; unreadable: Array<{ file: string; problem: string }> }>();
      expect(body).toMatchObject({ points: 1, added: 0, removed: 0 });
      expect(body.unreadable).toHaveLength(1);
      expect(body.unreadable[0]!.file).toBe(vbm);
      expect(body.unreadable[0]!.problem).toContain(`damaged chain metadata ${vbm}`);
      expect((await listRestorePoints(ctx, { vm: 'vm3' })).map((p) => p.id)).toEqual([p3.id]);
      // Asked for that one VM, the repository says it is damaged instead of "no points".
      await expect(repo.listRestorePoints({ job: 'j', vm: 'vm3' })).rejects.toThrow(`damaged chain metadata ${vbm}`);
      // Repaired, the folder is followed again.
      await writeFile(vbm, original);
      const again = await app.inject({ method: 'POST', url: '/api/v1/repositories/main/rescan', payload: {} });
      expect(again.json()).toEqual({ repository: 'main', points: 2, added: 0, removed: 0 });
    } finally {
      await app.close();
    }
  });
});

describe('POST /repositories/:name/rescan of a copy of another repository', () => {
  it('adds no point the catalog holds from another repository, names each and where it is; no SQL error', async () => {
    const copy = path.join(dir, 'copy-of-repo');
    await cp(path.join(dir, 'repo'), copy, { recursive: true });
    await createRepository(ctx, { name: 'copy', path: copy });
    const before = (await listRestorePoints(ctx, {})).map((p) => [p.id, p.repository]).sort();
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't', plugins: [restorePlugin(ctx)] });
    try {
      const r = await app.inject({ method: 'POST', url: '/api/v1/repositories/copy/rescan', payload: {} });
      expect(r.statusCode, r.body).toBe(200);
      const body = r.json<{ points: number; added: number; removed: number; elsewhere: Array<{ id: string; vm: string; repository: string }> }>();
      expect(body).toMatchObject({ points: 2, added: 0, removed: 0 });
      expect(body.elsewhere.map((e) => [e.id, e.repository]).sort()).toEqual(before.filter(([, repo]) => repo === 'main').sort());
      expect((await listRestorePoints(ctx, {})).map((p) => [p.id, p.repository]).sort()).toEqual(before);
    } finally {
      await app.close();
    }
  });
});
