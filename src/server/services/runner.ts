// How the API starts and stops job runs. The server wires the job engine (src/server/jobs/)
// behind this interface; `SimulatedJobRunner` is the stand-in that moves no data and says so.
import { BulwarkError } from '../../common/errors.js';
import { getJobRow } from './jobs.js';
import { addTask, appendLog, createSession, getSession, updateSession, updateTask, type SessionEvents } from './sessions.js';
import type { ServiceContext } from './common.js';

export interface JobRunner {
  /** Starts a session of the job now; refuses (conflict) when the job is running. */
  run(job: string, opts: { full: boolean }): Promise<{ sessionId: string }>;
  /** Stops a running session; the session ends in state `stopped`. */
  stop(sessionId: string, reason: string): Promise<void>;
  close(): Promise<void>;
}

/**
 * Runs a job as a simulation: one task per VM that "succeeds" after a short delay, with the
 * session log saying plainly that no data moved. Used until the data path is wired.
 */
export class SimulatedJobRunner implements JobRunner {
  readonly #ctx: ServiceContext;
  readonly #events: SessionEvents;
  readonly #running = new Map<string, { job: string; stop: AbortController; done: Promise<void> }>();
  readonly #stepMs: number;

  constructor(ctx: ServiceContext, events: SessionEvents, stepMs = 50) {
    this.#ctx = ctx;
    this.#events = events;
    this.#stepMs = stepMs;
  }

  async run(jobName: string, opts: { full: boolean }): Promise<{ sessionId: string }> {
    const job = await getJobRow(this.#ctx, jobName);
    for (const [id, r] of this.#running) {
      if (r.job === job.id) throw new BulwarkError(`job "${job.name}" is already running (session ${id})`, { kind: 'conflict', context: { job: job.name, session: id } });
    }
    const sessionId = await createSession(this.#ctx, { jobId: job.id, jobName: job.name, full: opts.full });
    const stop = new AbortController();
    const vms = JSON.parse(job.objects) as string[];
    const done = this.#simulate(sessionId, vms, stop.signal).finally(() => this.#running.delete(sessionId));
    this.#running.set(sessionId, { job: job.id, stop, done });
    return { sessionId };
  }

  async #simulate(sessionId: string, vms: string[], signal: AbortSignal): Promise<void> {
    const ctx = this.#ctx;
    const changed = () => this.#events.changed(sessionId);
    const pause = () => new Promise<void>((resolve) => setTimeout(resolve, this.#stepMs));
    try {
      const tasks = await Promise.all(vms.map((vm) => addTask(ctx, sessionId, { vm, disk: '*' })));
      await updateSession(ctx, sessionId, { state: 'running' });
      await appendLog(ctx, sessionId, 'warning', 'simulated: no data moved (the data path is not wired into this server yet)');
      changed();
      for (const [i, taskId] of tasks.entries()) {
        await pause();
        if (signal.aborted) break;
        await updateTask(ctx, taskId, { state: 'running' });
        await updateTask(ctx, taskId, { state: 'success', message: 'simulated: no data moved', progress: { percent: 100 } });
        await updateSession(ctx, sessionId, { progress: { percent: Math.round(((i + 1) / tasks.length) * 100) } });
        changed();
      }
      if (signal.aborted) {
        const s = await getSession(ctx, sessionId);
        for (const t of s.tasks) if (t.state === 'queued' || t.state === 'running') await updateTask(ctx, t.id, { state: 'stopped' });
        await updateSession(ctx, sessionId, { state: 'stopped', reason: String(signal.reason ?? 'stopped') });
      } else {
        await updateSession(ctx, sessionId, { state: 'warning', reason: 'simulated: no data moved' });
      }
    } catch (err) {
      await updateSession(ctx, sessionId, { state: 'failed', reason: err instanceof Error ? err.message : String(err) }).catch(() => undefined);
    }
    changed();
  }

  async stop(sessionId: string, reason: string): Promise<void> {
    const r = this.#running.get(sessionId);
    if (!r) {
      const s = await getSession(this.#ctx, sessionId); // not-found names the id
      throw new BulwarkError(`session ${s.id} is not running (${s.state})`, { kind: 'conflict', context: { session: s.id } });
    }
    r.stop.abort(reason);
    await r.done;
  }

  async close(): Promise<void> {
    for (const r of this.#running.values()) r.stop.abort('the server is stopping');
    await Promise.all([...this.#running.values()].map((r) => r.done));
  }
}
