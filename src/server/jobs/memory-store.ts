// A JobEngineStore held in memory: for tests, and a reference for the database implementation
// (same semantics: ids assigned by the store, patches merged, logs appended in order).
import { randomUUID } from 'node:crypto';
import type {
  JobDefinition,
  JobEngineStore,
  NewSession,
  NewTask,
  SessionLogLine,
  SessionPatch,
  SessionRecord,
  SessionState,
  TaskPatch,
  TaskRecord,
} from './ports.js';

export class InMemoryJobEngineStore implements JobEngineStore {
  readonly jobs = new Map<string, JobDefinition>();
  readonly sessions = new Map<string, SessionRecord>();
  readonly tasks = new Map<string, TaskRecord>();
  readonly logs = new Map<string, SessionLogLine[]>();

  /** Adds or replaces a job (tests). */
  putJob(job: JobDefinition): void {
    this.jobs.set(job.id, job);
  }

  async loadJob(idOrName: string): Promise<JobDefinition | undefined> {
    return this.jobs.get(idOrName) ?? [...this.jobs.values()].find((j) => j.name === idOrName);
  }

  async createSession(session: NewSession): Promise<string> {
    const id = randomUUID();
    this.sessions.set(id, { ...session, id });
    this.logs.set(id, []);
    return id;
  }

  async createTasks(sessionId: string, tasks: NewTask[]): Promise<string[]> {
    return tasks.map((t) => {
      const id = randomUUID();
      this.tasks.set(id, { ...t, id, sessionId });
      return id;
    });
  }

  async updateSession(sessionId: string, patch: SessionPatch): Promise<void> {
    const s = this.sessions.get(sessionId);
    if (s === undefined) throw new Error(`no session ${sessionId}`);
    this.sessions.set(sessionId, { ...s, ...patch });
  }

  async updateTask(taskId: string, patch: TaskPatch): Promise<void> {
    const t = this.tasks.get(taskId);
    if (t === undefined) throw new Error(`no task ${taskId}`);
    this.tasks.set(taskId, { ...t, ...patch });
  }

  async appendLog(sessionId: string, line: SessionLogLine): Promise<void> {
    const lines = this.logs.get(sessionId);
    if (lines === undefined) throw new Error(`no session ${sessionId}`);
    lines.push(line);
  }

  async loadSession(sessionId: string): Promise<SessionRecord | undefined> {
    return this.sessions.get(sessionId);
  }

  async listTasks(sessionId: string): Promise<TaskRecord[]> {
    return [...this.tasks.values()].filter((t) => t.sessionId === sessionId);
  }

  async listSessionsInState(states: readonly SessionState[]): Promise<SessionRecord[]> {
    return [...this.sessions.values()].filter((s) => states.includes(s.state));
  }

  /** The log of a session as plain text lines, `level: message` (tests). */
  logText(sessionId: string): string[] {
    return (this.logs.get(sessionId) ?? []).map((l) => `${l.level}: ${l.message}`);
  }
}
