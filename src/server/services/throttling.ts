// Network throttling rules, global on the server (docs/resource-scheduling.md): stored in the
// configuration database, edited through /throttling-rules with versions like every
// configuration object; the pure policy (matching, `limitFor`) is src/server/resources/throttling-rules.ts.
import type { Selectable } from 'kysely';
import { Type, type Static } from '@sinclair/typebox';
import type { ThrottlingRuleTable } from '../db/schema.js';
import { throttlingRuleProblems, type ThrottlingRule as PolicyRule, type Weekday } from '../resources/throttling-rules.js';
import { configFields, duplicate, invalid, isUniqueViolation, newId, notFound, nowIso, parseJson, stale, type ServiceContext } from './common.js';
import { checkName } from './infrastructure.js';
import { Name, VersionField, Weekday as WeekdaySchema } from './model.js';

const Hhmm = Type.String({ description: 'HH:MM, server time zone' });
export const ThrottlingSchedule = Type.Object(
  {
    days: Type.Array(WeekdaySchema, { description: 'days the window starts on' }),
    from: Hhmm,
    to: Type.String({ description: 'HH:MM; before `from` = past midnight; equal to `from` = the whole day' }),
  },
  { additionalProperties: false },
);
const Editable = {
  source: Type.String({ description: 'comma-separated CIDRs, ranges (10.0.0.5-10.0.0.9) or addresses' }),
  target: Type.String({ description: 'the same; the rule covers both directions' }),
  mbps: Type.Number({ description: 'limit in Mbit/s (10^6 bits) for all traffic the rule covers' }),
  schedule: Type.Union([ThrottlingSchedule, Type.Null()], { description: 'null = always' }),
  enabled: Type.Boolean(),
};
export const ThrottlingRule = Type.Object({
  id: Type.String(),
  name: Type.String(),
  version: Type.Integer(),
  createdAt: Type.String(),
  updatedAt: Type.String(),
  ...Editable,
});
export type ThrottlingRule = Static<typeof ThrottlingRule>;
export const ThrottlingRuleCreate = Type.Object(
  {
    name: Type.Optional(Name),
    source: Editable.source,
    target: Editable.target,
    mbps: Editable.mbps,
    schedule: Type.Optional(Editable.schedule),
    enabled: Type.Optional(Editable.enabled),
  },
  { additionalProperties: false },
);
export type ThrottlingRuleCreate = Static<typeof ThrottlingRuleCreate>;
export const ThrottlingRulePatch = Type.Object({ ...VersionField, ...Type.Partial(Type.Object(Editable)).properties }, { additionalProperties: false });
export type ThrottlingRulePatch = Static<typeof ThrottlingRulePatch>;

function toRule(r: Selectable<ThrottlingRuleTable>): ThrottlingRule {
  const days = parseJson<string[]>(r.days, 'throttling rule days');
  return {
    ...configFields(r),
    source: r.source,
    target: r.target,
    mbps: Number(r.mbps),
    schedule: days !== null && r.from_time !== null && r.to_time !== null ? { days: days as Weekday[], from: r.from_time, to: r.to_time } : null,
    enabled: r.enabled === 1,
  };
}

/** The policy's view of a stored rule (what `limitFor` takes). */
export function policyRule(r: ThrottlingRule): PolicyRule {
  return { name: r.name, source: r.source, target: r.target, mbps: r.mbps, schedule: r.schedule ?? undefined, enabled: r.enabled };
}

function check(r: { source: string; target: string; mbps: number; schedule: ThrottlingRule['schedule'] }): void {
  const [first] = throttlingRuleProblems({ name: '', source: r.source, target: r.target, mbps: r.mbps, schedule: r.schedule ?? undefined });
  if (first) throw invalid(first.field, first.message);
}

