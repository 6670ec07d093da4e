// Passwords of encrypted backups at the console (docs/encryption.md): `bulwark password
// list|add|remove` (the passwords the server keeps, sealed), a job's encryption from
// `job create|edit --encrypt --password-hint`, and the password of an encrypted point a restore
// needs when the server does not know it: `--password-file FILE`, else asked at the terminal.
// A password is never taken on the command line itself (where `ps` shows it).
import { readFile } from 'node:fs/promises';
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import { ApiError } from '../client.js';
import { at, clientFor, type CliContext, type ItemList } from '../context.js';
import { formatTable, localTime, printJson } from '../output.js';
import { askPassword } from '../prompt.js';

/** The password in FILE: its first line (a trailing newline is not part of it). */
export async function readPasswordFile(file: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (cause) {
    throw new BulwarkError(`--password-file: cannot read ${file}`, { kind: 'invalid', cause, context: { file } });
  }
  const password = text.split(/\r?\n/)[0] ?? '';
  if (password === '') throw new BulwarkError(`--password-file: ${file} holds no password on its first line`, { kind: 'invalid', context: { file } });
  return password;
}

/** A new password: from the file, or typed twice at the terminal. */
export async function newPassword(passwordFile: string | undefined, what: string): Promise<string> {
  if (passwordFile !== undefined) return readPasswordFile(passwordFile);
  const password = await askPassword(`Password for ${what}: `, '--password-file FILE');
  if ((await askPassword('Again: ', '--password-file FILE')) !== password) throw new BulwarkError('the two passwords differ', { kind: 'invalid' });
  return password;
}

/** The option every restore path takes. */
export const passwordFileOption = (): Option =>
  new Option('--password-file <file>', 'password of an encrypted point the server does not know the password of (first line of FILE); asked at the terminal when needed and not given');

/**
 * Runs a restore request with the password body it needs: `--password-file`'s, or none; when the
 * server answers that the point needs a password (field `password`) and none was given, asks at
 * the terminal (if there is one) and tries once more.
 */
export async function withPointPassword<T>(ctx: CliContext, passwordFile: string | undefined, run: (body: { password?: string }) => Promise<T>): Promise<T> {
  if (passwordFile !== undefined) return run({ password: await readPasswordFile(passwordFile) });
  try {
    return await run({});
  } catch (err) {
    if (!(err instanceof ApiError && err.field === 'password' && ctx.tty && process.stdin.isTTY)) throw err;
    ctx.output.err(`${err.message}\n`);
    return run({ password: await askPassword('Password: ', '--password-file FILE') });
  }
}

interface EncryptionKey {
  id: string;
  hint: string;
  job: string | null;
  active: boolean;
  createdAt: string;
  retiredAt: string | null;
  chains: number;
}

export interface JobEncryption {
  job: string;
  encrypted: boolean;
  hint: string | null;
  keyId: string | null;
  since: string | null;
}

/** `job create|edit --encrypt/--no-encrypt`: applies the job's encryption setting after the job itself. */
export async function applyJobEncryption(
  ctx: CliContext,
  cmd: Command,
  job: string,
  o: { encrypt?: boolean; passwordHint?: string; passwordFile?: string },
  password: string | undefined,
): Promise<JobEncryption | undefined> {
  const client = await clientFor(ctx, cmd);
  if (o.encrypt === true && password !== undefined) return client.post<JobEncryption>(at('/jobs', job, 'encryption'), { password, hint: o.passwordHint ?? '' });
  if (o.encrypt === false) return client.delete<JobEncryption>(at('/jobs', job, 'encryption'));
  return undefined;
}

/** Checks the encryption flags of `job create|edit` and asks for the password before anything changes. */
export async function jobPasswordFromOptions(cmd: Command, job: string, o: { encrypt?: boolean; passwordHint?: string; passwordFile?: string }): Promise<string | undefined> {
  if (o.encrypt !== true) {
    if (o.passwordHint !== undefined || o.passwordFile !== undefined) cmd.error('error: --password-hint and --password-file go with --encrypt', { exitCode: 2, code: 'bulwark.usage' });
    return undefined;
  }
  if (o.passwordHint === undefined) cmd.error('error: --encrypt needs --password-hint TEXT (shown when a wrong password is given; never the password)', { exitCode: 2, code: 'bulwark.usage' });
  const password = await newPassword(o.passwordFile, `the backups of job ${job}`);
  // Checked before the job is created or changed, so a refused password leaves nothing half done.
  if (password.length < 8) throw new BulwarkError('the encryption password needs at least 8 characters', { kind: 'invalid', context: { field: 'password' } });
  return password;
}

/** "on (hint: …)" / "off". */
export function encryptionText(e: JobEncryption | undefined): string {
  if (!e) return 'unknown';
  return e.encrypted ? `on (hint: ${e.hint ?? ''}; since ${localTime(e.since ?? '')}; from the next full: run \`bulwark job run ${e.job} --full\` after a change)` : 'off';
}

export function passwordCommand(ctx: CliContext): Command {
  const pw = new Command('password').description('encryption passwords the server keeps (sealed; never shown)');
  pw.command('list')
    .description('list the passwords: hint, job, the chains each opens')
    .addOption(new Option('--json', 'print them as JSON'))
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<EncryptionKey>>('/encryption-keys');
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'id', value: (k) => k.id },
          { header: 'hint', value: (k) => k.hint },
          { header: 'job', value: (k) => k.job ?? '-' },
          { header: 'active', value: (k) => k.active },
          { header: 'chains', value: (k) => k.chains, align: 'right' },
          { header: 'created', value: (k) => localTime(k.createdAt) },
          { header: 'retired', value: (k) => (k.retiredAt ? localTime(k.retiredAt) : '-') },
        ]),
      );
    });
  pw.command('add')
    .description('add a password the server tries on encrypted points it has none for (imported repositories, exports)')
    .requiredOption('--hint <text>', 'shown when a wrong password is given; never the password')
    .option('--password-file <file>', 'read the password from the first line of FILE (else asked twice)')
    .addOption(new Option('--json', 'print it as JSON'))
    .action(async (o: { hint: string; passwordFile?: string; json?: boolean }, cmd: Command) => {
      const password = await newPassword(o.passwordFile, 'the server to keep');
      const k = await (await clientFor(ctx, cmd)).post<EncryptionKey>('/encryption-keys', { password, hint: o.hint });
      if (o.json) return printJson(ctx.output, k);
      ctx.output.out(`password ${k.id} added (hint: ${k.hint})\n`);
    });
  pw.command('remove')
    .description('forget a password (refused while a job uses it, or while chains need it unless --force)')
    .argument('<id>')
    .option('--force', 'remove it although chains in the catalog need it (their restores will ask for it)')
    .action(async (id: string, o: { force?: boolean }, cmd: Command) => {
      await (await clientFor(ctx, cmd)).delete(`${at('/encryption-keys', id)}${o.force ? '?force=true' : ''}`);
      ctx.output.out(`password ${id} removed\n`);
    });
  return pw;
}
