// Opens the configuration database: embedded SQLite (better-sqlite3, WAL, held exclusively by
// this server process so a second server on the same data directory fails at once) or
// PostgreSQL (`postgres://…`). Start-up failures become BulwarkErrors that name the file or URL.
import BetterSqlite3 from 'better-sqlite3';
import { Kysely, PostgresDialect, SqliteDialect } from 'kysely';
import pg from 'pg';
import { BulwarkError } from '../../common/errors.js';
import { migrate, type Engine, type MigrationResult } from './migrations.js';
import type { Database } from './schema.js';

export interface ConfigDatabase {
  db: Kysely<Database>;
  engine: Engine;
  /** The SQLite file path, or the PostgreSQL URL with any password removed. */
  location: string;
  /** The raw better-sqlite3 handle (SQLite only): used for online backup. */
  sqlite?: BetterSqlite3.Database;
  /** The PostgreSQL connection URL including credentials (PostgreSQL only): used by pg_dump. */
  postgresUrl?: string;
  migrations: MigrationResult;
  close(): Promise<void>;
}

export interface OpenDatabaseOptions {
  /** `postgres://…` / `postgresql://…` URL, or a SQLite file path. */
  target: string;
  /** Skip running migrations (tests of the migration runner). */
  migrate?: boolean;
}

export function isPostgresUrl(target: string): boolean {
  return /^postgres(ql)?:\/\//.test(target);
}

/** The URL without its password, for messages and logs. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return url;
  }
}

function sqliteCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err ? String((err).code) : undefined;
}

function openSqlite(path: string): BetterSqlite3.Database {
  let handle: BetterSqlite3.Database | undefined;
  try {
    handle = new BetterSqlite3(path, { timeout: 300 });
    handle.pragma('locking_mode = EXCLUSIVE');
    handle.pragma('journal_mode = WAL');
    handle.pragma('foreign_keys = ON');
    handle.pragma('synchronous = NORMAL');
    // Take the exclusive lock now (a write), so a second server fails here, not later.
    handle.exec('BEGIN IMMEDIATE; COMMIT;');
    const check = handle.pragma('quick_check', { simple: true });
    if (check !== 'ok') throw new BulwarkError(`quick_check: ${String(check)}`);
    return handle;
  } catch (cause) {
    handle?.close();
    const code = sqliteCode(cause);
    if (code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED') {
      throw new BulwarkError(`configuration database ${path} is locked by another process`, {
        kind: 'unavailable',
        context: { file: path },
        cause,
        hint: 'another bulwark server is probably using this data directory: stop it, or use another --data',
      });
    }
    if (code === 'SQLITE_NOTADB' || code === 'SQLITE_CORRUPT' || cause instanceof BulwarkError) {
      throw new BulwarkError(`configuration database ${path} is corrupt`, {
        kind: 'corrupt',
        context: { file: path },
        cause,
        hint: 'move the file aside and restore a configuration backup (bulwark config restore)',
      });
    }
    if (code === 'SQLITE_CANTOPEN' || code === 'SQLITE_READONLY' || code === 'SQLITE_PERM') {
      throw new BulwarkError(`cannot open configuration database ${path} for writing`, {
        kind: 'unavailable',
        context: { file: path },
        cause,
        hint: 'check that the data directory exists and is writable by this user',
      });
    }
    throw new BulwarkError(`cannot open configuration database ${path}`, { context: { file: path }, cause });
  }
}

/** Opens (and by default migrates) the configuration database. */
export async function openDatabase(opts: OpenDatabaseOptions): Promise<ConfigDatabase> {
  if (isPostgresUrl(opts.target)) {
    const location = redactUrl(opts.target);
    const pool = new pg.Pool({
      connectionString: opts.target,
      max: 8,
      connectionTimeoutMillis: 5000,
      // int8 columns (byte counts) as numbers: byte counts stay far below 2^53.
      types: {
        getTypeParser: ((oid: number, format?: string): unknown =>
          oid === 20 ? (v: string) => Number(v) : (pg.types.getTypeParser(oid, format as 'text') as unknown)) as typeof pg.types.getTypeParser,
      },
    });
    pool.on('error', () => undefined); // idle-client errors surface on the next query
    const db = new Kysely<Database>({ dialect: new PostgresDialect({ pool }) });
    try {
      const client = await pool.connect();
      client.release();
    } catch (cause) {
      await db.destroy();
      throw new BulwarkError(`cannot connect to configuration database ${location}`, {
        kind: 'unavailable',
        context: { database: location },
        cause,
        hint: 'check that PostgreSQL is running and the --db URL (host, port, user, database) is right',
      });
    }
    try {
      const result = opts.migrate === false ? { applied: [] } : await migrate(db, 'postgres');
      return { db, engine: 'postgres', location, postgresUrl: opts.target, migrations: result, close: () => db.destroy() };
    } catch (err) {
      await db.destroy();
      throw err;
    }
  }
  const handle = openSqlite(opts.target);
  const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: handle }) });
  try {
    const result = opts.migrate === false ? { applied: [] } : await migrate(db, 'sqlite');
    return { db, engine: 'sqlite', location: opts.target, sqlite: handle, migrations: result, close: () => db.destroy() };
  } catch (err) {
    await db.destroy();
    throw err;
  }
}
