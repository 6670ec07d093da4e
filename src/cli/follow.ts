// Following a running session (`job run --wait`, `session show ID --follow`): subscribes to
// `GET /sessions/{id}/events`, shows progress (a bar with percent, rate and ETA on a terminal,
// plain lines otherwise, JSON lines with --json), and rides out a lost server for 5 minutes.
import cliProgress from 'cli-progress';
import { assertNever } from '../common/errors.js';
import { isFinalState } from '../server/jobs/ports.js';
import type { Session } from '../server/services/model.js';
import { ApiClient, Reconnect } from './client.js';
import { humanDuration, humanRate, humanSize, localTime, type Output } from './output.js';

export type SessionState = Session['state'];

/** 0 for success and warning, 1 for failed and stopped (and for a session still running). */
export function exitCodeOf(state: SessionState): number {
  return state === 'success' || state === 'warning' ? 0 : 1;
}

/** What a session is about, for its lines: "job nightly" for job runs and health checks, "restore-disk of web1" for restores. */
export function sessionSubject(s: Session): string {
  const kind = s.kind ?? 'backup';
  switch (kind) {
    case 'backup':
    case 'health-check':
      return `job ${s.jobName}`;
    case 'restore-vm':
    case 'restore-disk':
    case 'restore-files':
    case 'instant-recovery':
      return s.vm ? `${kind} of ${s.vm}` : kind;
    default:
      return assertNever(kind);
  }
}

/** One line that sums a finished (or current) session up. */
export function sessionSummary(s: Session): string {
  const end = s.endedAt ? new Date(s.endedAt).getTime() : Date.now();
  const seconds = (end - new Date(s.startedAt).getTime()) / 1000;
  const p = s.progress;
  return (
    `session ${s.id} (${sessionSubject(s)}): ${s.state} after ${humanDuration(seconds)}; ` +
    `read ${humanSize(p.bytesRead)}, transferred ${humanSize(p.bytesTransferred)}, stored ${humanSize(p.bytesStored)}` +
    (s.reason ? `; ${s.reason}` : '')
  );
}

/** A task's maintenance step (merge, synthetic-full, compact, inject, health-check). */
export type MaintenanceStepView = NonNullable<Session['tasks'][number]['progress']['step']>;

/** A maintenance step as the console shows it: "merge 45% (1.8 GiB of 4.0 GiB)". */
export function stepText(step: MaintenanceStepView): string {
  const percent = step.bytesTotal > 0 ? Math.floor((step.bytesDone * 100) / step.bytesTotal) : 100;
  return `${step.name} ${percent}% (${humanSize(step.bytesDone)} of ${humanSize(step.bytesTotal)})`;
}

/** The maintenance step a running task of the session runs now, as "VM web1: merge 45% (…)"; undefined when none. */
export function runningStep(s: Session): { key: string; percent: number; text: string } | undefined {
  for (const t of s.tasks) {
    const step = t.progress.step;
    if (t.state !== 'running' || !step) continue;
    return { key: `${t.id}:${step.name}`, percent: step.bytesTotal > 0 ? Math.floor((step.bytesDone * 100) / step.bytesTotal) : 100, text: `VM ${t.vm}: ${stepText(step)}` };
  }
  return undefined;
}

/** How a follow shows what happens. */
export interface SessionView {
  update(s: Session): void;
  /** A note from the console itself (lost connection, retrying). */
  note(text: string): void;
  finish(s: Session): void;
}

/** Lines for logs and pipes: state changes, each new log line, every 10 %, then a summary. */
export class PlainView implements SessionView {
  readonly #output: Output;
  #state: SessionState | undefined;
  #logLines = 0;
  #decile = -1;
  /** The maintenance step last shown, and its decile. */
  #step: { key: string; decile: number } | undefined;

  constructor(output: Output) {
    this.#output = output;
  }

  update(s: Session): void {
    if (s.state !== this.#state) {
      this.#state = s.state;
      this.#output.out(`${localTime(new Date())}  session ${s.id} (${sessionSubject(s)}): ${s.state}\n`);
    }
    for (const line of s.log.slice(this.#logLines)) {
      this.#output.out(`${localTime(line.time)}  ${line.level.padEnd(7)}  ${line.message}\n`);
    }
    this.#logLines = Math.max(this.#logLines, s.log.length);
    const decile = Math.floor(s.progress.percent / 10);
    if (s.state === 'running' && decile > this.#decile) {
      this.#decile = decile;
      this.#output.out(
        `${localTime(new Date())}  ${s.progress.percent.toFixed(0).padStart(3)}%  read ${humanSize(s.progress.bytesRead)}  ${humanRate(s.progress.processingRate)}\n`,
      );
    }
    // A maintenance step after the backup (a merge of a big increment takes a while): a line when
    // it starts and every 10 % of it (a step only moves forward: a lower decile is the next step of
    // the same name, e.g. the second of two merges).
    const step = s.state === 'running' ? runningStep(s) : undefined;
    if (step && (step.key !== this.#step?.key || Math.floor(step.percent / 10) !== this.#step.decile)) {
      this.#step = { key: step.key, decile: Math.floor(step.percent / 10) };
      this.#output.out(`${localTime(new Date())}  maintenance  ${step.text}\n`);
    }
  }

  note(text: string): void {
    this.#output.err(`${text}\n`);
  }

  finish(s: Session): void {
    this.update(s);
    this.#output.out(sessionSummary(s) + '\n');
  }
}

/** A progress bar on the terminal (stderr), log lines printed above it. */
export class BarView implements SessionView {
  readonly #output: Output;
  readonly #bars: cliProgress.MultiBar;
  #bar: cliProgress.SingleBar | undefined;
  #logLines = 0;

