// Where a full VM restore reads its restore point from: the point's stored VM configuration and
// disk sizes, and a way to write one disk to a file. The repository on this host
// (repositoryPointSource, restoreDisk) or, on another agent's host, the data-mover reader
// (src/agent/remote/restore-reader.ts) — restoreVm is the same either way.
import type { Repository } from '../../repository/index.js';
import { restoreDisk, type RestoreDiskFormat } from '../disk/restore-disk.js';

export interface PointDiskWrite {
  readonly disk: string;
  readonly to: string;
  readonly format: RestoreDiskFormat;
  /** Replace an existing file at `to` (restore over the original VM). */
  readonly overwrite: boolean;
  readonly signal?: AbortSignal | undefined;
  /** Bytes of this disk done so far. */
  readonly onProgress?: ((bytesDone: number) => void) | undefined;
  /** Also compute the SHA-256 of the written raw image (costs the restore's fast path: decision 0006). */
  readonly digest?: boolean | undefined;
}

export interface WrittenDisk {
  readonly path: string;
  readonly format: RestoreDiskFormat;
  readonly size: number;
  /** SHA-256 (hex) of the disk's raw contents; only when asked (`digest`). */
  readonly sha256?: string;
}

export interface VmPointSource {
  /** The point's stored VM configuration (point metadata) and its disks. */
  describe(): Promise<{ readonly config: Buffer; readonly disks: readonly { readonly name: string; readonly size: number }[] }>;
  /** Writes one disk to `to` (complete under its name only when done). */
  writeDisk(w: PointDiskWrite): Promise<WrittenDisk>;
}

/** A restore point in a repository on this host. */
export function repositoryPointSource(repository: Repository, pointId: string, password: string | undefined): VmPointSource {
  const opts = password === undefined ? {} : { password };
  return {
    async describe() {
      const point = await repository.openRestorePoint(pointId, opts);
      try {
        return { config: point.vmConfig, disks: point.disks.map((d) => ({ name: d.name, size: d.size })) };
      } finally {
        await point.close();
      }
    },
    async writeDisk(w) {
      const r = await restoreDisk({
        repository,
        pointId,
        disk: w.disk,
        to: w.to,
        format: w.format,
        overwrite: w.overwrite,
        // Only when asked: the digest disables the O_DIRECT write path (decision 0006).
        imageDigest: w.digest === true,
        ...opts,
        ...(w.signal ? { signal: w.signal } : {}),
        onProgress: (p) => w.onProgress?.(p.bytesDone),
      });
      return { path: r.path, format: r.format, size: r.size, ...(r.sha256 !== undefined ? { sha256: r.sha256 } : {}) };
    },
  };
}
