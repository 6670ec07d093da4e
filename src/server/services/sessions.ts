// Sessions (one run of a job, or one restore / instant recovery: `kind`), their tasks (one per VM
// disk) and log lines, plus the restore-point catalog. Every change to a session is announced on `SessionEvents`, which the SSE route follows.
import { EventEmitter } from 'node:events';
import type { Selectable, Updateable } from 'kysely';
import { assertNever, BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { isFinalState, type MaintenanceStepProgress } from '../jobs/ports.js';
import type { RestorePointTable, SessionKind, SessionState, SessionTable, SessionTaskTable } from '../db/schema.js';
import { invalid, isUniqueViolation, newId, notFound, nowIso, parseJson, type ServiceContext } from './common.js';
import type { LogLevelT, Progress, RestorePoint, Session, SessionTask } from './model.js';
import { parseStageBusy, sessionStageStats, stageStatsView } from '../resources/bottleneck.js';
import type { JobRunner } from './runner.js';

const recordLog = logger('sessions');

/** A session or task state that is never left (the job engine's definition). */
export const isFinal = (s: SessionState): boolean => isFinalState(s);

/** In-process notifications of session changes (by session id). */
export class SessionEvents {
  readonly #emitter = new EventEmitter();
  constructor() {
    this.#emitter.setMaxListeners(0);
  }
  changed(sessionId: string): void {
    this.#emitter.emit('changed', sessionId);
  }
  /** Calls `fn` on every change of any session; returns the unsubscribe function. */
  subscribe(fn: (sessionId: string) => void): () => void {
    this.#emitter.on('changed', fn);
    return () => this.#emitter.off('changed', fn);
  }
}

/**
 * The server's SessionEvents, by its configuration database: restore and instant recovery sessions
 * are written by services that do not hold the events (recovery, file restore), so their changes
 * are announced here (else `GET /sessions/{id}/events` of one would never say it ended).
 */
const announcers = new WeakMap<object, SessionEvents>();

/** Registers the server's SessionEvents for the database of `ctx` (the server does at start). */
export function announceSessionsOn(ctx: ServiceContext, events: SessionEvents): void {
  announcers.set(ctx.db, events);
}

function announce(ctx: ServiceContext, id: string): void {
  announcers.get(ctx.db)?.changed(id);
}

function progressOf(r: { percent: number; bytes_read: number; bytes_transferred: number; bytes_stored: number; processing_rate: number }): Progress {
  return {
    percent: Number(r.percent),
    bytesRead: Number(r.bytes_read),
    bytesTransferred: Number(r.bytes_transferred),
    bytesStored: Number(r.bytes_stored),
    processingRate: Number(r.processing_rate),
  };
}

/**
 * The task's maintenance step from its `step` column (JSON { name, bytesDone, bytesTotal }), as
 * the spread `{ step }`; nothing when none ran or the column does not hold one.
 */
export function taskStepOf(json: string | null | undefined): { step?: MaintenanceStepProgress } {
  const s = json ? parseJson<Partial<MaintenanceStepProgress> | null>(json, 'maintenance step of a session task') : null;
  if (!s || typeof s.name !== 'string' || typeof s.bytesDone !== 'number' || typeof s.bytesTotal !== 'number') return {};
  return { step: { name: s.name, bytesDone: s.bytesDone, bytesTotal: s.bytesTotal } };
}

function toTask(t: Selectable<SessionTaskTable>): SessionTask {
  return {
    id: t.id,
    vm: t.vm,
    disk: t.disk,
    state: t.state,
    ...(t.started_at ? { startedAt: t.started_at } : {}),
    ...(t.ended_at ? { endedAt: t.ended_at } : {}),
    progress: { ...progressOf(t), ...taskStepOf(t.step) },
    ...(t.message ? { message: t.message } : {}),
    ...(t.proxy ? { proxy: t.proxy } : {}),
    ...taskStages(t),
  };
}

/** A task's running time: start to end (or to now while it runs). */
function taskElapsedMs(t: Selectable<SessionTaskTable>): number {
  if (!t.started_at) return 0;
  return (t.ended_at ? Date.parse(t.ended_at) : Date.now()) - Date.parse(t.started_at);
}

function taskStages(t: Selectable<SessionTaskTable>): Pick<SessionTask, 'stages'> {
  const busy = parseStageBusy(t.stage_busy);
  return busy ? { stages: stageStatsView(busy, taskElapsedMs(t)) } : {};
}

function sessionStages(tasks: ReadonlyArray<Selectable<SessionTaskTable>>): Pick<Session, 'stages'> {
  const stages = sessionStageStats(tasks.map((t) => ({ busy: parseStageBusy(t.stage_busy), elapsedMs: taskElapsedMs(t) })));
  return stages ? { stages } : {};
}

function toSession(r: Selectable<SessionTable>, tasks: SessionTask[], log: Session['log']): Session {
  return {
    id: r.id,
    jobName: r.job_name,
    jobId: r.job_id,
    state: r.state,
    full: r.full === 1,
    startedAt: r.started_at,
    ...(r.ended_at ? { endedAt: r.ended_at } : {}),
    ...(r.reason ? { reason: r.reason } : {}),
    progress: progressOf(r),
    tasks,
    log,
    kind: r.kind,
    ...(r.vm !== null ? { vm: r.vm } : {}),
    ...(r.point_id !== null ? { point: r.point_id } : {}),
    ...(r.agent !== null ? { agent: r.agent } : {}),
    ...(r.status !== null ? { status: r.status } : {}),
    ...(r.ref !== null ? { ref: r.ref } : {}),
    ...(r.kind === 'instant-recovery' ? { runningFromBackup: r.status === 'running-from-backup' || r.status === 'migrating' } : {}),
  };
}

export async function getSession(ctx: ServiceContext, id: string): Promise<Session> {
  const r = await ctx.db.selectFrom('sessions').selectAll().where('id', '=', id).executeTakeFirst();
  if (!r) throw notFound('session', id);
  const [tasks, log] = await Promise.all([
    ctx.db.selectFrom('session_tasks').selectAll().where('session_id', '=', id).orderBy('vm').orderBy('disk').execute(),
    ctx.db.selectFrom('session_log').select(['time', 'level', 'message']).where('session_id', '=', id).orderBy('id').execute(),
  ]);
  return { ...toSession(r, tasks.map(toTask), log), ...sessionStages(tasks) };
}

export interface SessionQuery {
  job?: string;
  /** Only sessions of this kind (`backup`, `restore-vm`, `instant-recovery`, …). */
  kind?: string;
  limit?: number;
}

export const SESSION_KINDS: readonly SessionKind[] = ['backup', 'health-check', 'restore-vm', 'restore-disk', 'restore-files', 'instant-recovery'];

/** Newest first; tasks included, log left out (read one session for its log). */
export async function listSessions(ctx: ServiceContext, q: SessionQuery = {}): Promise<Session[]> {
  const limit = q.limit ?? 50;
  if (!Number.isInteger(limit) || limit < 1 || limit > 1000) throw invalid('limit', 'must be an integer from 1 to 1000');
  let query = ctx.db.selectFrom('sessions').selectAll().orderBy('started_at', 'desc').orderBy('id').limit(limit);
  if (q.job !== undefined) query = query.where('job_name', '=', q.job);
  if (q.kind !== undefined) {
    const kind = SESSION_KINDS.find((k) => k === q.kind);
    if (!kind) throw invalid('kind', `must be one of ${SESSION_KINDS.join(', ')}`);
    query = query.where('kind', '=', kind);
  }
  const rows = await query.execute();
  if (rows.length === 0) return [];
  const tasks = await ctx.db.selectFrom('session_tasks').selectAll().where('session_id', 'in', rows.map((r) => r.id)).orderBy('vm').execute();
  return rows.map((r) => toSession(r, tasks.filter((t) => t.session_id === r.id).map(toTask), []));
}

export interface NewSession {
  jobId: string | null;
  jobName: string;
  full: boolean;
  state?: SessionState;
}

export async function createSession(ctx: ServiceContext, s: NewSession): Promise<string> {
  const id = newId();
  const now = nowIso(ctx);
  await ctx.db
    .insertInto('sessions')
    .values({
      id,
      job_id: s.jobId,
      job_name: s.jobName,
      state: s.state ?? 'queued',
      full: s.full ? 1 : 0,
      started_at: now,
      ended_at: null,
      reason: null,
      percent: 0,
      bytes_read: 0,
      bytes_transferred: 0,
      bytes_stored: 0,
      processing_rate: 0,
      updated_at: now,
    })
    .execute();
  return id;
}

export interface SessionChange {
  state?: SessionState;
  reason?: string | null;
  endedAt?: string | null;
  progress?: Partial<Progress>;
}

export async function updateSession(ctx: ServiceContext, id: string, c: SessionChange): Promise<void> {
  const values: Updateable<SessionTable> = { updated_at: nowIso(ctx) };
  if (c.state !== undefined) {
    values.state = c.state;
    if (isFinal(c.state) && c.endedAt === undefined) values.ended_at = nowIso(ctx);
  }
  if (c.endedAt !== undefined) values.ended_at = c.endedAt;
  if (c.reason !== undefined) values.reason = c.reason;
  Object.assign(values, progressColumns(c.progress));
  const res = await ctx.db.updateTable('sessions').set(values).where('id', '=', id).executeTakeFirst();
  if (Number(res.numUpdatedRows) === 0) throw notFound('session', id);
}

type ProgressColumns = Pick<Updateable<SessionTable> & Updateable<SessionTaskTable>, 'percent' | 'bytes_read' | 'bytes_transferred' | 'bytes_stored' | 'processing_rate'>;

/** The progress columns (sessions and their tasks have the same) for the figures given. */
function progressColumns(p: Partial<Progress> | undefined): ProgressColumns {
  const v: ProgressColumns = {};
  if (p?.percent !== undefined) v.percent = p.percent;
  if (p?.bytesRead !== undefined) v.bytes_read = p.bytesRead;
  if (p?.bytesTransferred !== undefined) v.bytes_transferred = p.bytesTransferred;
  if (p?.bytesStored !== undefined) v.bytes_stored = p.bytesStored;
  if (p?.processingRate !== undefined) v.processing_rate = p.processingRate;
  return v;
}

export interface NewTask {
  vm: string;
  disk: string;
  state?: SessionState;
}

export async function addTask(ctx: ServiceContext, sessionId: string, t: NewTask): Promise<string> {
  const id = newId();
  await ctx.db
    .insertInto('session_tasks')
    .values({
      id,
      session_id: sessionId,
      vm: t.vm,
      disk: t.disk,
      state: t.state ?? 'queued',
      started_at: null,
      ended_at: null,
      percent: 0,
      bytes_read: 0,
      bytes_transferred: 0,
      bytes_stored: 0,
      processing_rate: 0,
      message: null,
    })
    .execute();
  return id;
}

export interface TaskChange {
  state?: SessionState;
  message?: string | null;
  progress?: Partial<Progress>;
}

export async function updateTask(ctx: ServiceContext, taskId: string, c: TaskChange): Promise<void> {
  const values: Updateable<SessionTaskTable> = {};
  if (c.state !== undefined) {
    values.state = c.state;
    if (c.state === 'running') values.started_at = nowIso(ctx);
    if (isFinal(c.state)) values.ended_at = nowIso(ctx);
  }
  if (c.message !== undefined) values.message = c.message;
  Object.assign(values, progressColumns(c.progress));
  if (Object.keys(values).length === 0) return;
  const res = await ctx.db.updateTable('session_tasks').set(values).where('id', '=', taskId).executeTakeFirst();
  if (Number(res.numUpdatedRows) === 0) throw notFound('task', taskId);
}

export async function appendLog(ctx: ServiceContext, sessionId: string, level: LogLevelT, message: string): Promise<void> {
  await ctx.db.insertInto('session_log').values({ session_id: sessionId, time: nowIso(ctx), level, message }).execute();
}

/** Job sessions left queued/running by a server that stopped: marked failed at start-up (restores: failInterruptedRestores). */
export async function failInterruptedSessions(ctx: ServiceContext): Promise<number> {
  const res = await ctx.db
    .updateTable('sessions')
    .set({ state: 'failed', reason: 'the server stopped while the session ran', ended_at: nowIso(ctx), updated_at: nowIso(ctx) })
    .where('state', 'in', ['queued', 'running'])
    .where('kind', 'in', ['backup', 'health-check'])
    .executeTakeFirst();
  return Number(res.numUpdatedRows);
}

// ---- restore and instant recovery sessions (kind other than backup / health-check)

export interface NewRestoreSession {
  /** The session's id, chosen by the caller (a UUID) so it can follow the session while the request runs; default a new one. */
  id?: string;
  kind: Exclude<SessionKind, 'backup' | 'health-check'>;
  /** The VM restored or recovered (its new name). */
  vm: string;
  point: string;
  /** The agent doing the work; null: this server's process. */
  agent?: string | null;
  /** An instant recovery's status (running-from-backup, …). */
  status?: string | null;
  /** The id of what it records (ir-…, vr-…). */
  ref?: string | null;
  state?: SessionState;
  /** A first log line. */
  message?: string;
}

/** Records a restore or an instant recovery as a session (running, started now); returns its id. */
export async function createRestoreSession(ctx: ServiceContext, s: NewRestoreSession): Promise<string> {
  const id = s.id ?? newId();
  const now = nowIso(ctx);
  const state = s.state ?? 'running';
  await ctx.db
    .insertInto('sessions')
    .values({
      id,
      job_id: null,
      job_name: '',
      state,
      full: 0,
      trigger: 'manual',
      started_at: now,
      ended_at: isFinal(state) ? now : null,
      reason: null,
      percent: 0,
      bytes_read: 0,
      bytes_transferred: 0,
      bytes_stored: 0,
      processing_rate: 0,
      updated_at: now,
      kind: s.kind,
      vm: s.vm,
      point_id: s.point,
      agent: s.agent ?? null,
      status: s.status ?? null,
      ref: s.ref ?? null,
    })
    .execute();
  if (s.message) await appendLog(ctx, id, 'info', s.message);
  announce(ctx, id);
  return id;
}

export interface RestoreSessionChange extends SessionChange {
  status?: string | null;
  agent?: string | null;
  ref?: string | null;
  /** A log line with it. */
  log?: { level: LogLevelT; message: string };
}

/** Updates a restore session (state, ending it when final; status; a log line). */
export async function updateRestoreSession(ctx: ServiceContext, id: string, c: RestoreSessionChange): Promise<void> {
  await updateSession(ctx, id, c);
  const extra: Updateable<SessionTable> = {};
  if (c.status !== undefined) extra.status = c.status;
  if (c.agent !== undefined) extra.agent = c.agent;
  if (c.ref !== undefined) extra.ref = c.ref;
  if (Object.keys(extra).length > 0) await ctx.db.updateTable('sessions').set(extra).where('id', '=', id).execute();
  if (c.log) await appendLog(ctx, id, c.log.level, c.log.message);
  announce(ctx, id);
}

/** The newest session of `kind` recording `ref` (an instant recovery's id), or undefined. */
export async function sessionIdByRef(ctx: ServiceContext, kind: SessionKind, ref: string): Promise<string | undefined> {
  const r = await ctx.db.selectFrom('sessions').select('id').where('kind', '=', kind).where('ref', '=', ref).orderBy('started_at', 'desc').executeTakeFirst();
  return r?.id;
}

/** Open sessions of restore kinds (state queued/running): a starting server settles them. */
export async function openRestoreSessions(ctx: ServiceContext): Promise<Array<{ id: string; kind: SessionKind; ref: string | null; agent: string | null; status: string | null }>> {
  return ctx.db
    .selectFrom('sessions')
    .select(['id', 'kind', 'ref', 'agent', 'status'])
    .where('state', 'in', ['queued', 'running'])
    .where('kind', 'not in', ['backup', 'health-check'])
    .execute();
}

/** Sets the kind of a session the job engine created (a health check run). */
export async function setSessionKind(ctx: ServiceContext, id: string, kind: SessionKind): Promise<void> {
  await ctx.db.updateTable('sessions').set({ kind }).where('id', '=', id).execute();
}

// ---- restore points
function toRestorePoint(r: Selectable<RestorePointTable> & { enc_hint?: string | null; enc_key?: string | null; enc_chain?: string | null }, repo: string, job: string | null): RestorePoint {
  const encrypted = r.enc_chain !== null && r.enc_chain !== undefined;
  return {
    id: r.id,
    vm: r.vm,
    disks: parseJson<RestorePoint['disks']>(r.disks, 'restore point disks') ?? [],
    time: r.time,
    type: r.type,
    chainId: r.chain_id,
    size: Number(r.size),
    state: r.state,
    repository: repo,
    job,
    sessionId: r.session_id,
    ...(encrypted ? { encrypted: true, keyKnown: r.enc_key !== null && r.enc_key !== undefined, ...(r.enc_hint ? { passwordHint: r.enc_hint } : {}) } : {}),
  };
}

/** Restore points with the names of their repository and job and their chain's encryption, one query for list and get. */
function restorePointRows(ctx: ServiceContext) {
  return ctx.db
    .selectFrom('restore_points as p')
    .innerJoin('repositories as r', 'r.id', 'p.repository_id')
    .leftJoin('jobs as j', 'j.id', 'p.job_id')
    .leftJoin('encrypted_chains as ec', 'ec.chain_id', 'p.chain_id')
    .selectAll('p')
    .select(['r.name as repo_name', 'j.name as job_name', 'ec.chain_id as enc_chain', 'ec.hint as enc_hint', 'ec.key_id as enc_key']);
}

export async function listRestorePoints(ctx: ServiceContext, q: { vm?: string } = {}): Promise<RestorePoint[]> {
  let query = restorePointRows(ctx).orderBy('p.vm').orderBy('p.time', 'desc');
  if (q.vm !== undefined) query = query.where('p.vm', '=', q.vm);
  const rows = await query.execute();
  return rows.map((r) => toRestorePoint(r, r.repo_name, r.job_name));
}

export async function getRestorePoint(ctx: ServiceContext, id: string): Promise<RestorePoint> {
  const row = await restorePointRows(ctx).where('p.id', '=', id).executeTakeFirst();
  if (!row) throw notFound('restore point', id);
  return toRestorePoint(row, row.repo_name, row.job_name);
}

export interface NewRestorePoint {
  /** The point's id in its repository (default: a new id). */
  id?: string;
  vm: string;
  disks: RestorePoint['disks'];
  time: string;
  type: RestorePoint['type'];
  chainId: string;
  size: number;
  state?: RestorePoint['state'];
  repositoryId: string;
  jobId?: string | null;
  sessionId?: string | null;
}

export async function recordRestorePoint(ctx: ServiceContext, p: NewRestorePoint): Promise<string> {
  const id = p.id ?? newId();
  await ctx.db
    .insertInto('restore_points')
    .values({
      id,
      vm: p.vm,
      disks: JSON.stringify(p.disks),
      time: p.time,
      type: p.type,
      chain_id: p.chainId,
      size: p.size,
      state: p.state ?? 'ready',
      repository_id: p.repositoryId,
      job_id: p.jobId ?? null,
      session_id: p.sessionId ?? null,
      created_at: nowIso(ctx),
    })
    .execute();
  return id;
}

export async function deleteRestorePoint(ctx: ServiceContext, id: string): Promise<void> {
  const res = await ctx.db.deleteFrom('restore_points').where('id', '=', id).executeTakeFirst();
  if (Number(res.numDeletedRows) === 0) throw notFound('restore point', id);
}

export function assertSessionOpen(s: Session): void {
  if (isFinal(s.state)) throw new BulwarkError(`session ${s.id} has already ended (${s.state})`, { kind: 'conflict', context: { session: s.id } });
}

// ---- restores running in this process: their progress, and `session stop`

/** A restore's figures now: bytes of the disk done (holes count), data written, the disk's size. */
export interface RestoreProgress {
  readonly bytesDone: number;
  readonly bytesWritten: number;
  readonly size: number;
}

/** What a running restore gets from its session. */
export interface RestoreSessionControl {
  /** The session's id (undefined when it could not be recorded). */
  readonly id: string | undefined;
  /** Aborted when the session is stopped (`session stop`): the restore ends and leaves nothing behind. */
  readonly signal: AbortSignal;
  /** The restore's figures now; written to the session at most every `progressEveryMs` (the latest wins). */
  progress(p: RestoreProgress): void;
}

/** The reason a restore's work is aborted with when its session is stopped; the request that started it answers with it (409). */
export class RestoreStopped extends BulwarkError {
  /** Who stopped it (a user name). */
  readonly by: string;
  constructor(message: string, by: string, session: string) {
    super(message, { kind: 'conflict', context: { session } });
    this.name = 'RestoreStopped';
    this.by = by;
  }
}

interface RunningRestore {
  readonly stopper: AbortController;
  /** What is restored, for the message a stop answers with ("the restore of disk vda to /x"). */
  readonly what: string;
  /** Settles once the session has ended (its final state written). */
  readonly ended: Promise<void>;
}

/**
 * The restores this server process runs as sessions: `session stop` reaches them here, and every
 * change of their sessions (start, progress, end) is announced on `events`, which
 * `GET /sessions/{id}/events` (and so `session show --follow`, `restore disk`) follows. One per
 * server, shared by both transports.
 */
export class RunningRestores {
  readonly events: SessionEvents | undefined;
  /** How often a running restore's progress is written to its session (default 500 ms). */
  readonly progressEveryMs: number;
  readonly #running = new Map<string, RunningRestore>();

  constructor(o: { events?: SessionEvents | undefined; progressEveryMs?: number | undefined } = {}) {
    this.events = o.events;
    this.progressEveryMs = o.progressEveryMs ?? 500;
  }

  /** Registers a running restore's session (recordedRestore does). */
  add(id: string, r: RunningRestore): void {
    this.#running.set(id, r);
    void r.ended.finally(() => this.#running.delete(id));
  }

  has(id: string): boolean {
    return this.#running.has(id);
  }

  /**
   * Stops the restore of session `id` and resolves once its session has ended (`stopped`, unless
   * it had finished first); false when no restore of that session runs in this process.
   */
  async stop(id: string, by: string): Promise<boolean> {
    const r = this.#running.get(id);
    if (!r) return false;
    if (!r.stopper.signal.aborted) r.stopper.abort(new RestoreStopped(`${r.what} was stopped by ${by} (bulwark session stop ${id})`, by, id));
    await r.ended;
    return true;
  }
}

/**
 * Writes the latest figures of a restore to its session: the first at once, then at most one
 * write per `everyMs` (one at a time; the figures reported in between are folded into the next).
 */
class ProgressWriter {
  readonly #write: (p: RestoreProgress) => Promise<void>;
  readonly #everyMs: number;
  #latest: RestoreProgress | undefined;
  #timer: NodeJS.Timeout | undefined;
  #lastAt = 0;
  #writing: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(write: (p: RestoreProgress) => Promise<void>, everyMs: number) {
    this.#write = write;
    this.#everyMs = everyMs;
  }

  push(p: RestoreProgress): void {
    if (this.#closed) return;
    this.#latest = p;
    if (this.#timer !== undefined) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#flush();
    }, Math.max(0, this.#lastAt + this.#everyMs - Date.now()));
  }

  #flush(): void {
    const p = this.#latest;
    this.#latest = undefined;
    if (p === undefined) return;
    this.#lastAt = Date.now();
    this.#writing = this.#writing.then(() => this.#write(p));
  }

  /** Writes what is pending and stops; later figures are dropped (the final state follows). */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#flush();
    await this.#writing;
  }
}

export interface RecordedRestoreOptions {
  /** Where `session stop` finds this restore and its changes are announced; absent: neither. */
  readonly running?: RunningRestores | undefined;
  /** What is restored, for the message of a stop: "the restore of disk vda to /x". */
  readonly what?: string | undefined;
}

/**
 * Runs a restore (`work`) recorded as a session of `s.kind`: running from now, its progress as
 * `work` reports it, then `success` with the line `done(result)`, `stopped` when `session stop`
 * stopped it (the stop's error is thrown), or `failed` with the error (which is rethrown). A
 * failed write of the record is logged, never the restore's failure; a session id the caller
 * chose that is taken already is refused (conflict) before any work.
 */
export async function recordedRestore<T>(
  ctx: ServiceContext,
  s: NewRestoreSession,
  work: (session: RestoreSessionControl) => Promise<T>,
  done: (result: T) => string,
  o: RecordedRestoreOptions = {},
): Promise<T> {
  const id = await createRestoreSession(ctx, s).catch((err: unknown) => {
    if (s.id !== undefined && isUniqueViolation(err)) {
      throw new BulwarkError(`session: a session with the id ${s.id} exists already`, { kind: 'conflict', context: { field: 'session' }, hint: 'leave the session id out, or give a new UUID' });
    }
    recordLog.error({ kind: s.kind, vm: s.vm, err: describeError(err) }, 'could not record a restore session');
    return undefined;
  });
  // The writes announce on the server's events (announceSessionsOn); these are another's (a test's).
  const events = o.running?.events !== announcers.get(ctx.db) ? o.running?.events : undefined;
  const announceHere = (): void => {
    if (id) events?.changed(id);
  };
  const update = async (c: RestoreSessionChange): Promise<void> => {
    if (id) await updateRestoreSession(ctx, id, c).catch((err: unknown) => recordLog.error({ session: id, err: describeError(err) }, 'could not update a restore session'));
    announceHere();
  };
  announceHere();
  // The rate counts from the first report: opening the point and starting the decoder threads
  // (seconds on a loaded host) would make the start look slow and the ETA long.
  let first: { at: number; done: number } | undefined;
  const writer = new ProgressWriter((p) => {
    const now = Date.now();
    first ??= { at: now, done: p.bytesDone };
    const seconds = (now - first.at) / 1000;
    return update({
      progress: {
        percent: p.size > 0 ? Math.min(100, (p.bytesDone * 100) / p.size) : 0,
        bytesRead: p.bytesDone,
        bytesStored: p.bytesWritten,
        processingRate: seconds > 0 ? Math.round((p.bytesDone - first.done) / seconds) : 0,
      },
    });
  }, o.running?.progressEveryMs ?? 500);
  const stopper = new AbortController();
  let markEnded: () => void = () => undefined;
  const ended = new Promise<void>((resolve) => (markEnded = resolve));
  if (id && o.running) o.running.add(id, { stopper, what: o.what ?? `the ${s.kind} of VM ${s.vm} (restore point ${s.point})`, ended });
  try {
    let result: T;
    try {
      result = await work({ id, signal: stopper.signal, progress: (p) => writer.push(p) });
    } finally {
      await writer.close();
    }
    await update({ state: 'success', progress: { percent: 100 }, log: { level: 'info', message: done(result) } });
    return result;
  } catch (err) {
    // Stopped: whatever the work failed with on its way out, the stop is the reason.
    const stopped: unknown = stopper.signal.aborted ? stopper.signal.reason : undefined;
    if (stopped instanceof RestoreStopped) {
      await update({ state: 'stopped', reason: `stopped by ${stopped.by}`, log: { level: 'warning', message: stopped.message } });
      throw stopped;
    }
    await update({ state: 'failed', reason: describeError(err), log: { level: 'error', message: `${s.kind} failed: ${describeError(err)}` } });
    throw err;
  } finally {
    markEnded();
  }
}

/**
 * `POST /sessions/{id}/stop` for a session of any kind: a job run or health check through the job
 * engine (`runner`), a disk restore running in this process through `restores` (it ends
 * `stopped`, leaving no image). Instant recoveries are refused, naming their own command
 * (`instant-recovery stop` chooses between shutting a migrated VM down and leaving it running);
 * VM and file restores cannot be stopped, and say so. Resolves once the session has ended.
 */
export async function stopSession(ctx: ServiceContext, o: { runner: JobRunner; restores?: RunningRestores | undefined }, id: string, by: string): Promise<void> {
  const row = await ctx.db.selectFrom('sessions').select(['id', 'kind', 'state', 'vm', 'ref']).where('id', '=', id).executeTakeFirst();
  if (!row) throw notFound('session', id);
  const kind = row.kind;
  if (kind === 'backup' || kind === 'health-check') return o.runner.stop(id, `stopped by ${by}`);
  const what = `session ${id} (${kind} of VM ${row.vm ?? '?'})`;
  if (isFinal(row.state) && kind !== 'instant-recovery') {
    throw new BulwarkError(`${what} is not running (it is ${row.state})`, { kind: 'conflict', context: { session: id } });
  }
  switch (kind) {
    case 'restore-disk':
      if (await o.restores?.stop(id, by)) return;
      throw new BulwarkError(`${what} is not running in this server's process (it is ${row.state})`, {
        kind: 'conflict',
        context: { session: id },
        hint: 'a restore left open by an earlier server process is settled when the server starts',
      });
    case 'instant-recovery':
      throw new BulwarkError(`${what} is an instant recovery: session stop does not stop those`, {
        kind: 'conflict',
        context: { session: id },
        hint: `stop it with: bulwark instant-recovery stop ${row.ref ?? 'ID'} (a migrated VM also needs --shutdown-vm or --forget)`,
      });
    case 'restore-vm':
    case 'restore-files':
      throw new BulwarkError(`${what} cannot be stopped: session stop stops job runs, health checks and disk restores`, {
        kind: 'conflict',
        context: { session: id },
        hint: 'it ends by itself; its progress: bulwark session show ' + id,
      });
    default:
      return assertNever(kind);
  }
}
