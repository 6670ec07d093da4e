// One Repository per folder per process, for the long-running roles (server, agent). Opening a
// repository sweeps the leftovers of interrupted writes in every VM folder, taking each folder's
// lock (about 65-85 ms per VM folder measured, docs/decisions/0008): worth doing once per process,
// since a folder is written by one process only and a crash of that process ends it. Offline tools
// and tests that check the sweep call openRepository itself, which always sweeps.
import { stat } from 'node:fs/promises';
import path from 'node:path';
import { openRepository, type Repository } from './repository.js';

const opened = new Map<string, Promise<Repository>>();

/**
 * The process's Repository of folder `root`, opened (and swept) on first use. A failed open is
 * not kept; a folder gone since (the repository was removed) is opened again, so the caller gets
 * openRepository's error naming it.
 */
export async function openSharedRepository(root: string, opts: { create?: boolean } = {}): Promise<Repository> {
  const abs = path.resolve(root);
  const hit = opened.get(abs);
  if (hit) {
    const folder = await stat(abs).then((s) => s.isDirectory(), () => false);
    if (folder) return hit;
    opened.delete(abs);
  }
  const r = openRepository(abs, opts);
  opened.set(abs, r);
  r.catch(() => {
    if (opened.get(abs) === r) opened.delete(abs);
  });
  return r;
}
