// Restores one disk of a restore point to a file: raw (sparse: blocks that read as zeroes are not
// written, the file is truncated to the disk's size) or qcow2 (the raw sparse image is written to a
// temporary file next to the target, then converted by `qemu-img convert`, which keeps it sparse).
// Blocks are read ahead in parallel from the repository; the SHA-256 of the disk's contents (the
// raw image, whatever the output format) is computed on the way. The result appears under its
// name only when complete (rename); an existing file is refused unless `overwrite` is set.
import { createHash } from 'node:crypto';
import { lstat, open, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { runTool } from '../../common/process.js';
import type { Repository } from '../../repository/index.js';

const log = logger('restore-disk');

export type RestoreDiskFormat = 'raw' | 'qcow2';

export interface RestoreDiskOptions {
  readonly repository: Repository;
  readonly pointId: string;
  readonly disk: string;
  readonly to: string;
  readonly format?: RestoreDiskFormat;
  /** Replace an existing file at `to`. */
  readonly overwrite?: boolean;
  /** Blocks read ahead in parallel (default 8). */
  readonly parallel?: number;
  /** Password of an encrypted chain. */
  readonly password?: string;
  readonly signal?: AbortSignal;
  readonly onProgress?: (p: { bytesDone: number; bytesWritten: number; size: number }) => void;
}

export interface RestoreDiskResult {
  readonly path: string;
  readonly format: RestoreDiskFormat;
  readonly size: number;
  /** SHA-256 (hex) of the disk's contents, i.e. of the raw image. */
  readonly sha256: string;
  /** Bytes of data written (blocks that do not read as zeroes). */
  readonly bytesWritten: number;
  readonly durationMs: number;
}

async function exists(p: string): Promise<boolean> {
  try {
    await lstat(p);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

function isZero(buf: Buffer): boolean {
  // Compare in 64 KiB slices against one zero buffer.
  const slice = 65536;
  for (let off = 0; off < buf.length; off += slice) {
    const part = buf.subarray(off, Math.min(off + slice, buf.length));
    if (!part.equals(ZERO.subarray(0, part.length))) return false;
  }
  return true;
}
const ZERO = Buffer.alloc(65536);

/** Restores one disk; see the file comment. */
export async function restoreDisk(o: RestoreDiskOptions): Promise<RestoreDiskResult> {
  const started = Date.now();
  const format = o.format ?? 'raw';
  const target = path.resolve(o.to);
  if (!o.overwrite && (await exists(target))) {
    throw new BulwarkError(`${target} already exists`, { kind: 'conflict', context: { file: target }, hint: 'choose another path, or allow overwriting' });
  }
  const point = await o.repository.openRestorePoint(o.pointId, o.password === undefined ? {} : { password: o.password });
  const tag = `.bulwark-restore-${process.pid}-${Date.now()}`;
  const rawTmp = `${target}${tag}.raw`;
  const outTmp = `${target}${tag}.${format}`;
  try {
    const disk = point.openDisk(o.disk, { parallel: o.parallel ?? 8 });
    const hash = createHash('sha256');
    let bytesWritten = 0;
    let bytesDone = 0;
    const fh = await open(rawTmp, 'wx', 0o600);
    try {
      for await (const block of disk.stream()) {
        o.signal?.throwIfAborted();
        const offset = block.index * disk.blockSize;
        const length = Math.min(disk.blockSize, disk.size - offset);
        if (block.data === null) {
          for (let left = length; left > 0; left -= ZERO.length) hash.update(ZERO.subarray(0, Math.min(left, ZERO.length)));
        } else {
          hash.update(block.data);
          if (!isZero(block.data)) {
            let done = 0;
            while (done < block.data.length) done += (await fh.write(block.data, done, block.data.length - done, offset + done)).bytesWritten;
            bytesWritten += block.data.length;
          }
        }
        bytesDone += length;
        o.onProgress?.({ bytesDone, bytesWritten, size: disk.size });
      }
      await fh.truncate(disk.size);
      await fh.sync();
    } finally {
      await fh.close();
    }
    if (format === 'qcow2') {
      await runTool('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', rawTmp, outTmp], `qemu-img convert to qcow2 for ${target}`, {
        context: { file: target },
      });
      const q = await open(outTmp, 'r');
      try {
        await q.sync();
      } finally {
        await q.close();
      }
      await rm(rawTmp, { force: true });
    }
    if (!o.overwrite && (await exists(target))) {
      throw new BulwarkError(`${target} appeared while restoring`, { kind: 'conflict', context: { file: target } });
    }
    await rename(format === 'qcow2' ? outTmp : rawTmp, target);
    const result: RestoreDiskResult = { path: target, format, size: disk.size, sha256: hash.digest('hex'), bytesWritten, durationMs: Date.now() - started };
    log.info({ point: o.pointId, disk: o.disk, ...result }, 'disk restored');
    return result;
  } catch (err) {
    await rm(rawTmp, { force: true });
    await rm(outTmp, { force: true });
    throw err;
  } finally {
    await point.close();
  }
}
