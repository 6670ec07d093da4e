// The ports of the job engine (JobEngineStore), the scheduler (SchedulerStore) and the agent link
// (AgentLinkStore) implemented over the configuration database, plus the adapter that makes the
// JobEngine the API's JobRunner.
import type { Selectable } from 'kysely';
import { BulwarkError } from '../../common/errors.js';
import type {
  AgentHealthReport,
  AgentLinkStore,
  EnrolledAgent,
  EnrollmentTokenRecord,
  RegisteredAgent,
} from '../api/agent-link.js';
import { agentNameTaken } from '../api/agent-link.js';
import type { SessionTable, SessionTaskTable } from '../db/schema.js';
import { parseStageBusy } from '../resources/bottleneck.js';
import type { JobEngine } from '../jobs/engine.js';
import type {
  JobDefinition,
  JobEngineStore,
  NewSession,
  NewTask,
  SessionLogLine,
  SessionPatch,
  SessionRecord,
  SessionState,
  SessionTrigger,
  TaskPatch,
  TaskRecord,
  TransferProgress,
} from '../jobs/ports.js';
import type { ScheduledJob, SchedulerStore } from '../scheduler/scheduler.js';
import type { Schedule } from '../scheduler/schedule.js';
import { findByNameOrId, newId, nowIso, parseJson, type ServiceContext } from './common.js';
import { registerAgent } from './infrastructure.js';
import { taskStepOf } from './sessions.js';
import { backupOptionsOf } from './jobs.js';
import type { BackupWindow, Retention } from './model.js';
import type { JobRunner } from './runner.js';

const iso = (d: Date | undefined): string | null => (d === undefined ? null : d.toISOString());
const date = (s: string | null): Date | undefined => (s === null ? undefined : new Date(s));
const percentOf = (p: TransferProgress): number => (p.total > 0 ? Math.min(100, (p.bytesRead / p.total) * 100) : 0);

function toSessionRecord(r: Selectable<SessionTable>): SessionRecord {
  return {
    id: r.id,
    jobId: r.job_id ?? '',
    jobName: r.job_name,
    state: r.state,
    trigger: r.trigger as SessionTrigger,
    full: r.full === 1,
    startedAt: new Date(r.started_at),
    endedAt: date(r.ended_at),
    progress: {
      percent: Number(r.percent),
      bytesRead: Number(r.bytes_read),
      bytesTransferred: Number(r.bytes_transferred),
      bytesStored: Number(r.bytes_stored),
      processingRate: Number(r.processing_rate),
    },
    reason: r.reason ?? undefined,
  };
}

function toTaskRecord(t: Selectable<SessionTaskTable>): TaskRecord {
  return {
    id: t.id,
    sessionId: t.session_id,
    vm: t.vm,
    disk: t.disk,
    state: t.state,
    attempt: t.attempt,
    startedAt: date(t.started_at),
    endedAt: date(t.ended_at),
    progress: { bytesRead: Number(t.bytes_read), bytesTransferred: Number(t.bytes_transferred), bytesStored: Number(t.bytes_stored), total: Number(t.bytes_total), ...taskStepOf(t.step) },
    message: t.message ?? undefined,
    proxy: t.proxy ?? undefined,
    stageBusy: parseStageBusy(t.stage_busy),
  };
}

/** JobEngineStore over the configuration database; `changed` is called after each session write. */
export class DatabaseJobEngineStore implements JobEngineStore {
  readonly #ctx: ServiceContext;
  readonly #banner: string | undefined;
  /** `banner`: a warning line written first into every new session's log (e.g. "simulated: …"). */
  constructor(ctx: ServiceContext, banner?: string) {
    this.#ctx = ctx;
    this.#banner = banner;
  }

