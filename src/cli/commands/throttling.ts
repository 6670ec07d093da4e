// `bulwark throttling add|list|show|edit|remove`: network throttling rules, global on the server
// (docs/resource-scheduling.md). A rule limits the traffic between two address ranges, in both
// directions, to N Mbit/s, optionally only on given days and hours.
import { Command, InvalidArgumentError, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import type { ThrottlingRule } from '../../server/services/throttling.js';
import { at, clientFor, nothingToDo, positiveInt, type CliContext, type ItemList } from '../context.js';
import { formatFields, formatTable, printJson } from '../output.js';
import { editWithVersion } from './edit.js';

const jsonOption = (): Option => new Option('--json', 'print the API object(s) as JSON');
const days = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];

function mbitPerSecond(value: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(?:mbit\/s|mbps|mbit)?$/i.exec(value.trim());
  if (!m || !(Number(m[1]) > 0)) throw new InvalidArgumentError(`--mbps must be a positive number of Mbit/s (e.g. 100), not "${value}"`);
  return Number(m[1]);
}

/** `mon,tue`, `mon-fri`, `weekdays`, `weekend`, `all`. */
function dayList(value: string): string[] {
  const out: string[] = [];
  for (const part of value.toLowerCase().split(',').map((p) => p.trim()).filter(Boolean)) {
    if (part === 'all' || part === 'daily') out.push(...days);
    else if (part === 'weekdays') out.push(...days.slice(0, 5));
    else if (part === 'weekend') out.push('sat', 'sun');
    else if (/^[a-z]{3}-[a-z]{3}$/.test(part)) {
      const [a = '', b = ''] = part.split('-');
      const i = days.indexOf(a);
      const j = days.indexOf(b);
      if (i < 0 || j < 0) throw new InvalidArgumentError(`--days: "${part}" is not a range of days (mon..sun)`);
      for (let k = i; ; k = (k + 1) % 7) {
        out.push(days[k]!);
        if (k === j) break;
      }
    } else if (days.includes(part)) out.push(part);
    else throw new InvalidArgumentError(`--days: "${part}" is not a day (mon..sun, mon-fri, weekdays, weekend, all)`);
  }
  return [...new Set(out)];
}

/** `HH:MM-HH:MM`. */
function hourRange(value: string): { from: string; to: string } {
  const m = /^(\d{1,2}:\d{2})\s*-\s*(\d{1,2}:\d{2})$/.exec(value.trim());
  if (!m) throw new InvalidArgumentError(`--hours must be HH:MM-HH:MM (e.g. 08:00-18:00), not "${value}"`);
  const pad = (t: string): string => t.padStart(5, '0');
  return { from: pad(m[1]!), to: pad(m[2]!) };
}

interface RuleOptions {
  name?: string;
  source?: string;
  target?: string;
  mbps?: number;
  days?: string[];
  hours?: { from: string; to: string };
  always?: boolean;
  enable?: boolean;
  disable?: boolean;
  expectVersion?: number;
  json?: boolean;
}

function when(r: ThrottlingRule): string {
  if (!r.schedule) return 'always';
  const d = r.schedule.days.length === 7 ? 'every day' : r.schedule.days.join(',');
  return r.schedule.from === r.schedule.to ? `${d}, all day` : `${d} ${r.schedule.from}-${r.schedule.to}`;
}

/** The schedule the options give, against the rule's current one (edit) or none (add). */
function scheduleFrom(o: RuleOptions, current: ThrottlingRule['schedule']): ThrottlingRule['schedule'] | undefined {
  if (o.always) return null;
  if (o.days === undefined && o.hours === undefined) return undefined;
  const hours = o.hours ?? (current ? { from: current.from, to: current.to } : { from: '00:00', to: '00:00' });
  return { days: (o.days ?? current?.days ?? days) as NonNullable<ThrottlingRule['schedule']>['days'], from: hours.from, to: hours.to };
}

