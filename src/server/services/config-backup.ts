// Backup and restore of the configuration database itself. A backup is a consistent copy written
// into a repository folder: SQLite through the online backup API (`.sqlite`), PostgreSQL through
// pg_dump (`.sql`). Restore replaces the live database's contents from such a file while the
// server runs, inside one transaction (see docs/configuration-database.md).
import { copyFile, mkdir, mkdtemp, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import { runTool } from '../../common/process.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import { migrate } from '../db/migrations.js';
import { dataTables } from '../db/schema.js';
import { invalid, type Clock } from './common.js';
import { isLocalRepository } from './backup-methods.js';
import { listRepositories } from './infrastructure.js';

/**
 * Runs pg_dump / psql against `url` without putting its password on the command line (where any
 * local user could read it with ps): the password goes in PGPASSWORD, the URL without it.
 */
async function runPg(cmd: 'pg_dump' | 'psql', args: string[], url: string): Promise<void> {
  let dbname = url;
  let password = '';
  try {
    const u = new URL(url);
    password = decodeURIComponent(u.password);
    u.password = '';
    dbname = u.toString();
  } catch {
    // A form URL cannot parse (e.g. a socket folder in ?host= with no host): libpq reads it as is.
  }
  await runTool(cmd, [...args, '--dbname', dbname], `${cmd} of the configuration database`, {
    env: { ...process.env, ...(password ? { PGPASSWORD: password } : {}) },
    kind: 'unavailable',
  });
}

/** fsyncs a file (or folder) by path. */
async function fsyncPath(p: string): Promise<void> {
  const fh = await open(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export const configBackupDir = 'config-backup';

export interface ConfigBackupOptions {
  cdb: ConfigDatabase;
  clock: Clock;
}

function stamp(d: Date): string {
  return d.toISOString().replace(/[:.]/g, '-');
}

/**
 * Picks the named repository, or the first one by name of this server's host; errors say what to
 * do when none fits. The copy is written by this process, so a repository on another agent's host
 * (its folder is not here) is refused rather than a folder of that path made on this host.
 */
async function targetFolder(o: ConfigBackupOptions, repository: string | undefined): Promise<string> {
  const ctx = { db: o.cdb.db, engine: o.cdb.engine, clock: o.clock };
  const repos = await listRepositories(ctx);
  const local = repos.filter(isLocalRepository);
  if (repository !== undefined) {
    const repo = repos.find((r) => r.name === repository || r.id === repository);
    if (!repo) throw new BulwarkError(`repository: repository "${repository}" not found`, { kind: 'not-found', context: { field: 'repository', repository } });
    if (!isLocalRepository(repo)) {
      throw new BulwarkError(`repository: repository ${repo.name} is on the host of agent ${repo.agent ?? ''}; configuration backups are written into repositories of this server's host`, {
        kind: 'invalid',
        context: { field: 'repository', repository: repo.name, agent: repo.agent ?? undefined },
        hint: local[0] ? `choose one of this host: ${local.map((r) => r.name).join(', ')}` : 'add one on this host: bulwark repo add NAME --path DIR',
      });
    }
    return join(repo.path, configBackupDir);
  }
  const repo = local[0];
  if (!repo) {
    const elsewhere = repos.length > 0 ? ` (${repos.map((r) => `${r.name} is on agent ${r.agent ?? ''}`).join(', ')})` : '';
    throw new BulwarkError(`there is no repository on this server's host to write the configuration backup into${elsewhere}`, { kind: 'invalid', hint: 'add one first: bulwark repo add NAME --path DIR' });
  }
  return join(repo.path, configBackupDir);
}

/** Writes a consistent copy of the configuration database; returns the file written. */
export async function backupConfiguration(o: ConfigBackupOptions, repository?: string): Promise<{ path: string }> {
  const dir = await targetFolder(o, repository);
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
  } catch (cause) {
    throw new BulwarkError(`cannot create configuration backup folder ${dir}`, { kind: 'unavailable', cause, context: { file: dir } });
  }
  const ext = o.cdb.engine === 'sqlite' ? 'sqlite' : 'sql';
  const final = join(dir, `bulwark-config-${stamp(o.clock.now())}.${ext}`);
  const tmp = `${final}.tmp`;
  try {
    if (o.cdb.engine === 'sqlite') {
      if (!o.cdb.sqlite) throw new BulwarkError('SQLite handle missing');
      await o.cdb.sqlite.backup(tmp);
    } else {
      await runPg('pg_dump', ['--no-owner', '--no-privileges', '--clean', '--if-exists', '--file', tmp], o.cdb.postgresUrl ?? '');
    }
    // Durable before it counts: pruning keeps only the newest backups, so an empty newest file
    // after a crash must not be possible.
    await fsyncPath(tmp);
    await rename(tmp, final);
    await fsyncPath(dir);
  } catch (cause) {
    await rm(tmp, { force: true });
    throw new BulwarkError(`configuration backup to ${final} failed`, { cause, context: { file: final } });
  }
  return { path: final };
}

/** Keeps the newest `keep` backups in a folder, deletes older ones. */
export async function pruneConfigBackups(dir: string, keep: number): Promise<string[]> {
  const names = (await readdir(dir).catch(() => [])).filter((n) => /^bulwark-config-.*\.(sqlite|sql)$/.test(n)).sort();
  const old = names.slice(0, Math.max(0, names.length - keep));
  for (const n of old) await rm(join(dir, n), { force: true });
  return old;
}

/**
 * Replaces the contents of the live database with those of a configuration backup. Refused while
 * a session is queued or running. SQLite: the backup is copied aside, migrated to this build's
 * schema, attached, and every table is replaced in one transaction under the server's exclusive
 * lock. PostgreSQL: the pg_dump script runs through psql in a single transaction, then migrations.
 */
export async function restoreConfiguration(o: ConfigBackupOptions, path: string): Promise<{ restoredFrom: string }> {
  const { cdb } = o;
  const st = await stat(path).catch(() => undefined);
  if (!st?.isFile()) throw invalid('path', `${path} is not a file on the server`);
  const wantExt = cdb.engine === 'sqlite' ? '.sqlite' : '.sql';
  if (!path.endsWith(wantExt)) throw invalid('path', `${basename(path)} is not a ${cdb.engine} configuration backup (*${wantExt})`);
  const open = await cdb.db.selectFrom('sessions').select('id').where('state', 'in', ['queued', 'running']).executeTakeFirst();
  if (open) throw new BulwarkError(`session ${open.id} is running: stop it before restoring the configuration`, { kind: 'conflict', context: { session: open.id } });

  if (cdb.engine === 'postgres') {
    try {
      await runPg('psql', ['--quiet', '--no-psqlrc', '-v', 'ON_ERROR_STOP=1', '--single-transaction', '--file', path], cdb.postgresUrl ?? '');
    } catch (cause) {
      throw new BulwarkError(`restoring the configuration from ${path} failed; the database is unchanged`, { cause, context: { file: path } });
    }
    await migrate(cdb.db, 'postgres');
    return { restoredFrom: path };
  }

  // SQLite: migrate a private copy first, so an older backup fits this build's schema.
  const workDir = await mkdtemp(join(tmpdir(), 'bulwark-config-restore-'));
  const work = join(workDir, 'restore.sqlite');
  try {
    await copyFile(path, work);
    const copy = await openDatabase({ target: work });
    await copy.close();
    const handle = cdb.sqlite;
    if (!handle) throw new BulwarkError('SQLite handle missing');
    handle.prepare('ATTACH DATABASE ? AS restore_src').run(work);
    try {
      handle.pragma('foreign_keys = OFF');
      const replace = handle.transaction(() => {
        for (const table of [...dataTables].reverse()) handle.prepare(`DELETE FROM main."${table}"`).run();
        for (const table of dataTables) {
          const cols = (handle.prepare(`PRAGMA main.table_info("${table}")`).all() as Array<{ name: string }>).map((c) => `"${c.name}"`).join(', ');
          handle.prepare(`INSERT INTO main."${table}" (${cols}) SELECT ${cols} FROM restore_src."${table}"`).run();
        }
        const bad = handle.prepare('PRAGMA main.foreign_key_check').all();
        if (bad.length > 0) throw new BulwarkError(`the backup ${path} has ${bad.length} broken reference(s)`, { kind: 'corrupt' });
      });
      replace.exclusive();
    } finally {
      handle.pragma('foreign_keys = ON');
      handle.prepare('DETACH DATABASE restore_src').run();
    }
  } catch (cause) {
    throw new BulwarkError(`restoring the configuration from ${path} failed; the database is unchanged`, { cause, context: { file: path } });
  } finally {
    await rm(workDir, { recursive: true, force: true });
    await rm(`${work}-wal`, { force: true });
    await rm(`${work}-shm`, { force: true });
  }
  return { restoredFrom: path };
}
