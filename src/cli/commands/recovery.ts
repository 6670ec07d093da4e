// `bulwark restore vm POINT …` (a whole VM back, over the original or as a new VM) and
// `bulwark instant-recovery start|list|show|migrate|stop` (VMs that run straight from a restore
// point). Both act through the server's API (docs/api.md "Full VM restore", "Instant recovery").
import path from 'node:path';
import { Command, Option } from 'commander';
import { BulwarkError, type ErrorKind } from '../../common/errors.js';
import type { InstantRecovery, VmRestore } from '../../server/api/recovery.js';
import { at, clientFor, oneOf, type CliContext, type ItemList } from '../context.js';
import { formatFields, formatTable, humanDuration, humanSize, localTime, printJson } from '../output.js';
import { resolvePoint } from './restore.js';
import { passwordFileOption, withPointPassword } from './encryption.js';

const jsonOption = (): Option => new Option('--json', 'print the API object(s) as JSON');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function restoreFields(t: VmRestore): [string, unknown][] {
  const r = t.result;
  return [
    ['restore', t.id],
    ['restore point', t.point],
    ['VM', t.toOriginal ? `${t.vm} (over the original)` : `${t.vm} (new, from ${t.sourceVm})`],
    ['host', t.host],
    ...(t.agent ? [['agent', t.agent] as [string, unknown]] : []),
    ['state', t.state],
    ...(t.log ?? []).map((l): [string, unknown] => [l.level === 'info' ? 'log' : l.level, l.message]),
    ...(r
      ? ([
          ...r.disks.map((d): [string, unknown] => [`disk ${d.name}`, `${d.path} (${d.format}, ${humanSize(d.size)}${d.sha256 ? `, sha256 ${d.sha256}` : ''})`]),
          ...(r.vmDir ? [['folder', r.vmDir] as [string, unknown]] : []),
          ...(r.startScript ? [['start with', r.startScript] as [string, unknown]] : []),
          ...(r.qmpSocket ? [['QMP socket', r.qmpSocket] as [string, unknown]] : []),
          ...(r.uuid ? [['UUID', r.uuid] as [string, unknown]] : []),
          ['powered on', r.poweredOn ? 'yes' : 'no'],
          ...r.warnings.map((w): [string, unknown] => ['warning', w]),
          ['took', humanDuration(r.durationMs / 1000)],
        ] as [string, unknown][])
      : []),
  ];
}

