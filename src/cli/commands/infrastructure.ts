// `bulwark host …`, `bulwark agent token|list|show|remove`, `bulwark repo …`: the
// infrastructure that jobs run on.
import { existsSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import type { Agent, Host, Repository } from '../../server/services/model.js';
import {
  at,
  clientFor,
  nothingToDo,
  positiveInt,
  positiveNumber,
  type CliContext,
  type ItemList,
} from '../context.js';
import { formatFields, formatTable, humanSize, localTime, printJson } from '../output.js';
import { editWithVersion } from './edit.js';
import { addAgentEditCommand, rateMBps, taskLimit } from './settings.js';

const jsonOption = (): Option => new Option('--json', 'print the API object(s) as JSON');

// ---- hosts

export function hostCommand(ctx: CliContext): Command {
  const host = new Command('host').description('managed hypervisor hosts (libvirt or QEMU QMP sockets)');

  host
    .command('add')
    .description('add a host reached through libvirt or through QEMU QMP sockets')
    .argument('<name>', 'name of the host')
    .addOption(new Option('--libvirt <uri>', 'libvirt connection URI, e.g. qemu:///system').conflicts('qemu'))
    .addOption(new Option('--qemu <glob>', 'glob of QMP sockets, e.g. "/run/vms/*.qmp"'))
    .option('--agent <name>', 'the agent that reaches this host (default: the local agent)')
    .addOption(jsonOption())
    .action(async (name: string, o: { libvirt?: string; qemu?: string; agent?: string; json?: boolean }, cmd: Command) => {
      if (!o.libvirt && !o.qemu) cmd.error('error: host add needs --libvirt URI or --qemu GLOB', { exitCode: 2, code: 'bulwark.usage' });
      const client = await clientFor(ctx, cmd);
      const created = await client.post<Host>('/hosts', {
        name,
        kind: o.libvirt ? 'libvirt' : 'qemu',
        uri: o.libvirt ?? o.qemu,
        ...(o.agent ? { agent: o.agent } : {}),
      });
      if (o.json) printJson(ctx.output, created);
      else ctx.output.out(`host ${created.name} added (${created.kind} ${created.uri})\n`);
    });

  host
    .command('list')
    .description('list hosts')
    .addOption(jsonOption())
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<Host>>('/hosts');
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'name', value: (h) => h.name },
          { header: 'kind', value: (h) => h.kind },
          { header: 'uri', value: (h) => h.uri },
          { header: 'agent', value: (h) => h.agent },
        ]),
      );
    });

  host
    .command('show')
    .description('show one host')
    .argument('<name>')
    .addOption(jsonOption())
    .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
      const h = await (await clientFor(ctx, cmd)).get<Host>(at('/hosts', name));
      if (o.json) return printJson(ctx.output, h);
      ctx.output.out(
        formatFields([
          ['name', h.name],
          ['id', h.id],
          ['kind', h.kind],
          ['uri', h.uri],
          ['agent', h.agent],
          ['version', h.version],
          ['created', localTime(h.createdAt)],
          ['updated', localTime(h.updatedAt)],
        ]),
      );
    });

  host
    .command('edit')
    .description('change a host')
    .argument('<name>')
    .addOption(new Option('--libvirt <uri>', 'libvirt connection URI').conflicts('qemu'))
    .option('--qemu <glob>', 'glob of QMP sockets')
    .option('--agent <name>', 'the agent that reaches this host')
    .option('--expect-version <n>', 'refuse the edit unless the host still has this version', positiveInt('--expect-version'))
    .addOption(jsonOption())
    .action(async (name: string, o: { libvirt?: string; qemu?: string; agent?: string; expectVersion?: number; json?: boolean }, cmd: Command) => {
      const patch: Record<string, unknown> = {};
      if (o.libvirt) Object.assign(patch, { kind: 'libvirt', uri: o.libvirt });
      if (o.qemu) Object.assign(patch, { kind: 'qemu', uri: o.qemu });
      if (o.agent !== undefined) patch.agent = o.agent;
      if (Object.keys(patch).length === 0) throw nothingToDo(`host edit ${name}`, '--libvirt, --qemu, --agent');
      const h = await editWithVersion<Host>(await clientFor(ctx, cmd), at('/hosts', name), patch, o.expectVersion);
      if (o.json) printJson(ctx.output, h);
      else ctx.output.out(`host ${h.name} changed (version ${h.version})\n`);
    });

  host
    .command('remove')
    .alias('delete')
    .description('remove a host')
    .argument('<name>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await (await clientFor(ctx, cmd)).delete(at('/hosts', name));
      ctx.output.out(`host ${name} removed\n`);
    });

  return host;
}

