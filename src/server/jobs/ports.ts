// The job engine's contracts: the session/task state machine, and the ports it is driven
// through — a store (the configuration database), a disk resolver and a task executor (the data
// path), and task slots (the resource scheduler). The engine itself is in engine.ts.
import type { StageBusy } from '../../transport/stage-times.js';
import type { BackupWindow } from '../scheduler/schedule.js';

// ---------------------------------------------------------------------------------------------
// States

/** The state of a session (one run of a job) and of each of its tasks (one VM disk). */
export type RunState = 'queued' | 'running' | 'success' | 'warning' | 'failed' | 'stopped';
export type SessionState = RunState;
export type TaskState = RunState;

export const runStates: readonly RunState[] = ['queued', 'running', 'success', 'warning', 'failed', 'stopped'];

/** States a session or task never leaves (except a task retried: failed -> queued). */
export function isFinalState(state: RunState): boolean {
  switch (state) {
    case 'queued':
    case 'running':
      return false;
    case 'success':
    case 'warning':
    case 'failed':
    case 'stopped':
      return true;
  }
}

/**
 * Whether a session or task may move from `from` to `to`.
 *
 * - queued -> running (started), failed (could not start, or the server crashed), stopped.
 * - running -> success, warning, failed, stopped.
 * - a task only: failed -> queued, when the engine retries it within the same session.
 * - a task only: success/warning -> failed, when a sibling disk task of the same restore point
 *   failed, so the point the task wrote its disk into was never committed.
 * Everything else — including staying in the same state — is illegal.
 */