/** Adds `restore vm` to the `restore` group. */
export function registerRestoreVm(restore: Command, ctx: CliContext): void {
  restore
    .command('vm')
    .description('restore a whole VM: over the original (it must be off) or as a new VM with --name')
    .argument('<point>', 'restore point id, VM@latest or VM@<ISO time>')
    .option('--name <name>', 'restore as a new VM with this name (new disks, UUID and MAC addresses)')
    .option('--host <host>', 'host to restore to (default: the host of the original VM)')
    .option('--storage <dir>', 'folder for the new VM\'s disks (on that host)')
    .addOption(new Option('--format <format>', 'disk format (default: as the original)').argParser(oneOf('--format', ['raw', 'qcow2'] as const)))
    .option('--power-on', 'start the VM when its disks are restored')
    .option('--digest', "also report each restored disk's SHA-256 (reads every image back: slower)")
    .addOption(passwordFileOption())
    .addOption(jsonOption())
    .action(async (point: string, o: { name?: string; host?: string; storage?: string; format?: 'raw' | 'qcow2'; powerOn?: boolean; digest?: boolean; passwordFile?: string; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const id = await resolvePoint(client, point);
      let task = await withPointPassword(ctx, o.passwordFile, (pw) =>
        client.post<VmRestore>(at('/restore-points', id, 'restore-vm'), {
          ...(o.name ? { name: o.name } : {}),
          ...(o.host ? { host: o.host } : {}),
          ...(o.storage ? { storage: path.resolve(o.storage) } : {}),
          ...(o.format ? { format: o.format } : {}),
          ...(o.powerOn ? { powerOn: true } : {}),
          ...(o.digest ? { digest: true } : {}),
          ...pw,
        }),
      );
      let lastTenth = -1;
      while (task.state === 'running') {
        const pct = Math.floor(task.progress.percent);
        if (!o.json) {
          if (ctx.tty) ctx.output.err(`\rrestoring ${task.vm}: ${task.progress.disk ?? ''} ${pct}% (${humanSize(task.progress.bytesDone)} of ${humanSize(task.progress.total)})   `);
          else if (Math.floor(pct / 10) > lastTenth) {
            lastTenth = Math.floor(pct / 10);
            ctx.output.out(`restoring ${task.vm}: ${pct}%\n`);
          }
        }
        await sleep(500);
        task = await client.get<VmRestore>(at('/vm-restores', task.id));
      }
      if (ctx.tty && !o.json) ctx.output.err('\n');
      if (task.state === 'failed') {
        const e = task.error;
        throw new BulwarkError(e?.message ?? `VM restore ${task.id} failed`, { kind: (e?.kind as ErrorKind | undefined) ?? 'internal', ...(e?.hint ? { hint: e.hint } : {}) });
      }
      if (o.json) return printJson(ctx.output, task);
      ctx.output.out(formatFields(restoreFields(task)));
    });
}

function instantFields(s: InstantRecovery): [string, unknown][] {
  return [
    ['id', s.id],
    ['name', s.name],
    ['VM', s.vm],
    ['restore point', s.point],
    ...(s.agent ? [['runs on', `${s.host ? `host ${s.host}, ` : ''}agent ${s.agent}`] as [string, unknown]] : []),
    ['state', s.state],
    ['running from backup', s.runningFromBackup ? 'yes' : 'no'],
    ['pid', s.pid ?? '-'],
    ['started', localTime(s.startedAt)],
    ['guest agent socket', s.agentSocket],
    ['QMP socket', s.qmpSocket],
    ['console log', s.consoleLog],
    ...s.disks.map((d): [string, unknown] => [`disk ${d.name}`, d.target ? `${d.target} (own disk)` : `${humanSize(d.size)}, writes in ${d.overlay}`]),
  ];
}

export function instantRecoveryCommand(ctx: CliContext): Command {
  const ir = new Command('instant-recovery').description('run VMs straight from restore points, then move them to their own disks');

  ir.command('start')
    .description('boot the VM of a restore point from the backup (writes go to a local overlay, never to the backup)')
    .argument('<point>', 'restore point id, VM@latest or VM@<ISO time>')
    .option('--name <name>', 'name of the recovered VM (default: VM-ir)')
    .option('--host <host>', 'run the VM on this host (its agent; default: the server, or the repository\'s agent)')
    .addOption(
      new Option('--network <mode>', 'the NICs (recorded model and MAC): disconnected (no network, link down: the original may still be on its network) or recorded (each on the network it had)')
        .choices(['disconnected', 'recorded'])
        .default('disconnected'),
    )
    .addOption(passwordFileOption())
    .addOption(jsonOption())
    .action(async (point: string, o: { name?: string; host?: string; network: 'disconnected' | 'recorded'; passwordFile?: string; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const id = await resolvePoint(client, point);
      const s = await withPointPassword(ctx, o.passwordFile, (pw) =>
        client.post<InstantRecovery>('/instant-recoveries', { point: id, ...(o.name ? { name: o.name } : {}), ...(o.host ? { host: o.host } : {}), network: o.network, ...pw }),
      );
      if (o.json) return printJson(ctx.output, s);
      ctx.output.out(formatFields(instantFields(s)));
    });

  ir.command('list')
    .description('instant recovery sessions of the server: which VMs run from backup')
    .addOption(jsonOption())
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const { items } = await client.get<ItemList<InstantRecovery>>('/instant-recoveries');
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'id', value: (s) => s.id },
          { header: 'name', value: (s) => s.name },
          { header: 'vm', value: (s) => s.vm },
          { header: 'point', value: (s) => s.point },
          { header: 'state', value: (s) => s.state },
          { header: 'from backup', value: (s) => (s.runningFromBackup ? 'yes' : 'no') },
          { header: 'pid', value: (s) => s.pid ?? '-' },
          { header: 'started', value: (s) => localTime(s.startedAt) },
          { header: 'agent', value: (s) => s.agent ?? '(server)' },
        ]),
      );
    });

  ir.command('show')
    .argument('<id>')
    .addOption(jsonOption())
    .action(async (id: string, o: { json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const s = await client.get<InstantRecovery>(at('/instant-recoveries', id));
      if (o.json) return printJson(ctx.output, s);
      ctx.output.out(formatFields(instantFields(s)));
    });

  ir.command('migrate')
    .description('copy the running VM\'s disks to its own storage, switch it over, and close the backup side')
    .argument('<id>')
    .option('--storage <dir>', 'folder for the VM\'s own disks (default <data>/vms/NAME on the server host)')
    .addOption(jsonOption())
    .action(async (id: string, o: { storage?: string; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const s = await client.post<InstantRecovery>(at('/instant-recoveries', id, 'migrate'), o.storage ? { storage: path.resolve(o.storage) } : {});
      if (o.json) return printJson(ctx.output, s);
      ctx.output.out(formatFields(instantFields(s)));
    });

  ir.command('stop')
    .description('stop the VM and discard the session (overlays, sockets); migrated disks stay. A migrated VM (a VM of its own now) needs --shutdown-vm or --forget')
    .argument('<id>')
    .option('--shutdown-vm', 'a migrated VM: shut it down (its folder and disks stay)')
    .option('--forget', 'a migrated VM: remove it from the instant recovery list and leave it running')
    .action(async (id: string, o: { shutdownVm?: boolean; forget?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      await client.post(at('/instant-recoveries', id, 'stop'), { ...(o.shutdownVm ? { shutdownVm: true } : {}), ...(o.forget ? { forget: true } : {}) });
      ctx.output.out(o.forget ? `instant recovery ${id} forgotten: its VM runs on\n` : `instant recovery ${id} stopped${o.shutdownVm ? ' (its migrated VM shut down)' : ''}\n`);
    });

  return ir;
}
