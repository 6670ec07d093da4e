// `bulwark server` and `bulwark agent [run]`: the roles of the one program. Both run in the
// foreground until SIGINT or SIGTERM, then close cleanly (a second signal exits at once).
// Their modules load only when the role starts, so the console's own commands start fast.
import { Command, Option } from 'commander';
import { globals, type CliContext } from '../context.js';
import { dataDirectory } from '../paths.js';
import { addAgentAdminCommands } from './infrastructure.js';

/** Something running that stops with close(). */
interface Running {
  close(): Promise<void>;
}

/** Runs until the first SIGINT/SIGTERM, then awaits close(); a second signal exits at once. */
export async function runUntilSignal(ctx: CliContext, what: string, running: Running): Promise<void> {
  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    process.once('SIGINT', () => resolve('SIGINT'));
    process.once('SIGTERM', () => resolve('SIGTERM'));
  });
  const again = (): void => {
    ctx.output.err(`${what}: second signal, exiting without a clean close\n`);
    process.exit(1);
  };
  process.once('SIGINT', again);
  process.once('SIGTERM', again);
  ctx.output.err(`${what}: ${signal}: closing\n`);
  await running.close();
}

export function serverCommand(ctx: CliContext): Command {
  return new Command('server')
    .description('run the backup server (with its local agent and default repository) in the foreground')
    .addOption(new Option('--listen <addr>', 'TCP address for the API (TLS)').default('127.0.0.1:9392'))
    .option('--db <url>', 'configuration database: postgres://… (default: SQLite in the data directory)')
    .action(async (o: { listen: string; db?: string }, cmd: Command) => {
      const dataDir = dataDirectory(globals(cmd).data, ctx.env);
      // Loaded on use: the server's modules (Fastify, the database) are not a console's business.
      const { startServer } = await import('../../server/main.js');
      const running = await startServer({ dataDir, listen: o.listen, db: o.db });
      await runUntilSignal(ctx, 'server', running);
    });
}

export function agentCommand(ctx: CliContext): Command {
  const agent = new Command('agent').description('data movers: run one here (`agent --server URL --enroll TOKEN`), or manage them');
  agent
    .command('run', { isDefault: true })
    .description('run an agent here in the foreground; the first start enrolls it with a one-time token')
    .option('--enroll <token>', 'one-time enrollment token from `bulwark agent token` (first start only; needs --server URL)')
    .option('--name <name>', 'name to enroll under (default: this host\'s name)')
    .option('--data-listen <addr>', 'HOST:PORT of the data-mover listener for backups this agent receives (default: 0.0.0.0, any free port)')
    .option('--data-advertise <host>', 'address source agents use to reach the data-mover listener (default: the address the server sees)')
    .action(async (o: { enroll?: string; name?: string; dataListen?: string; dataAdvertise?: string }, cmd: Command) => {
      const g = globals(cmd);
      if (o.enroll && !g.server) cmd.error('error: --enroll needs --server <url> (the server to enroll with)', { exitCode: 2, code: 'bulwark.usage' });
      const dataDir = dataDirectory(g.data, ctx.env);
      const { runAgent } = await import('../../agent/main.js');
      const running = await runAgent({ server: g.server, dataDir, enrollToken: o.enroll, name: o.name, dataListen: o.dataListen, dataAdvertise: o.dataAdvertise });
      ctx.output.err(`agent ${running.name} running (data ${dataDir}); Ctrl-C stops it\n`);
      await runUntilSignal(ctx, 'agent', running);
    });
  addAgentAdminCommands(agent, ctx);
  return agent;
}
