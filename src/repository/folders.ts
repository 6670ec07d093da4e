// Finding VM folders in a repository and turning a .vbm body into chains and restore points.
import { readdir } from 'node:fs/promises';
import path from 'node:path';
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
