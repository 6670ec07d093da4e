// Helpers for running the same test bodies on SQLite and PostgreSQL.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inject } from 'vitest';
import { BulwarkError } from '../../src/common/errors.js';
import { openDatabase, type ConfigDatabase } from '../../src/server/db/connect.js';
import type { Engine } from '../../src/server/db/migrations.js';
import type { Clock, ServiceContext } from '../../src/server/services/common.js';
import { createTestDatabase } from '../fixtures/postgres.js';

export const engines: Engine[] = ['sqlite', 'postgres'];

/** A database target of the engine: a fresh SQLite file, or a fresh PostgreSQL database. */
export async function freshTarget(engine: Engine): Promise<{ target: string; cleanup: () => void }> {
  if (engine === 'postgres') return { target: await createTestDatabase(inject('postgresUrl')), cleanup: () => undefined };
  const dir = mkdtempSync(join(tmpdir(), 'bulwark-db-'));
  return { target: join(dir, 'bulwark.db'), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export class FakeClock implements Clock {
  constructor(public t = new Date('2026-11-25T10:00:00Z')) {}
  now(): Date {
    return new Date(this.t);
  }
  advance(ms: number): void {
    this.t = new Date(this.t.getTime() + ms);
  }
}

export async function openTestContext(engine: Engine): Promise<{ cdb: ConfigDatabase; ctx: ServiceContext; clock: FakeClock; close: () => Promise<void> }> {
  const { target, cleanup } = await freshTarget(engine);
  const cdb = await openDatabase({ target });
  const clock = new FakeClock();
  return {
    cdb,
    clock,
    ctx: { db: cdb.db, engine, clock },
    close: async () => {
      await cdb.close();
      cleanup();
    },
  };
}

/** The BulwarkError `p` rejects with; fails the test when it resolves or rejects with another error. */
export async function bulwarkRejection(p: Promise<unknown>): Promise<BulwarkError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof BulwarkError) return err;
    throw err;
  }
  throw new Error('expected a BulwarkError');
}
