// The `file-index` task (docs/formats/agent-link.md, "File index tasks"): this agent builds the
// guest file index of a point in a repository on its own host (mounted here, written beside the
// point exactly as the server does for its own repositories; sealed for encrypted points), and
// searches the indexes of that repository's points for the server's `search`.
import { BulwarkError } from '../../common/errors.js';
import { unlockChain } from '../../repository/chain-keys.js';
import type { Repository } from '../../repository/index.js';
import { fileIndexPath, indexRestorePoint, searchIndexes, type IndexResult, type SearchablePoint, type SearchResult } from '../../restore/catalog/catalog.js';
import type { FileIndexTask } from '../../transport/file-index-task.js';

export interface FileIndexTaskContext {
  repository(path: string): Promise<Repository>;
  /** The mounts' run dir (default: the mount module's). */
  readonly runDir?: string | undefined;
}

/**
 * Builds run one at a time per agent: walking an in-process mount blocks a libuv thread per file
 * call until this process's own NBD server (which needs one too) answers (see files.ts on the server).
 */
let building: Promise<unknown> = Promise.resolve();

export async function runFileIndexTask(c: FileIndexTaskContext, task: FileIndexTask): Promise<IndexResult | SearchResult> {
  const repository = await c.repository(task.repositoryPath);
  switch (task.action) {
    case 'build': {
      const run = building.then(() =>
        indexRestorePoint({
          repository,
          pointId: task.pointId,
          ...(c.runDir !== undefined ? { runDir: c.runDir } : {}),
          ...(task.password !== undefined ? { password: task.password } : {}),
        }),
      );
      building = run.catch(() => undefined);
      return run;
    }
    case 'search': {
      const files = new Map((await repository.listRestorePoints()).map((p) => [p.id, fileIndexPath(p)]));
      const points: SearchablePoint[] = task.points.map((p) => ({
        id: p.id,
        time: p.time,
        vm: p.vm,
        indexFile: files.get(p.id) ?? null,
        unlock: async (kdf) => {
          if (p.password === undefined) {
            throw new BulwarkError(`restore point ${p.id} is encrypted and the server does not know its password`, { kind: 'forbidden', context: { point: p.id } });
          }
          return unlockChain(p.password, kdf, { point: p.id });
        },
      }));
      return searchIndexes(points, task.pattern, { limit: task.limit });
    }
  }
}
