// The `file-index` agent task (docs/formats/agent-link.md, "File index tasks"): the guest file
// index of a point in a repository on another agent's host is built, and searched, by that agent,
// where the repository folder is; only the result (counts, matches) comes back to the server.

/** Build (or rebuild) one point's index, stored beside the point as on the server's own host. */
export interface FileIndexBuildTask {
  readonly kind: 'file-index';
  readonly action: 'build';
  readonly taskId: string;
  readonly repositoryPath: string;
  readonly pointId: string;
  /** Password of an encrypted point (its index is then sealed). */
  readonly password?: string | undefined;
}

/** Search the indexes of some points of one repository. */
export interface FileIndexSearchTask {
  readonly kind: 'file-index';
  readonly action: 'search';
  readonly taskId: string;
  readonly repositoryPath: string;
  readonly pattern: string;
  readonly limit: number;
  /** The points (catalog id, time, VM) and, for encrypted ones the server knows, the password. */
  readonly points: ReadonlyArray<{ readonly id: string; readonly time: string; readonly vm: string; readonly password?: string | undefined }>;
}

export type FileIndexTask = FileIndexBuildTask | FileIndexSearchTask;