export function throttlingCommand(ctx: CliContext): Command {
  const throttling = new Command('throttling').description('network throttling rules: limit traffic between address ranges (both directions)');
  const withRuleOptions = (c: Command): Command =>
    c
      .option('--source <ranges>', 'comma-separated CIDRs (10.0.0.0/24), ranges (10.0.0.5-10.0.0.9) or addresses')
      .option('--target <ranges>', 'the same, for the other side')
      .option('--mbps <n>', 'the limit in Mbit/s for all traffic the rule covers', mbitPerSecond)
      .option('--days <days>', 'only on these days: mon,tue,… | mon-fri | weekdays | weekend | all', dayList)
      .option('--hours <from-to>', 'only in these hours, server time: HH:MM-HH:MM (past midnight when to < from)', hourRange)
      .addOption(jsonOption());

  withRuleOptions(
    throttling
      .command('add')
      .description('add a throttling rule')
      .option('--name <name>', 'a name for the rule (default: rule-N)')
      .option('--disabled', 'add it switched off'),
  ).action(async (o: RuleOptions & { disabled?: boolean }, cmd: Command) => {
    if (o.source === undefined || o.target === undefined || o.mbps === undefined) {
      throw new BulwarkError('throttling add needs --source, --target and --mbps', { kind: 'invalid', hint: 'e.g. bulwark throttling add --source 10.1.0.0/16 --target 10.2.0.0/16 --mbps 100 --days weekdays --hours 08:00-18:00' });
    }
    const schedule = scheduleFrom(o, null);
    const body = {
      ...(o.name ? { name: o.name } : {}),
      source: o.source,
      target: o.target,
      mbps: o.mbps,
      ...(schedule !== undefined ? { schedule } : {}),
      ...(o.disabled ? { enabled: false } : {}),
    };
    const r = await (await clientFor(ctx, cmd)).post<ThrottlingRule>('/throttling-rules', body);
    if (o.json) printJson(ctx.output, r);
    else ctx.output.out(`throttling rule ${r.name} added: ${r.source} <-> ${r.target} at most ${r.mbps} Mbit/s, ${when(r)}\n`);
  });

  throttling
    .command('list')
    .description('list throttling rules')
    .addOption(jsonOption())
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<ThrottlingRule>>('/throttling-rules');
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'name', value: (r) => r.name },
          { header: 'source', value: (r) => r.source },
          { header: 'target', value: (r) => r.target },
          { header: 'Mbit/s', value: (r) => r.mbps, align: 'right' },
          { header: 'when', value: when },
          { header: 'enabled', value: (r) => (r.enabled ? 'yes' : 'no') },
        ]),
      );
    });

  throttling
    .command('show')
    .description('show one throttling rule')
    .argument('<name>')
    .addOption(jsonOption())
    .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
      const r = await (await clientFor(ctx, cmd)).get<ThrottlingRule>(at('/throttling-rules', name));
      if (o.json) return printJson(ctx.output, r);
      ctx.output.out(
        formatFields([
          ['name', r.name],
          ['source', r.source],
          ['target', r.target],
          ['limit', `${r.mbps} Mbit/s`],
          ['when', when(r)],
          ['enabled', r.enabled ? 'yes' : 'no'],
          ['version', r.version],
        ]),
      );
    });

  withRuleOptions(
    throttling
      .command('edit')
      .description('change a throttling rule')
      .argument('<name>')
      .option('--always', 'remove the days/hours: the rule applies at all times')
      .option('--enable', 'switch the rule on')
      .option('--disable', 'switch the rule off')
      .option('--expect-version <n>', 'refuse the edit unless the rule still has this version', positiveInt('--expect-version')),
  ).action(async (name: string, o: RuleOptions, cmd: Command) => {
    const client = await clientFor(ctx, cmd);
    const current = await client.get<ThrottlingRule>(at('/throttling-rules', name));
    const patch: Record<string, unknown> = {};
    if (o.source !== undefined) patch.source = o.source;
    if (o.target !== undefined) patch.target = o.target;
    if (o.mbps !== undefined) patch.mbps = o.mbps;
    const schedule = scheduleFrom(o, current.schedule);
    if (schedule !== undefined) patch.schedule = schedule;
    if (o.enable) patch.enabled = true;
    if (o.disable) patch.enabled = false;
    if (Object.keys(patch).length === 0) throw nothingToDo(`throttling edit ${name}`, '--source, --target, --mbps, --days, --hours, --always, --enable, --disable');
    const r = await editWithVersion<ThrottlingRule>(client, at('/throttling-rules', name), patch, o.expectVersion ?? current.version);
    if (o.json) printJson(ctx.output, r);
    else ctx.output.out(`throttling rule ${r.name} changed (version ${r.version}): ${r.source} <-> ${r.target} at most ${r.mbps} Mbit/s, ${when(r)}\n`);
  });

  throttling
    .command('remove')
    .alias('delete')
    .description('remove a throttling rule')
    .argument('<name>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await (await clientFor(ctx, cmd)).delete(at('/throttling-rules', name));
      ctx.output.out(`throttling rule ${name} removed\n`);
    });

  return throttling;
}
