// `bulwark config backup | restore`: a consistent copy of the configuration database itself,
// written into a repository folder, and bringing a server back from one.
import { Command, Option } from 'commander';
import { clientFor, type CliContext } from '../context.js';
import { formatFields, printJson } from '../output.js';

export function configCommand(ctx: CliContext): Command {
  const config = new Command('config').description('back up and restore the configuration database');

  config
    .command('backup')
    .description('write a consistent copy of the configuration database into a repository')
    .option('--repo <name>', 'the repository to write into, one on the server\'s host (default: the first of those by name)')
    .addOption(new Option('--json', 'print the API reply as JSON'))
    .action(async (o: { repo?: string; json?: boolean }, cmd: Command) => {
      const reply = await (await clientFor(ctx, cmd)).post<{ path: string }>('/config/backup', o.repo ? { repository: o.repo } : {});
      if (o.json) return printJson(ctx.output, reply);
      ctx.output.out(`configuration backed up to ${reply.path}\n`);
    });

  config
    .command('restore')
    .description('replace the server\'s configuration with a configuration backup')
    .argument('<path>', 'the backup file (as `config backup` printed it)')
    .addOption(new Option('--json', 'print the API reply as JSON'))
    .action(async (path: string, o: { json?: boolean }, cmd: Command) => {
      const reply = await (await clientFor(ctx, cmd)).post<unknown>('/config/restore', { path });
      if (o.json) return printJson(ctx.output, reply ?? {});
      ctx.output.out(`configuration restored from ${path}\n`);
      if (reply && typeof reply === 'object') ctx.output.out(formatFields(Object.entries(reply)));
    });

  return config;
}
