// The job engine: runs a job as a session — expands its VMs into one task per disk, waits for a
// task slot for each, hands each task to the executor, retries failed tasks, stops at the end of
// the backup window or on request, and records every step through the store port.
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { sleep, systemClock, type Clock, type Timer } from '../scheduler/clock.js';
import { windowEndsAt } from '../scheduler/schedule.js';
import {
  UnlimitedTaskSlots,
  canTransition,
  isFinalState,
  zeroSessionProgress,
  zeroTransfer,
  type DiskRef,
  type DiskResolver,
  type JobDefinition,
  type JobEngineStore,
  type LogLevel,
  type NewTask,
  type SessionProgress,
  type SessionState,
  type SessionTrigger,
  type TaskExecutor,
  type TaskPatch,
  type TaskRecord,
  type TaskSlots,
  type TaskSpec,
  type TaskState,
  type TransferProgress,
} from './ports.js';

const log = logger('job-engine');

export interface JobEngineOptions {
  store: JobEngineStore;
  executor: TaskExecutor;
  disks: DiskResolver;
  /** The resource scheduler; default {@link UnlimitedTaskSlots}. */
  slots?: TaskSlots | undefined;
  clock?: Clock | undefined;
  /** Time zone for backup windows that name none (default: the server's). */
  timeZone?: string | undefined;
  /** The global "sequential processing" setting: one task at a time within a session. */
  sequential?: (() => boolean) | undefined;
  /** Least time between two stored progress updates of one task (default 1000 ms). */
  progressIntervalMs?: number | undefined;
}

export interface RunOptions {
  /** Force a full backup. */
  full?: boolean | undefined;
  trigger?: SessionTrigger | undefined;
  /**
   * What to do when the job is already running: `refuse` (default) throws a conflict error naming
   * the running session; `coalesce` returns the running session instead (the scheduler's choice).
   */
  ifRunning?: 'refuse' | 'coalesce' | undefined;
  /** Only these VMs of the job (a quick backup of one VM); default: all of the job's VMs. */
  vms?: string[] | undefined;
  /** Merged over the job's settings for this session only (e.g. `operation: 'health-check'`). */
  settings?: Readonly<Record<string, unknown>> | undefined;
  /** No automatic retry of failed tasks in this session (e.g. a health check). */
  noRetries?: boolean | undefined;
}

export interface RunResult {
  sessionId: string;
  /** True when the job was already running and `sessionId` is that session. */
  coalesced: boolean;
  /** Why no new session was started, when coalesced. */
  reason?: string | undefined;
}

/** Sent to subscribers after the store holds the change. */
export interface SessionEvent {
  type: 'changed' | 'ended';
  sessionId: string;
  jobId: string;
  jobName: string;
  state: SessionState;
  trigger: SessionTrigger;
}

interface TaskRuntime {
  record: TaskRecord;
  disk: DiskRef;
  lastProgressWrite: number;
  /** Failed only because a sibling task of its restore point failed (see #failUncommitted). */
  revoked?: boolean;
}

interface ActiveSession {
  id: string;
  job: JobDefinition;
  full: boolean;
  trigger: SessionTrigger;
  startedAt: Date;
  abort: AbortController;
  /** Set when the session is being stopped: why, in the user's words. */
  stopReason?: string | undefined;
  tasks: TaskRuntime[];
  /** Store writes of this session, in order (a late progress write never overtakes a final state). */
  writes: Promise<void>;
  done: Promise<SessionState>;
}

/**
 * Runs jobs. One job never runs twice at once: a second start is refused (or coalesced, see
 * {@link RunOptions.ifRunning}).
 *
 * @example
 * const engine = new JobEngine({ store, executor: new FakeTaskExecutor(), disks });
 * await engine.recoverInterruptedSessions(); // once, at server start, before the scheduler
 * const { sessionId } = await engine.runNow('nightly', { trigger: 'manual' });
 * engine.subscribe((e) => { if (e.type === 'ended') console.log(e.sessionId, e.state); });
 */
