// `bulwark vm list [--host NAME]`: the VMs of the managed hosts (GET /vms).
import { Command, Option } from 'commander';
import type { VmList } from '../../server/api/vms.js';
import { clientFor, type CliContext } from '../context.js';
import { formatTable, humanSize, localTime, printJson } from '../output.js';

const STATE: Record<VmList['items'][number]['state'], string> = { running: 'running', paused: 'paused', 'shut-off': 'shut off', other: 'other' };

export function vmCommand(ctx: CliContext): Command {
  const vm = new Command('vm').description('virtual machines on the managed hosts');
  vm.command('list')
    .description('the VMs of every host (or one), as their hypervisors report them now, with the jobs naming each and its newest restore point')
    .option('--host <name>', 'only this host')
    .addOption(new Option('--json', 'print the API object as JSON (items and unreachable hosts)'))
    .action(async (o: { host?: string; json?: boolean }, cmd: Command) => {
      const list = await (await clientFor(ctx, cmd)).get<VmList>(`/vms${o.host !== undefined ? `?host=${encodeURIComponent(o.host)}` : ''}`);
      if (o.json) return printJson(ctx.output, list);
      ctx.output.out(
        formatTable(list.items, [
          { header: 'name', value: (v) => v.name },
          { header: 'host', value: (v) => v.host },
          { header: 'state', value: (v) => STATE[v.state] },
          { header: 'disks', value: (v) => v.disks.map((d) => `${d.name} ${humanSize(d.sizeBytes)}`).join(', ') },
          { header: 'jobs', value: (v) => (v.jobs.length > 0 ? v.jobs.join(', ') : '-') },
          { header: 'last backup', value: (v) => (v.lastPoint ? `${localTime(v.lastPoint.time)} (${v.lastPoint.type}${v.lastPoint.state === 'ready' ? '' : `, ${v.lastPoint.state}`})` : 'never') },
        ]),
      );
      for (const u of list.unreachable) ctx.output.err(`host ${u.host}: its VMs could not be listed: ${u.reason}\n`);
      // Every host unreachable is a failure; some is a warning on stderr with the others listed.
      if (list.items.length === 0 && list.unreachable.length > 0) ctx.exitCode = 1;
    });
  return vm;
}
