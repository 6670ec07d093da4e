// The job scheduler: keeps one timer per scheduled job on an injected Clock, starts sessions
// through the job engine, runs once what was missed while the server was down, chains "after
// job X" schedules on X's success or warning, and runs the daily configuration backup.
import { describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { RunOptions, RunResult, SessionEvent } from '../jobs/engine.js';
import { systemClock, type Clock, type Timer } from './clock.js';
import { isInsideWindow, missedRunSince, nextRun, type BackupWindow, type Schedule, type TimeOfDay } from './schedule.js';

const log = logger('scheduler');

/** A job as the scheduler sees it. */
export interface ScheduledJob {
  id: string;
  name: string;
  enabled: boolean;
  /** No schedule: the job runs only by hand. */
  schedule?: Schedule | undefined;
  /** Start of the job's last session, if it ever ran. */
  lastRunAt?: Date | undefined;
  /** When the job was created or last enabled: the origin for missed-run detection. */
  scheduledSince: Date;
  /** Hours the job may run in; a run falling due outside them is skipped. */
  window?: BackupWindow | undefined;
}

/** The scheduler's read port onto the configuration database. */
export interface SchedulerStore {
  listScheduledJobs(): Promise<ScheduledJob[]>;
}

/** What the scheduler needs of the job engine (JobEngine satisfies it). */
export interface SchedulerEngine {
  runNow(jobIdOrName: string, opts?: RunOptions): Promise<RunResult>;
  subscribe(listener: (event: SessionEvent) => void): () => void;
}

export interface SchedulerOptions {
  engine: SchedulerEngine;
  store: SchedulerStore;
  clock?: Clock | undefined;
  /** Time zone of schedules that name none (default: the server's). */
  timeZone?: string | undefined;
  /** Run once at start-up what was missed while the server was down (default true). */
  runMissed?: boolean | undefined;
  /** The daily configuration backup: `run` is called every day at `at` (server time zone). */
  configBackup?: { at?: TimeOfDay | undefined; run: () => Promise<void> } | undefined;
}

export interface SkippedRun {
  jobId: string;
  jobName: string;
  at: Date;
  reason: string;
}

export interface UpcomingRun {
  jobId: string;
  jobName: string;
  at: Date;
}

/**
 * @example
 * const scheduler = new Scheduler({ engine, store, configBackup: { run: () => backupConfig() } });
 * await engine.recoverInterruptedSessions();
 * await scheduler.start();
 * // after any job create / edit / enable / disable / delete:
 * await scheduler.reload();
 */
export class Scheduler {
  readonly #engine: SchedulerEngine;
  readonly #store: SchedulerStore;
  readonly #clock: Clock;
  readonly #timeZone: string | undefined;
  readonly #runMissed: boolean;
  readonly #configBackup: SchedulerOptions['configBackup'];
  #jobs: ScheduledJob[] = [];
  readonly #timers = new Map<string, { timer: Timer; at: Date; schedule: string }>();
  /** When each job last fired in this process (newer than the store's lastRunAt). */
  readonly #lastFired = new Map<string, Date>();
  #configTimer: Timer | undefined;
  #unsubscribe: (() => void) | undefined;
  #running = false;
  /** Job id -> the chain of job ids whose "after job" links started its current session. */
  readonly #chains = new Map<string, string[]>();
  /** Recent runs that fell due but did not start, newest last (at most 100). */
  #skipped: SkippedRun[] = [];

  constructor(opts: SchedulerOptions) {
    this.#engine = opts.engine;
    this.#store = opts.store;
    this.#clock = opts.clock ?? systemClock;
    this.#timeZone = opts.timeZone;
    this.#runMissed = opts.runMissed ?? true;
    this.#configBackup = opts.configBackup;
  }

  /** Loads the jobs, starts what was missed, and arms every timer. */
  async start(): Promise<void> {
    if (this.#running) return;
    this.#running = true;
    this.#unsubscribe = this.#engine.subscribe((e) => this.#onSessionEvent(e));
    this.#jobs = await this.#store.listScheduledJobs();
    const now = this.#clock.now();
    if (this.#runMissed) {
      for (const job of this.#jobs) {
        if (!job.enabled || job.schedule === undefined) continue;
        const since = job.lastRunAt ?? job.scheduledSince;
        const missed = missedRunSince(job.schedule, since, now, this.#timeZone);
        if (missed === undefined) continue;
        log.info({ job: job.name, missed: missed.toISOString() }, 'running a job whose scheduled run was missed');
        this.#lastFired.set(job.id, now);
        await this.#trigger(job, 'missed-run');
      }
    }
    this.#armAll();
    this.#armConfigBackup();
  }

  /** Re-reads the jobs (after any change to a job) and re-arms the timers that changed. */
  async reload(): Promise<void> {
    if (!this.#running) return;
    this.#jobs = await this.#store.listScheduledJobs();
    this.#armAll();
  }

  /** Cancels every timer; running sessions go on. */
  stop(): void {
    this.#running = false;
    this.#unsubscribe?.();
    for (const t of this.#timers.values()) t.timer.cancel();
    this.#timers.clear();
    this.#configTimer?.cancel();
    this.#configTimer = undefined;
  }

  /** The next time each scheduled job will run, soonest first (for `job list`). */
  upcoming(): UpcomingRun[] {
    const byId = new Map(this.#jobs.map((j) => [j.id, j]));
    return [...this.#timers.entries()]
      .map(([jobId, t]) => ({ jobId, jobName: byId.get(jobId)?.name ?? jobId, at: t.at }))
      .sort((a, b) => a.at.getTime() - b.at.getTime());
  }

  /** Runs that fell due but were skipped (job still running, outside its window), newest last. */
  skippedRuns(): SkippedRun[] {
    if (this.#skipped.length > 100) this.#skipped = this.#skipped.slice(-100);
    return [...this.#skipped];
  }

  #armAll(): void {
    const seen = new Set<string>();
    for (const job of this.#jobs) {
      seen.add(job.id);
      const key = JSON.stringify(job.schedule ?? null);
      const existing = this.#timers.get(job.id);
      if (!job.enabled || job.schedule === undefined || job.schedule.kind === 'after-job') {
        existing?.timer.cancel();
        this.#timers.delete(job.id);
        continue;
      }
      if (existing !== undefined && existing.schedule === key) continue;
      existing?.timer.cancel();
      this.#arm(job);
    }
    for (const [id, t] of this.#timers) {
      if (!seen.has(id)) {
        t.timer.cancel();
        this.#timers.delete(id);
      }
    }
  }

  #arm(job: ScheduledJob): void {
    const schedule = job.schedule;
    if (schedule === undefined || !this.#running) return;
    const now = this.#clock.now();
    // Periodic schedules count from the previous run; calendar schedules from now.
    const anchor = schedule.kind === 'periodic' ? (this.#lastFired.get(job.id) ?? lastRunOrNow(job.lastRunAt, now)) : now;
    let at: Date | undefined;
    try {
      at = nextRun(schedule, anchor, this.#timeZone);
    } catch (err) {
      log.error({ job: job.name, err: describeError(err) }, 'the job has a schedule that cannot be evaluated; it will not run on its own');
      return;
    }
    if (at === undefined) return;
    if (at.getTime() < now.getTime()) at = now;
    const timer = this.#clock.setTimer(at.getTime() - now.getTime(), () => {
      this.#timers.delete(job.id);
      this.#lastFired.set(job.id, this.#clock.now());
      void this.#trigger(job, 'schedule').finally(() => {
        const current = this.#jobs.find((j) => j.id === job.id);
        if (current !== undefined && current.enabled && !this.#timers.has(job.id)) this.#arm(current);
      });
    });
    this.#timers.set(job.id, { timer, at, schedule: JSON.stringify(schedule) });
  }

  async #trigger(job: ScheduledJob, trigger: 'schedule' | 'missed-run' | 'after-job', chain: string[] = [job.id]): Promise<void> {
    if (job.window !== undefined && !isInsideWindow(job.window, this.#clock.now(), this.#timeZone)) {
      log.info({ job: job.name, trigger }, 'skipped a run that fell due outside the backup window');
      this.#skipped.push({ jobId: job.id, jobName: job.name, at: this.#clock.now(), reason: 'outside the backup window' });
      return;
    }
    if (!this.#chains.has(job.id)) this.#chains.set(job.id, chain);
    try {
      const result = await this.#engine.runNow(job.id, { trigger, ifRunning: 'coalesce' });
      if (result.coalesced) {
        log.info({ job: job.name, reason: result.reason }, 'skipped a scheduled run: the job is still running');
        this.#skipped.push({ jobId: job.id, jobName: job.name, at: this.#clock.now(), reason: result.reason ?? 'the job is still running' });
      }
    } catch (err) {
      this.#chains.delete(job.id);
      log.error({ job: job.name, err: describeError(err) }, 'could not start a scheduled job');
    }
  }

  #onSessionEvent(event: SessionEvent): void {
    if (event.type !== 'ended') return;
    // The jobs whose chain started this session ("after job" links), to stop a cycle A → B → A.
    const chain = this.#chains.get(event.jobId) ?? [event.jobId];
    this.#chains.delete(event.jobId);
    if (!(event.state === 'success' || event.state === 'warning')) return;
    for (const job of this.#jobs) {
      const s = job.schedule;
      if (!job.enabled || s === undefined || s.kind !== 'after-job') continue;
      if (s.job !== event.jobId && s.job !== event.jobName) continue;
      if (chain.includes(job.id)) {
        const names = [...chain, job.id].map((id) => this.#jobs.find((j) => j.id === id)?.name ?? id).join(' → ');
        const reason = `"after job" schedules form a cycle: ${names}`;
        log.warn({ job: job.name }, `not starting the job again: ${reason}`);
        this.#skipped.push({ jobId: job.id, jobName: job.name, at: this.#clock.now(), reason });
        continue;
      }
      log.info({ job: job.name, after: event.jobName }, 'starting a job after the job it follows');
      void this.#trigger(job, 'after-job', [...chain, job.id]);
    }
  }

  #armConfigBackup(): void {
    const backup = this.#configBackup;
    if (backup === undefined || !this.#running) return;
    const schedule: Schedule = { kind: 'daily', at: backup.at ?? '03:00' };
    const now = this.#clock.now();
    const at = nextRun(schedule, now, this.#timeZone);
    if (at === undefined) return;
    this.#configTimer = this.#clock.setTimer(at.getTime() - now.getTime(), () => {
      void backup
        .run()
        .then(
          () => log.info('configuration backup done'),
          (err: unknown) => log.error({ err: describeError(err) }, 'the daily configuration backup failed'),
        )
        .finally(() => this.#armConfigBackup());
    });
  }
}

function lastRunOrNow(a: Date | undefined, b: Date): Date {
  return a === undefined || a.getTime() > b.getTime() ? b : a;
}

/**
 * The first cycle among "after job" schedules (names, first repeated at the end), or undefined.
 * The server refuses a job edit that would create one; the scheduler also stops a cycle at run time.
 */
export function findAfterJobCycle(jobs: ReadonlyArray<Pick<ScheduledJob, 'id' | 'name' | 'schedule'>>): string[] | undefined {
  const byRef = new Map<string, Pick<ScheduledJob, 'id' | 'name' | 'schedule'>>();
  for (const j of jobs) {
    byRef.set(j.id, j);
    byRef.set(j.name, j);
  }
  const predecessorOf = (j: Pick<ScheduledJob, 'schedule'>) => (j.schedule?.kind === 'after-job' ? byRef.get(j.schedule.job) : undefined);
  for (const start of jobs) {
    const path: string[] = [];
    for (let cur: typeof start | undefined = start; cur !== undefined; cur = predecessorOf(cur)) {
      if (path.includes(cur.id)) {
        const names = path.slice(path.indexOf(cur.id)).map((id) => byRef.get(id)!.name);
        return [...names, cur.name].reverse();
      }
      path.push(cur.id);
    }
  }
  return undefined;
}
