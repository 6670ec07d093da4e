// Global server settings: one versioned object (like every configuration object, edits carry the
// version read): `processing`, parallel or sequential task processing (see
// docs/resource-scheduling.md); `restoreFolders`, where users who are not administrators may restore
// to (docs/decisions/0009-restore-folders.md).
import path from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { isUniqueViolation, nowIso, stale, type ServiceContext } from './common.js';

const log = logger('settings');

export const ProcessingMode = Type.Union([Type.Literal('parallel'), Type.Literal('sequential')], {
  description: 'parallel: tasks of a job run side by side as slots allow; sequential: one VM and one disk at a time within a job (jobs still run in parallel)',
});

const RestoreFolders = Type.Array(Type.String({ minLength: 1, maxLength: 4096, pattern: '^/' }), {
  maxItems: 64,
  description: 'absolute folders below which users without the configure permission may restore disks, files, VM storage and mounts (administrators may restore anywhere)',
});

export const ServerSettings = Type.Object({
  processing: ProcessingMode,
  restoreFolders: RestoreFolders,
  version: Type.Integer({ description: '+1 per edit; send it back in PATCH' }),
  updatedAt: Type.Union([Type.String(), Type.Null()]),
});
export type ServerSettings = Static<typeof ServerSettings>;

export const ServerSettingsPatch = Type.Object(
  { version: Type.Integer({ minimum: 1 }), processing: Type.Optional(ProcessingMode), restoreFolders: Type.Optional(RestoreFolders) },
  { additionalProperties: false },
);
export type ServerSettingsPatch = Static<typeof ServerSettingsPatch>;

const KEY = 'server';
type Values = Omit<ServerSettings, 'version' | 'updatedAt'>;
const defaults: Values = { processing: 'parallel', restoreFolders: [] };

function parse(text: string): Values {
  try {
    const v = JSON.parse(text) as Partial<Values>;
    const folders = Array.isArray(v.restoreFolders) ? v.restoreFolders.filter((f): f is string => typeof f === 'string' && f.startsWith('/')) : [];
    return { processing: v.processing === 'sequential' ? 'sequential' : 'parallel', restoreFolders: folders };
  } catch (err) {
    // Unreadable settings must not stop the scheduler; they must not change behaviour unseen either.
    log.error({ table: 'server_settings', key: KEY, err: describeError(err) }, 'the stored server settings cannot be read: using the defaults until they are set again');
    return defaults;
  }
}

/** The settings; defaults (version 1) until the first edit. */
export async function getSettings(ctx: ServiceContext): Promise<ServerSettings> {
  const row = await ctx.db.selectFrom('server_settings').selectAll().where('key', '=', KEY).executeTakeFirst();
  if (!row) return { ...defaults, version: 1, updatedAt: null };
  return { ...parse(row.value), version: row.version, updatedAt: row.updated_at };
}

/** Changes settings; a stale `version` is a conflict ("changed by someone else since you read it"). */
export async function updateSettings(ctx: ServiceContext, patch: ServerSettingsPatch): Promise<ServerSettings> {
  const current = await getSettings(ctx);
  const { version, ...changes } = patch;
  const values: Values = { ...defaults, processing: current.processing, restoreFolders: current.restoreFolders };
  if (changes.processing !== undefined) values.processing = changes.processing;
  if (changes.restoreFolders !== undefined) values.restoreFolders = [...new Set(changes.restoreFolders.map((f) => path.resolve(f)))];
  const now = nowIso(ctx);
  if (current.updatedAt === null) {
    if (version !== 1) throw stale('settings', KEY);
    try {
      await ctx.db.insertInto('server_settings').values({ key: KEY, value: JSON.stringify(values), version: 2, updated_at: now }).execute();
    } catch (err) {
      if (isUniqueViolation(err)) throw stale('settings', KEY);
      throw err;
    }
  } else {
    const res = await ctx.db
      .updateTable('server_settings')
      .set({ value: JSON.stringify(values), version: version + 1, updated_at: now })
      .where('key', '=', KEY)
      .where('version', '=', version)
      .executeTakeFirst();
    if (Number(res.numUpdatedRows) === 0) throw stale('settings', KEY);
  }
  return getSettings(ctx);
}