export class JobEngine {
  readonly #store: JobEngineStore;
  readonly #executor: TaskExecutor;
  readonly #disks: DiskResolver;
  readonly #slots: TaskSlots;
  readonly #clock: Clock;
  readonly #timeZone: string | undefined;
  readonly #sequential: () => boolean;
  readonly #progressIntervalMs: number;
  /** Active sessions by job id (a reservation exists from the moment a start is accepted). */
  readonly #byJob = new Map<string, Promise<ActiveSession>>();
  readonly #bySession = new Map<string, ActiveSession>();
  readonly #listeners = new Set<(event: SessionEvent) => void>();

  constructor(opts: JobEngineOptions) {
    this.#store = opts.store;
    this.#executor = opts.executor;
    this.#disks = opts.disks;
    this.#slots = opts.slots ?? new UnlimitedTaskSlots();
    this.#clock = opts.clock ?? systemClock;
    this.#timeZone = opts.timeZone;
    this.#sequential = opts.sequential ?? (() => false);
    this.#progressIntervalMs = opts.progressIntervalMs ?? 1000;
  }

  /**
   * Marks sessions (and their tasks) that a crash or kill left queued or running as failed, with
   * the reason. Call once at server start, before anything runs. Returns how many it closed.
   */
  async recoverInterruptedSessions(): Promise<number> {
    const open = await this.#store.listSessionsInState(['queued', 'running']);
    let closed = 0;
    for (const s of open) {
      if (this.#bySession.has(s.id)) continue;
      const now = this.#clock.now();
      for (const t of await this.#store.listTasks(s.id)) {
        if (isFinalState(t.state)) continue;
        await this.#store.updateTask(t.id, { state: 'failed', endedAt: now, message: 'the server stopped while this task was running' });
      }
      const reason = `the server stopped while this session was ${s.state} (crash or restart)`;
      await this.#store.appendLog(s.id, { time: now, level: 'error', message: `Session failed: ${reason}` });
      await this.#store.updateSession(s.id, { state: 'failed', endedAt: now, reason });
      log.warn({ session: s.id, job: s.jobName }, 'marked an interrupted session as failed');
      closed++;
    }
    return closed;
  }

  /** Starts a session of the job (id or name) now. */
  async runNow(jobIdOrName: string, opts: RunOptions = {}): Promise<RunResult> {
    const loaded = await this.#store.loadJob(jobIdOrName);
    if (loaded === undefined) {
      throw new BulwarkError(`there is no job ${jobIdOrName}`, { kind: 'not-found', context: { job: jobIdOrName } });
    }
    const job: JobDefinition = {
      ...loaded,
      ...(opts.vms ? { vms: opts.vms } : {}),
      ...(opts.settings ? { settings: { ...loaded.settings, ...opts.settings } } : {}),
      ...(opts.noRetries ? { retry: { count: 0, waitSeconds: 0 } } : {}),
    };
    const running = this.#byJob.get(job.id);
    if (running !== undefined) {
      const active = await running;
      const reason = `job ${job.name} is already running (session ${active.id})`;
      if (opts.ifRunning === 'coalesce') return { sessionId: active.id, coalesced: true, reason };
      throw new BulwarkError(reason, {
        kind: 'conflict',
        context: { job: job.name, session: active.id },
        hint: 'wait for it to end, or stop it first',
      });
    }
    // Reserve synchronously: a second runNow arriving while the session row is created sees it.
    const trigger = opts.trigger ?? 'manual';
    const full = opts.full ?? false;
    const reservation = this.#start(job, trigger, full);
    this.#byJob.set(job.id, reservation);
    try {
      const active = await reservation;
      return { sessionId: active.id, coalesced: false };
    } catch (err) {
      this.#byJob.delete(job.id);
      throw err;
    }
  }

  /**
   * Stops a running session: tasks waiting for a slot never start, running ones are aborted
   * (their executors see the signal), the session ends as `stopped`. Resolves once requested.
   */
  async stop(sessionId: string, opts: { by?: string | undefined; reason?: string | undefined } = {}): Promise<void> {
    const active = this.#bySession.get(sessionId);
    if (active === undefined) {
      const s = await this.#store.loadSession(sessionId);
      if (s === undefined) throw new BulwarkError(`there is no session ${sessionId}`, { kind: 'not-found', context: { session: sessionId } });
      throw new BulwarkError(`session ${sessionId} of job ${s.jobName} is not running (it is ${s.state})`, {
        kind: 'conflict',
        context: { session: sessionId, job: s.jobName },
      });
    }
    this.#abort(active, opts.reason ?? (opts.by === undefined ? 'stopped by a user' : `stopped by ${opts.by}`));
  }

  /** Stops every running session (server shutdown) and waits for them to end. */
  async shutdown(): Promise<void> {
    const all = [...this.#bySession.values()];
    for (const a of all) this.#abort(a, 'the server shut down');
    await Promise.all(all.map((a) => a.done));
  }

  /** The session of a job that is running now, if any. */
  runningSessionOf(jobId: string): string | undefined {
    for (const a of this.#bySession.values()) if (a.job.id === jobId) return a.id;
    return undefined;
  }

  /** Ids of the sessions running now. */
  runningSessions(): string[] {
    return [...this.#bySession.keys()];
  }

  /** Resolves with the final state when the session ends (at once for a session that is not running). */
  async waitForEnd(sessionId: string): Promise<SessionState> {
    const active = this.#bySession.get(sessionId);
    if (active !== undefined) return active.done;
    const s = await this.#store.loadSession(sessionId);
    if (s === undefined) throw new BulwarkError(`there is no session ${sessionId}`, { kind: 'not-found', context: { session: sessionId } });
    return s.state;
  }

  /** Calls `listener` on every stored change of any session; returns the unsubscribe function. */
  subscribe(listener: (event: SessionEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  async #start(job: JobDefinition, trigger: SessionTrigger, full: boolean): Promise<ActiveSession> {
    const startedAt = this.#clock.now();
    const id = await this.#store.createSession({
      jobId: job.id,
      jobName: job.name,
      state: 'queued',
      trigger,
      full,
      startedAt,
      progress: zeroSessionProgress,
    });
    let settle!: (s: SessionState) => void;
    const active: ActiveSession = {
      id,
      job,
      full,
      trigger,
      startedAt,
      abort: new AbortController(),
      tasks: [],
      writes: Promise.resolve(),
      done: new Promise<SessionState>((resolve) => (settle = resolve)),
    };
    this.#bySession.set(id, active);
    this.#emit(active, 'changed', 'queued');
    void this.#run(active).then(settle, (err: unknown) => {
      log.error({ session: id, err: describeError(err) }, 'session runner failed');
      settle('failed');
    });
    return active;
  }

  async #run(active: ActiveSession): Promise<SessionState> {
    const { job } = active;
    let windowTimer: Timer | undefined;
    let failure: string | undefined;
    try {
      await this.#updateSession(active, { state: 'running' }, 'running');
      this.#log(active, 'info', `Job ${job.name} started (${describeTrigger(active.trigger)}${active.full ? ', full backup' : ''})`);
      windowTimer = this.#armWindow(active);

      await this.#expand(active);
      if (active.tasks.length === 0) {
        failure = 'the job has no VMs to back up';
      } else {
        await this.#runTasks(active, active.tasks);
        for (let retry = 1; retry <= job.retry.count; retry++) {
          const again = active.tasks.filter((t) => t.record.state === 'failed' && t.record.disk !== '*');
          if (again.length === 0 || active.abort.signal.aborted) break;
          this.#log(active, 'info', `Retrying ${again.length} failed task(s) in ${job.retry.waitSeconds} s (retry ${retry} of ${job.retry.count})`);
          try {
            await sleep(this.#clock, job.retry.waitSeconds * 1000, active.abort.signal);
          } catch {
            break;
          }
          for (const t of again) {
            t.revoked = false;
            this.#setTask(active, t, 'queued', {
              attempt: t.record.attempt + 1,
              stageBusy: undefined,
              message: undefined,
              startedAt: undefined,
              endedAt: undefined,
              progress: { ...zeroTransfer, total: t.disk.sizeBytes ?? 0 },
            });
          }
          await this.#runTasks(active, again);
        }
      }
    } catch (err) {
      failure = `the session could not run: ${describeError(err)}`;
      log.error({ session: active.id, job: job.name, err: describeError(err) }, 'session failed');
    } finally {
      windowTimer?.cancel();
    }
    return this.#finish(active, failure);
  }

  /** Stops the session when its backup window ends. A manual run outside the window is not stopped. */
  #armWindow(active: ActiveSession): Timer | undefined {
    const window = active.job.window;
    if (window === undefined) return undefined;
    const now = this.#clock.now();
    const endsAt = windowEndsAt(window, now, this.#timeZone);
    if (endsAt === undefined) return undefined;
    if (endsAt.getTime() <= now.getTime()) {
      if (active.trigger === 'manual') {
        this.#log(active, 'info', 'Started by hand outside the backup window: the window will not stop it');
      } else {
        this.#abort(active, 'outside the backup window');
      }
      return undefined;
    }
    return this.#clock.setTimer(endsAt.getTime() - now.getTime(), () =>
      this.#abort(active, `stopped at the end of the backup window (${endsAt.toISOString()})`),
    );
  }

  /** One task per disk of every VM; a VM whose disks cannot be listed gets one failed task `*`. */
  async #expand(active: ActiveSession): Promise<void> {
    const { job } = active;
    const planned: Array<{ task: NewTask; disk: DiskRef }> = [];
    for (const vm of job.vms) {
      if (active.abort.signal.aborted) break;
      try {
        const disks = await this.#disks.resolveDisks(job, vm, active.abort.signal);
        if (disks.length === 0) this.#log(active, 'warning', `VM ${vm} has no disks to back up`);
        for (const disk of disks) {
          planned.push({
            disk,
            task: { vm, disk: disk.name, state: 'queued', attempt: 1, progress: { ...zeroTransfer, total: disk.sizeBytes ?? 0 } },
          });
        }
      } catch (err) {
        if (active.abort.signal.aborted) break;
        const message = `cannot list the disks of VM ${vm}: ${describeError(err)}`;
        this.#log(active, 'error', message);
        planned.push({
          disk: { name: '*' },
          task: { vm, disk: '*', state: 'failed', attempt: 1, progress: zeroTransfer, message, endedAt: this.#clock.now() },
        });
      }
    }
    const ids = await this.#store.createTasks(
      active.id,
      planned.map((p) => p.task),
    );
    active.tasks = planned.map((p, i) => ({ record: { ...p.task, id: ids[i]!, sessionId: active.id }, disk: p.disk, lastProgressWrite: 0 }));
    const disks = active.tasks.filter((t) => t.record.disk !== '*').length;
    this.#log(active, 'info', `${job.vms.length} VM(s), ${disks} disk(s) to process`);
  }

  async #runTasks(active: ActiveSession, tasks: TaskRuntime[]): Promise<void> {
    // The disks of each VM in this round: the executor shares a VM's restore point among them.
    const vmDisks = new Map<string, string[]>();
    for (const t of tasks) if (t.record.disk !== '*') vmDisks.set(t.record.vm, [...(vmDisks.get(t.record.vm) ?? []), t.record.disk]);
    if (this.#sequential()) {
      for (const t of tasks) await this.#runTask(active, t, vmDisks.get(t.record.vm) ?? []);
    } else {
      await Promise.all(tasks.map((t) => this.#runTask(active, t, vmDisks.get(t.record.vm) ?? [])));
    }
    this.#failUncommitted(active, tasks);
  }

  /**
   * The disk tasks of one restore point (a VM's; with storage per-job, every VM's of the job) stand
   * or fall together: the point is committed only when all of them are done. A task of this round
   * that ended success or warning while a sibling failed or was stopped wrote its disk into a point
   * that was never committed: it fails too, naming the sibling (and a retry round runs it again).
   * Health checks check each disk on its own and are left alone.
   */
  #failUncommitted(active: ActiveSession, tasks: readonly TaskRuntime[]): void {
    const settings = active.job.settings ?? {};
    if (settings.operation === 'health-check') return;
    const perJob = settings.storage === 'per-job';
    const groups = new Map<string, TaskRuntime[]>();
    for (const t of tasks) {
      const key = perJob ? '' : t.record.vm;
      groups.set(key, [...(groups.get(key) ?? []), t]);
    }
    for (const group of groups.values()) {
      const candidates = group.filter((t) => (t.record.state === 'failed' || t.record.state === 'stopped') && !t.revoked);
      // A failure that names another failed disk of the point is a consequence of that one: name the cause.
      const broken = candidates.find((c) => !candidates.some((o) => o !== c && (c.record.message ?? '').includes(`disk ${o.record.disk}`))) ?? candidates[0];
      if (!broken) continue;
      const { vm, disk } = broken.record;
      const point = perJob ? `restore point of job ${active.job.name} (all its VMs)` : `restore point of VM ${vm}`;
      const cause =
        disk === '*'
          ? `the disks of VM ${vm} could not be listed`
          : `${perJob ? `VM ${vm} disk ${disk}` : `disk ${disk}`} ${broken.record.state === 'stopped' ? 'was stopped' : 'failed'}`;
      const message = `${point} not committed: ${cause}`;
      for (const t of group) {
        if (t.record.state !== 'success' && t.record.state !== 'warning') continue;
        t.revoked = true;
        this.#setTask(active, t, 'failed', { message, endedAt: t.record.endedAt, progress: t.record.progress, stageBusy: t.record.stageBusy });
        this.#log(active, 'error', `${t.record.vm}/${t.record.disk}: ${message}`, t.record.id);
      }
    }
  }

  #spec(active: ActiveSession, rt: TaskRuntime, vmDisks: readonly string[], proxy: string | undefined): TaskSpec {
    return {
      sessionId: active.id,
      taskId: rt.record.id,
      job: active.job,
      vm: rt.record.vm,
      disk: rt.disk,
      full: active.full,
      attempt: rt.record.attempt,
      proxy,
      vmDisks,
    };
  }

  #skipped(active: ActiveSession, rt: TaskRuntime, vmDisks: readonly string[], reason: string): void {
    try {
      this.#executor.taskSkipped?.(this.#spec(active, rt, vmDisks, undefined), reason);
    } catch (err) {
      log.error({ session: active.id, err: describeError(err) }, 'the executor failed to note a skipped task');
    }
  }

  async #runTask(active: ActiveSession, rt: TaskRuntime, vmDisks: readonly string[]): Promise<void> {
    const signal = active.abort.signal;
    const what = `${rt.record.vm}/${rt.record.disk}`;
    if (signal.aborted) {
      this.#setTask(active, rt, 'stopped', { endedAt: this.#clock.now(), message: active.stopReason });
      this.#skipped(active, rt, vmDisks, active.stopReason ?? 'stopped');
      return;
    }
    let lease;
    try {
      lease = await this.#slots.acquire(
        {
          sessionId: active.id,
          taskId: rt.record.id,
          jobId: active.job.id,
          vm: rt.record.vm,
          disk: rt.disk,
          repository: active.job.repository,
          proxy: active.job.proxy,
          onWaiting: (reasons) => this.#log(active, 'info', `${what}: waiting for a task slot: ${reasons.join('; ')}`, rt.record.id),
        },
        signal,
      );
    } catch (err) {
      if (signal.aborted) {
        this.#setTask(active, rt, 'stopped', { endedAt: this.#clock.now(), message: active.stopReason });
        this.#skipped(active, rt, vmDisks, active.stopReason ?? 'stopped');
      } else {
        const message = `no task slot: ${describeError(err)}`;
        this.#setTask(active, rt, 'failed', { endedAt: this.#clock.now(), message });
        this.#log(active, 'error', `${what}: ${message}`, rt.record.id);
        this.#skipped(active, rt, vmDisks, `${what}: ${message}`);
      }
      return;
    }
    try {
      this.#setTask(active, rt, 'running', { startedAt: this.#clock.now(), proxy: lease.proxy });
      this.#log(active, 'info', `${what}: started${lease.proxy === undefined ? '' : ` on proxy ${lease.proxy}`}${rt.record.attempt > 1 ? ` (attempt ${rt.record.attempt})` : ''}`, rt.record.id);
      const spec = this.#spec(active, rt, vmDisks, lease.proxy);
      const grant = lease;
      const outcome = await this.#executor.execute(spec, {
        signal,
        progress: (p) => this.#onProgress(active, rt, p),
        log: (level, message) => this.#log(active, level, `${what}: ${message}`, rt.record.id),
        rateLimit: () => grant.rateLimit?.(),
        watchRate: (listener) => grant.watchRate?.(listener) ?? (() => undefined),
        stageTimes: (busy) => {
          if (rt.record.state === 'running') rt.record.stageBusy = { ...busy };
        },
      });
      const messages = outcome.messages ?? [];
      for (const m of messages) this.#log(active, outcome.state === 'warning' ? 'warning' : 'info', `${what}: ${m}`, rt.record.id);
      this.#setTask(active, rt, outcome.state, {
        endedAt: this.#clock.now(),
        message: messages.length > 0 ? messages.join('; ') : undefined,
        progress: rt.record.progress,
        stageBusy: rt.record.stageBusy,
      });
      this.#log(active, 'info', `${what}: ${outcome.state === 'success' ? 'done' : 'done with warnings'}`, rt.record.id);
    } catch (err) {
      if (signal.aborted) {
        this.#setTask(active, rt, 'stopped', { endedAt: this.#clock.now(), message: active.stopReason, progress: rt.record.progress, stageBusy: rt.record.stageBusy });
        this.#log(active, 'warning', `${what}: ${active.stopReason ?? 'stopped'}`, rt.record.id);
      } else {
        const message = describeError(err);
        this.#setTask(active, rt, 'failed', { endedAt: this.#clock.now(), message, progress: rt.record.progress, stageBusy: rt.record.stageBusy });
        this.#log(active, 'error', `${what}: failed: ${message}`, rt.record.id);
      }
    } finally {
      lease.release();
    }
  }

  #onProgress(active: ActiveSession, rt: TaskRuntime, p: TransferProgress): void {
    if (rt.record.state !== 'running') return;
    rt.record.progress = { ...p };
    const now = this.#clock.now().getTime();
    if (now - rt.lastProgressWrite < this.#progressIntervalMs) return;
    rt.lastProgressWrite = now;
    const progress = { ...p };
    this.#write(active, async () => {
      await this.#store.updateTask(rt.record.id, { progress });
      await this.#store.updateSession(active.id, { progress: this.#sessionProgress(active) });
    }, true);
  }

  #sessionProgress(active: ActiveSession): SessionProgress {
    let bytesRead = 0;
    let bytesTransferred = 0;
    let bytesStored = 0;
    // Each task weighs as much as its disk; a finished task counts whole, a running one by its own
    // estimate of what it has left (with changed block tracking it reads far less than the disk).
    let weight = 0;
    let done = 0;
    for (const t of active.tasks) {
      const p = t.record.progress;
      bytesRead += p.bytesRead;
      bytesTransferred += p.bytesTransferred;
      bytesStored += p.bytesStored;
      const w = Math.max(1, t.disk.sizeBytes ?? p.total);
      weight += w;
      done += w * (isFinalState(t.record.state) ? 1 : p.total > 0 ? Math.min(1, p.bytesRead / p.total) : 0);
    }
    const percent = weight > 0 ? Math.min(100, Math.floor((done * 100) / weight)) : 0;
    const seconds = Math.max(1, (this.#clock.now().getTime() - active.startedAt.getTime()) / 1000);
    return { percent, bytesRead, bytesTransferred, bytesStored, processingRate: Math.round(bytesRead / seconds) };
  }

  #setTask(active: ActiveSession, rt: TaskRuntime, to: TaskState, patch: Omit<TaskPatch, 'state'> = {}): void {
    const from = rt.record.state;
    if (!canTransition('task', from, to)) {
      throw new BulwarkError(`task ${rt.record.vm}/${rt.record.disk} cannot go from ${from} to ${to}`, {
        context: { session: active.id, task: rt.record.id },
      });
    }
    rt.record = { ...rt.record, ...patch, state: to };
    const full: TaskPatch = { ...patch, state: to };
    this.#write(active, async () => {
      await this.#store.updateTask(rt.record.id, full);
      await this.#store.updateSession(active.id, { progress: this.#sessionProgress(active) });
    }, true);
  }

  async #updateSession(active: ActiveSession, patch: Parameters<JobEngineStore['updateSession']>[1], state: SessionState): Promise<void> {
    this.#write(active, () => this.#store.updateSession(active.id, patch), false);
    await active.writes;
    this.#emit(active, 'changed', state);
  }

  async #finish(active: ActiveSession, failure: string | undefined): Promise<SessionState> {
    const tasks = active.tasks.map((t) => t.record);
    // A task failed only because a sibling did comes after the sibling (the cause) in the reason.
    const failed = active.tasks.filter((t) => t.record.state === 'failed' && !t.revoked).concat(active.tasks.filter((t) => t.record.state === 'failed' && t.revoked)).map((t) => t.record);
    const warned = tasks.filter((t) => t.state === 'warning');
    let state: SessionState;
    let reason: string | undefined;
    if (active.stopReason !== undefined) {
      state = 'stopped';
      reason = active.stopReason;
    } else if (failure !== undefined) {
      state = 'failed';
      reason = failure;
    } else if (failed.length > 0) {
      state = 'failed';
      reason = `${failed.length} of ${tasks.length} task(s) failed; ${failed[0]!.vm}/${failed[0]!.disk}: ${failed[0]!.message ?? 'no message'}`;
    } else if (warned.length > 0) {
      state = 'warning';
      reason = `${warned.length} of ${tasks.length} task(s) ended with warnings; ${warned[0]!.vm}/${warned[0]!.disk}: ${warned[0]!.message ?? ''}`;
    } else {
      state = 'success';
    }
    const level: LogLevel = state === 'success' ? 'info' : state === 'warning' || state === 'stopped' ? 'warning' : 'error';
    this.#log(active, level, `Job ${active.job.name} ended: ${state}${reason === undefined ? '' : ` (${reason})`}`);
    const endedAt = this.#clock.now();
    this.#write(active, () => this.#store.updateSession(active.id, { state, endedAt, reason, progress: this.#sessionProgress(active) }), false);
    await active.writes;
    this.#bySession.delete(active.id);
    this.#byJob.delete(active.job.id);
    this.#emit(active, 'ended', state);
    return state;
  }

  #abort(active: ActiveSession, reason: string): void {
    if (active.stopReason !== undefined) return;
    active.stopReason = reason;
    this.#log(active, 'warning', `Stopping: ${reason}`);
    active.abort.abort(new BulwarkError(reason, { kind: 'conflict', context: { session: active.id, job: active.job.name } }));
  }

  #log(active: ActiveSession, level: LogLevel, message: string, taskId?: string): void {
    const time = this.#clock.now();
    log[level === 'warning' ? 'warn' : level]({ session: active.id, job: active.job.name }, message);
    this.#write(active, () => this.#store.appendLog(active.id, { time, level, message, taskId }), false);
  }

  /** Queues a store write behind the session's earlier writes; a failed write is logged, not thrown. */
  #write(active: ActiveSession, op: () => Promise<void>, notify: boolean): void {
    active.writes = active.writes.then(op).then(
      () => {
        if (notify) this.#emit(active, 'changed', 'running');
      },
      (err: unknown) => log.error({ session: active.id, err: describeError(err) }, 'could not record session progress'),
    );
  }

  #emit(active: ActiveSession, type: SessionEvent['type'], state: SessionState): void {
    const event: SessionEvent = { type, sessionId: active.id, jobId: active.job.id, jobName: active.job.name, state, trigger: active.trigger };
    for (const l of this.#listeners) {
      try {
        l(event);
      } catch (err) {
        log.error({ err: describeError(err) }, 'a session listener threw');
      }
    }
  }
}

/**
 * The engine behind the API's `JobRunner` shape (`run(job, { full })`, `stop(id, reason)`,
 * `close()`), for the server to use in place of its simulated runner.
 */
export function asJobRunner(engine: JobEngine): {
  run(job: string, opts: { full: boolean }): Promise<{ sessionId: string }>;
  stop(sessionId: string, reason: string): Promise<void>;
  close(): Promise<void>;
} {
  return {
    run: async (job, opts) => ({ sessionId: (await engine.runNow(job, { full: opts.full, trigger: 'manual' })).sessionId }),
    stop: (sessionId, reason) => engine.stop(sessionId, { reason }),
    close: () => engine.shutdown(),
  };
}

function describeTrigger(trigger: SessionTrigger): string {
  switch (trigger) {
    case 'manual':
      return 'started by hand';
    case 'schedule':
      return 'by its schedule';
    case 'missed-run':
      return 'a run missed while the server was down';
    case 'after-job':
      return 'after the job it follows';
  }
}
