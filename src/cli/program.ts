// The command tree of the console (ARCHITECTURE.md, "The console") and how a run ends: exit 0 on
// success, 1 on failure, 2 on a usage error; errors print the server's message and hint, never a
// stack trace unless BULWARK_DEBUG=1.
import { readFileSync } from 'node:fs';
import { Command, CommanderError, Option } from 'commander';
import { BulwarkError, describeError } from '../common/errors.js';
import { ApiError } from './client.js';
import { loginCommands, userCommand } from './commands/auth.js';
import { backupCommand, exportCommand, exportsCommand } from './commands/backup.js';
import { configCommand } from './commands/config.js';
import { indexCommand, mountCommand, searchCommand } from './commands/files.js';
import { hostCommand, repoCommand } from './commands/infrastructure.js';
import { vmCommand } from './commands/vms.js';
import { jobCommand, restorePointCommand, sessionCommand } from './commands/jobs.js';
import { restoreCommand } from './commands/restore.js';
import { passwordCommand } from './commands/encryption.js';
import { settingsCommand } from './commands/settings.js';
import { throttlingCommand } from './commands/throttling.js';
import { instantRecoveryCommand } from './commands/recovery.js';
import { agentCommand, serverCommand } from './commands/roles.js';
import type { CliContext } from './context.js';

/** The program's version: package.json's, two levels up from src/cli/ and from dist/cli/. */
export const version = ((): string => {
  try {
    return (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string }).version ?? '0.0.0';
  } catch {
    return '0.0.0';
  }
})();

export function buildProgram(ctx: CliContext): Command {
  const program = new Command('bulwark')
    .description('Image-level backup and recovery for KVM/QEMU virtual machines')
    .version(version, '-V, --version')
    .addOption(new Option('--server <url>', 'the server: https://HOST:PORT or unix:PATH (default: $BULWARK_SERVER, the data directory\'s socket, then `bulwark login`)'))
    .addOption(new Option('--data <dir>', 'data directory (default: $BULWARK_DATA, /var/lib/bulwark as root, else ~/.local/share/bulwark)'))
    .configureOutput({
      writeOut: (s) => ctx.output.out(s),
      writeErr: (s) => ctx.output.err(s),
    })
    .configureHelp({ showGlobalOptions: true, sortSubcommands: false })
    .showSuggestionAfterError(true)
    .exitOverride();

  const subcommands = [
    serverCommand(ctx),
    agentCommand(ctx),
    ...loginCommands(ctx),
    hostCommand(ctx),
    vmCommand(ctx),
    repoCommand(ctx),
    jobCommand(ctx),
    sessionCommand(ctx),
    restorePointCommand(ctx),
    restoreCommand(ctx),
    backupCommand(ctx),
    exportCommand(ctx),
    exportsCommand(ctx),
    mountCommand(ctx),
    searchCommand(ctx),
    indexCommand(ctx),
    instantRecoveryCommand(ctx),
    configCommand(ctx),
    settingsCommand(ctx),
    throttlingCommand(ctx),
    userCommand(ctx),
    passwordCommand(ctx),
  ];
  for (const sub of subcommands) program.addCommand(sub);
  // addCommand does not copy settings made before: exit codes, output and help go everywhere.
  const configure = (cmd: Command): void => {
    cmd.exitOverride().copyInheritedSettings(program);
    cmd.commands.forEach(configure);
  };
  subcommands.forEach(configure);
  return program;
}

/** Runs the console with `argv` (without node and script) and returns the exit code. */
export async function runConsole(ctx: CliContext, argv: readonly string[]): Promise<number> {
  const program = buildProgram(ctx);
  ctx.exitCode = 0;
  try {
    await program.parseAsync([...argv], { from: 'user' });
    return ctx.exitCode;
  } catch (err) {
    return reportError(ctx, err);
  }
}

/** Prints an error the way a user needs it and returns its exit code. */
export function reportError(ctx: CliContext, err: unknown): number {
  if (err instanceof CommanderError) {
    // Commander has printed the usage message already.
    switch (err.code) {
      case 'commander.helpDisplayed':
      case 'commander.version':
        return 0;
      case 'commander.help': // `help` asked for (0) or shown for a missing subcommand (usage error)
        return err.exitCode === 0 ? 0 : 2;
      default:
        return 2;
    }
  }
  const debug = ctx.env.BULWARK_DEBUG === '1';
  if (err instanceof BulwarkError) {
    const field = err instanceof ApiError && err.field && !err.message.includes(err.field) ? ` (field ${err.field})` : '';
    ctx.output.err(`bulwark: ${err.message}${field}\n`);
    if (err.hint) ctx.output.err(`  hint: ${err.hint}\n`);
    if (debug) ctx.output.err(`${describeCause(err)}${err.stack ?? ''}\n`);
    else if (err.cause !== undefined && !(err instanceof ApiError && err.status > 0)) {
      const cause = describeError(err.cause);
      if (!err.message.includes(cause)) ctx.output.err(`  cause: ${cause}\n`);
    }
    return err.kind === 'invalid' ? 2 : 1;
  }
  ctx.output.err(`bulwark: ${describeError(err)}\n`);
  if (debug && err instanceof Error) ctx.output.err(`${err.stack ?? ''}\n`);
  else ctx.output.err('  (run with BULWARK_DEBUG=1 for details)\n');
  return 1;
}

function describeCause(err: Error): string {
  return err.cause === undefined ? '' : `cause: ${describeError(err.cause)}\n`;
}
