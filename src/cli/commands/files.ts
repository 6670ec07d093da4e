// File-level restore in the console: `bulwark mount POINT` (held until Ctrl-C, or --detach and
// then `mount list` / `mount unmount ID`), `bulwark restore files POINT --path P... --to DIR |
// --to-guest`, `bulwark search PATTERN [--vm VM]` over the guest file indexes, and
// `bulwark index POINT` to build one point's index by hand.
import path from 'node:path';
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import { ApiError } from '../client.js';
import { at, clientFor, collect, oneOf, positiveInt, type CliContext, type ItemList } from '../context.js';
import { formatFields, formatTable, humanDuration, humanSize, localTime, printJson } from '../output.js';
import { resolvePoint } from './restore.js';
import { passwordFileOption, withPointPassword } from './encryption.js';

interface FileSystemView {
  name: string;
  disk: string;
  partition: number | null;
  type: string;
  label?: string;
  path: string;
  mountpoint?: string;
}

interface MountInfo {
  id: string;
  point: string;
  vm: string;
  time: string;
  at: string;
  detached: boolean;
  createdAt: string;
  filesystems: FileSystemView[];
  skipped: Array<{ name: string; type: string; reason: string }>;
  warnings: string[];
  notes: string[];
  /** The agent holding the mount (absent: the server process). */
  agent?: string;
  host?: string;
}

interface RestoreFilesReply {
  point: string;
  vm: string;
  target: string;
  /** The agent that mounted the point and wrote the files (absent: the server process). */
  agent?: string;
  items: Array<{ path: string; filesystem: string; inside: string; to: string }>;
  files: number;
  directories: number;
  symlinks: number;
  bytes: number;
  skipped: Array<{ path: string; reason: string }>;
}

interface SearchReply {
  pattern: string;
  matches: Array<{ vm: string; path: string; versions: Array<{ type: string; size: number; mtime: string; points: Array<{ id: string; time: string }> }> }>;
  pointsSearched: number;
  pointsWithoutIndex: Array<{ id: string; time: string; vm: string; reason: string }>;
  /** Points of encrypted chains whose password the server does not know (their index is sealed). */
  pointsLocked?: Array<{ id: string; time: string; vm: string; reason: string }>;
  truncated: boolean;
}

function describeMount(m: MountInfo): string {
  let s = formatFields([
    ['mount', m.id],
    ['restore point', `${m.point} (VM ${m.vm}, ${localTime(m.time)})`],
    ['mounted at', m.agent !== undefined ? `${m.at} (on agent ${m.agent}'s host${m.host !== undefined ? ` ${m.host}` : ''})` : m.at],
    ['held', m.detached ? 'detached: until `bulwark mount unmount ID`' : 'until this command ends'],
  ]);
  s += '\n';
  s += formatTable(m.filesystems, [
    { header: 'file system', value: (f) => f.name },
    { header: 'type', value: (f) => f.type },
    { header: 'label', value: (f) => f.label },
    { header: 'guest path', value: (f) => f.mountpoint },
    { header: 'folder (read-only)', value: (f) => f.path },
  ]);
  for (const x of m.skipped) s += `not mounted: ${x.name} (${x.type}): ${x.reason}\n`;
  for (const w of m.warnings) s += `warning: ${w}\n`;
  for (const n of m.notes) s += `note: ${n}\n`;
  return s;
}

