// `bulwark login URL`, `logout`, `whoami` and `bulwark user …`. Login trusts the server's CA on
// first use: it shows the CA's SHA-256 fingerprint (which `bulwark server` prints at start) and
// saves the CA with the session token, so every later connection verifies against that CA.
import { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import type { Role, User } from '../../server/services/model.js';
import { ApiClient, fetchPeerCa, normaliseFingerprint, normaliseOrigin, type PeerCa } from '../client.js';
import { at, clientFor, nothingToDo, oneOf, positiveInt, type CliContext, type ItemList } from '../context.js';
import { forgetLogin, loadLogin, saveLogin } from '../credentials.js';
import { formatTable, localTime, printJson } from '../output.js';
import { configDirectory, credentialsPath } from '../paths.js';
import { askLine, askPassword, askYesNo, readStdin } from '../prompt.js';
import { editWithVersion } from './edit.js';

const roles: readonly Role[] = ['administrator', 'operator', 'restore-operator', 'viewer'];

interface LoginReply {
  token: string;
  expiresAt: string;
  user: string;
  role: Role;
}

/** `--ca-file`: the server's CA certificate, copied by hand. */
async function caOfFile(path: string): Promise<PeerCa> {
  let ca: X509Certificate;
  try {
    ca = new X509Certificate(await readFile(path));
  } catch (err) {
    throw new BulwarkError(`--ca-file: cannot read a certificate from ${path}`, { kind: 'invalid', cause: err });
  }
  if (!ca.ca) throw new BulwarkError(`--ca-file: ${path} is not a CA certificate`, { kind: 'invalid', hint: 'use the server\'s <data>/pki/ca.crt' });
  return { caPem: ca.toString(), caFingerprint: ca.fingerprint256, subject: ca.subject.replace(/\n/g, ', ') };
}

async function passwordFrom(o: { passwordStdin?: boolean }, question: string, confirm = false): Promise<string> {
  if (o.passwordStdin) {
    const p = await readStdin();
    if (p === '') throw new BulwarkError('--password-stdin: standard input was empty', { kind: 'invalid' });
    return p;
  }
  const p = await askPassword(question, '--password-stdin');
  if (confirm && (await askPassword('Again: ', '--password-stdin')) !== p) {
    throw new BulwarkError('the two passwords differ', { kind: 'invalid' });
  }
  return p;
}

export function loginCommands(ctx: CliContext): Command[] {
  const login = new Command('login')
    .description('log in to a remote server over TCP+TLS and save the session for later commands')
    .argument('<url>', 'the server, e.g. https://backup.example:9392')
    .option('--user <name>', 'user name (asked when not given)')
    .option('--password-stdin', 'read the password from standard input (for scripts)')
    .option('--ca-fingerprint <sha256>', 'trust the server\'s CA only if its SHA-256 fingerprint is this')
    .option('--ca-file <pem>', 'trust this CA certificate (a copy of the server\'s <data>/pki/ca.crt) instead of asking')
    .option('--insecure-trust', 'trust whatever CA the server shows (scripts on a trusted network only)')
    .addOption(new Option('--json', 'print the login reply (without the token) as JSON'))
    .action(
      async (url: string, o: { user?: string; passwordStdin?: boolean; caFingerprint?: string; caFile?: string; insecureTrust?: boolean; json?: boolean }) => {
        const origin = normaliseOrigin(url);
        const credentials = credentialsPath(configDirectory(ctx.env));
        const peer = o.caFile ? await caOfFile(o.caFile) : await fetchPeerCa(origin);
        const saved = await loadLogin(credentials).catch(() => undefined);
        if (o.caFingerprint !== undefined) {
          if (normaliseFingerprint(o.caFingerprint) !== peer.caFingerprint) {
            throw new BulwarkError(`the CA of ${origin} has fingerprint ${peer.caFingerprint}, not the ${o.caFingerprint} you gave: not logging in`, {
              kind: 'forbidden',
              hint: 'someone may be intercepting the connection, or you have the wrong server; compare with the fingerprint the server printed at start',
            });
          }
        } else if (o.caFile || (saved?.url === origin && saved.caFingerprint === peer.caFingerprint)) {
          // Given as a file, or trusted at an earlier login; the TLS handshake below verifies it.
        } else if (o.insecureTrust) {
          ctx.output.err(`trusting the CA of ${origin} without checking: ${peer.caFingerprint}\n`);
        } else {
          if (saved?.url === origin) {
            ctx.output.err(`WARNING: the CA of ${origin} CHANGED since your last login (was ${saved.caFingerprint}).\n`);
          }
          ctx.output.err(
            `The server ${origin} presents the CA\n  ${peer.subject}\n  SHA-256 fingerprint ${peer.caFingerprint}\n` +
              'Compare it with the fingerprint the server printed at its first start\n' +
              '(or: openssl x509 -noout -fingerprint -sha256 -in <data>/pki/ca.crt on the server).\n',
          );
          if (!(await askYesNo('Trust this CA?', '--ca-fingerprint SHA256 (or --insecure-trust)'))) {
            throw new BulwarkError('not logged in: the CA was not trusted', { kind: 'forbidden' });
          }
        }
        const user = o.user ?? (await askLine('User: ', '--user')).trim();
        const password = await passwordFrom(o, `Password for ${user}: `);
        const client = new ApiClient({ kind: 'tcp', origin, caPem: peer.caPem, source: 'bulwark login' });
        const reply = await client.post<LoginReply>('/auth/login', { user, password });
        await saveLogin(credentials, {
          url: origin,
          caPem: peer.caPem,
          caFingerprint: peer.caFingerprint,
          token: reply.token,
          expiresAt: reply.expiresAt,
          user: reply.user,
          role: reply.role,
        });
        if (o.json) printJson(ctx.output, { url: origin, user: reply.user, role: reply.role, expiresAt: reply.expiresAt, caFingerprint: peer.caFingerprint });
        else ctx.output.out(`logged in to ${origin} as ${reply.user} (${reply.role}); the session lasts until ${localTime(reply.expiresAt)}\n`);
      },
    );

  const logout = new Command('logout')
    .description('end the saved remote session and forget it')
    .action(async () => {
      const path = credentialsPath(configDirectory(ctx.env));
      const saved = await loadLogin(path).catch(() => undefined);
      if (saved) {
        const client = new ApiClient({ kind: 'tcp', origin: saved.url, caPem: saved.caPem, token: saved.token, source: 'bulwark login' });
        await client.post('/auth/logout', {}).catch((err: unknown) => {
          ctx.output.err(`note: the server did not confirm the logout (${(err as Error).message}); the saved session is removed anyway\n`);
        });
      }
      const had = await forgetLogin(path);
      ctx.output.out(had ? `logged out of ${saved?.url ?? 'the saved server'}\n` : 'not logged in\n');
    });

  const whoami = new Command('whoami')
    .description('show who the server takes you for')
    .addOption(new Option('--json', 'print the API object as JSON'))
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const me = await client.get<{ user: string; role: string; expiresAt?: string }>('/auth/whoami');
      if (o.json) return printJson(ctx.output, me);
      ctx.output.out(`${me.user} (${me.role}) on ${client.target}${me.expiresAt ? `, session until ${localTime(me.expiresAt)}` : ''}\n`);
    });

  return [login, logout, whoami];
}