  async loadJob(idOrName: string): Promise<JobDefinition | undefined> {
    const r = await findByNameOrId(this.#ctx, 'jobs', idOrName);
    if (!r) return undefined;
    const repo = await this.#ctx.db.selectFrom('repositories').select('name').where('id', '=', r.repository_id).executeTakeFirst();
    const window = parseJson<BackupWindow>(r.window, 'job window');
    return {
      id: r.id,
      name: r.name,
      vms: parseJson<string[]>(r.objects, 'job objects') ?? [],
      repository: repo?.name ?? r.repository_id,
      retry: { count: r.retry_count, waitSeconds: r.retry_wait_minutes * 60 },
      window: window ?? undefined,
      proxy: r.proxy ?? undefined,
      settings: {
        method: r.method,
        blockSize: r.block_size,
        compression: r.compression,
        retention: parseJson<Retention>(r.retention, 'job retention'),
        requireGuestProcessing: r.require_guest_processing === 1,
        // activeFull, syntheticFull, healthCheck, compact, excludeDisks, removedVmRetentionDays, fileIndex,
        // multithreadedTransfer, storage
        ...backupOptionsOf(r),
      },
    };
  }

  async createSession(s: NewSession): Promise<string> {
    const id = newId();
    await this.#ctx.db
      .insertInto('sessions')
      .values({
        id,
        job_id: s.jobId,
        job_name: s.jobName,
        state: s.state,
        full: s.full ? 1 : 0,
        trigger: s.trigger,
        started_at: s.startedAt.toISOString(),
        ended_at: iso(s.endedAt),
        reason: s.reason ?? null,
        percent: s.progress.percent,
        bytes_read: s.progress.bytesRead,
        bytes_transferred: s.progress.bytesTransferred,
        bytes_stored: s.progress.bytesStored,
        processing_rate: s.progress.processingRate,
        updated_at: nowIso(this.#ctx),
      })
      .execute();
    if (this.#banner) await this.appendLog(id, { time: s.startedAt, level: 'warning', message: this.#banner });
    return id;
  }

  async createTasks(sessionId: string, tasks: NewTask[]): Promise<string[]> {
    const ids = tasks.map(() => newId());
    if (tasks.length === 0) return ids;
    await this.#ctx.db
      .insertInto('session_tasks')
      .values(
        tasks.map((t, i) => ({
          id: ids[i]!,
          session_id: sessionId,
          vm: t.vm,
          disk: t.disk,
          state: t.state,
          attempt: t.attempt,
          proxy: t.proxy ?? null,
          started_at: iso(t.startedAt),
          ended_at: iso(t.endedAt),
          percent: percentOf(t.progress),
          bytes_read: t.progress.bytesRead,
          bytes_transferred: t.progress.bytesTransferred,
          bytes_stored: t.progress.bytesStored,
          bytes_total: t.progress.total,
          processing_rate: 0,
          message: t.message ?? null,
        })),
      )
      .execute();
    return ids;
  }

  async updateSession(sessionId: string, p: SessionPatch): Promise<void> {
    const values: Record<string, unknown> = { updated_at: nowIso(this.#ctx) };
    if (p.state !== undefined) values.state = p.state;
    if (p.startedAt !== undefined) values.started_at = p.startedAt.toISOString();
    if (p.endedAt !== undefined) values.ended_at = p.endedAt.toISOString();
    if (p.reason !== undefined) values.reason = p.reason;
    if (p.progress !== undefined) {
      values.percent = p.progress.percent;
      values.bytes_read = p.progress.bytesRead;
      values.bytes_transferred = p.progress.bytesTransferred;
      values.bytes_stored = p.progress.bytesStored;
      values.processing_rate = p.progress.processingRate;
    }
    const res = await this.#ctx.db.updateTable('sessions').set(values).where('id', '=', sessionId).executeTakeFirst();
    if (Number(res.numUpdatedRows) === 0) throw new BulwarkError(`session ${sessionId} not found`, { kind: 'not-found', context: { session: sessionId } });
  }

  async updateTask(taskId: string, p: TaskPatch): Promise<void> {
    const values: Record<string, unknown> = {};
    if (p.state !== undefined) values.state = p.state;
    if (p.attempt !== undefined) values.attempt = p.attempt;
    if (p.startedAt !== undefined) values.started_at = p.startedAt.toISOString();
    if (p.endedAt !== undefined) values.ended_at = p.endedAt.toISOString();
    if (p.message !== undefined) values.message = p.message;
    if (p.proxy !== undefined) values.proxy = p.proxy;
    if (p.stageBusy !== undefined) values.stage_busy = JSON.stringify(p.stageBusy);
    if (p.progress !== undefined) {
      values.percent = percentOf(p.progress);
      values.bytes_read = p.progress.bytesRead;
      values.bytes_transferred = p.progress.bytesTransferred;
      values.bytes_stored = p.progress.bytesStored;
      values.bytes_total = p.progress.total;
      values.step = p.progress.step ? JSON.stringify(p.progress.step) : null;
    }
    if (Object.keys(values).length === 0) return;
    const res = await this.#ctx.db.updateTable('session_tasks').set(values).where('id', '=', taskId).executeTakeFirst();
    if (Number(res.numUpdatedRows) === 0) throw new BulwarkError(`task ${taskId} not found`, { kind: 'not-found', context: { task: taskId } });
  }

  async appendLog(sessionId: string, line: SessionLogLine): Promise<void> {
    await this.#ctx.db
      .insertInto('session_log')
      .values({ session_id: sessionId, task_id: line.taskId ?? null, time: line.time.toISOString(), level: line.level, message: line.message })
      .execute();
  }

  async loadSession(sessionId: string): Promise<SessionRecord | undefined> {
    const r = await this.#ctx.db.selectFrom('sessions').selectAll().where('id', '=', sessionId).executeTakeFirst();
    return r ? toSessionRecord(r) : undefined;
  }

  async listTasks(sessionId: string): Promise<TaskRecord[]> {
    const rows = await this.#ctx.db.selectFrom('session_tasks').selectAll().where('session_id', '=', sessionId).orderBy('vm').orderBy('disk').execute();
    return rows.map(toTaskRecord);
  }

  async listSessionsInState(states: readonly SessionState[]): Promise<SessionRecord[]> {
    if (states.length === 0) return [];
    // Job sessions only: restores and instant recoveries (other kinds) are settled by the recovery service.
    const rows = await this.#ctx.db.selectFrom('sessions').selectAll().where('state', 'in', [...states]).where('kind', 'in', ['backup', 'health-check']).orderBy('started_at').execute();
    return rows.map(toSessionRecord);
  }
}

/** SchedulerStore over the configuration database. */
export class DatabaseSchedulerStore implements SchedulerStore {
  readonly #ctx: ServiceContext;
  constructor(ctx: ServiceContext) {
    this.#ctx = ctx;
  }

  async listScheduledJobs(): Promise<ScheduledJob[]> {
    const [rows, last] = await Promise.all([
      this.#ctx.db.selectFrom('jobs').select(['id', 'name', 'enabled', 'schedule', 'scheduled_since']).orderBy('name').execute(),
      this.#ctx.db
        .selectFrom('sessions')
        .select(['job_id', (eb) => eb.fn.max('started_at').as('last')])
        .where('job_id', 'is not', null)
        .groupBy('job_id')
        .execute(),
    ]);
    const lastRun = new Map(last.map((l) => [l.job_id, l.last]));
    return rows.map((r) => {
      const lastRunAt = lastRun.get(r.id);
      return {
        id: r.id,
        name: r.name,
        enabled: r.enabled === 1,
        schedule: parseJson<Schedule>(r.schedule, 'job schedule') ?? undefined,
        lastRunAt: lastRunAt ? new Date(lastRunAt) : undefined,
        scheduledSince: new Date(r.scheduled_since),
      };
    });
  }
}

/** AgentLinkStore over the configuration database. */
export class DatabaseAgentLinkStore implements AgentLinkStore {
  readonly #ctx: ServiceContext;
  constructor(ctx: ServiceContext) {
    this.#ctx = ctx;
  }

  async saveEnrollmentToken(t: EnrollmentTokenRecord): Promise<void> {
    await this.#ctx.db
      .insertInto('enrollment_tokens')
      .values({
        id: t.id,
        token_hash: t.tokenHash,
        expires_at: t.expiresAt.toISOString(),
        used_at: iso(t.usedAt),
        agent_name: t.agentName ?? null,
        agent_id: null,
        created_at: t.createdAt.toISOString(),
      })
      .execute();
  }

  async findEnrollmentToken(id: string): Promise<EnrollmentTokenRecord | undefined> {
    const r = await this.#ctx.db.selectFrom('enrollment_tokens').selectAll().where('id', '=', id).executeTakeFirst();
    if (!r) return undefined;
    return {
      id: r.id,
      tokenHash: r.token_hash,
      expiresAt: new Date(r.expires_at),
      createdAt: new Date(r.created_at),
      usedAt: date(r.used_at),
      agentName: r.agent_name ?? undefined,
    };
  }

  async markEnrollmentTokenUsed(id: string, usedAt: Date): Promise<boolean> {
    const res = await this.#ctx.db
      .updateTable('enrollment_tokens')
      .set({ used_at: usedAt.toISOString() })
      .where('id', '=', id)
      .where('used_at', 'is', null)
      .executeTakeFirst();
    return Number(res.numUpdatedRows) === 1;
  }

  async findAgent(name: string): Promise<RegisteredAgent | undefined> {
    const r = await this.#ctx.db.selectFrom('agents').select(['name', 'cert_fingerprint', 'state']).where('name', '=', name).executeTakeFirst();
    return r ? { name: r.name, certFingerprint: r.cert_fingerprint, state: r.state } : undefined;
  }

  async saveEnrolledAgent(a: EnrolledAgent): Promise<void> {
    const now = a.enrolledAt.toISOString();
    const existing = await this.#ctx.db.selectFrom('agents').select('id').where('name', '=', a.name).executeTakeFirst();
    if (existing && !a.replaceExisting) throw agentNameTaken(a.name);
    if (existing) {
      await this.#ctx.db
        .updateTable('agents')
        .set((eb) => ({
          cert_fingerprint: a.certFingerprint,
          cert_serial: a.certSerial,
          hostname: a.hostname,
          agent_version: a.version,
          cores: a.cores,
          state: 'online',
          last_seen_at: now,
          version: eb('version', '+', 1),
          updated_at: now,
        }))
        .where('id', '=', existing.id)
        .execute();
      return;
    }
    // Insert-only: two enrollments racing for one new name meet the unique name, and the second
    // gets a conflict instead of replacing the first.
    await registerAgent(this.#ctx, {
      name: a.name,
      hostname: a.hostname,
      agentVersion: a.version,
      cores: a.cores,
      certFingerprint: a.certFingerprint,
      certSerial: a.certSerial,
    });
  }

  async recordHeartbeat(name: string, report: AgentHealthReport, seenAt: Date): Promise<void> {
    // Health is not a configuration edit: no version bump, so heartbeats never make edits stale.
    await this.#ctx.db
      .updateTable('agents')
      .set({
        last_seen_at: seenAt.toISOString(),
        hostname: report.hostname,
        agent_version: report.version,
        cores: report.cores,
        health: JSON.stringify({ uptimeSeconds: report.uptimeSeconds, repositories: report.repositories }),
      })
      .where('name', '=', name)
      .execute();
    await this.#ctx.db.updateTable('agents').set({ state: 'online' }).where('name', '=', name).where('state', '!=', 'revoked').execute();
  }

  async repositoryPathsOf(name: string): Promise<string[]> {
    const rows = await this.#ctx.db
      .selectFrom('repositories as r')
      .innerJoin('agents as a', 'a.id', 'r.agent_id')
      .select('r.path')
      .where('a.name', '=', name)
      .orderBy('r.path')
      .execute();
    return rows.map((r) => r.path);
  }
}

/** The job engine as the API's JobRunner. */
export class EngineJobRunner implements JobRunner {
  readonly #engine: JobEngine;
  constructor(engine: JobEngine) {
    this.#engine = engine;
  }
  async run(job: string, opts: { full: boolean }): Promise<{ sessionId: string }> {
    const r = await this.#engine.runNow(job, { full: opts.full, trigger: 'manual' });
    return { sessionId: r.sessionId };
  }
  async stop(sessionId: string, reason: string): Promise<void> {
    await this.#engine.stop(sessionId, { by: reason.replace(/^stopped by /, '') });
    await this.#engine.waitForEnd(sessionId);
  }
  async close(): Promise<void> {
    await this.#engine.shutdown();
  }
}