function rowValues(r: Pick<ThrottlingRule, 'source' | 'target' | 'mbps' | 'schedule' | 'enabled'>) {
  return {
    source: r.source.trim(),
    target: r.target.trim(),
    mbps: r.mbps,
    days: r.schedule ? JSON.stringify(r.schedule.days) : null,
    from_time: r.schedule?.from ?? null,
    to_time: r.schedule?.to ?? null,
    enabled: r.enabled ? 1 : 0,
  };
}

async function findRule(ctx: ServiceContext, name: string): Promise<Selectable<ThrottlingRuleTable> | undefined> {
  return (
    (await ctx.db.selectFrom('throttling_rules').selectAll().where('name', '=', name).executeTakeFirst()) ??
    (await ctx.db.selectFrom('throttling_rules').selectAll().where('id', '=', name).executeTakeFirst())
  );
}

export async function listThrottlingRules(ctx: ServiceContext): Promise<ThrottlingRule[]> {
  return (await ctx.db.selectFrom('throttling_rules').selectAll().orderBy('name').execute()).map(toRule);
}

export async function getThrottlingRule(ctx: ServiceContext, name: string): Promise<ThrottlingRule> {
  const r = await findRule(ctx, name);
  if (!r) throw notFound('throttling rule', name);
  return toRule(r);
}

export async function createThrottlingRule(ctx: ServiceContext, input: ThrottlingRuleCreate): Promise<ThrottlingRule> {
  const rule = { source: input.source, target: input.target, mbps: input.mbps, schedule: input.schedule ?? null, enabled: input.enabled ?? true };
  check(rule);
  let name = input.name;
  if (name === undefined) {
    const taken = new Set((await ctx.db.selectFrom('throttling_rules').select('name').execute()).map((r) => r.name));
    let n = taken.size + 1;
    while (taken.has(`rule-${n}`)) n++;
    name = `rule-${n}`;
  }
  checkName(name);
  const now = nowIso(ctx);
  try {
    await ctx.db
      .insertInto('throttling_rules')
      .values({ id: newId(), name, version: 1, created_at: now, updated_at: now, ...rowValues(rule) })
      .execute();
  } catch (err) {
    if (isUniqueViolation(err)) throw duplicate('throttling rule', name);
    throw err;
  }
  return getThrottlingRule(ctx, name);
}

export async function updateThrottlingRule(ctx: ServiceContext, name: string, patch: ThrottlingRulePatch): Promise<ThrottlingRule> {
  const row = await findRule(ctx, name);
  if (!row) throw notFound('throttling rule', name);
  const cur = toRule(row);
  const next = {
    source: patch.source ?? cur.source,
    target: patch.target ?? cur.target,
    mbps: patch.mbps ?? cur.mbps,
    schedule: patch.schedule === undefined ? cur.schedule : patch.schedule,
    enabled: patch.enabled ?? cur.enabled,
  };
  check(next);
  const res = await ctx.db
    .updateTable('throttling_rules')
    .set((eb) => ({ ...rowValues(next), version: eb('version', '+', 1), updated_at: nowIso(ctx) }))
    .where('id', '=', row.id)
    .where('version', '=', patch.version)
    .executeTakeFirst();
  if (Number(res.numUpdatedRows) === 0) throw stale('throttling rule', row.name);
  return getThrottlingRule(ctx, row.id);
}

export async function deleteThrottlingRule(ctx: ServiceContext, name: string): Promise<void> {
  const row = await findRule(ctx, name);
  if (!row) throw notFound('throttling rule', name);
  await ctx.db.deleteFrom('throttling_rules').where('id', '=', row.id).execute();
}

/**
 * The rules as the data path applies them (`limitFor`, `matchingThrottlingRules`), with the time
 * zone they are evaluated in (default: the server's).
 */
export async function loadThrottlingPolicy(ctx: ServiceContext, timeZone?: string): Promise<{ rules: PolicyRule[]; timeZone: string }> {
  return { rules: (await listThrottlingRules(ctx)).map(policyRule), timeZone: timeZone ?? Intl.DateTimeFormat().resolvedOptions().timeZone };
}