export function mountCommand(ctx: CliContext): Command {
  const mount = new Command('mount')
    .description('show the guest file systems of a restore point read-only (held until Ctrl-C, or --detach)')
    .argument('[point]', 'restore point id, VM@latest or VM@<ISO time>')
    .option('--at <dir>', 'folder to mount under (new or empty; on the mount server\'s host). Default: under its data directory')
    .option('--host <host>', 'host whose agent mounts the point (default: the agent of the point\'s repository, or the server)')
    .option('--detach', 'return at once and keep the mount until `bulwark mount unmount ID`')
    .addOption(passwordFileOption())
    .addOption(new Option('--json', 'print the mount as JSON'))
    .action(async (point: string | undefined, o: { at?: string; host?: string; detach?: boolean; passwordFile?: string; json?: boolean }, cmd: Command) => {
      if (point === undefined) {
        cmd.help({ error: true });
        return;
      }
      const client = await clientFor(ctx, cmd);
      const id = await resolvePoint(client, point, ctx.output);
      const info = await withPointPassword(ctx, o.passwordFile, (pw) =>
        client.post<MountInfo>('/mounts', {
          point: id,
          ...(o.at !== undefined ? { at: path.resolve(o.at) } : {}),
          ...(o.host !== undefined ? { host: o.host } : {}),
          ...(o.detach ? { detached: true } : {}),
          ...pw,
        }),
      );
      if (o.json) printJson(ctx.output, info);
      else ctx.output.out(describeMount(info));
      if (o.detach) {
        if (!o.json) ctx.output.out(`\nunmount with: bulwark mount unmount ${info.id}\n`);
        return;
      }
      const abort = new AbortController();
      let stopping: Promise<void> | undefined;
      const stop = (): void => {
        // Unmount first (waits until it is undone), then let go of the hold.
        stopping ??= client
          .delete(at('/mounts', info.id))
          .then(() => undefined)
          .catch((err: unknown) => {
            if (!(err instanceof ApiError && err.status === 404)) throw err;
          })
          .finally(() => abort.abort());
      };
      const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
      for (const s of signals) process.on(s, stop);
      let ended = false;
      let held = false;
      try {
        await client.events(
          at('/mounts', info.id, 'hold'),
          (ev) => {
            // The server holds the mount for this console from its first event on: only then is
            // it safe to wait (a console killed before would leave it to the server's grace time).
            if (ev.event === 'mount' && !held) {
              held = true;
              if (!o.json) ctx.output.out('\nPress Ctrl-C to unmount.\n');
            }
            if (ev.event === 'unmounted') ended = true;
          },
          abort.signal,
        );
      } catch (err) {
        if (!stopping) throw err;
      } finally {
        for (const s of signals) process.off(s, stop);
      }
      if (stopping) {
        await stopping;
        ctx.output.out(`unmounted ${info.at}\n`);
        return;
      }
      throw new BulwarkError(ended ? `mount ${info.id} was unmounted (by \`mount unmount\` or the server stopping)` : `lost the server: mount ${info.id} is undone by the server`, {
        kind: 'unavailable',
      });
    });

  mount
    .command('list')
    .description('list the restore points mounted on the server')
    .addOption(new Option('--json', 'print as JSON'))
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<MountInfo>>('/mounts');
      // `mount` has a --json of its own, which commander gives the parent.
      if (o.json || cmd.parent?.opts<{ json?: boolean }>().json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'id', value: (m) => m.id },
          { header: 'vm', value: (m) => m.vm },
          { header: 'point time', value: (m) => localTime(m.time) },
          { header: 'held', value: (m) => (m.detached ? 'detached' : 'console') },
          { header: 'file systems', value: (m) => m.filesystems.map((f) => `${f.name}-${f.type}`) },
          { header: 'mounted at', value: (m) => m.at },
          { header: 'agent', value: (m) => m.agent ?? '(server)' },
        ]),
      );
    });

  mount
    .command('unmount')
    .description('undo a mount')
    .argument('<id>', 'mount id (from `mount list`; the first 8 characters will do)')
    .action(async (id: string, _o: unknown, cmd: Command) => {
      const info = await (await clientFor(ctx, cmd)).delete<MountInfo>(at('/mounts', id));
      ctx.output.out(`unmounted ${info.at}\n`);
    });
  return mount;
}

/** `restore files`: registered under the `restore` group by restoreCommand(). */
export function registerRestoreFiles(restore: Command, ctx: CliContext): void {
  restore
    .command('files')
    .description('copy files and folders out of a restore point, to a folder or back into the running VM')
    .argument('<point>', 'restore point id, VM@latest or VM@<ISO time>')
    .requiredOption('--path <path>', 'guest path (/etc/hostname, "/home/u/My Docs") or FS:/path (vdb2:/srv); repeat for more', collect)
    .option('--to <dir>', 'folder to copy into (on the mount server\'s host); each path lands under its own name')
    .option('--host <host>', 'host whose agent mounts the point and writes the files (default: the agent of the point\'s repository; with --to-guest the VM\'s host)')
    .option('--to-guest', 'write back into the running original VM at the same paths, through its guest agent')
    .addOption(new Option('--conflict <mode>', 'with --to-guest: when a path exists').argParser(oneOf('--conflict', ['fail', 'overwrite', 'keep-both'] as const)).default('fail'))
    .option('--overwrite', 'with --to: replace existing files')
    .addOption(passwordFileOption())
    .addOption(new Option('--json', 'print the result as JSON'))
    .action(async (point: string, o: { path: string[]; to?: string; host?: string; toGuest?: boolean; conflict: 'fail' | 'overwrite' | 'keep-both'; overwrite?: boolean; passwordFile?: string; json?: boolean }, cmd: Command) => {
      if ((o.to === undefined) === !o.toGuest) {
        throw new BulwarkError('say where to: --to DIR or --to-guest', { kind: 'invalid', hint: 'e.g. bulwark restore files web01@latest --path /etc/hostname --to /tmp/restored' });
      }
      // Each says what to do with existing files for one destination only: given with the other,
      // it would be ignored and the restore would do what the user did not ask for.
      if (o.toGuest && o.overwrite) {
        throw new BulwarkError('--overwrite goes with --to DIR', { kind: 'invalid', hint: 'into the guest, say --conflict overwrite (or keep-both)' });
      }
      if (o.to !== undefined && cmd.getOptionValueSource('conflict') === 'cli') {
        throw new BulwarkError('--conflict goes with --to-guest', { kind: 'invalid', hint: 'with --to DIR an existing file is a conflict; --overwrite replaces it' });
      }
      const client = await clientFor(ctx, cmd);
      const id = await resolvePoint(client, point, ctx.output);
      const reply = await withPointPassword(ctx, o.passwordFile, (pw) =>
        client.post<RestoreFilesReply>(at('/restore-points', id, 'restore-files'), {
          paths: o.path,
          ...(o.to !== undefined ? { to: path.resolve(o.to) } : { toGuest: true, conflict: o.conflict }),
          ...(o.host !== undefined ? { host: o.host } : {}),
          ...(o.overwrite ? { overwrite: true } : {}),
          ...pw,
        }),
      );
      if (o.json) return printJson(ctx.output, reply);
      ctx.output.out(
        formatFields([
          ['restore point', `${reply.point} (VM ${reply.vm})`],
          ['restored to', reply.target],
          ...(reply.agent !== undefined ? [['by agent', reply.agent] as [string, string]] : []),
          ['copied', `${reply.files} files, ${reply.directories} folders, ${reply.symlinks} links, ${humanSize(reply.bytes)}`],
        ]),
      );
      for (const i of reply.items) ctx.output.out(`  ${i.path}  (${i.filesystem}:${i.inside})  ->  ${i.to}\n`);
      for (const s of reply.skipped) ctx.output.out(`  skipped ${s.path}: ${s.reason}\n`);
    });
}

