// The restore task kinds of the agent link (docs/formats/agent-link.md, "Restore tasks"): a VM
// restored or instantly recovered on the agent of the host it goes to, reading the point from a
// repository on its own host or through the data-mover protocol from the repository's agent.
// Shapes, and TypeBox schemas of the replies the server checks before use (an agent of another
// version, a damaged reply); agent side src/agent/remote/restore-tasks.ts, server side
// src/server/dispatch/recovery.ts.
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import type { HypervisorConnection } from '../hypervisor/index.js';

/** A point's stored VM configuration and disks (the restore-point-config result). */
export interface WirePointConfig {
  readonly vm: string;
  /** Base64 of the point-metadata JSON (src/agent/backup/point-metadata.ts). */
  readonly config: string;
  readonly disks: ReadonlyArray<{ readonly name: string; readonly size: number }>;
}

/** Where the agent of the restore's host reads the point from. */
export type WireRestoreSource =
  | { readonly kind: 'repository'; readonly repositoryPath: string; readonly password?: string | undefined }
  | (WirePointConfig & {
      readonly kind: 'agent';
      /** The repository's agent (its certificate's CN) and its data-mover listener. */
      readonly agent: string;
      readonly host: string;
      readonly port: number;
      /** The restore-serve task id (HELLO taskId) and its secret. */
      readonly transferId: string;
      readonly secret: string;
      readonly streams?: number | undefined;
    });

export interface RestorePointConfigTask {
  readonly kind: 'restore-point-config';
  readonly taskId: string;
  readonly repositoryPath: string;
  readonly pointId: string;
  readonly password?: string | undefined;
}

export interface RestoreServeTask {
  readonly kind: 'restore-serve';
  readonly taskId: string;
  readonly repositoryPath: string;
  readonly pointId: string;
  readonly password?: string | undefined;
  /** 64 hex: a reader stream's HELLO must carry it. */
  readonly secret: string;
  /** The agent allowed to read (the certificate's CN must be this name). */
  readonly readerAgent: string;
}

export interface RestoreVmTask {
  readonly kind: 'restore-vm';
  readonly taskId: string;
  /** The host the VM is restored to (one of this agent's hypervisor connections). */
  readonly hypervisor: HypervisorConnection;
  readonly pointId: string;
  readonly name?: string | undefined;
  readonly storage?: string | undefined;
  readonly format?: 'raw' | 'qcow2' | undefined;
  readonly powerOn?: boolean | undefined;
  /** Report each disk's SHA-256 (added 2026-11-26; absent: no digest, the fast write path). */
  readonly digest?: boolean | undefined;
  readonly source: WireRestoreSource;
}

export type InstantRecoveryAction =
  | {
      readonly action: 'start';
      readonly pointId: string;
      readonly name: string;
      readonly source: WireRestoreSource;
      readonly cacheBytes?: number | undefined;
      /** The server's name of the host the VM runs on; the agent reports it back with the session (added 2026-11-26). */
      readonly host?: string | undefined;
      /** The NICs' network: 'disconnected' when absent (startInstantRecovery's `network`; added 2026-11-26). */
      readonly network?: 'disconnected' | 'recorded' | undefined;
    }
  | { readonly action: 'show'; readonly session: string }
  | { readonly action: 'list' }
  | {
      readonly action: 'migrate';
      readonly session: string;
      readonly storage?: string | undefined;
      /**
       * Where the migrated VM lives as a VM of its own (added 2026-11-26): its folder (sockets,
       * logs; default `<agent data>/vms/NAME`) and QMP socket (default `vmDir/qmp.sock`), from
       * the host's QMP glob as `restore vm` places a new VM.
       */
      readonly vmDir?: string | undefined;
      readonly qmpSocket?: string | undefined;
    }
  | {
      readonly action: 'stop';
      readonly session: string;
      /** A migrated VM (added 2026-11-26): forget it and leave it running (absent: shut it down; the server refuses that without the user's word). */
      readonly forget?: boolean | undefined;
    };

export type InstantRecoveryTask = InstantRecoveryAction & { readonly kind: 'instant-recovery'; readonly taskId: string };

