// `bulwark restore disk POINT …`: brings one disk of a restore point back as an image file,
// showing the progress of its session while it runs (a bar on a terminal, lines otherwise).
// POINT is a restore point id, `VM@latest` or `VM@<ISO time>` (the newest point at or before it).
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import cliProgress from 'cli-progress';
import { Command, Option } from 'commander';
import { BulwarkError } from '../../common/errors.js';
import { isFinalState } from '../../server/jobs/ports.js';
import type { RestorePoint, Session } from '../../server/services/model.js';
import { at, clientFor, oneOf, type CliContext, type ItemList } from '../context.js';
import { ApiError, type ApiClient } from '../client.js';
import { formatFields, humanDuration, humanRate, humanSize, localTime, printJson, processOutput, type Output } from '../output.js';
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

/** A restore's figures as its session shows them: bytes of the disk done of `total`, the average rate. */
export interface RestoreFigures {
  readonly done: number;
  /** The disk's size (undefined while unknown). */
  readonly total: number | undefined;
  readonly percent: number;
  /** Bytes/s since the start. */
  readonly rate: number;
}

export function restoreFigures(s: Session, total: number | undefined): RestoreFigures {
  const p = s.progress;
  return { done: p.bytesRead, total: total ?? (p.percent > 0 ? Math.round((p.bytesRead * 100) / p.percent) : undefined), percent: p.percent, rate: p.processingRate };
}

/** The time left at the rate so far ("1m05s"), "-" while unknown. */
function timeLeft(f: RestoreFigures): string {
  return f.total !== undefined && f.rate > 0 ? humanDuration(Math.max(0, f.total - f.done) / f.rate) : '-';
}

/** "40% (102 MiB of 256 MiB), 120 MiB/s, ETA 1s" (no rate before the server has measured one). */
export function restoreProgressText(f: RestoreFigures): string {
  return `${Math.floor(f.percent)}% (${humanSize(f.done)} of ${humanSize(f.total)})${f.rate > 0 ? `, ${humanRate(f.rate)}` : ''}, ETA ${timeLeft(f)}`;
}

/** How `restore disk` shows its session while the request runs. */
interface RestoreView {
  /** The session as the server has it now. */
  update(s: Session): void;
  /** The request has been answered (or failed): clear the bar. */
  end(): void;
}

/**
 * Plain lines (pipes, logs) on stdout: the session's id once it exists, then a line at every 10 %
 * and at least every `everyMs` while it moves; never one per update.
 */
export class RestoreLines implements RestoreView {
  readonly #output: Output;
  readonly #what: string;
  readonly #total: () => number | undefined;
  readonly #everyMs: number;
  readonly #now: () => number;
  #announced = false;
  #decile = -1;
  #lastAt = 0;
  /** Nothing done yet is not worth a line. */
  #lastDone = 0;

  constructor(output: Output, what: string, total: () => number | undefined, o: { everyMs?: number; now?: () => number } = {}) {
    this.#output = output;
    this.#what = what;
    this.#total = total;
    this.#everyMs = o.everyMs ?? 5000;
    this.#now = o.now ?? Date.now;
  }