// ---- agents (the `agent` noun also runs the agent role: see roles.ts)

export function addAgentAdminCommands(agent: Command, ctx: CliContext): void {
  agent
    .command('token')
    .description('create a one-time enrollment token for a new agent')
    .option('--name <name>', 'the only name the agent may enroll under')
    .option('--ttl <seconds>', 'how long the token stays valid (default: the server\'s)', positiveInt('--ttl'))
    .addOption(jsonOption())
    .action(async (o: { name?: string; ttl?: number; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const body = { ...(o.name ? { name: o.name } : {}), ...(o.ttl ? { ttlSeconds: o.ttl } : {}) };
      const reply = await client.post<{ token: string; expiresAt?: string; name?: string }>('/agents/tokens', body);
      if (o.json) return printJson(ctx.output, reply);
      const server = client.address.kind === 'tcp' ? client.address.origin : 'https://THIS-SERVER:9392';
      ctx.output.out(
        `${reply.token}\n` +
          `one-time token${reply.expiresAt ? `, valid until ${localTime(reply.expiresAt)}` : ''}; on the new agent's host run:\n` +
          `  bulwark agent --server ${server} --enroll ${reply.token}${reply.name ? ` --name ${reply.name}` : ''}\n`,
      );
    });

  agent
    .command('list')
    .description('list agents with their health')
    .addOption(jsonOption())
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<Agent>>('/agents');
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'name', value: (a) => a.name },
          { header: 'state', value: (a) => a.state },
          { header: 'hostname', value: (a) => a.hostname },
          { header: 'version', value: (a) => a.agentVersion },
          { header: 'cores', value: (a) => a.cores, align: 'right' },
          { header: 'max tasks', value: (a) => a.maxTasks, align: 'right' },
          { header: 'last seen', value: (a) => localTime(a.lastSeenAt) },
          // Free space of the agent's repositories, from its last heartbeat.
          { header: 'repository free', value: (a) => a.repositories.map((r) => `${r.path} ${r.freeBytes === undefined ? (r.error ?? '?') : humanSize(r.freeBytes)}`).join(', ') },
        ]),
      );
    });

  agent
    .command('show')
    .description('show one agent')
    .argument('<name>')
    .addOption(jsonOption())
    .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
      const a = await (await clientFor(ctx, cmd)).get<Agent>(at('/agents', name));
      if (o.json) return printJson(ctx.output, a);
      ctx.output.out(
        formatFields([
          ['name', a.name],
          ['id', a.id],
          ['state', a.state],
          ['hostname', a.hostname],
          ['version', a.agentVersion],
          ['cores', a.cores],
          ['max tasks', `${a.maxTasks}${a.maxTasksSetting === null ? ' (its CPU cores)' : ''}`],
          ['last seen', localTime(a.lastSeenAt)],
          ['certificate', a.certFingerprint],
          ['created', localTime(a.createdAt)],
        ]),
      );
    });

  addAgentEditCommand(agent, ctx);

  agent
    .command('remove')
    .alias('delete')
    .description('remove an agent (its certificate is no longer accepted)')
    .argument('<name>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await (await clientFor(ctx, cmd)).delete(at('/agents', name));
      ctx.output.out(`agent ${name} removed\n`);
    });
}

// ---- repositories

interface RescanReply {
  repository: string;
  points: number;
  added: number;
  removed: number;
  unreadable?: Array<{ file: string; problem: string }>;
  elsewhere?: Array<{ id: string; vm: string; repository: string }>;
}

