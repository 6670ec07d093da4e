// Timestamped schema migrations and the runner that applies them under a lock: SQLite takes an
// exclusive transaction, PostgreSQL a transaction-scoped advisory lock. The runner refuses to
// run when the recorded history is not a prefix of the known list (reordered or unknown entries),
// because guessing on a configuration database loses people's jobs.
import { sql, type Kysely, type Transaction } from 'kysely';
import { BulwarkError } from '../../common/errors.js';
import type { Database } from './schema.js';

export type Engine = 'sqlite' | 'postgres';

export interface Migration {
  /** `YYYYMMDDHHMM_what`, sorted by name = applied in order. */
  name: string;
  up(db: Kysely<Database>, engine: Engine): Promise<void>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- schema builders work on untyped tables
type AnyDb = Kysely<any>;

const bigint = 'bigint' as const;
const real = 'double precision' as const;

function configColumns(t: ReturnType<AnyDb['schema']['createTable']>) {
  return t
    .addColumn('id', 'text', (c) => c.primaryKey())
    .addColumn('name', 'text', (c) => c.notNull().unique())
    .addColumn('version', 'integer', (c) => c.notNull().defaultTo(1))
    .addColumn('created_at', 'text', (c) => c.notNull())
    .addColumn('updated_at', 'text', (c) => c.notNull());
}

export const migrations: readonly Migration[] = [
  {
    name: '202611250001_initial',
    async up(kdb, engine) {
      const db = kdb as AnyDb;
      await configColumns(db.schema.createTable('agents'))
        .addColumn('hostname', 'text', (c) => c.notNull())
        .addColumn('agent_version', 'text', (c) => c.notNull())
        .addColumn('cores', 'integer', (c) => c.notNull().defaultTo(0))
        .addColumn('last_seen_at', 'text')
        .addColumn('cert_fingerprint', 'text')
        .addColumn('cert_serial', 'text')
        .addColumn('state', 'text', (c) => c.notNull())
        .addColumn('health', 'text')
        .execute();
      await configColumns(db.schema.createTable('hosts'))
        .addColumn('kind', 'text', (c) => c.notNull())
        .addColumn('uri', 'text', (c) => c.notNull())
        .addColumn('agent_id', 'text', (c) => c.references('agents.id'))
        .execute();
      await configColumns(db.schema.createTable('repositories'))
        .addColumn('path', 'text', (c) => c.notNull())
        .addColumn('agent_id', 'text', (c) => c.references('agents.id'))
        .addColumn('max_tasks', 'integer', (c) => c.notNull())
        .addColumn('read_rate_mbps', real)
        .addColumn('write_rate_mbps', real)
        .execute();
      await configColumns(db.schema.createTable('jobs'))
        .addColumn('objects', 'text', (c) => c.notNull())
        .addColumn('repository_id', 'text', (c) => c.notNull().references('repositories.id'))
        .addColumn('method', 'text', (c) => c.notNull())
        .addColumn('retention', 'text', (c) => c.notNull())
        .addColumn('block_size', 'integer', (c) => c.notNull())
        .addColumn('compression', 'text', (c) => c.notNull())
        .addColumn('schedule', 'text')
        .addColumn('enabled', 'integer', (c) => c.notNull())
        .addColumn('retry_count', 'integer', (c) => c.notNull())
        .addColumn('retry_wait_minutes', 'integer', (c) => c.notNull())
        .addColumn('window', 'text')
        .addColumn('require_guest_processing', 'integer', (c) => c.notNull())
        .addColumn('scheduled_since', 'text', (c) => c.notNull())
        .execute();
      await db.schema
        .createTable('sessions')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('job_id', 'text', (c) => c.references('jobs.id').onDelete('set null'))
        .addColumn('job_name', 'text', (c) => c.notNull())
        .addColumn('state', 'text', (c) => c.notNull())
        .addColumn('full', 'integer', (c) => c.notNull())
        .addColumn('trigger', 'text', (c) => c.notNull().defaultTo('manual'))
        .addColumn('started_at', 'text', (c) => c.notNull())
        .addColumn('ended_at', 'text')
        .addColumn('reason', 'text')
        .addColumn('percent', real, (c) => c.notNull())
        .addColumn('bytes_read', bigint, (c) => c.notNull())
        .addColumn('bytes_transferred', bigint, (c) => c.notNull())
        .addColumn('bytes_stored', bigint, (c) => c.notNull())
        .addColumn('processing_rate', real, (c) => c.notNull())
        .addColumn('updated_at', 'text', (c) => c.notNull())
        .execute();
      await db.schema.createIndex('sessions_job_started').on('sessions').columns(['job_name', 'started_at']).execute();
      await db.schema
        .createTable('session_tasks')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('session_id', 'text', (c) => c.notNull().references('sessions.id').onDelete('cascade'))
        .addColumn('vm', 'text', (c) => c.notNull())
        .addColumn('disk', 'text', (c) => c.notNull())
        .addColumn('state', 'text', (c) => c.notNull())
        .addColumn('attempt', 'integer', (c) => c.notNull().defaultTo(1))
        .addColumn('proxy', 'text')
        .addColumn('started_at', 'text')
        .addColumn('ended_at', 'text')
        .addColumn('percent', real, (c) => c.notNull())
        .addColumn('bytes_total', bigint, (c) => c.notNull().defaultTo(0))
        .addColumn('bytes_read', bigint, (c) => c.notNull())
        .addColumn('bytes_transferred', bigint, (c) => c.notNull())
        .addColumn('bytes_stored', bigint, (c) => c.notNull())
        .addColumn('processing_rate', real, (c) => c.notNull())
        .addColumn('message', 'text')
        .execute();
      await db.schema
        .createTable('session_log')
        .addColumn('id', engine === 'postgres' ? 'bigserial' : 'integer', (c) =>
          engine === 'postgres' ? c.primaryKey() : c.primaryKey().autoIncrement(),
        )
        .addColumn('session_id', 'text', (c) => c.notNull().references('sessions.id').onDelete('cascade'))
        .addColumn('task_id', 'text')
        .addColumn('time', 'text', (c) => c.notNull())
        .addColumn('level', 'text', (c) => c.notNull())
        .addColumn('message', 'text', (c) => c.notNull())
        .execute();
      await db.schema.createIndex('session_log_session').on('session_log').column('session_id').execute();
      await db.schema
        .createTable('restore_points')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('vm', 'text', (c) => c.notNull())
        .addColumn('disks', 'text', (c) => c.notNull())
        .addColumn('time', 'text', (c) => c.notNull())
        .addColumn('type', 'text', (c) => c.notNull())
        .addColumn('chain_id', 'text', (c) => c.notNull())
        .addColumn('size', bigint, (c) => c.notNull())
        .addColumn('state', 'text', (c) => c.notNull())
        .addColumn('repository_id', 'text', (c) => c.notNull().references('repositories.id'))
        .addColumn('job_id', 'text', (c) => c.references('jobs.id').onDelete('set null'))
        .addColumn('session_id', 'text', (c) => c.references('sessions.id').onDelete('set null'))
        .addColumn('created_at', 'text', (c) => c.notNull())
        .execute();
      await db.schema.createIndex('restore_points_vm_time').on('restore_points').columns(['vm', 'time']).execute();
      await configColumns(db.schema.createTable('users'))
        .addColumn('password_hash', 'text', (c) => c.notNull())
        .addColumn('role', 'text', (c) => c.notNull())
        .execute();
      await db.schema
        .createTable('api_tokens')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('token_hash', 'text', (c) => c.notNull().unique())
        .addColumn('user_id', 'text', (c) => c.notNull().references('users.id').onDelete('cascade'))
        .addColumn('expires_at', 'text', (c) => c.notNull())
        .addColumn('created_at', 'text', (c) => c.notNull())
        .execute();
      await db.schema
        .createTable('enrollment_tokens')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('token_hash', 'text', (c) => c.notNull().unique())
        .addColumn('expires_at', 'text', (c) => c.notNull())
        .addColumn('used_at', 'text')
        .addColumn('agent_name', 'text')
        .addColumn('agent_id', 'text', (c) => c.references('agents.id').onDelete('set null'))
        .addColumn('created_at', 'text', (c) => c.notNull())
        .execute();
    },
  },
  {
    name: '202611250100_job_backup_options_and_exports',
    async up(kdb) {
      const db = kdb as AnyDb;
      await db.schema.alterTable('jobs').addColumn('backup_options', 'text').execute();
      await db.schema
        .createTable('exports')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('vm', 'text', (c) => c.notNull())
        .addColumn('repository_id', 'text', (c) => c.notNull().references('repositories.id'))
        .addColumn('folder', 'text', (c) => c.notNull())
        .addColumn('point_id', 'text', (c) => c.notNull())
        .addColumn('encrypted', 'integer', (c) => c.notNull().defaultTo(0))
        .addColumn('created_at', 'text', (c) => c.notNull())
        .addColumn('expires_at', 'text')
        .execute();
    },
  },
  {
    // Resource scheduling (docs/resource-scheduling.md): an agent's task limit (null = its CPU
    // cores), global server settings (processing mode), network throttling rules, and each task's
    // busy time per stage for the bottleneck statistics. A repository's max_tasks 0 = the cores
    // of its agent.
    name: '202611250200_resources',
    async up(kdb) {
      const db = kdb as AnyDb;
      await db.schema.alterTable('agents').addColumn('max_tasks', 'integer').execute();
      await db.schema.alterTable('session_tasks').addColumn('stage_busy', 'text').execute();
      await db.schema
        .createTable('server_settings')
        .addColumn('key', 'text', (c) => c.primaryKey())
        .addColumn('value', 'text', (c) => c.notNull())
        .addColumn('version', 'integer', (c) => c.notNull().defaultTo(1))
        .addColumn('updated_at', 'text', (c) => c.notNull())
        .execute();
      await configColumns(db.schema.createTable('throttling_rules'))
        .addColumn('source', 'text', (c) => c.notNull())
        .addColumn('target', 'text', (c) => c.notNull())
        .addColumn('mbps', real, (c) => c.notNull())
        .addColumn('days', 'text')
        .addColumn('from_time', 'text')
        .addColumn('to_time', 'text')
        .addColumn('enabled', 'integer', (c) => c.notNull().defaultTo(1))
        .execute();
    },
  },
  {
    // A job may pin the agent that moves its data (the proxy); null = automatic selection.
    name: '202611250201_job_proxy',
    async up(kdb) {
      await (kdb as AnyDb).schema.alterTable('jobs').addColumn('proxy', 'text').execute();
    },
  },
  {
    // Encryption of backup chains managed by the server (docs/encryption.md): the passwords it
    // knows, sealed with the key in <data>/secret.key (never in clear text here), each optionally
    // the active password of a job; and the encrypted chains it has seen, with their hint and the
    // password that opens them (null: not known to this server, e.g. an encrypted export).
    name: '202611250500_encryption_keys',
    async up(kdb) {
      const db = kdb as AnyDb;
      await db.schema
        .createTable('encryption_keys')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('job_id', 'text')
        .addColumn('hint', 'text', (c) => c.notNull())
        .addColumn('sealed_password', 'text', (c) => c.notNull())
        .addColumn('created_at', 'text', (c) => c.notNull())
        .addColumn('retired_at', 'text')
        .execute();
      await db.schema
        .createTable('encrypted_chains')
        .addColumn('chain_id', 'text', (c) => c.primaryKey())
        .addColumn('hint', 'text', (c) => c.notNull())
        .addColumn('key_id', 'text')
        .addColumn('recorded_at', 'text', (c) => c.notNull())
        .execute();
    },
  },
  {
    // The maintenance step a task runs (merge, synthetic-full, compact, inject, health-check) and
    // how far it has come, as JSON { name, bytesDone, bytesTotal }; null while none ran (MAINTPROGRESS).
    name: '202611280300_task_step',
    async up(kdb) {
      await (kdb as AnyDb).schema.alterTable('session_tasks').addColumn('step', 'text').execute();
    },
  },
  {
    // Sessions of every kind (docs/api.md, "Sessions"): restores and instant recoveries beside job
    // runs. kind backup | health-check | restore-vm | restore-disk | restore-files |
    // instant-recovery; vm, point_id and agent of a restore; status: an instant recovery's
    // running-from-backup | migrating | migrated | stopped; ref: its id (ir-…, vr-…).
    name: '202611290100_session_kind',
    async up(kdb) {
      const db = kdb as AnyDb;
      await db.schema.alterTable('sessions').addColumn('kind', 'text', (c) => c.notNull().defaultTo('backup')).execute();
      for (const column of ['vm', 'point_id', 'agent', 'status', 'ref']) await db.schema.alterTable('sessions').addColumn(column, 'text').execute();
      await db.schema.createIndex('sessions_kind_ref').on('sessions').columns(['kind', 'ref']).execute();
    },
  },
];

/** Advisory-lock key of the migration runner on PostgreSQL ("BULWARK1" as an int64). */
const PG_LOCK_KEY = 0x42554c5741524b31n;

export interface MigrationResult {
  applied: string[];
}

/**
 * Applies the pending migrations of `list` in name order, under the engine's lock, in one
 * transaction. Throws BulwarkError kind `corrupt` when the recorded history is not a prefix of
 * the known list.
 */
export async function migrate(
  db: Kysely<Database>,
  engine: Engine,
  list: readonly Migration[] = migrations,
): Promise<MigrationResult> {
  const known = [...list].sort((a, b) => a.name.localeCompare(b.name));
  for (let i = 1; i < known.length; i++) {
    if (known[i]!.name === known[i - 1]!.name) throw new BulwarkError(`duplicate migration ${known[i]!.name}`);
  }
  const body = async (trx: Kysely<Database> | Transaction<Database>): Promise<string[]> => {
    // Inside the lock: two servers starting at once on an empty database must not race here.
    await sql`create table if not exists bulwark_migrations (name text primary key, applied_at text not null)`.execute(trx);
    const done = (await trx.selectFrom('bulwark_migrations').select('name').execute()).map((r) => r.name).sort();
    for (let i = 0; i < done.length; i++) {
      const want = known[i];
      if (!want || !known.some((m) => m.name === done[i])) {
        throw new BulwarkError(`configuration database records migration ${done[i]} that this Bulwark does not know`, {
          kind: 'corrupt',
          context: { migration: done[i] },
          hint: 'the database was written by a newer Bulwark: run that version, or restore a configuration backup',
        });
      }
      if (want.name !== done[i]) {
        throw new BulwarkError(
          `configuration database migration history is out of order: ${done[i]} is recorded but ${want.name} before it is not`,
          { kind: 'corrupt', context: { migration: want.name }, hint: 'restore a configuration backup' },
        );
      }
    }
    const pending = known.slice(done.length);
    for (const m of pending) {
      try {
        await m.up(trx, engine);
      } catch (cause) {
        throw new BulwarkError(`configuration database migration ${m.name} failed`, { cause, context: { migration: m.name } });
      }
      await trx.insertInto('bulwark_migrations').values({ name: m.name, applied_at: new Date().toISOString() }).execute();
    }
    return pending.map((m) => m.name);
  };

  if (engine === 'postgres') {
    const applied = await db.transaction().execute(async (trx) => {
      await sql`select pg_advisory_xact_lock(${sql.lit(PG_LOCK_KEY.toString())}::bigint)`.execute(trx);
      return body(trx);
    });
    return { applied };
  }
  // SQLite: one connection; BEGIN EXCLUSIVE keeps every other process out until we commit.
  const applied = await db.connection().execute(async (conn) => {
    await sql`begin exclusive`.execute(conn);
    try {
      const names = await body(conn);
      await sql`commit`.execute(conn);
      return names;
    } catch (err) {
      await sql`rollback`.execute(conn);
      throw err;
    }
  });
  return { applied };
}
