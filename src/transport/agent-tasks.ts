// The task part of the agent link (docs/formats/agent-link.md, "Tasks"): what the server hands an
// agent and what the agent reports back, as JSON over the agent's long poll. Shapes only; the
// server side is src/server/dispatch/, the agent side src/agent/remote/.
import type { HypervisorConnection } from '../hypervisor/index.js';
import type { StageBusy } from './stage-times.js';
import type { NamedLimit } from './throttle.js';
import type { FileIndexTask } from './file-index-task.js';
import type { MountTask } from './mount-tasks.js';
import type { RestoreTask } from './restore-tasks.js';

/** A restore point as JSON (RestorePointInfo with `time` as an ISO string). */
export type WirePoint = Record<string, unknown>;

/** The previous point of a chain and the hypervisor checkpoint stored with it. */
export interface WirePrevious {
  readonly point: WirePoint;
  readonly checkpoint: Record<string, unknown>;
}

/** Lists a VM's disks through the agent's hypervisor connections. Result: `WireDisk[]`. */
export interface ResolveDisksTask {
  readonly kind: 'resolve-disks';
  readonly taskId: string;
  readonly hosts: readonly HypervisorConnection[];
  readonly vm: string;
}

/** Lists the VMs of the agent's hypervisor connections (`bulwark vm list`). Result: `ListVmsResult`. */
export interface ListVmsTask {
  readonly kind: 'list-vms';
  readonly taskId: string;
  readonly hosts: readonly HypervisorConnection[];
}

/** One VM as `list-vms` reports it (no configuration: names, state and disks). */
export interface WireVm {
  readonly name: string;
  readonly uuid?: string | undefined;
  readonly state: 'running' | 'paused' | 'shut-off' | 'other';
  readonly disks: ReadonlyArray<{ readonly name: string; readonly sizeBytes: number; readonly format: string; readonly image: string }>;
}

/** Result of `list-vms`: per host, in the task's order, its VMs or why they could not be listed. */
export interface ListVmsResult {
  readonly hosts: ReadonlyArray<{ readonly vms: readonly WireVm[] } | { readonly error: string }>;
}

export interface WireDisk {
  readonly name: string;
  readonly sizeBytes: number;
  readonly location: Record<string, string>;
}

/** Repository side of a backup: receive one VM's restore point from a source agent. */
export interface BackupTargetTask {
  readonly kind: 'backup-target';
  readonly taskId: string;
  /** 64 hex: proves to the data-mover listener that a stream belongs to this task. */
  readonly secret: string;
  readonly repositoryPath: string;
  readonly job: string;
  readonly vm: string;
  /** Hypervisor chain id: the previous point counts only when its checkpoint is of this chain. */
  readonly chainId: string;
  /** The job's current password: a full (a new chain) is encrypted with it. */
  readonly password?: string | undefined;
  /**
   * Every other password that may open the job's existing chains, newest first (its earlier ones,
   * then those added by hand): the agent continues the latest chain with the one that opens it
   * (latestChainPassword), so a changed password applies from the next full. Like `password`, only
   * ever sent over the agent link's mutual TLS and never logged.
   */
  readonly passwords?: readonly string[] | undefined;
  /** The agent allowed to send (the certificate's CN must be this name). */
  readonly sourceAgent: string;
  /**
   * The job's settings as the session runs them (JobDefinition.settings): with them the agent runs
   * the chain steps around the point (plan in `ready`, retention and maintenance after the commit).
   */
  readonly settings?: Readonly<Record<string, unknown>> | undefined;
  /** `job run --full`. */
  readonly fullRequested?: boolean | undefined;
  /** ISO time of the server's clock: days, retention and the point's time are judged by it. */
  readonly now?: string | undefined;
  /**
   * Per-job storage (agent-link.md, "Per-job storage on an agent's repository"): ONE point for
   * every VM of the job, in its `_all` folder (`vm` is `_all`). Each VM's source agent sends its VM
   * on transfer id `<taskId>/<vm>`, as `sourceAgent` (its certificate CN); `chainId` is the VM's
   * hypervisor chain id. In the job's order.
   */
  readonly vms?: ReadonlyArray<{ readonly vm: string; readonly sourceAgent: string; readonly chainId: string }> | undefined;
}