const typeWord: Record<string, string> = { f: 'file', d: 'folder', l: 'link', o: 'other' };

export function searchCommand(ctx: CliContext): Command {
  return new Command('search')
    .description('find guest files in the file indexes of restore points (jobs with file indexing on)')
    .argument('<pattern>', 'glob on the file name (*.conf, host?ame), or on the whole path when it holds a /')
    .option('--vm <vm>', 'only this VM\'s restore points')
    .addOption(new Option('--limit <n>', 'most paths to list').argParser(positiveInt('--limit')).default(1000))
    .addOption(new Option('--json', 'print as JSON'))
    .action(async (pattern: string, o: { vm?: string; limit: number; json?: boolean }, cmd: Command) => {
      const r = await (await clientFor(ctx, cmd)).get<SearchReply>('/file-index/search', { pattern, vm: o.vm, limit: o.limit });
      if (o.json) return printJson(ctx.output, r);
      for (const m of r.matches) {
        ctx.output.out(`${m.vm}: ${m.path}\n`);
        for (const v of m.versions) {
          const what = v.type === 'f' ? humanSize(v.size) : typeWord[v.type] ?? v.type;
          ctx.output.out(`  ${what}, modified ${localTime(v.mtime)}, in ${v.points.length} point${v.points.length === 1 ? '' : 's'}: ${v.points.map((p) => `${p.id} (${localTime(p.time)})`).join(', ')}\n`);
        }
      }
      const without = r.pointsWithoutIndex.length;
      const locked = r.pointsLocked ?? [];
      ctx.output.out(
        `${r.matches.length === 0 ? 'no match' : `${r.matches.length} path${r.matches.length === 1 ? '' : 's'}`}${r.truncated ? ' (more matched: raise --limit)' : ''}; ` +
          `${r.pointsSearched} restore point${r.pointsSearched === 1 ? '' : 's'} searched${without > 0 ? `, ${without} without a file index` : ''}` +
          `${locked.length > 0 ? `, ${locked.length} not searched (encrypted, password unknown)` : ''}\n`,
      );
      for (const p of locked) ctx.output.out(`not searched: ${p.vm} ${p.id} (${localTime(p.time)}): ${p.reason}\n`);
    });
}

export function indexCommand(ctx: CliContext): Command {
  return new Command('index')
    .description('build (or rebuild) the guest file index of one restore point, for `bulwark search`')
    .argument('<point>', 'restore point id, VM@latest or VM@<ISO time>')
    .addOption(passwordFileOption())
    .addOption(new Option('--json', 'print the result as JSON'))
    .action(async (point: string, o: { passwordFile?: string; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const id = await resolvePoint(client, point, ctx.output);
      const r = await withPointPassword(ctx, o.passwordFile, (pw) =>
        client.post<{ point: string; file: string; entries: number; filesystems: number; sealed?: boolean; durationMs: number }>(at('/restore-points', id, 'file-index'), pw),
      );
      if (o.json) return printJson(ctx.output, r);
      ctx.output.out(
        formatFields([
          ['restore point', r.point],
          ['entries', r.entries],
          ['file systems', r.filesystems],
          ['index', `${r.file}${r.sealed ? ' (sealed with the chain\'s keys)' : ''}`],
          ['took', humanDuration(r.durationMs / 1000)],
        ]),
      );
    });
}
