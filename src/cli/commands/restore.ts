// `bulwark restore disk POINT …`: brings one disk of a restore point back as an image file.
// POINT is a restore point id, `VM@latest` or `VM@<ISO time>` (the newest point at or before it).
import path from 'node:path';
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import type { RestorePoint } from '../../server/services/model.js';
import { at, clientFor, oneOf, type CliContext, type ItemList } from '../context.js';
import type { ApiClient } from '../client.js';
import { formatFields, humanDuration, humanSize, printJson } from '../output.js';
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

/** Resolves POINT (id, VM@latest, VM@time) to a restore point id. */
export async function resolvePoint(client: ApiClient, point: string): Promise<string> {
  const atSign = point.lastIndexOf('@');
  if (atSign <= 0) return point;
  const vm = point.slice(0, atSign);
  const when = point.slice(atSign + 1);
  const { items } = await client.get<ItemList<RestorePoint>>('/restore-points', { vm });
  let limit = Number.POSITIVE_INFINITY;
  if (when !== 'latest') {
    limit = Date.parse(when);
    if (Number.isNaN(limit)) throw new BulwarkError(`POINT: "${when}" is neither "latest" nor an ISO time`, { kind: 'invalid', hint: 'e.g. web01@latest or web01@2026-11-25T22:00:00Z' });
  }
  const candidates = items.filter((p) => p.state === 'ready' && Date.parse(p.time) <= limit).sort((a, b) => Date.parse(b.time) - Date.parse(a.time));
  const found = candidates[0];
  if (!found) throw new BulwarkError(`no restore point of VM ${vm} ${when === 'latest' ? 'exists' : `at or before ${when}`}`, { kind: 'not-found' });
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
      const id = await resolvePoint(client, point);
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
