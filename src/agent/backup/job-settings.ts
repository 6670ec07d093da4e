// What the data path reads from a job (JobDefinition.settings, opaque to the engine) and how a
// VM's backup progress becomes one disk task's progress: shared by the in-process executor and
// the server's dispatch of tasks to agents.
import type { JobDefinition, TransferProgress } from '../../server/jobs/ports.js';
import type { BackupProgress } from './disk-backup.js';

/** A job setting of the expected type, or undefined (absent or of another type). */
export function setting<T>(job: JobDefinition, key: string, check: (v: unknown) => v is T): T | undefined {
  const v = job.settings?.[key];
  return check(v) ? v : undefined;
}
export const isNumber = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v);
export const isBoolean = (v: unknown): v is boolean => typeof v === 'boolean';
export const isCompression = (v: unknown): v is 'none' | 'zstd' | 'lz4' => v === 'none' || v === 'zstd' || v === 'lz4';
export const isMode = (v: unknown): v is 'online' | 'offline' => v === 'online' || v === 'offline';

/** How long a finished VM run stays known to disk tasks that join late (retries, slow slots). */
export const KEEP_SETTLED_MS = 60 * 60 * 1000;

/** One disk's share of a VM's backup progress, as the engine's task progress. */
export function diskProgress(p: BackupProgress, disk: string): TransferProgress {
  const d = p.disks[disk];
  if (!d) return { bytesRead: 0, bytesTransferred: 0, bytesStored: 0, total: 0 };
  // total: an upper bound of what is left to read that shrinks to bytesRead when the disk is done
  // (zero and unchanged extents are never read, so the disk's size would never be reached).
  const total = d.done ? d.bytesRead : d.bytesRead + (d.size - d.bytesProcessed);
  // Transferred: what left the source after compression (a repository in this process: what it
  // stored; across the network: the bytes handed to it), live as the disk goes.
  return { bytesRead: d.bytesRead, bytesTransferred: d.bytesStored, bytesStored: d.bytesStored, total };
}