export function userCommand(ctx: CliContext): Command {
  const user = new Command('user').description('users of the server and their roles');
  const roleOption = (): Option => new Option('--role <role>', `one of ${roles.join(', ')}`).argParser(oneOf('--role', roles));

  user
    .command('add')
    .description('add a user (the password is asked twice, or read with --password-stdin)')
    .argument('<name>')
    .addOption(roleOption().makeOptionMandatory())
    .option('--password-stdin', 'read the password from standard input')
    .addOption(new Option('--json', 'print the API object as JSON'))
    .action(async (name: string, o: { role: Role; passwordStdin?: boolean; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const password = await passwordFrom(o, `Password for ${name}: `, true);
      const u = await client.post<User>('/users', { name, role: o.role, password });
      if (o.json) printJson(ctx.output, u);
      else ctx.output.out(`user ${u.name} added (${u.role})\n`);
    });

  user
    .command('list')
    .description('list users')
    .addOption(new Option('--json', 'print the API objects as JSON'))
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<User>>('/users');
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'name', value: (u) => u.name },
          { header: 'role', value: (u) => u.role },
          { header: 'created', value: (u) => localTime(u.createdAt) },
          { header: 'updated', value: (u) => localTime(u.updatedAt) },
        ]),
      );
    });

  user
    .command('remove')
    .alias('delete')
    .description('remove a user')
    .argument('<name>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await (await clientFor(ctx, cmd)).delete(at('/users', name));
      ctx.output.out(`user ${name} removed\n`);
    });

  user
    .command('passwd')
    .description('set a user\'s password')
    .argument('<name>')
    .option('--password-stdin', 'read the password from standard input')
    .action(async (name: string, o: { passwordStdin?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const current = await client.get<User>(at('/users', name));
      const password = await passwordFrom(o, `New password for ${name}: `, true);
      await client.patch<User>(at('/users', name), { version: current.version, password });
      ctx.output.out(`password of ${name} changed\n`);
    });

  user
    .command('edit')
    .description('change a user\'s role and/or password')
    .argument('<name>')
    .addOption(roleOption())
    .option('--password', 'ask for a new password (twice)')
    .option('--password-stdin', 'read the new password from standard input')
    .option('--expect-version <n>', 'refuse the edit unless the user still has this version', positiveInt('--expect-version'))
    .addOption(new Option('--json', 'print the API object as JSON'))
    .action(async (name: string, o: { role?: Role; password?: boolean; passwordStdin?: boolean; expectVersion?: number; json?: boolean }, cmd: Command) => {
      if (!o.role && !o.password && !o.passwordStdin) throw nothingToDo(`user edit ${name}`, '--role, --password, --password-stdin');
      const client = await clientFor(ctx, cmd);
      const patch: Record<string, unknown> = {};
      if (o.role) patch.role = o.role;
      if (o.password || o.passwordStdin) patch.password = await passwordFrom(o, `New password for ${name}: `, true);
      const u = await editWithVersion<User>(client, at('/users', name), patch, o.expectVersion);
      if (o.json) printJson(ctx.output, u);
      else ctx.output.out(`user ${u.name} changed (${u.role})\n`);
    });

  user
    .command('role')
    .description('change a user\'s role')
    .argument('<name>')
    .argument('<role>', `one of ${roles.join(', ')}`, oneOf('role', roles))
    .addOption(new Option('--json', 'print the API object as JSON'))
    .action(async (name: string, role: Role, o: { json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const current = await client.get<User>(at('/users', name));
      const u = await client.patch<User>(at('/users', name), { version: current.version, role });
      if (o.json) printJson(ctx.output, u);
      else ctx.output.out(`user ${u.name} is now ${u.role}\n`);
    });

  return user;
}