  update(s: Session): void {
    if (!this.#announced) {
      this.#announced = true;
      this.#output.out(`${localTime(new Date(this.#now()))}  ${this.#what}: session ${s.id} (stop it with: bulwark session stop ${s.id})\n`);
    }
    if (s.state !== 'running') return;
    const f = restoreFigures(s, this.#total());
    const decile = Math.floor(f.percent / 10);
    const now = this.#now();
    if (f.done === this.#lastDone || (decile <= this.#decile && now - this.#lastAt < this.#everyMs)) return;
    this.#decile = Math.max(this.#decile, decile);
    this.#lastAt = now;
    this.#lastDone = f.done;
    this.#output.out(`${localTime(new Date(now))}  restoring  ${restoreProgressText(f)}\n`);
  }

  end(): void {
    // lines need no clearing
  }
}

/** A progress bar on the terminal (stderr): bytes restored of the disk, rate, ETA. */
export class RestoreBar implements RestoreView {
  readonly #stream: NodeJS.WritableStream;
  readonly #what: string;
  readonly #total: () => number | undefined;
  #bar: cliProgress.SingleBar | undefined;

  constructor(what: string, total: () => number | undefined, stream: NodeJS.WritableStream = process.stderr) {
    this.#stream = stream;
    this.#what = what;
    this.#total = total;
  }

  update(s: Session): void {
    if (s.state !== 'running') return;
    const f = restoreFigures(s, this.#total());
    // `left`, not `eta`: cli-progress fills {eta} itself (from its own updates, in seconds).
    const values = { done: humanSize(f.done), size: humanSize(f.total), rate: f.rate > 0 ? humanRate(f.rate) : '-', left: timeLeft(f) };
    if (!this.#bar) {
      this.#stream.write(`${this.#what}: session ${s.id} (Ctrl-C or bulwark session stop ${s.id} stops it)\n`);
      this.#bar = new cliProgress.SingleBar(
        { stream: this.#stream, format: ' restoring [{bar}] {percentage}% | {done} of {size} | {rate} | ETA {left}', hideCursor: true, clearOnComplete: true, fps: 5 },
        cliProgress.Presets.shades_classic,
      );
      this.#bar.start(100, 0, values);
      // Ctrl-C stops the restore (the server sees the connection close): show the cursor again
      // first, then let the signal end the console as it would have.
      process.once('SIGINT', this.#interrupted);
    }
    this.#bar.update(Math.min(100, Math.max(0, Math.floor(f.percent))), values);
  }

  end(): void {
    process.off('SIGINT', this.#interrupted);
    this.#bar?.stop();
    this.#bar = undefined;
  }

  readonly #interrupted = (): void => {
    this.#bar?.stop();
    this.#bar = undefined;
    process.kill(process.pid, 'SIGINT');
  };
}

/**
 * Follows session `id` (which the server creates once it has checked the request) until `signal`
 * aborts or it ends; for display only: errors (no permission to read sessions, an older server)
 * end it quietly, the request's answer decides the outcome.
 */
export async function watchSession(client: ApiClient, id: string, seen: (s: Session) => void, signal: AbortSignal): Promise<void> {
  const where = at('/sessions', id);
  try {
    for (;;) {
      if (signal.aborted) return;
      try {
        const s = await client.get<Session>(where);
        seen(s);
        if (isFinalState(s.state)) return;
        break;
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 404)) return;
      }
      await sleep(100, undefined, { signal }).catch(() => undefined);
    }
    await client.events(
      `${where}/events`,
      (e) => {
        if (e.event === 'session') seen(JSON.parse(e.data) as Session);
      },
      signal,
    );
  } catch {
    // display only (see above)
  }
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
      const to = path.resolve(o.to);
      // The disk's size, for "bytes restored of total" (the session carries the percent).
      let total: number | undefined;
      const what = `restore of disk ${o.disk} of restore point ${id} to ${to}`;
      // A terminal gets a bar on stderr (with --json too); pipes get lines on stdout, except with --json.
      const newView = (): RestoreView | undefined => (ctx.tty ? new RestoreBar(what, () => total) : o.json ? undefined : new RestoreLines(ctx.output, what, () => total));
      if (ctx.tty || !o.json) {
        void client.get<RestorePoint>(at('/restore-points', id)).then(
          (p) => void (total = p.disks.find((d) => d.name === o.disk)?.size),
          () => undefined,
        );
      }
      let sessionId = '';
      const reply = await withPointPassword(ctx, o.passwordFile, async (pw) => {
        // The session's id is chosen here, so its progress can be followed while the request runs
        // (a new one for each attempt: a refused password ends the first attempt's session).
        sessionId = randomUUID();
        const view = newView();
        const following = new AbortController();
        const watching = view ? watchSession(client, sessionId, (s) => view.update(s), following.signal) : undefined;
        try {
          return await client.post<RestoreDiskReply>(at('/restore-points', id, 'restore-disk'), {
            disk: o.disk,
            to,
            format: o.format,
            ...(o.overwrite ? { overwrite: true } : {}),
            ...(o.digest ? { digest: true } : {}),
            session: sessionId,
            ...pw,
          });
        } finally {
          following.abort();
          await watching;
          view?.end();
        }
      });
      if (o.json) return printJson(ctx.output, reply);
      ctx.output.out(
        formatFields([
          ['session', sessionId],
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
