// `bulwark server` and `bulwark agent [run]`: the roles of the one program. Both run in the
// foreground until SIGINT or SIGTERM, then close cleanly (a second signal exits at once).
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import { globals, type CliContext } from '../context.js';
import { dataDirectory } from '../paths.js';
import { addAgentAdminCommands } from './infrastructure.js';

/** Something running that stops with close(). */
interface Running {
  close(): Promise<void>;
}

/**
 * Loads a role's module by a computed specifier: the role modules are written by other
 * engineers and land at their own pace; a build without one says so instead of failing to load.
 */
async function loadRole<T>(relative: string, exported: string): Promise<T> {
  const specifier = new URL(relative, import.meta.url).href;
  let mod: Record<string, unknown>;
  try {
    mod = (await import(specifier)) as Record<string, unknown>;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ERR_MODULE_NOT_FOUND' && String((err as Error).message).includes(relative.replace(/^(\.\.\/)+/, ''))) {
      throw new BulwarkError(`this build has no ${relative.replace(/^(\.\.\/)+/, 'src/')} yet`, { kind: 'unavailable', cause: err });
    }
    throw err;
  }
  const fn = mod[exported];
  if (typeof fn !== 'function') throw new BulwarkError(`${relative} does not export ${exported}`, { kind: 'internal' });
  return fn as T;
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

type StartServer = (options: { dataDir: string; listen?: string; db?: string }) => Promise<Running>;
type RunAgent = (options: { server: string; enrollToken?: string; dataDir: string }) => Promise<Running>;

export function serverCommand(ctx: CliContext): Command {
  return new Command('server')
    .description('run the backup server (with its local agent and default repository) in the foreground')
    .addOption(new Option('--listen <addr>', 'TCP address for the API (TLS)').default('127.0.0.1:9392'))
    .option('--db <url>', 'configuration database: postgres://… (default: SQLite in the data directory)')
    .action(async (o: { listen: string; db?: string }, cmd: Command) => {
      const dataDir = dataDirectory(globals(cmd).data, ctx.env);
      const startServer = await loadRole<StartServer>('../../server/main.js', 'startServer');
      const running = await startServer({ dataDir, listen: o.listen, ...(o.db ? { db: o.db } : {}) });
      await runUntilSignal(ctx, 'server', running);
    });
}

export function agentCommand(ctx: CliContext): Command {
  const agent = new Command('agent').description('data movers: run one here (`agent --server URL --enroll TOKEN`), or manage them');
  agent
    .command('run', { isDefault: true })
    .description('run an agent here in the foreground; the first start enrolls it with a one-time token')
    .option('--enroll <token>', 'one-time enrollment token from `bulwark agent token` (first start only)')
    .action(async (o: { enroll?: string }, cmd: Command) => {
      const g = globals(cmd);
      if (!g.server) cmd.error('error: required option \'--server <url>\' not specified', { exitCode: 2, code: 'bulwark.usage' });
      const dataDir = dataDirectory(g.data, ctx.env);
      const runAgent = await loadRole<RunAgent>('../../agent/main.js', 'runAgent');
      const running = await runAgent({ server: g.server, dataDir, ...(o.enroll ? { enrollToken: o.enroll } : {}) });
      await runUntilSignal(ctx, 'agent', running);
    });
  addAgentAdminCommands(agent, ctx);
  return agent;
}
