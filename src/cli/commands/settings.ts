// `bulwark settings show|set`, `bulwark agent edit`, and the value parsers of resource scheduling
// (task limits, rates): global server settings and per-agent task limits
// (docs/resource-scheduling.md).
import { Command, InvalidArgumentError, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import type { Agent } from '../../server/services/model.js';
import type { SchedulerStatus } from '../../server/resources/database-slots.js';
import type { ServerSettings } from '../../server/services/settings.js';
import { at, clientFor, nothingToDo, positiveInt, type CliContext } from '../context.js';
import { formatFields, formatTable, localTime, printJson } from '../output.js';
import { editWithVersion } from './edit.js';

const jsonOption = (): Option => new Option('--json', 'print the API object as JSON');

/** `N` (1..1024) or `default` (null: the CPU cores of the agent). */
export function taskLimit(name: string) {
  return (value: string): number | null => {
    if (value === 'default' || value === 'auto') return null;
    if (!/^\d+$/.test(value) || Number(value) < 1 || Number(value) > 1024) {
      throw new InvalidArgumentError(`${name} must be a whole number from 1 to 1024, or "default" (the CPU cores), not "${value}"`);
    }
    return Number(value);
  };
}

const rateUnits: Record<string, number> = { '': 1, b: 1e-6, kb: 1e-3, mb: 1, gb: 1e3, kib: 1024 / 1e6, mib: 1048576 / 1e6, gib: 1073741824 / 1e6 };

/** A rate in MB/s (10^6 bytes): `200`, `200MB/s`, `1.5GB/s`, `512MiB/s`; `none` or `unlimited` = null. */
export function rateMBps(name: string) {
  return (value: string): number | null => {
    if (value === 'none' || value === 'unlimited') return null;
    const m = /^(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?(?:\/s|ps)?$/i.exec(value.trim());
    const factor = m ? rateUnits[(m[2] ?? '').toLowerCase()] : undefined;
    const mbps = m && factor !== undefined ? Number(m[1]) * factor : NaN;
    if (!(mbps > 0)) throw new InvalidArgumentError(`${name} must be a rate such as 200MB/s, 1GB/s or 512MiB/s (or "none"), not "${value}"`);
    return Math.round(mbps * 1000) / 1000;
  };
}

export function addAgentEditCommand(agent: Command, ctx: CliContext): void {
  agent
    .command('edit')
    .description('change an agent: its task limit as a proxy')
    .argument('<name>')
    .option('--max-tasks <n>', 'most concurrent tasks, or "default" (its CPU cores)', taskLimit('--max-tasks'))
    .option('--expect-version <n>', 'refuse the edit unless the agent still has this version', positiveInt('--expect-version'))
    .addOption(jsonOption())
    .action(async (name: string, o: { maxTasks?: number | null; expectVersion?: number; json?: boolean }, cmd: Command) => {
      if (o.maxTasks === undefined) throw nothingToDo(`agent edit ${name}`, '--max-tasks');
      const a = await editWithVersion<Agent>(await clientFor(ctx, cmd), at('/agents', name), { maxTasks: o.maxTasks }, o.expectVersion);
      if (o.json) printJson(ctx.output, a);
      else ctx.output.out(`agent ${a.name} changed: at most ${a.maxTasks} task(s)${a.maxTasksSetting === null ? ' (its CPU cores)' : ''} (version ${a.version})\n`);
    });
}

const settingNames = ['processing', 'restore-folders'] as const;

export function settingsCommand(ctx: CliContext): Command {
  const settings = new Command('settings').description('global server settings (processing mode, restore folders)');

  settings
    .command('show')
    .description('show the server settings')
    .addOption(jsonOption())
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const s = await client.get<ServerSettings>('/settings');
      if (o.json) return printJson(ctx.output, s);
      ctx.output.out(
        formatFields([
          ['processing', `${s.processing}${s.processing === 'sequential' ? ' (one VM and one disk at a time within a job)' : ' (tasks side by side as slots allow)'}`],
          ['restore folders', s.restoreFolders.length > 0 ? `${s.restoreFolders.join(', ')} (where users who are not administrators may restore to)` : 'none (only administrators may restore to a path)'],
          ['version', s.version],
          ['updated', localTime(s.updatedAt ?? undefined)],
        ]),
      );
      // Task slots in use now (what the resource scheduler holds).
      const slots = await client.get<SchedulerStatus>('/scheduler');
      ctx.output.out(`\ntask slots (${slots.running.length} running, ${slots.queued.length} queued):\n`);
      ctx.output.out(
        formatTable(
          [
            ...slots.proxies.map((p) => ({ kind: 'proxy', name: p.name, used: `${p.running} of ${p.maxTasks}`, note: p.online ? '' : 'offline' })),
            ...slots.repositories.map((r) => ({ kind: 'repository', name: r.name, used: `${r.running} of ${r.maxTasks}`, note: r.rateLimit === null ? '' : `${r.rateLimit / 1e6} MB/s shared` })),
          ],
          [
            { header: 'kind', value: (x) => x.kind },
            { header: 'name', value: (x) => x.name },
            { header: 'tasks', value: (x) => x.used, align: 'right' },
            { header: '', value: (x) => x.note },
          ],
        ),
      );
    });

  settings
    .command('set')
    .description('change a setting: processing parallel|sequential; restore-folders DIR[,DIR…] (or none): where users who are not administrators may restore to')
    .argument('<setting>', settingNames.join(', '))
    .argument('<value>')
    .option('--expect-version <n>', 'refuse the edit unless the settings still have this version', positiveInt('--expect-version'))
    .addOption(jsonOption())
    .action(async (setting: string, value: string, o: { expectVersion?: number; json?: boolean }, cmd: Command) => {
      if (setting === 'restore-folders') {
        const folders = value === 'none' ? [] : value.split(',').map((f) => f.trim()).filter((f) => f !== '');
        const relative = folders.find((f) => !f.startsWith('/'));
        if (relative !== undefined) throw new BulwarkError(`restore folder "${relative}" is not an absolute path`, { kind: 'invalid', hint: 'give absolute folders separated by commas, or none' });
        const s = await editWithVersion<ServerSettings>(await clientFor(ctx, cmd), '/settings', { restoreFolders: folders }, o.expectVersion);
        if (o.json) printJson(ctx.output, s);
        else ctx.output.out(`restore folders: ${s.restoreFolders.length > 0 ? s.restoreFolders.join(', ') : 'none'} (version ${s.version})\n`);
        return;
      }
      if (setting !== 'processing') throw new BulwarkError(`unknown setting "${setting}"`, { kind: 'invalid', hint: `known settings: ${settingNames.join(', ')}` });
      if (value !== 'parallel' && value !== 'sequential') throw new BulwarkError(`processing must be parallel or sequential, not "${value}"`, { kind: 'invalid' });
      const s = await editWithVersion<ServerSettings>(await clientFor(ctx, cmd), '/settings', { processing: value }, o.expectVersion);
      if (o.json) printJson(ctx.output, s);
      else ctx.output.out(`processing: ${s.processing} (version ${s.version})\n`);
    });

  return settings;
}