export function canTransition(subject: 'session' | 'task', from: RunState, to: RunState): boolean {
  switch (from) {
    case 'queued':
      return to === 'running' || to === 'failed' || to === 'stopped';
    case 'running':
      return to === 'success' || to === 'warning' || to === 'failed' || to === 'stopped';
    case 'failed':
      return subject === 'task' && to === 'queued';
    case 'success':
    case 'warning':
      return subject === 'task' && to === 'failed';
    case 'stopped':
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Jobs, sessions, tasks as the engine sees them

/** What the engine needs to know about a job. The server maps its job row onto this. */
export interface JobDefinition {
  id: string;
  name: string;
  /** VM names, in the order they should be processed. */
  vms: string[];
  /** Target repository (name or id, passed through to slots and executor). */
  repository: string;
  /** A proxy (agent name) pinned by the job; otherwise the resource scheduler chooses. */
  proxy?: string | undefined;
  /** Automatic retry of failed tasks: `count` more attempts, `waitSeconds` apart. */
  retry: { count: number; waitSeconds: number };
  /** When set, a session still running at the end of the window is stopped. */
  window?: BackupWindow | undefined;
  /** Opaque to the engine, handed to the executor: method, block size, compression, … */
  settings?: Readonly<Record<string, unknown>> | undefined;
}

/** Why a session was started. */
export type SessionTrigger = 'manual' | 'schedule' | 'missed-run' | 'after-job';

export interface TransferProgress {
  /** Bytes read from the source disk. */
  bytesRead: number;
  /** Bytes sent over the network (after zero-skipping and compression). */
  bytesTransferred: number;
  /** Bytes written to the repository (after deduplication). */
  bytesStored: number;
  /** Bytes the task will read in all (0 when not known yet). */
  total: number;
  /** The maintenance step the task runs after its backup (or ran last) and how far it has come. */
  step?: MaintenanceStepProgress | undefined;
}

/** A chain maintenance step of a task: merge, synthetic-full, compact, inject, health-check. */
export interface MaintenanceStepProgress {
  name: string;
  /** Disk bytes of the step's disks gone through, of `bytesTotal` (docs/backup-methods.md). */
  bytesDone: number;
  bytesTotal: number;
}

export interface SessionProgress {
  /** 0..100, from bytes read over total of all tasks. */
  percent: number;
  bytesRead: number;
  bytesTransferred: number;
  bytesStored: number;
  /** Bytes read per second since the session started. */
  processingRate: number;
}

export const zeroTransfer: TransferProgress = { bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 };
export const zeroSessionProgress: SessionProgress = { percent: 0, bytesRead: 0, bytesTransferred: 0, bytesStored: 0, processingRate: 0 };

export interface SessionRecord {
  id: string;
  jobId: string;
  jobName: string;
  state: SessionState;
  trigger: SessionTrigger;
  /** A full backup was asked for (`job run --full`). */
  full: boolean;
  startedAt: Date;
  endedAt?: Date | undefined;
  progress: SessionProgress;
  /** Why the session ended as it did (failed, stopped, warning), in words for the user. */
  reason?: string | undefined;
}

export interface TaskRecord {
  id: string;
  sessionId: string;
  vm: string;
  /** The disk's name in the VM (e.g. `vda`); `*` for a VM whose disks could not be listed. */
  disk: string;
  state: TaskState;
  /** 1 on the first try; +1 per automatic retry. */
  attempt: number;
  startedAt?: Date | undefined;
  endedAt?: Date | undefined;
  progress: TransferProgress;
  /** Result messages (warnings, or the error of a failed task). */
  message?: string | undefined;
  /** Proxy (agent) that ran the task, as granted by the task slots. */
  proxy?: string | undefined;
  /** Busy milliseconds per stage as last reported by the executor (bottleneck statistics). */
  stageBusy?: StageBusy | undefined;
}

export type LogLevel = 'info' | 'warning' | 'error';

export interface SessionLogLine {
  time: Date;
  level: LogLevel;
  message: string;
  /** The task the line is about, if any. */
  taskId?: string | undefined;
}

export type NewSession = Omit<SessionRecord, 'id'>;
export type NewTask = Omit<TaskRecord, 'id' | 'sessionId'>;
export type SessionPatch = Partial<Pick<SessionRecord, 'state' | 'endedAt' | 'progress' | 'reason' | 'startedAt'>>;
export type TaskPatch = Partial<Pick<TaskRecord, 'state' | 'attempt' | 'startedAt' | 'endedAt' | 'progress' | 'message' | 'proxy' | 'stageBusy'>>;

// ---------------------------------------------------------------------------------------------
// Ports

/**
 * Persistence of jobs, sessions, tasks and session logs. The server implements it over the
 * configuration database; {@link InMemoryJobEngineStore} (memory-store.ts) serves tests.
 * Implementations store what they are given; the engine enforces the state machine.
 */
export interface JobEngineStore {
  /** A job by id or name; undefined when there is none. */
  loadJob(idOrName: string): Promise<JobDefinition | undefined>;
  /** Stores a new session and returns its id. */
  createSession(session: NewSession): Promise<string>;
  /** Stores new tasks of a session and returns their ids, in the same order. */
  createTasks(sessionId: string, tasks: NewTask[]): Promise<string[]>;
  updateSession(sessionId: string, patch: SessionPatch): Promise<void>;
  updateTask(taskId: string, patch: TaskPatch): Promise<void>;
  appendLog(sessionId: string, line: SessionLogLine): Promise<void>;
  loadSession(sessionId: string): Promise<SessionRecord | undefined>;
  listTasks(sessionId: string): Promise<TaskRecord[]>;
  /** Sessions in any of the given states (used at start-up to find sessions a crash left open). */
  listSessionsInState(states: readonly SessionState[]): Promise<SessionRecord[]>;
}

/** One disk of a VM, as found by the disk resolver. */
export interface DiskRef {
  /** The disk's name in the VM (target device, e.g. `vda`). */
  name: string;
  sizeBytes?: number | undefined;
  /** Where the resolver found it (host, image path, node name…), for the executor. */
  location?: Readonly<Record<string, string>> | undefined;
}

/** Lists the disks of a VM. The data path implements it with the hypervisor adapters. */
export interface DiskResolver {
  resolveDisks(job: JobDefinition, vm: string, signal: AbortSignal): Promise<DiskRef[]>;
}

/** What a task asks the resource scheduler for. */
export interface SlotRequest {
  sessionId: string;
  taskId: string;
  jobId: string;
  vm: string;
  disk: DiskRef;
  repository: string;
  /** The proxy pinned by the job, if any. */
  proxy?: string | undefined;
  /** Called while the task waits in the queue, with why (once per change of the reasons). */
  onWaiting?: ((reasons: readonly string[]) => void) | undefined;
}

/** A granted slot. `release` must be called exactly once, when the task ends. */
export interface SlotLease {
  /** The proxy (agent) chosen to run the task; undefined when the grant names none. */
  proxy?: string | undefined;
  /** The task's current share of its repository's rate limit (bytes/s); undefined = unlimited. */
  rateLimit?(): number | undefined;
  /** Called when the share changes (tasks start or end on the same repository); returns an unsubscribe. */
  watchRate?(listener: (bytesPerSecond: number | undefined) => void): () => void;
  release(): void;
}

/**
 * The resource scheduler as the engine sees it: a task awaits a slot before it starts (per proxy
 * and per repository limits in issue 5). `acquire` rejects when `signal` aborts (stop, window end).
 */
export interface TaskSlots {
  acquire(request: SlotRequest, signal: AbortSignal): Promise<SlotLease>;
}

/** What an executor receives for one task. */
export interface TaskSpec {
  sessionId: string;
  taskId: string;
  job: JobDefinition;
  vm: string;
  disk: DiskRef;
  /** A full backup was asked for, or the chain needs one. */
  full: boolean;
  attempt: number;
  /** The proxy the slot grant chose. */
  proxy?: string | undefined;
  /**
   * The disks of this VM that have a task in this round of the session (first try, or one retry
   * round: only the failed disks), this task's disk among them. A restore point holds every disk
   * of a VM, so the executor does the VM's other disks itself within one of these tasks.
   * Undefined: not known (the executor then does the whole VM in the VM's first task).
   */
  vmDisks?: readonly string[] | undefined;
}

export interface TaskContext {
  /** Aborted when the session is stopped or its backup window ends; the executor must return soon. */
  signal: AbortSignal;
  /** Report progress as often as convenient; the engine throttles what it stores. */
  progress(progress: TransferProgress): void;
  /** A line for the session log, attributed to this task. */
  log(level: LogLevel, message: string): void;
  /**
   * The task's current share of its repository's read/write rate limit in bytes/s (undefined =
   * unlimited), from the slot grant; it changes as tasks start and end on the same repository.
   */
  rateLimit?(): number | undefined;
  /** Called with the new share whenever it changes; returns an unsubscribe. */
  watchRate?(listener: (bytesPerSecond: number | undefined) => void): () => void;
  /**
   * Busy milliseconds per stage so far (src/transport/stage-times.ts, cumulative: each report
   * replaces the last). Stored with the task; `session show` names the bottleneck from them.
   */
  stageTimes?(busy: StageBusy): void;
}

/** A task that did not throw: success, or success with warnings (e.g. guest not quiesced). */
export type TaskOutcome = { state: 'success'; messages?: string[] } | { state: 'warning'; messages: string[] };

/**
 * Backs up one VM disk. Returns success or warning, or throws (the task fails with the error's
 * message; a throw after `signal` aborted counts as stopped).
 */
export interface TaskExecutor {
  execute(task: TaskSpec, context: TaskContext): Promise<TaskOutcome>;
  /**
   * A task of this round that will not be executed (no slot, stopped before it started): an
   * executor that shares work between the disk tasks of a VM stops waiting for it.
   */
  taskSkipped?(task: TaskSpec, reason: string): void;
}

/** Unlimited slots: every task starts at once. The resource scheduler replaces it (issue 5). */
export class UnlimitedTaskSlots implements TaskSlots {
  async acquire(request: SlotRequest, signal: AbortSignal): Promise<SlotLease> {
    signal.throwIfAborted();
    return { proxy: request.proxy, release: () => undefined };
  }
}
