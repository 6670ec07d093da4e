// What every service shares: the context (database, clock), id generation, errors that name the
// field or the object, and the optimistic-concurrency update used by every PATCH.
import { randomUUID } from 'node:crypto';
import type { Kysely, Selectable } from 'kysely';
import { BulwarkError } from '../../common/errors.js';
import type { Engine } from '../db/migrations.js';
import type { Database } from '../db/schema.js';

export interface Clock {
  now(): Date;
}
export const systemClock: Clock = { now: () => new Date() };

/** The side effects a service may use; tests pass a real database and a fake clock. */
export interface ServiceContext {
  db: Kysely<Database>;
  engine: Engine;
  clock: Clock;
}

export const newId = (): string => randomUUID();

export function nowIso(ctx: ServiceContext): string {
  return ctx.clock.now().toISOString();
}

/** A 400 naming the offending field. */
export function invalid(field: string, message: string): BulwarkError {
  return new BulwarkError(`${field}: ${message}`, { kind: 'invalid', context: { field } });
}

export function notFound(what: string, name: string): BulwarkError {
  return new BulwarkError(`${what} "${name}" not found`, { kind: 'not-found', context: { [what]: name } });
}

export const staleMessage = 'changed by someone else since you read it: reload';

export function stale(what: string, name: string): BulwarkError {
  return new BulwarkError(`${what} "${name}" was ${staleMessage}`, {
    kind: 'conflict',
    context: { [what]: name },
    hint: `read the ${what} again and repeat the edit`,
  });
}

export function duplicate(what: string, name: string): BulwarkError {
  return new BulwarkError(`${what} "${name}" already exists`, { kind: 'conflict', context: { [what]: name, field: 'name' } });
}

export function isUniqueViolation(err: unknown): boolean {
  const code = typeof err === 'object' && err !== null && 'code' in err ? String((err).code) : '';
  return code === '23505' || code === 'SQLITE_CONSTRAINT_UNIQUE' || code === 'SQLITE_CONSTRAINT_PRIMARYKEY';
}

export type ConfigTable = 'hosts' | 'agents' | 'repositories' | 'jobs' | 'users';

/** Looks a configuration object up by name, or by id when no name matches. */
export async function findByNameOrId<T extends ConfigTable>(
  ctx: ServiceContext,
  table: T,
  nameOrId: string,
): Promise<Selectable<Database[T]> | undefined> {
  const row =
    (await ctx.db.selectFrom(table as 'jobs').selectAll().where('name', '=', nameOrId).executeTakeFirst()) ??
    (await ctx.db.selectFrom(table as 'jobs').selectAll().where('id', '=', nameOrId).executeTakeFirst());
  return row as unknown as Selectable<Database[T]> | undefined;
}

/**
 * `UPDATE table SET values, version = version + 1 WHERE id = ? AND version = expected`; a miss
 * means someone else edited first: a conflict that tells the user to reload.
 */
export async function updateVersioned(
  ctx: ServiceContext,
  table: ConfigTable,
  what: string,
  row: { id: string; name: string },
  expectedVersion: number,
  values: Record<string, unknown>,
): Promise<void> {
  const result = await ctx.db
    .updateTable(table as 'jobs')
    .set((eb) => ({ ...values, version: eb('version', '+', 1), updated_at: nowIso(ctx) }))
    .where('id', '=', row.id)
    .where('version', '=', expectedVersion)
    .executeTakeFirst();
  if (Number(result.numUpdatedRows) === 0) throw stale(what, row.name);
}

export function configFields(row: { id: string; name: string; version: number; created_at: string; updated_at: string }) {
  return { id: row.id, name: row.name, version: row.version, createdAt: row.created_at, updatedAt: row.updated_at };
}

export function parseJson<T>(text: string | null, what: string): T | null {
  if (text === null) return null;
  try {
    return JSON.parse(text) as T;
  } catch (cause) {
    throw new BulwarkError(`stored ${what} is not valid JSON`, { kind: 'corrupt', cause });
  }
}