/** An instant recovery session on an agent, as JSON (InstantSessionInfo with startedAt as ISO). */
export interface WireInstantSession {
  readonly id: string;
  readonly name: string;
  readonly vm: string;
  readonly pointId: string;
  readonly state: 'running-from-backup' | 'migrating' | 'migrated' | 'stopped';
  readonly runningFromBackup: boolean;
  readonly startedAt: string;
  readonly pid: number | null;
  readonly dir: string;
  readonly qmpSocket: string;
  readonly agentSocket: string;
  readonly consoleLog: string;
  readonly disks: ReadonlyArray<{ readonly name: string; readonly size: number; readonly overlay: string; readonly target: string | null }>;
  /** The restore-serve task the session reads from (repository agent and task id), while it does: a restarted server re-adopts it. */
  readonly serve?: { readonly agent: string; readonly taskId: string } | undefined;
  /** The host name the start named (a restarted server lists the session with it). */
  readonly host?: string | undefined;
}

export type RestoreTask = RestorePointConfigTask | RestoreServeTask | RestoreVmTask | InstantRecoveryTask;

// ---- Reply schemas (extra properties are allowed: a newer agent may add fields) ----

export const WirePointConfigSchema = Type.Object({
  vm: Type.String(),
  config: Type.String(),
  disks: Type.Array(Type.Object({ name: Type.String(), size: Type.Number() })),
});

/** What an instant recovery session is, on the agent link and in the REST API alike (each adds its own ids). */
export const instantSessionFields = {
  state: Type.Union([Type.Literal('running-from-backup'), Type.Literal('migrating'), Type.Literal('migrated'), Type.Literal('stopped')]),
  runningFromBackup: Type.Boolean(),
  startedAt: Type.String(),
  pid: Type.Union([Type.Integer(), Type.Null()]),
  dir: Type.String(),
  qmpSocket: Type.String(),
  agentSocket: Type.String(),
  consoleLog: Type.String(),
  disks: Type.Array(Type.Object({ name: Type.String(), size: Type.Number(), overlay: Type.String(), target: Type.Union([Type.String(), Type.Null()]) })),
};

export const WireInstantSessionSchema = Type.Object({
  id: Type.String(),
  name: Type.String(),
  vm: Type.String(),
  pointId: Type.String(),
  ...instantSessionFields,
  serve: Type.Optional(Type.Object({ agent: Type.String(), taskId: Type.String() })),
  host: Type.Optional(Type.String()),
});

/** The reply of each instant-recovery action. */
export const InstantRecoveryReplySchemas = {
  start: WireInstantSessionSchema,
  show: WireInstantSessionSchema,
  migrate: WireInstantSessionSchema,
  list: Type.Object({ sessions: Type.Array(WireInstantSessionSchema) }),
  stop: Type.Object({ stopped: Type.String() }),
} as const satisfies Record<InstantRecoveryAction['action'], TSchema>;

export type InstantRecoveryReply<A extends InstantRecoveryAction['action']> = Static<(typeof InstantRecoveryReplySchemas)[A]>;

// A schema that drifts from its interface fails the typecheck here.
type Fits<T extends U, U> = T;
export type WireSchemasFit = [Fits<Static<typeof WirePointConfigSchema>, WirePointConfig>, Fits<Static<typeof WireInstantSessionSchema>, WireInstantSession>];

/**
 * A restore-disk task's progress event (`{ type: 'progress', progress }`, added 2026-11-26): bytes
 * of the disk done (holes count), data written to the image, the disk's size. The agent sends the
 * latest with its event flush; the server writes it to the restore's session.
 */
export interface WireRestoreDiskProgress {
  readonly bytesDone: number;
  readonly bytesWritten: number;
  readonly size: number;
}

/** The restore-disk progress in a progress event, or undefined when it holds none (another agent version). */
export function restoreDiskProgressOf(progress: Record<string, unknown>): WireRestoreDiskProgress | undefined {
  const { bytesDone, bytesWritten, size } = progress;
  if (typeof bytesDone !== 'number' || typeof bytesWritten !== 'number' || typeof size !== 'number') return undefined;
  return { bytesDone, bytesWritten, size };
}
