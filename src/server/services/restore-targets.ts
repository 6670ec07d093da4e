// Where a restore may write (docs/decisions/0009-restore-folders.md). Restores write as the server's
// or agent's user (root in the one-host install), so a path chosen by the caller is a root file
// write. Administrators (`configure`) may write anywhere; every other role that may restore writes
// only below the folders of the server setting `restoreFolders`. Putting a VM back where it was
// (restore over the original VM, files into the original guest) is what the restore permission is
// for and is not a path the caller chooses, so it is not confined here.
import { realpath } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import type { ServiceContext } from './common.js';
import { getSettings } from './settings.js';
import { can, type Principal } from './users.js';

/** What is written at the path, for the message: "restore disk --to", "mount --at", … */
export type RestoreTargetUse = 'restore disk --to' | 'restore files --to' | 'restore vm --storage' | 'instant-recovery migrate --storage' | 'mount --at';

/**
 * Is `target` (absolute, normalized) the same as or below one of `folders`? Pure: no file system.
 * A folder `/srv/restore` allows `/srv/restore` and `/srv/restore/a`, not `/srv/restores`.
 */
export function withinFolders(folders: readonly string[], target: string): string | undefined {
  const t = path.resolve(target);
  for (const f of folders) {
    const root = path.resolve(f);
    if (t === root || t.startsWith(root.endsWith(path.sep) ? root : root + path.sep)) return f;
  }
  return undefined;
}

/**
 * The path as the file system will resolve it: the deepest existing ancestor through realpath
 * (a symbolic link inside a restore folder must not lead out of it), then the rest as given.
 */
export async function resolveThroughLinks(target: string): Promise<string> {
  const rest: string[] = [];
  let at = path.resolve(target);
  for (;;) {
    try {
      return path.join(await realpath(at), ...rest.reverse());
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENOTDIR') throw err;
      const parent = path.dirname(at);
      if (parent === at) return path.resolve(target);
      rest.push(path.basename(at));
      at = parent;
    }
  }
}

/**
 * Refuses (403 forbidden) a restore target outside the restore folders for a principal without
 * `configure`. `local`: the path is on this server's host (links are followed); a path on another
 * agent's host is checked as written, after normalization.
 */
export async function checkRestoreTarget(
  ctx: ServiceContext,
  principal: Pick<Principal, 'user' | 'role'> | undefined,
  target: string,
  use: RestoreTargetUse,
  o: { local: boolean },
): Promise<void> {
  // No principal: an in-process caller (the console through the data directory's socket is the
  // local administrator and has one); routes always set it.
  if (!principal || can(principal.role, 'configure')) return;
  const { restoreFolders } = await getSettings(ctx);
  const where = o.local ? await resolveThroughLinks(target) : path.resolve(target);
  if (withinFolders(restoreFolders, where) !== undefined) return;
  const allowed = restoreFolders.length > 0 ? `the restore folders are ${restoreFolders.join(', ')}` : 'no restore folder is set';
  throw new BulwarkError(`${use} ${target}: user ${principal.user} (role ${principal.role}) may restore only into the restore folders, and ${allowed}`, {
    kind: 'forbidden',
    context: { target, resolved: where, user: principal.user },
    hint: 'write below a restore folder, or ask an administrator to add one (bulwark settings set restore-folders DIR) or to run this restore',
  });
}
