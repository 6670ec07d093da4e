// Where a configuration backup goes: the named repository or the first of this server's host, and
// never a folder made on this host at the path of a repository that lives on another agent's host.
// Real SQLite (the online backup API writes the copy).
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import { systemClock, type ServiceContext } from './common.js';
import { backupConfiguration, configBackupDir } from './config-backup.js';
import { createRepository } from './infrastructure.js';

let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-config-backup-'));
  cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  const now = new Date().toISOString();
  await ctx.db
    .insertInto('agents')
    .values({ id: 'a-kvm07', name: 'kvm-07', version: 1, created_at: now, updated_at: now, hostname: 'kvm-07', agent_version: 't', cores: 2, last_seen_at: null, cert_fingerprint: null, state: 'online' })
    .execute();
});
afterAll(async () => {
  await cdb?.close();
  await rm(dir, { recursive: true, force: true });
});

const failure = async (p: Promise<unknown>): Promise<BulwarkError> => {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof BulwarkError)) throw new Error(`expected a BulwarkError, got ${String(err)}`);
  return err;
};

describe('backupConfiguration', () => {
  it('with only a repository on another agent\'s host: refuses, names it, and makes no folder here', async () => {
    const remotePath = path.join(dir, 'on-agent');
    // "a-…" sorts first by name: it would have been the default.
    await createRepository(ctx, { name: 'a-offsite', path: remotePath, agent: 'kvm-07' });
    const o = { cdb, clock: systemClock };
    const byDefault = await failure(backupConfiguration(o));
    expect(byDefault.kind).toBe('invalid');
    expect(byDefault.message).toBe('there is no repository on this server\'s host to write the configuration backup into (a-offsite is on agent kvm-07)');
    const named = await failure(backupConfiguration(o, 'a-offsite'));
    expect(named.kind).toBe('invalid');
    expect(named.context).toMatchObject({ field: 'repository', repository: 'a-offsite', agent: 'kvm-07' });
    expect(named.message).toContain('a-offsite is on the host of agent kvm-07');
    expect(existsSync(remotePath)).toBe(false);
  });

  it('defaults to the first repository of this host, past one on an agent', async () => {
    const localPath = path.join(dir, 'local-repo');
    await createRepository(ctx, { name: 'main', path: localPath });
    const { path: written } = await backupConfiguration({ cdb, clock: systemClock });
    expect(path.dirname(written)).toBe(path.join(localPath, configBackupDir));
    expect(existsSync(written)).toBe(true);
    expect(existsSync(path.join(dir, 'on-agent'))).toBe(false);
  });
});
