// Live progress of a repository transform (merge, synthetic full, compaction, the reverse
// increment a reverse injection builds): how far through the disks the step has come, told as the
// work proceeds but throttled, so a merge of a big increment is not silent for tens of seconds.
// Pure bookkeeping over counters the transforms keep anyway: it adds no repository read.
import { describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';

const log = logger('repository');

/** The maintenance step a transform is (the name the session shows). */
export type TransformStep = 'merge' | 'synthetic-full' | 'compact' | 'inject';

/** One progress report of a transform step. */
export interface TransformProgress {
  readonly step: TransformStep;
  /**
   * Disk bytes of the step's disks gone through (each table page counts its blocks' disk bytes,
   * advanced within a page as its block records are copied); reaches `bytesTotal` at the end.
   */
  readonly bytesDone: number;
  /** The disk bytes of every disk the step goes through (the sizes of the file's disks). */
  readonly bytesTotal: number;
  /** Repository bytes read so far by the step. */
  readonly bytesRead: number;
  /** Repository bytes written so far by the step. */
  readonly bytesWritten: number;
}

export type TransformProgressListener = (p: TransformProgress) => void;

/** How often a step reports: when either this much time or this many bytes passed since the last report. */
export interface ProgressThrottle {
  readonly everyMs: number;
  readonly everyBytes: number;
}

export const DEFAULT_PROGRESS_THROTTLE: ProgressThrottle = { everyMs: 250, everyBytes: 32 * 1024 * 1024 };

/** The last report told: when, and how far. */
export interface LastReport {
  readonly atMs: number;
  readonly bytesDone: number;
}

/**
 * Whether a step at `bytesDone` of `bytesTotal` at time `nowMs` reports now, while it runs: the
 * first report always; then only forward progress short of the total (the end is told by
 * StepProgress.end(), once the step's last byte is written), and only when `everyMs` or
 * `everyBytes` passed since the last report.
 */
export function shouldReport(last: LastReport | null, nowMs: number, bytesDone: number, bytesTotal: number, t: ProgressThrottle): boolean {
  if (last === null) return true;
  if (bytesDone <= last.bytesDone || bytesDone >= bytesTotal) return false;
  return nowMs - last.atMs >= t.everyMs || bytesDone - last.bytesDone >= t.everyBytes;
}

/** Options a transform takes for its progress. */
export interface TransformProgressOptions {
  readonly onProgress?: TransformProgressListener | undefined;
  /** Default DEFAULT_PROGRESS_THROTTLE. */
  readonly throttle?: ProgressThrottle | undefined;
}

/**
 * The progress of one step: start() tells 0, at() moves it forward (never back), end() tells the
 * total. `io()` gives the repository bytes read and written so far (the step's own counters).
 */
export class StepProgress {
  readonly step: TransformStep;
  readonly bytesTotal: number;
  readonly #listener: TransformProgressListener | undefined;
  readonly #throttle: ProgressThrottle;
  readonly #io: () => { bytesRead: number; bytesWritten: number };
  readonly #clock: () => number;
  #done = 0;
  #last: LastReport | null = null;
  #ended = false;

  constructor(
    step: TransformStep,
    bytesTotal: number,
    io: () => { bytesRead: number; bytesWritten: number },
    opts: TransformProgressOptions = {},
    clock: () => number = Date.now,
  ) {
    this.step = step;
    this.bytesTotal = Math.max(0, bytesTotal);
    this.#listener = opts.onProgress;
    this.#throttle = opts.throttle ?? DEFAULT_PROGRESS_THROTTLE;
    this.#io = io;
    this.#clock = clock;
  }

  get bytesDone(): number {
    return this.#done;
  }

  start(): void {
    this.#tell(true);
  }

  /** The step has gone through `bytesDone` disk bytes (clamped to 0..total; never moves back). */
  at(bytesDone: number): void {
    const d = Math.min(this.bytesTotal, Math.max(this.#done, Math.floor(bytesDone)));
    if (d === this.#done) return;
    this.#done = d;
    this.#tell(false);
  }

  /**
   * Within the span [from, to) of disk bytes (one table page), `copied` of `toCopy` record bytes
   * are copied: the step is that share of the way through the span.
   */
  within(from: number, to: number, copied: number, toCopy: number): void {
    this.at(toCopy > 0 ? from + ((to - from) * copied) / toCopy : to);
  }

  /** The step is done (its last byte written): tells the total and the step's whole I/O, once. */
  end(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#done = this.bytesTotal;
    this.#tell(true);
  }

  #tell(force: boolean): void {
    if (!this.#listener) return;
    const now = this.#clock();
    if (!force && !shouldReport(this.#last, now, this.#done, this.bytesTotal, this.#throttle)) return;
    this.#last = { atMs: now, bytesDone: this.#done };
    const io = this.#io();
    try {
      this.#listener({ step: this.step, bytesDone: this.#done, bytesTotal: this.bytesTotal, bytesRead: io.bytesRead, bytesWritten: io.bytesWritten });
    } catch (err) {
      // Progress is for the eye: a listener that fails (a lost link, a database write) never
      // stops the transform it watches.
      log.warn({ step: this.step, err: describeError(err) }, 'a progress listener failed; the step goes on');
    }
  }
}

/**
 * The disk-byte span of table page `page` of a disk starting at `diskBase` in the step's bytes:
 * [from, to), the last page cut at the disk's end.
 */
export function pageSpan(diskBase: number, diskSize: number, page: number, entriesPerPage: number, blockSize: number): { from: number; to: number } {
  const from = diskBase + Math.min(diskSize, page * entriesPerPage * blockSize);
  const to = diskBase + Math.min(diskSize, (page + 1) * entriesPerPage * blockSize);
  return { from, to };
}
