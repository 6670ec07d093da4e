// The `mount` agent task (docs/formats/agent-link.md, "Mount tasks"): an agent as mount server —
// it mounts a restore point's guest file systems on its own host, reading the point from its own
// repository or through the data mover from the repository's agent, and copies files out to a
// folder there or into a running VM through its guest agent, or holds the mount for browsing.
// Shapes only; agent side src/agent/remote/mount-tasks.ts, server side src/server/api/files.ts.
import type { HypervisorConnection } from '../hypervisor/index.js';
import type { RestoreFilesResult } from '../restore/mount/restore-files.js';
import type { MountSessionInfo } from '../restore/mount/sessions.js';
import type { WireRestoreSource } from './restore-tasks.js';

/** The catalog's view of the point (the data-mover source carries no time). */
export interface WireMountPoint {
  readonly vm: string;
  /** ISO time of the point. */
  readonly time: string;
}

/** Copy guest paths out of the point, to a folder on this agent's host or into the running VM. */
export interface MountRestoreFilesTask {
  readonly kind: 'mount';
  readonly action: 'restore-files';
  readonly taskId: string;
  readonly pointId: string;
  readonly point: WireMountPoint;
  readonly source: WireRestoreSource;
  readonly paths: readonly string[];
  /** Absolute folder on this agent's host. */
  readonly to?: string | undefined;
  readonly overwrite?: boolean | undefined;
  /** Write into the running VM instead (found on these hypervisor connections of this agent). */
  readonly guest?: { readonly hosts: readonly HypervisorConnection[]; readonly vm: string; readonly conflict: 'fail' | 'overwrite' | 'keep-both' } | undefined;
}

/** Mount the point for browsing and hold it until the server cancels the task. */
export interface MountOpenTask {
  readonly kind: 'mount';
  readonly action: 'open';
  readonly taskId: string;
  /** The server's id of the mount (the agent's mount has this id too). */
  readonly mountId: string;
  readonly pointId: string;
  readonly point: WireMountPoint;
  readonly source: WireRestoreSource;
  /** Absolute folder on this agent's host (new or empty). */
  readonly at?: string | undefined;
  /** The server's `detached` (kept so a restarted server re-adopts the mount as it was). */
  readonly detached?: boolean | undefined;
}

/** The mounts this agent holds now. */
export interface MountListTask {
  readonly kind: 'mount';
  readonly action: 'list';
  readonly taskId: string;
}

export type MountTask = MountRestoreFilesTask | MountOpenTask | MountListTask;

/** One mount of the `list` result: the `open` task holding it and the serve task it reads from. */
export type WireHeldMount = WireMountInfo & {
  readonly taskId: string;
  readonly serve?: { readonly agent: string; readonly taskId: string } | undefined;
};

/** A mount as `GET /mounts/{id}` shows it: the session table's shape, as JSON. */
export type WireMountInfo = MountSessionInfo;

/** Result of `restore-files`: the restore-files reply plus the agent's name. */
export type WireRestoreFilesResult = RestoreFilesResult & { readonly point: string; readonly vm: string; readonly target: string; readonly agent: string };
