// The server's encryption passwords (docs/encryption.md): the server key file, sealing, a job's
// password opening its points with none typed, a given password checked (wrong -> "wrong password
// (hint: …)"), an unknown chain opened once its password is added, the catalog's encrypted /
// keyKnown, and no password in clear text in the database. Real SQLite, real repository.
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { openRepository, type Repository } from '../../repository/index.js';
import { DiskModel, iterate } from '../../repository/test-helpers.js';
import { buildApi } from '../api/app.js';
import { encryptionPlugin } from '../api/encryption.js';
import { restorePlugin } from '../api/restore.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import { systemClock, type ServiceContext } from './common.js';
import { EncryptionKeys, loadServerKey, sealPassword, unsealPassword } from './encryption.js';
import { createRepository } from './infrastructure.js';
import { createJob } from './jobs.js';
import { getRestorePoint, listRestorePoints, recordRestorePoint, SessionEvents } from './sessions.js';

const BS = 262144;
const JOB_PASSWORD = 'job-secret-Zq81';
const OTHER_PASSWORD = 'export-secret-Pw77';

let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let keys: EncryptionKeys;
let repo: Repository;
let repoId: string;

async function writePoint(job: string, vm: string, password: string, hint: string): Promise<{ id: string; chainId: string }> {
  const m = new DiskModel(BS + 5, BS);
  const w = await repo.startRestorePoint({ job, vm, kind: 'full', blockSize: BS, threads: 0, encryption: { password, hint, log2N: 10 }, disks: [{ name: 'vda', size: m.size }] });
  await w.writeDisk('vda', iterate(m.change([[0, 'data'], [1, 'data']])));
  const p = await w.commit();
  return { id: p.id, chainId: p.chainId };
}

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-encryption-'));
  cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  keys = await EncryptionKeys.open(ctx, dir);
  repo = await openRepository(path.join(dir, 'repo'), { create: true });
  repoId = (await createRepository(ctx, { name: 'main', path: repo.root })).id;
  await createJob(ctx, { name: 'nightly', vms: ['vm1'], repository: 'main' });
});
afterAll(async () => {
  await cdb?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('server key and sealing', () => {
  it('creates the key once, mode 0600, and reads it back; a damaged key file is refused', async () => {
    const other = await mkdtemp(path.join(tmpdir(), 'bulwark-key-'));
    try {
      const k1 = await loadServerKey(other);
      expect(k1.length).toBe(32);
      expect((await stat(path.join(other, 'secret.key'))).mode & 0o777).toBe(0o600);
      expect((await loadServerKey(other)).equals(k1)).toBe(true);
      await writeFile(path.join(other, 'secret.key'), 'bulwark-secret-key-v1\nshort\n');
      await expect(loadServerKey(other)).rejects.toThrow(/damaged/);
    } finally {
      await rm(other, { recursive: true, force: true });
    }
  });

  it('seals with the key and the record id; another key or id cannot unseal', async () => {
    const key = Buffer.alloc(32, 7);
    const sealed = sealPassword(key, 'id-1', JOB_PASSWORD);
    expect(sealed).toMatch(/^v1:/);
    expect(sealed).not.toContain(JOB_PASSWORD);
    expect(unsealPassword(key, 'id-1', sealed)).toBe(JOB_PASSWORD);
    expect(() => unsealPassword(Buffer.alloc(32, 8), 'id-1', sealed)).toThrow(/cannot be unsealed/);
    expect(() => unsealPassword(key, 'id-2', sealed)).toThrow(/cannot be unsealed/);
  });
});

describe('passwords of jobs and points', () => {
  it('a job point opens with the server password; a given password is checked; an unknown chain opens once its password is added', async () => {
    await expect(keys.setJobPassword('nightly', 'short', 'h')).rejects.toThrow(/at least 8/);
    const enc = await keys.setJobPassword('nightly', JOB_PASSWORD, 'the usual one');
    expect(enc).toMatchObject({ job: 'nightly', encrypted: true, hint: 'the usual one' });
    const job = await ctx.db.selectFrom('jobs').select('id').where('name', '=', 'nightly').executeTakeFirstOrThrow();
    expect(await keys.jobPassword(job.id)).toBe(JOB_PASSWORD);

    const a = await writePoint('nightly', 'vm1', JOB_PASSWORD, 'the usual one');
    await recordRestorePoint(ctx, { id: a.id, vm: 'vm1', disks: [{ name: 'vda', size: BS + 5 }], time: new Date().toISOString(), type: 'full', chainId: a.chainId, size: 1, repositoryId: repoId, jobId: job.id });
    await keys.recordJobChain(job.id, a.chainId, null);
    const pa = await getRestorePoint(ctx, a.id);
    expect(pa).toMatchObject({ encrypted: true, keyKnown: true, passwordHint: 'the usual one' });
    expect(await keys.unlock(repo, pa)).toBe(JOB_PASSWORD);
    const wrong = await keys.unlock(repo, pa, 'not-the-password').catch((e: unknown) => e);
    expect(wrong).toBeInstanceOf(BulwarkError);
    expect((wrong as BulwarkError).message).toBe(`wrong password for restore point ${a.id} (hint: the usual one)`);
    expect((wrong as BulwarkError).context.field).toBe('password');
    expect((wrong as BulwarkError).kind).not.toBe('corrupt');

    // An export-like point: its own password, not known to the server.
    const b = await writePoint('_export-vm1', 'vm1', OTHER_PASSWORD, 'the export one');
    await recordRestorePoint(ctx, { id: b.id, vm: 'vm1', disks: [{ name: 'vda', size: BS + 5 }], time: new Date().toISOString(), type: 'full', chainId: b.chainId, size: 1, repositoryId: repoId, jobId: null });
    await keys.recordChain(b.chainId, 'the export one', null);
    const pb = await getRestorePoint(ctx, b.id);
    expect(pb).toMatchObject({ encrypted: true, keyKnown: false });
    await expect(keys.unlock(repo, pb)).rejects.toThrow(`restore point ${b.id} is encrypted and this server does not know its password (hint: the export one)`);
    expect(await keys.unlock(repo, pb, OTHER_PASSWORD)).toBe(OTHER_PASSWORD);
    const added = await keys.add(OTHER_PASSWORD, 'export password');
    expect(await keys.matchUnknownChains()).toBe(1);
    expect((await getRestorePoint(ctx, b.id)).keyKnown).toBe(true);
    expect(await keys.unlock(repo, pb)).toBe(OTHER_PASSWORD);
    expect((await keys.get(added.id)).chains).toBe(1);

    // Changing the job's password keeps the old one for the old chain.
    await keys.setJobPassword('nightly', 'a-new-password-2', 'the new one');
    expect(await keys.unlock(repo, pa)).toBe(JOB_PASSWORD);
    // The executors get every password that may open the job's chains: active, earlier, added by hand.
    expect(await keys.jobPasswords(job.id)).toEqual(['a-new-password-2', JOB_PASSWORD, OTHER_PASSWORD]);
    // An increment of the old chain recorded after the change keeps the chain's key (not the active one).
    await keys.recordJobChain(job.id, a.chainId, null);
    expect(await keys.remotePassword({ id: a.id, job: 'nightly', chainId: a.chainId })).toBe(JOB_PASSWORD);
    // A new chain of the job is recorded with the active password.
    const c = await writePoint('nightly', 'vm2', 'a-new-password-2', 'the new one');
    await keys.recordJobChain(job.id, c.chainId, null);
    expect(await keys.remotePassword({ id: c.id, job: 'nightly', chainId: c.chainId })).toBe('a-new-password-2');
    const list = await keys.list();
    expect(list.filter((k) => k.job === 'nightly').map((k) => k.active).sort()).toEqual([false, true]);
    await expect(keys.remove(list.find((k) => k.job === 'nightly' && k.active)!.id)).rejects.toThrow(/active password of job nightly/);
    await expect(keys.remove(added.id)).rejects.toThrow(/opens 1 encrypted chain/);
    await keys.remove(added.id, true);
    expect((await getRestorePoint(ctx, b.id)).keyKnown).toBe(false);
    expect((await listRestorePoints(ctx)).filter((p) => p.encrypted).length).toBe(2);
    await keys.clearJobPassword('nightly');
    expect((await keys.jobEncryption('nightly')).encrypted).toBe(false);
    expect(await keys.jobPassword(job.id)).toBeUndefined();
  });

  it('through the API: job encryption and the password list never answer a password; a restore with a wrong one is 403 field password', async () => {
    const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
    const app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't', plugins: [encryptionPlugin(keys), restorePlugin(ctx, undefined, keys)] });
    try {
      const short = await app.inject({ method: 'POST', url: '/api/v1/jobs/nightly/encryption', payload: { password: 'short', hint: 'h' } });
      expect(short.statusCode).toBe(400);
      const set = await app.inject({ method: 'POST', url: '/api/v1/jobs/nightly/encryption', payload: { password: JOB_PASSWORD, hint: 'via the API' } });
      expect(set.statusCode).toBe(200);
      expect(set.json()).toMatchObject({ job: 'nightly', encrypted: true, hint: 'via the API' });
      const list = await app.inject({ method: 'GET', url: '/api/v1/encryption-keys' });
      expect(list.statusCode).toBe(200);
      for (const body of [set.body, list.body]) {
        expect(body).not.toContain(JOB_PASSWORD);
        expect(body).not.toMatch(/sealed|"password"/);
      }
      const point = (await listRestorePoints(ctx)).find((p) => p.job === 'nightly')!;
      const to = path.join(dir, 'api-restore.raw');
      const wrong = await app.inject({ method: 'POST', url: `/api/v1/restore-points/${point.id}/restore-disk`, payload: { disk: 'vda', to, password: 'not-it-at-all' } });
      expect(wrong.statusCode).toBe(403);
      expect(wrong.json()).toMatchObject({ error: { kind: 'forbidden', field: 'password', message: `wrong password for restore point ${point.id} (hint: the usual one)` } });
      const ok = await app.inject({ method: 'POST', url: `/api/v1/restore-points/${point.id}/restore-disk`, payload: { disk: 'vda', to } });
      expect(ok.statusCode, ok.body).toBe(200);
      expect(ok.json<{ size: number }>().size).toBe(BS + 5);
      expect((await app.inject({ method: 'DELETE', url: '/api/v1/jobs/nightly/encryption' })).json()).toMatchObject({ encrypted: false });
    } finally {
      await app.close();
    }
  });

  it('the database holds no password in clear text', async () => {
    await cdb.close();
    const bytes = await readFile(path.join(dir, 'bulwark.db'));
    for (const p of [JOB_PASSWORD, OTHER_PASSWORD, 'a-new-password-2']) expect(bytes.includes(Buffer.from(p))).toBe(false);
    cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
    const rows = await sql<{ n: number }>`select count(*) as n from encryption_keys`.execute(cdb.db);
    expect(Number(rows.rows[0]?.n)).toBe(3);
  });
});
