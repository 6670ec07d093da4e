// Finding VM folders in a repository and turning a .vbm body into chains and restore points.
import { access, readdir } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError } from '../common/errors.js';
import type { ChainMetadata, ChainRecord, Compression, PointRecord } from '../format/index.js';
import type { RestorePointInfo } from './restore-point.js';

export interface VmFolder {
  readonly dir: string;
  readonly vbmPath: string;
}

/** A backup chain of one VM: a full and the increments that depend on it. */
export interface BackupChain {
  readonly id: string;
  readonly job: string;
  readonly vm: string;
  readonly method: 'forward' | 'reverse';
  readonly blockSize: number;
  readonly compression: Compression;
  readonly encrypted: boolean;
  readonly passwordHint: string | null;
  /** Oldest first. */
  readonly points: readonly RestorePointInfo[];
  /** The VM folder holding the chain's files. */
  readonly folder: string;
}

/** Every VM folder (`<job>/<vm>/`) under `root`, sorted. */
export async function listVmFolders(root: string): Promise<VmFolder[]> {
  const out: VmFolder[] = [];
  for (const job of await readdir(root, { withFileTypes: true })) {
    if (!job.isDirectory()) continue;
    for (const vm of await readdir(path.join(root, job.name), { withFileTypes: true })) {
      if (!vm.isDirectory()) continue;
      const dir = path.join(root, job.name, vm.name);
      out.push({ dir, vbmPath: path.join(dir, `${vm.name}.vbm`) });
    }
  }
  return out.sort((a, b) => a.dir.localeCompare(b.dir));
}

/** Sub-folder names of `dir` (none when it cannot be read), at most `most`. */
async function subfolders(dir: string, most: number): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  return entries.filter((e) => e.isDirectory()).slice(0, most).map((e) => e.name);
}

async function holdsChainMetadata(vmDir: string): Promise<boolean> {
  return access(path.join(vmDir, `${path.basename(vmDir)}.vbm`)).then(
    () => true,
    () => false,
  );
}

/**
 * The repository folder next to `root` when `root`, which holds no VM folder with chain metadata,
 * is one level off: a VM folder (it holds a .vbm itself), a job folder (CHILD/CHILD.vbm), or the
 * folder above a repository (A/JOB/VM/VM.vbm). Null when nothing like a repository is near. Reads a
 * bounded number of folders: it runs only when the folder given holds no chain.
 */
export async function repositoryNear(root: string): Promise<string | null> {
  const entries = await readdir(root, { withFileTypes: true }).catch(() => []);
  if (entries.some((e) => e.isFile() && e.name.endsWith('.vbm'))) return path.dirname(path.dirname(root));
  const children = await subfolders(root, 200);
  for (const c of children) if (await holdsChainMetadata(path.join(root, c))) return path.dirname(root);
  for (const a of children.slice(0, 50)) {
    for (const job of await subfolders(path.join(root, a), 50)) {
      for (const vm of await subfolders(path.join(root, a, job), 20)) {
        if (await holdsChainMetadata(path.join(root, a, job, vm))) return path.join(root, a);
      }
    }
  }
  return null;
}

/**
 * Refuses a folder that holds no chain but sits one level off a repository (an offline tool given
 * the job's or VM's folder, or the folder above): it would report "no damage" having read nothing.
 */
export async function assertNotBesideRepository(root: string, tool: string): Promise<void> {
  const near = await repositoryNear(root);
  if (near === null) return;
  throw new BulwarkError(`${root} is not a repository folder (it holds no JOB/VM/VM.vbm), but ${near} is`, {
    kind: 'invalid',
    context: { repository: root },
    hint: `give the repository folder: bulwark repo ${tool} ${near}`,
  });
}

export function chainsOfFolder(body: ChainMetadata, dir: string): BackupChain[] {
  return body.chains.map((c) => ({
    id: c.id,
    job: body.job,
    vm: body.vm,
    method: c.method,
    blockSize: c.blockSize,
    compression: c.compression,
    encrypted: c.encryption !== null,
    passwordHint: c.encryption?.hint ?? null,
    folder: dir,
    points: c.points.map((p) => pointInfo(body, c, p, dir)),
  }));
}

function pointInfo(body: ChainMetadata, c: ChainRecord, p: PointRecord, dir: string): RestorePointInfo {
  return {
    id: p.id,
    job: body.job,
    vm: body.vm,
    chainId: c.id,
    method: c.method,
    kind: p.kind,
    time: new Date(p.time),
    file: path.join(dir, p.file),
    fileBytes: p.fileBytes,
    base: p.base,
    disks: p.disks,
    blockSize: c.blockSize,
    compression: c.compression,
    encrypted: c.encryption !== null,
    generation: p.generation,
    fileId: p.fileId,
    ...(p.aliasFileIds ? { aliasFileIds: p.aliasFileIds } : {}),
    ...damageOf(body, p.id),
  };
}

/** The health check's mark on a point (ChainMetadata.damagedPoints), as RestorePointInfo.damage. */
function damageOf(body: ChainMetadata, id: string): Pick<RestorePointInfo, 'damage'> {
  const mark = body.damagedPoints?.find((m) => m.point === id);
  if (!mark) return {};
  return { damage: { metadata: mark.metadataDamaged, disks: mark.disks.filter((d) => d.blocks.length > 0).map((d) => d.disk) } };
}
