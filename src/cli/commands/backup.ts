// `bulwark backup quick VM` (an incremental of one VM inside its job's chain, outside the
// schedule), `bulwark export VM --repo REPO` (a standalone full with its own metadata, outside
// every job's chain and retention, importable anywhere with `repo rescan`) and `bulwark exports
// [list]` / `bulwark exports delete ID` (a command of their own, so a VM named `list` or `delete`
// is exported like any other).
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import { at, clientFor, type CliContext, type ItemList } from '../context.js';
import { BarView, exitCodeOf, followSession, JsonView, PlainView, type SessionView } from '../follow.js';
import { formatFields, formatTable, localTime, printJson } from '../output.js';
import { askPassword, readStdin } from '../prompt.js';
import { readPasswordFile } from './encryption.js';
import type { ExportRecord } from '../../server/services/backup-methods.js';


function viewFor(ctx: CliContext, json: boolean): SessionView {
  if (json) return new JsonView(ctx.output, false);
  return ctx.tty ? new BarView(ctx.output) : new PlainView(ctx.output);
}

export function backupCommand(ctx: CliContext): Command {
  const backup = new Command('backup').description('backups outside a job\'s schedule');
  backup
    .command('quick')
    .description('back up one VM now: an incremental in the chain of its job (a session of that job with only this VM)')
    .argument('<vm>')
    .option('--job <name>', 'the job whose chain to continue (needed when the VM is in several jobs)')
    .option('--wait', 'follow the session until it ends (exit 0 on success or warning, 1 otherwise)')
    .addOption(new Option('--json', 'print the reply (or with --wait the final session) as JSON'))
    .action(async (vm: string, o: { job?: string; wait?: boolean; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const { sessionId, job } = await client.post<{ sessionId: string; job: string }>('/backup/quick', { vm, ...(o.job ? { job: o.job } : {}) });
      if (!o.wait) {
        if (o.json) printJson(ctx.output, { sessionId, job });
        else ctx.output.out(`quick backup of ${vm} started in job ${job}: session ${sessionId}\n  follow it with: bulwark session show ${sessionId} --follow\n`);
        return;
      }
      if (!o.json) ctx.output.out(`quick backup of ${vm} started in job ${job}: session ${sessionId}\n`);
      const s = await followSession(client, sessionId, { view: viewFor(ctx, o.json ?? false), reconnectLimitMs: ctx.reconnectLimitMs });
      ctx.exitCode = exitCodeOf(s.state);
    });
  return backup;
}

export function exportCommand(ctx: CliContext): Command {
  const exp = new Command('export')
    .description('write a standalone full backup of a VM (own metadata, outside every job\'s chain and retention); `bulwark exports` lists them')
    .argument('<vm>', 'the VM to export (any name: exports are listed and deleted with `bulwark exports`)')
    .option('--repo <name>', 'the repository to write it into')
    .option('--encrypt', 'encrypt it with a password (asked, or --password-stdin)')
    .option('--password-stdin', 'with --encrypt: read the password from standard input')
    .option('--password-file <file>', 'with --encrypt: read the password from the first line of FILE')
    .option('--password-hint <text>', 'with --encrypt: shown when a wrong password is given at restore (never the password)')
    .option('--delete-after <time>', 'the server deletes the export after this long: 30d, 12h, 2w')
    .addOption(new Option('--compress <codec>', 'compression').choices(['zstd', 'lz4', 'none']))
    .addOption(new Option('--json', 'print the export as JSON'))
    .action(async (vm: string, o: { repo?: string; encrypt?: boolean; passwordStdin?: boolean; passwordFile?: string; passwordHint?: string; deleteAfter?: string; compress?: string; json?: boolean }, cmd: Command) => {
      if (!o.repo) {
        const hint = vm === 'list' ? ' (to list exports: bulwark exports)' : vm === 'delete' ? ' (to delete an export: bulwark exports delete ID)' : '';
        cmd.error(`error: required option '--repo <name>' not specified${hint}`, { exitCode: 2, code: 'bulwark.usage' });
      }
      const client = await clientFor(ctx, cmd);
      let password: string | undefined;
      if (o.encrypt) {
        if (o.passwordFile !== undefined) password = await readPasswordFile(o.passwordFile);
        else {
          password = o.passwordStdin ? await readStdin() : await askPassword('Password for the export: ', '--password-stdin');
          if (!o.passwordStdin && (await askPassword('Again: ', '--password-stdin')) !== password) throw new BulwarkError('the two passwords differ', { kind: 'invalid' });
        }
        if (password === '') throw new BulwarkError('--encrypt: the password is empty', { kind: 'invalid' });
      } else {
        // A password option without --encrypt would otherwise write an unencrypted export silently.
        const stray = [o.passwordStdin && '--password-stdin', o.passwordFile !== undefined && '--password-file', o.passwordHint !== undefined && '--password-hint'].filter(Boolean);
        if (stray.length > 0) cmd.error(`error: ${stray.join(', ')} goes with --encrypt (without it the export is not encrypted)`, { exitCode: 2, code: 'bulwark.usage' });
      }
      if (!o.json) ctx.output.err(`exporting ${vm} into repository ${o.repo} …\n`);
      const e = await client.post<ExportRecord>('/exports', {
        vm,
        repository: o.repo,
        ...(password !== undefined ? { password } : {}),
        ...(password !== undefined && o.passwordHint !== undefined ? { passwordHint: o.passwordHint } : {}),
        ...(o.deleteAfter !== undefined ? { deleteAfter: o.deleteAfter } : {}),
        ...(o.compress !== undefined ? { compression: o.compress } : {}),
      });
      if (o.json) return printJson(ctx.output, e);
      ctx.output.out(
        formatFields([
          ['export', e.folder],
          ['vm', e.vm],
          ['repository', e.repository],
          ['restore point', e.pointId],
          ['encrypted', e.encrypted],
          ['deleted', e.expiresAt ? localTime(e.expiresAt) : `never (delete it with: bulwark exports delete ${e.folder})`],
        ]),
      );
    });
  return exp;
}

/** `bulwark exports [list]` and `bulwark exports delete ID|FOLDER`. */
export function exportsCommand(ctx: CliContext): Command {
  const exps = new Command('exports').description('standalone full backups written by `bulwark export` (list, delete)');
  const list = async (o: { json?: boolean }, cmd: Command) => {
    const { items } = await (await clientFor(ctx, cmd)).get<ItemList<ExportRecord>>('/exports');
    if (o.json) return printJson(ctx.output, items);
    ctx.output.out(
      formatTable(items, [
        { header: 'vm', value: (e) => e.vm },
        { header: 'created', value: (e) => localTime(e.createdAt) },
        { header: 'expires', value: (e) => (e.expiresAt ? localTime(e.expiresAt) : 'never') },
        { header: 'repository', value: (e) => e.repository },
        { header: 'folder', value: (e) => e.folder },
        { header: 'point', value: (e) => e.pointId },
        { header: 'encrypted', value: (e) => e.encrypted },
      ]),
    );
  };
  exps
    .command('list', { isDefault: true })
    .description('exports and their expiry')
    .addOption(new Option('--json', 'print them as JSON'))
    .action(async (o: { json?: boolean }, cmd: Command) => list(o, cmd));
  exps
    .command('delete')
    .description('delete an export now (by id or folder name)')
    .argument('<export>')
    .action(async (id: string, _o: unknown, cmd: Command) => {
      await (await clientFor(ctx, cmd)).delete(at('/exports', id));
      ctx.output.out(`export ${id} deleted\n`);
    });
  return exps;
}