interface RepoOptions {
  path?: string;
  agent?: string;
  maxTasks?: number | null;
  rate?: number;
  rateLimit?: number | null;
  readRate?: number;
  writeRate?: number;
  expectVersion?: number;
  json?: boolean;
}

function repoFields(o: RepoOptions): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  if (o.path !== undefined) body.path = o.agent ? o.path : resolve(o.path);
  if (o.agent !== undefined) body.agent = o.agent;
  if (o.maxTasks !== undefined) body.maxTasks = o.maxTasks;
  if (o.rate !== undefined) Object.assign(body, { readRateMBps: o.rate, writeRateMBps: o.rate });
  if (o.rateLimit !== undefined) Object.assign(body, { readRateMBps: o.rateLimit, writeRateMBps: o.rateLimit });
  if (o.readRate !== undefined) body.readRateMBps = o.readRate;
  if (o.writeRate !== undefined) body.writeRateMBps = o.writeRate;
  return body;
}

const rate = (r: number | null): string => (r === null ? 'unlimited' : `${r} MB/s`);

export function repoCommand(ctx: CliContext): Command {
  const repo = new Command('repo').description('backup repositories');

  const withRepoOptions = (c: Command): Command =>
    c
      .option('--agent <name>', 'the agent that owns the folder (default: the local agent)')
      .option('--max-tasks <n>', 'most tasks writing at once, or "default" (the CPU cores of its agent)', taskLimit('--max-tasks'))
      .option('--rate-limit <rate>', 'read and write rate limit shared by its tasks, e.g. 200MB/s, or "none"', rateMBps('--rate-limit'))
      .option('--rate <MBps>', 'read and write rate limit in MB/s', positiveNumber('--rate'))
      .option('--read-rate <MBps>', 'read rate limit in MB/s', positiveNumber('--read-rate'))
      .option('--write-rate <MBps>', 'write rate limit in MB/s', positiveNumber('--write-rate'))
      .addOption(jsonOption());

  withRepoOptions(
    repo
      .command('add')
      .description('add a repository: a folder on a host with an agent')
      .argument('<name>')
      .requiredOption('--path <dir>', 'the folder (absolute on the agent; relative paths are made absolute here)'),
  ).action(async (name: string, o: RepoOptions, cmd: Command) => {
    const r = await (await clientFor(ctx, cmd)).post<Repository>('/repositories', { name, ...repoFields(o) });
    if (o.json) printJson(ctx.output, r);
    else ctx.output.out(`repository ${r.name} added (${r.path})\n`);
  });

  repo
    .command('list')
    .description('list repositories')
    .addOption(jsonOption())
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<Repository>>('/repositories');
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'name', value: (r) => r.name },
          { header: 'path', value: (r) => r.path },
          { header: 'agent', value: (r) => r.agent ?? '(local)' },
          { header: 'max tasks', value: (r) => r.maxTasks, align: 'right' },
          { header: 'read', value: (r) => rate(r.readRateMBps) },
          { header: 'write', value: (r) => rate(r.writeRateMBps) },
        ]),
      );
    });

  repo
    .command('show')
    .description('show one repository')
    .argument('<name>')
    .addOption(jsonOption())
    .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
      const r = await (await clientFor(ctx, cmd)).get<Repository>(at('/repositories', name));
      if (o.json) return printJson(ctx.output, r);
      ctx.output.out(
        formatFields([
          ['name', r.name],
          ['id', r.id],
          ['path', r.path],
          ['agent', r.agent ?? '(local)'],
          ['max tasks', `${r.maxTasks}${r.maxTasksSetting === null ? ' (the CPU cores of its agent)' : ''}`],
          ['read rate', rate(r.readRateMBps)],
          ['write rate', rate(r.writeRateMBps)],
          ['version', r.version],
          ['created', localTime(r.createdAt)],
          ['updated', localTime(r.updatedAt)],
        ]),
      );
    });

  withRepoOptions(
    repo
      .command('edit')
      .description('change a repository')
      .argument('<name>')
      .option('--path <dir>', 'the folder')
      .option('--expect-version <n>', 'refuse the edit unless the repository still has this version', positiveInt('--expect-version')),
  ).action(async (name: string, o: RepoOptions, cmd: Command) => {
    const patch = repoFields(o);
    if (Object.keys(patch).length === 0) throw nothingToDo(`repo edit ${name}`, '--path, --agent, --max-tasks, --rate, --rate-limit, --read-rate, --write-rate');
    const r = await editWithVersion<Repository>(await clientFor(ctx, cmd), at('/repositories', name), patch, o.expectVersion);
    if (o.json) printJson(ctx.output, r);
    else ctx.output.out(`repository ${r.name} changed (version ${r.version})\n`);
  });

  repo
    .command('remove')
    .alias('delete')
    .description('remove a repository (refused while it holds restore points)')
    .argument('<name>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await (await clientFor(ctx, cmd)).delete(at('/repositories', name));
      ctx.output.out(`repository ${name} removed\n`);
    });

  repo
    .command('rescan')
    .description('read the repository folder again and update the restore-point catalog')
    .argument('<name>')
    .addOption(jsonOption())
    .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
      const reply = await (await clientFor(ctx, cmd)).post<RescanReply>(at('/repositories', name, 'rescan'), {});
      // Unreadable chain metadata: the catalog could not follow those VMs (exit 1, their files named).
      if (reply.unreadable && reply.unreadable.length > 0) ctx.exitCode = 1;
      if (o.json) return printJson(ctx.output, reply);
      ctx.output.out(`repository ${name} rescanned\n`);
      ctx.output.out(
        formatFields([
          ['restore points', reply.points],
          ['added', reply.added],
          ['removed', reply.removed],
        ]),
      );
      for (const u of reply.unreadable ?? []) ctx.output.err(`unreadable: ${u.file}: ${u.problem}\n`);
      if (reply.unreadable?.length) ctx.output.err('nothing was removed from the catalog while a folder is unreadable; check it with `bulwark repo verify`\n');
      const elsewhere = reply.elsewhere ?? [];
      if (elsewhere.length > 0) {
        const from = [...new Set(elsewhere.map((e) => e.repository))].join(', ');
        ctx.output.err(`not added: ${elsewhere.length} point(s) the catalog already holds from repository ${from} (this folder has copies of them): ${elsewhere.slice(0, 5).map((e) => `${e.id} (VM ${e.vm})`).join(', ')}${elsewhere.length > 5 ? ', ...' : ''}\n`);
      }
    });

  repo
    .command('inspect')
    .description('show what a repository folder holds, read straight from its files (no server needed)')
    .argument('<path>', 'the repository folder')
    .addOption(jsonOption())
    .action(async (path: string, o: { json?: boolean }) => {
      const { repoInspectCommand } = await import('./repo-offline.js');
      ctx.exitCode = await repoInspectCommand(path, { json: o.json ?? false }, ctx.output);
    });

  repo
    .command('verify')
    .description(
      'check every block of a repository folder (PATH), or of a repository by NAME whose folder is on this host; encrypted chains: the plain data\'s digests too with their password in $BULWARK_REPO_PASSWORD (CRCs only without it)',
    )
    .argument('<path-or-name>')
    .addOption(jsonOption())
    .action(async (target: string, o: { json?: boolean }, cmd: Command) => {
      let path = target;
      if (!(existsSync(target) && statSync(target).isDirectory())) {
        if (target.includes('/')) throw new BulwarkError(`${target} is not a folder`, { kind: 'not-found', hint: 'give the repository folder or a repository name' });
        const r = await (await clientFor(ctx, cmd)).get<Repository>(at('/repositories', target));
        if (!existsSync(r.path)) {
          throw new BulwarkError(`the folder ${r.path} of repository ${r.name} does not exist on this host`, {
            kind: 'not-found',
            hint: r.agent
              ? `it lives on the host of agent ${r.agent}: run \`bulwark repo verify ${r.path}\` there`
              : 'nothing has been written to it yet, or it is on another host',
          });
        }
        path = r.path;
      }
      const { repoVerifyCommand } = await import('./repo-offline.js');
      ctx.exitCode = await repoVerifyCommand(path, { json: o.json ?? false, password: ctx.env.BULWARK_REPO_PASSWORD }, ctx.output);
    });

  return repo;
}
