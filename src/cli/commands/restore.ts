// `bulwark restore disk POINT …`: brings one disk of a restore point back as an image file.
// POINT is a restore point id, `VM@latest` or `VM@<ISO time>` (the newest point at or before it).
import path from 'node:path';
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import type { RestorePoint } from '../../server/services/model.js';
import { at, clientFor, oneOf, type CliContext, type ItemList } from '../context.js';
import type { ApiClient } from '../client.js';
import { formatFields, humanDuration, humanSize, printJson, processOutput, type Output } from '../output.js';
import { registerRestoreFiles } from './files.js';
import { registerRestoreVm } from './recovery.js';
import { passwordFileOption, withPointPassword } from './encryption.js';

interface RestoreDiskReply {
  point: string;
  disk: string;
  path: string;
  format: 'raw' | 'qcow2';
  size: number;
  /** Only with --digest. */
  sha256?: string;
  bytesWritten: number;
  durationMs: number;
}

type PointRef = Pick<RestorePoint, 'id' | 'time' | 'state'>;

/**
 * The point `VM@WHEN` names among the VM's points: the newest at or before WHEN (`latest`: the
 * newest of all) that a health check did not mark corrupt. Newer corrupt points it passes over are
 * returned in `skipped` (the console says so); when every candidate is corrupt it refuses, naming
 * the newest, rather than say the VM has no points (a damaged point restores by its id: intact
 * blocks read as backed up, a damaged one fails naming the block).
 */
export function pickPoint<T extends PointRef>(items: readonly T[], vm: string, when: string): { point: T; skipped: T[] } {
  let limit = Number.POSITIVE_INFINITY;
  if (when !== 'latest') {
    limit = Date.parse(when);
    if (Number.isNaN(limit)) throw new BulwarkError(`POINT: "${when}" is neither "latest" nor an ISO time`, { kind: 'invalid', hint: 'e.g. web01@latest or web01@2026-11-25T22:00:00Z' });
  }
  const where = when === 'latest' ? '' : ` at or before ${when}`;
  const candidates = items.filter((p) => Date.parse(p.time) <= limit).sort((a, b) => Date.parse(b.time) - Date.parse(a.time));
  if (candidates.length === 0) {
    const oldest = [...items].sort((a, b) => Date.parse(a.time) - Date.parse(b.time))[0];
    throw new BulwarkError(`no restore point of VM ${vm}${where} exists`, {
      kind: 'not-found',
      hint: oldest ? `its oldest point is ${oldest.id} (${oldest.time})` : `list the VMs' points with: bulwark restore-point list`,
    });
  }
  const at = candidates.findIndex((p) => p.state === 'ready');
  if (at < 0) {
    const newest = candidates[0]!;
    throw new BulwarkError(`no intact restore point of VM ${vm}${where}: its ${candidates.length} point(s) there are marked corrupt by a health check (newest: ${newest.id}, ${newest.time})`, {
      kind: 'not-found',
      hint: `restore from one by its id (intact blocks restore; a damaged block fails, naming it), or run the job again: its next run repairs the chain`,
    });
  }
  return { point: candidates[at]!, skipped: candidates.slice(0, at) };
}

/** Resolves POINT (id, VM@latest, VM@time) to a restore point id; a note on `output` when newer damaged points were passed over. */
export async function resolvePoint(client: ApiClient, point: string, output: Output = processOutput): Promise<string> {
  const atSign = point.lastIndexOf('@');
  if (atSign <= 0) return point;
  const vm = point.slice(0, atSign);
  const when = point.slice(atSign + 1);
  const { items } = await client.get<ItemList<RestorePoint>>('/restore-points', { vm });
  const { point: found, skipped } = pickPoint(items, vm, when);
  if (skipped.length > 0) {
    output.err(`note: ${point} is ${found.id} (${found.time}): the newer ${skipped.map((p) => p.id).join(', ')} ${skipped.length === 1 ? 'is' : 'are'} marked corrupt by a health check (give an id to restore from one)\n`);
  }
  return found.id;
}

export function restoreCommand(ctx: CliContext): Command {
  const restore = new Command('restore').description('bring back disks from restore points');

  restore
    .command('disk')
    .description('restore one disk of a restore point to an image file (sparse raw, or qcow2)')
    .argument('<point>', 'restore point id, VM@latest or VM@<ISO time>')
    .requiredOption('--disk <name>', 'disk of the restore point (e.g. vda)')
    .requiredOption('--to <path>', 'image file to write (on the server host in the one-host install)')
    .addOption(new Option('--format <format>', 'image format').argParser(oneOf('--format', ['raw', 'qcow2'] as const)).default('raw'))
    .option('--overwrite', 'replace an existing file at --to')
    .option('--digest', 'also compute the SHA-256 of the whole restored image (costs about a core; every block is CRC-checked either way)')
    .addOption(passwordFileOption())
    .addOption(new Option('--json', 'print the result as JSON'))
    .action(async (point: string, o: { disk: string; to: string; format: 'raw' | 'qcow2'; overwrite?: boolean; digest?: boolean; passwordFile?: string; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const id = await resolvePoint(client, point, ctx.output);
      const reply = await withPointPassword(ctx, o.passwordFile, (pw) =>
        client.post<RestoreDiskReply>(at('/restore-points', id, 'restore-disk'), {
          disk: o.disk,
          to: path.resolve(o.to),
          format: o.format,
          ...(o.overwrite ? { overwrite: true } : {}),
          ...(o.digest ? { digest: true } : {}),
          ...pw,
        }),
      );
      if (o.json) return printJson(ctx.output, reply);
      ctx.output.out(
        formatFields([
          ['restore point', reply.point],
          ['disk', reply.disk],
          ['written to', reply.path],
          ['format', reply.format],
          ['size', humanSize(reply.size)],
          ['data written', humanSize(reply.bytesWritten)],
          ...(reply.sha256 !== undefined ? [['sha256', reply.sha256] as [string, unknown]] : []),
          ['took', humanDuration(reply.durationMs / 1000)],
        ]),
      );
    });

  registerRestoreVm(restore, ctx);
  registerRestoreFiles(restore, ctx);
  return restore;
}