/** Blocks of one disk to read again and store fresh (damaged in the repository). */
export interface WireRepair {
  readonly disk: string;
  readonly blocks: readonly number[];
}

/** What a run writes, as the repository agent planned it (RunPlan plus the repair). */
export interface WireRunPlan {
  readonly kind: 'full' | 'incremental' | 'synthetic-full' | 'reverse';
  readonly reason: string;
  readonly chainMethod: 'forward' | 'reverse';
  readonly parent: string | null;
  readonly repair: readonly WireRepair[];
}

/** Result of a backup-target task. */
export interface BackupTargetResult {
  readonly point: WirePoint;
  readonly disks: ReadonlyArray<{ readonly name: string; readonly storedBytes: number; readonly storedBlocks: number; readonly unchangedBlocks: number }>;
  /** With `settings`: the VM's points after the chain steps, and their warnings. */
  readonly points?: readonly WirePoint[] | undefined;
  readonly warnings?: readonly string[] | undefined;
}

/** Verifies a VM's chain in a repository on this agent's host (a health-check session). */
export interface HealthCheckTask {
  readonly kind: 'health-check';
  readonly taskId: string;
  readonly repositoryPath: string;
  readonly job: string;
  readonly vm: string;
  readonly settings: Readonly<Record<string, unknown>>;
  readonly now: string;
  readonly password?: string | undefined;
  /** As for backup-target: the check reads the chain with whichever of `password` and these opens it. */
  readonly passwords?: readonly string[] | undefined;
}

/** Result of a health-check task. */
export interface HealthCheckResult {
  readonly warnings: readonly string[];
  /** Disk names of the VM's latest point. */
  readonly disks: readonly string[];
  readonly points: readonly WirePoint[];
}

/** Source side of a backup: read the VM next to this agent and send it to the repository agent. */
export interface BackupSourceTask {
  readonly kind: 'backup-source';
  readonly taskId: string;
  /** The data-mover task id: the backup-target task's id (what the repository agent's grant is keyed by). */
  readonly transferId: string;
  readonly secret: string;
  /** The repository agent's data-mover listener and its agent name (its certificate's CN). */
  readonly target: { readonly host: string; readonly port: number; readonly agent: string };
  readonly hosts: readonly HypervisorConnection[];
  readonly job: string;
  readonly vm: string;
  readonly full: boolean;
  /** Why `full` (the repository agent's plan reason), said in each disk's full-read line. */
  readonly fullReason?: string | undefined;
  readonly previous: WirePrevious | null;
  /** A full's new chain: forward (default) or reverse. */
  readonly chainMethod?: 'forward' | 'reverse' | undefined;
  /** Blocks to read too and store fresh (the repair of damage a health check found). */
  readonly repair?: readonly WireRepair[] | undefined;
  /** Disks the job excludes (`DISK` or `VM:DISK`). */
  readonly excludeDisks?: readonly string[] | undefined;
  readonly mode?: 'online' | 'offline' | undefined;
  readonly requireGuestProcessing?: boolean | undefined;
  readonly blockSize?: number | undefined;
  readonly compression?: 'none' | 'zstd' | 'lz4' | undefined;
  /** Parallel TCP streams (5; 1 when the job's multithreaded transfer is off). */
  readonly streams: number;
  readonly resumeWindowMs: number;
  /** Rate limits to enforce on the data streams: throttling rules (shared by name) and the repository share. */
  readonly limits: readonly NamedLimit[];
  /**
   * The VM's disks that have a task of their own on the server (one task per disk): each is backed
   * up once the server names it in an events reply (`disks`: its task has its slot); the VM's other
   * disks at once. Commit when all are done. Absent: every disk at once, one after another.
   */
  readonly diskTasks?: readonly string[] | undefined;
  /**
   * Per-job storage: the VM goes into the job's increment even without a checkpoint of its own
   * (read whole, zero blocks explicit); `blockSize` is then the chain's.
   */
  readonly intoIncrement?: boolean | undefined;
}