  constructor(output: Output, stream: NodeJS.WritableStream = process.stderr) {
    this.#output = output;
    this.#bars = new cliProgress.MultiBar(
      {
        stream,
        format: ' {state} [{bar}] {percentage}% | {rate} | ETA {eta_formatted} | read {read}{step}',
        hideCursor: true,
        clearOnComplete: true,
        etaBuffer: 20,
        fps: 5,
      },
      cliProgress.Presets.shades_classic,
    );
  }

  update(s: Session): void {
    const step = s.state === 'running' ? runningStep(s) : undefined;
    const values = { state: s.state.padEnd(7), rate: humanRate(s.progress.processingRate), read: humanSize(s.progress.bytesRead), step: step ? ` | ${step.text}` : '' };
    for (const line of s.log.slice(this.#logLines)) this.#bars.log(`${localTime(line.time)}  ${line.level.padEnd(7)}  ${line.message}\n`);
    this.#logLines = Math.max(this.#logLines, s.log.length);
    if (!this.#bar) this.#bar = this.#bars.create(100, 0, values);
    this.#bar.update(Math.min(100, Math.max(0, s.progress.percent)), values);
  }

  note(text: string): void {
    this.#bars.log(`${text}\n`);
  }

  finish(s: Session): void {
    this.update(s);
    // Log lines wait for the next redraw; draw now so the last ones are not lost on stop.
    this.#bars.update();
    this.#bars.stop();
    this.#output.out(sessionSummary(s) + '\n');
  }
}

/** `--json`: every update as one line of JSON (`follow`), or only the last (`wait`). */
export class JsonView implements SessionView {
  readonly #output: Output;
  readonly #everyUpdate: boolean;

  constructor(output: Output, everyUpdate: boolean) {
    this.#output = output;
    this.#everyUpdate = everyUpdate;
  }

  update(s: Session): void {
    if (this.#everyUpdate) this.#output.out(JSON.stringify(s) + '\n');
  }

  note(text: string): void {
    this.#output.err(`${text}\n`);
  }

  finish(s: Session): void {
    this.#output.out(this.#everyUpdate ? JSON.stringify(s) + '\n' : JSON.stringify(s, null, 2) + '\n');
  }
}

export interface FollowOptions {
  view: SessionView;
  /** How long the server may be unreachable before giving up. */
  reconnectLimitMs: number;
  sleep?: (ms: number) => Promise<void>;
}

/**
 * Follows session `id` until it ends and returns its last state. Each `event: session` carries
 * the whole session object. When the stream ends early or the connection breaks, the session is
 * read again and the stream re-opened, with backoff, for up to `reconnectLimitMs`.
 */
export async function followSession(client: ApiClient, id: string, opts: FollowOptions): Promise<Session> {
  const sleep = opts.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
  const reconnect = new Reconnect({
    limitMs: opts.reconnectLimitMs,
    sleep,
    onRetry: (err, delay) => opts.view.note(`lost the server (${err.message}); trying again in ${(delay / 1000).toFixed(1)} s`),
  });
  const path = `/sessions/${encodeURIComponent(id)}`;
  let last: Session | undefined;
  let wasLost = false;
  const seen = (s: Session): void => {
    last = s;
    opts.view.update(s);
  };
  for (;;) {
    try {
      if (wasLost || !last) {
        // Read the current state first: the stream may have nothing new to say about it.
        const current = await client.get<Session>(path);
        if (wasLost) opts.view.note('connected to the server again');
        wasLost = false;
        reconnect.reachable();
        seen(current);
        if (isFinalState(current.state)) break;
      }
      await client.events(`${path}/events`, (event) => {
        if (event.event !== 'session') return;
        reconnect.reachable();
        seen(JSON.parse(event.data) as Session);
      });
      if (last && isFinalState(last.state)) break;
      // The stream ended although the session did not: read it again, then re-subscribe.
      const current = await client.get<Session>(path);
      seen(current);
      if (isFinalState(current.state)) break;
      await sleep(1000);
    } catch (err) {
      wasLost = true;
      await reconnect.failed(err);
    }
  }
  if (!last) throw new Error(`session ${id}: no state was read`); // unreachable: the loop reads before it breaks
  opts.view.finish(last);
  return last;
}
