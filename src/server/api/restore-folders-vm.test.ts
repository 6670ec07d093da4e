// Restore folders (docs/decisions/0009-restore-folders.md) for the two paths restore.test.ts does
// not reach: `restore vm --storage` and `instant-recovery migrate --storage`. A restore-operator is
// refused (403, naming the path, the user and the folders) outside the restore folders before
// anything is written; inside, the restore runs (the VM's disk lands there) and migrate gets past
// the check (to "no such session"); an administrator is not confined.
// Real SQLite, a real repository with a point carrying a plain-QEMU VM configuration
// (recovery-test-point.ts), the real recovery service, the routes through Fastify's inject.
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ConfigDatabase } from '../db/connect.js';
import type { ServiceContext } from '../services/common.js';
import { getSettings, updateSettings } from '../services/settings.js';
import { createUser, login } from '../services/users.js';
import { SessionEvents } from '../services/sessions.js';
import { buildApi } from './app.js';
import { recoveryPlugin, RecoveryService } from './recovery.js';
import { seedQemuVmPoint } from './recovery-test-point.js';

let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let service: RecoveryService;
let app: Awaited<ReturnType<typeof buildApi>>;
let pointId: string;
let image: Buffer;
let rita: string;
let ada: string;
let allowed: string;
let outside: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-restore-folders-vm-'));
  ({ cdb, ctx, pointId, image } = await seedQemuVmPoint(dir));

  await createUser(ctx, { name: 'rita', password: 'restore-pw', role: 'restore-operator' });
  await createUser(ctx, { name: 'ada', password: 'admin-pw-12', role: 'administrator' });
  rita = (await login(ctx, 'rita', 'restore-pw')).token;
  ada = (await login(ctx, 'ada', 'admin-pw-12')).token;
  allowed = path.join(dir, 'restores');
  outside = path.join(dir, 'elsewhere');
  await mkdir(allowed);
  await mkdir(outside);
  await updateSettings(ctx, { version: (await getSettings(ctx)).version, restoreFolders: [allowed] });

  service = new RecoveryService({ ctx, dataDir: path.join(dir, 'data') });
  const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
  app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'tcp', version: 't', plugins: [recoveryPlugin(service)] });
});

afterAll(async () => {
  await app?.close();
  await service?.close();
  await cdb?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

interface ErrorReply {
  error: { kind: string; message: string; hint?: string };
}
interface RestoreReply {
  id: string;
  state: 'running' | 'success' | 'failed';
  result: { disks: { name: string; path: string; format: string }[] } | null;
  error: { message: string } | null;
}

const restoreVm = (payload: Record<string, unknown>, bearer: string) =>
  app.inject({ method: 'POST', url: `/api/v1/restore-points/${pointId}/restore-vm`, payload, headers: { authorization: `Bearer ${bearer}` } });

/** Waits for a restore the route accepted (202) to end; its final state. */
async function finished(id: string, bearer: string): Promise<RestoreReply> {
  for (;;) {
    const r = await app.inject({ method: 'GET', url: `/api/v1/vm-restores/${id}`, headers: { authorization: `Bearer ${bearer}` } });
    expect(r.statusCode, r.body).toBe(200);
    const t = r.json<RestoreReply>();
    if (t.state !== 'running') return t;
    await new Promise((res) => setTimeout(res, 20));
  }
}

describe('restore vm --storage of users who are not administrators (decision 0009)', () => {
  it('refuses storage outside the restore folders (403, naming path, user and folders) before anything is written', async () => {
    for (const bad of [path.join(outside, 'vm-a'), path.join(allowed, '..', 'elsewhere', 'vm-b'), `${allowed}-x/vm-c`]) {
      const r = await restoreVm({ name: 'copy-out', storage: bad }, rita);
      expect(r.statusCode, `${bad}: ${r.body}`).toBe(403);
      const e = r.json<ErrorReply>().error;
      expect(e.kind).toBe('forbidden');
      expect(e.message).toContain(`restore vm --storage ${bad}`);
      expect(e.message).toContain('user rita (role restore-operator)');
      expect(e.message).toContain(`the restore folders are ${allowed}`);
      expect(e.hint).toContain('restore-folders');
    }
    expect(await readdir(outside)).toEqual([]);
    expect(existsSync(`${allowed}-x`)).toBe(false);
    // Not even the new VM's folder (start script, vm.json) was made.
    expect(existsSync(path.join(dir, 'vms', 'copy-out'))).toBe(false);
    expect(existsSync(path.join(dir, 'data', 'vms', 'copy-out'))).toBe(false);
    const list = await app.inject({ method: 'GET', url: '/api/v1/vm-restores', headers: { authorization: `Bearer ${rita}` } });
    expect(list.json<{ items: unknown[] }>().items).toEqual([]);
  });

  it('restores into a folder below the restore folders: the disk lands there', async () => {
    const storage = path.join(allowed, 'copy-in');
    const r = await restoreVm({ name: 'copy-in', storage }, rita);
    expect(r.statusCode, r.body).toBe(202);
    const t = await finished(r.json<RestoreReply>().id, rita);
    expect(t.error).toBeNull();
    expect(t.state).toBe('success');
    expect(t.result!.disks).toEqual([expect.objectContaining({ name: 'vda', path: path.join(storage, 'vda.raw'), format: 'raw' })]);
    expect((await readFile(path.join(storage, 'vda.raw'))).equals(image)).toBe(true);
    expect(existsSync(path.join(dir, 'vms', 'copy-in', 'start-vm.sh'))).toBe(true);
  });

  it('does not confine an administrator', async () => {
    const storage = path.join(outside, 'copy-admin');
    const r = await restoreVm({ name: 'copy-admin', storage }, ada);
    expect(r.statusCode, r.body).toBe(202);
    const t = await finished(r.json<RestoreReply>().id, ada);
    expect(t.state, JSON.stringify(t.error)).toBe('success');
    expect((await readFile(path.join(storage, 'vda.raw'))).equals(image)).toBe(true);
  });
});

describe('instant-recovery migrate --storage of users who are not administrators (decision 0009)', () => {
  const migrate = (session: string, storage: string, bearer: string) =>
    app.inject({ method: 'POST', url: `/api/v1/instant-recoveries/${session}/migrate`, payload: { storage }, headers: { authorization: `Bearer ${bearer}` } });

  it('refuses storage outside the restore folders before it looks at the session; inside and for an administrator it gets past the check', async () => {
    const bad = path.join(outside, 'migrated');
    const refused = await migrate('ir-none', bad, rita);
    expect(refused.statusCode, refused.body).toBe(403);
    const e = refused.json<ErrorReply>().error;
    expect(e.message).toContain(`instant-recovery migrate --storage ${bad}`);
    expect(e.message).toContain('user rita (role restore-operator)');
    expect(e.message).toContain(`the restore folders are ${allowed}`);
    expect(existsSync(bad)).toBe(false);
    // Past the check, the session is looked up: there is none of that id.
    const inside = await migrate('ir-none', path.join(allowed, 'migrated'), rita);
    expect(inside.statusCode, inside.body).toBe(404);
    expect(inside.json<ErrorReply>().error.message).toContain('ir-none');
    const admin = await migrate('ir-none', bad, ada);
    expect(admin.statusCode, admin.body).toBe(404);
  });
});