/** Restores one disk of a restore point in a repository on this agent's host to a path on this host. */
export interface RestoreDiskTask {
  readonly kind: 'restore-disk';
  readonly taskId: string;
  readonly repositoryPath: string;
  readonly pointId: string;
  readonly disk: string;
  readonly to: string;
  readonly format?: 'raw' | 'qcow2' | undefined;
  readonly overwrite?: boolean | undefined;
  /** Also compute the SHA-256 of the whole image (result `sha256`). */
  readonly digest?: boolean | undefined;
  readonly password?: string | undefined;
}

/** Result of a restore-disk task (as restoreDisk returns it). */
export interface WireRestoredDisk {
  readonly path: string;
  readonly format: 'raw' | 'qcow2';
  readonly size: number;
  /** Only when the task asked for `digest`. */
  readonly sha256?: string | undefined;
  readonly bytesWritten: number;
  readonly durationMs: number;
}

/** Deletes the points of VMs no longer in a job once their days are over (the server's periodic sweep). */
export interface RemovedVmSweepTask {
  readonly kind: 'removed-vm-sweep';
  readonly taskId: string;
  readonly repositoryPath: string;
  readonly job: string;
  readonly method: 'forever-forward' | 'forward' | 'reverse';
  /** The job's VMs now: their folders are untouched. */
  readonly vms: readonly string[];
  /** removedVmRetentionDays, counted from a removed VM's newest point. */
  readonly days: number;
  readonly now: string;
}

/** Result of a removed-vm-sweep task. */
export interface RemovedVmSweepResult {
  readonly vms: ReadonlyArray<{ readonly vm: string; readonly removedPoints: readonly string[]; readonly points: readonly WirePoint[] }>;
}

export type AgentTask = ResolveDisksTask | ListVmsTask | BackupTargetTask | BackupSourceTask | RestoreDiskTask | HealthCheckTask | RemovedVmSweepTask | RestoreTask | FileIndexTask | MountTask;

/** `POST /agents/tasks/poll` body. */
export interface PollRequest {
  /** Random per agent process: a new one tells the server the agent restarted (its old tasks are gone). */
  readonly bootId: string;
  /** Task ids the agent is running now. */
  readonly running: readonly string[];
}

/** `POST /agents/tasks/poll` reply: new tasks and tasks to stop. */
export interface PollReply {
  readonly tasks: readonly AgentTask[];
  readonly cancel: ReadonlyArray<{ readonly taskId: string; readonly reason: string }>;
}

export type TaskEvent =
  | { readonly type: 'progress'; readonly progress: Record<string, unknown>; readonly stageTimes?: StageBusy | undefined }
  | { readonly type: 'log'; readonly level: 'info' | 'warning' | 'error'; readonly message: string; readonly disk?: string | undefined }
  /** backup-target: listening for the source; `previous` found in the repository. */
  | {
      readonly type: 'ready';
      readonly port: number;
      readonly host?: string | undefined;
      readonly previous: WirePrevious | null;
      readonly plan?: WireRunPlan | undefined;
      /** Per-job target: each VM's checkpoint in the point the run continues (null: none). */
      readonly vms?: Readonly<Record<string, WirePrevious | null>> | undefined;
      /** Per-job target continuing a chain: the chain's block size. */
      readonly blockSize?: number | undefined;
    }
  | { readonly type: 'result'; readonly ok: true; readonly value: unknown; readonly stageTimes?: StageBusy | undefined }
  | { readonly type: 'result'; readonly ok: false; readonly error: { readonly kind: string; readonly message: string; readonly hint?: string | undefined } };

/** `POST /agents/tasks/:taskId/events` body and reply. */
export interface EventsRequest {
  readonly events: readonly TaskEvent[];
}
export interface EventsReply {
  /** The server wants the task stopped (or no longer knows it). */
  readonly cancel: boolean;
  /** backup-source: the rate limits that apply now (a rule's hours began or ended, the repository share changed). */
  readonly limits?: readonly NamedLimit[] | undefined;
  /** backup-source with `diskTasks`: the disks whose task has its slot now (cumulative: it only grows). */
  readonly disks?: readonly string[] | undefined;
}
