// Restores one disk of a restore point to a file: raw (sparse: zero and unallocated blocks are
// neither read nor written, the file is sized to the disk first) or qcow2 (the raw sparse image
// is written to a temporary file next to the target, then converted by `qemu-img convert`, which
// keeps it sparse). The main thread resolves the block tables and hands batches of stored blocks
// to decoder threads, which read, check (CRC32C always, the table's SHA-256 with `verify`),
// decode and write them with pwritev (restore-worker.ts); with `imageDigest` (opt-in,
// docs/decisions/0006-restore-image-digest.md) a hash thread computes the SHA-256 of the raw image
// by following the written file in disk order. The result appears under its name
// only when complete (rename); an existing file is refused unless `overwrite` is set.
import { constants as fsConstants } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { lstat, mkdtemp, open, rename, rm, stat, statfs, type FileHandle } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { runTool } from '../../common/process.js';
import type { Repository } from '../../repository/index.js';
import { corrupt } from '../../repository/backup-file.js';
import type { RestorePoint, RestorePointDisk } from '../../repository/restore-point.js';
import { RECORD_HEADER_SIZE } from '../../format/index.js';
import { publish } from '../../storage/local-fs.js';
import { BlockDecodeError, DecodePool, ImageHasher } from './restore-pool.js';

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
  /** Decoder threads (default: the machine's cores; 0 decodes on this thread, for small disks and tests). */
  readonly threads?: number;
  /**
   * Also check every block's plain data against the SHA-256 (HMAC when encrypted) in its block
   * table (in the decoder threads). The CRC32C of every stored block is always checked.
   */
  readonly verify?: boolean;
  /**
   * Also compute the SHA-256 of the whole raw image (result `sha256`; default false: it costs a
   * core for the whole restore, docs/decisions/0006-restore-image-digest.md). The blocks are
   * checked without it: CRC32C always, their SHA-256 with `verify`.
   */
  readonly imageDigest?: boolean;
  /**
   * Write whole aligned blocks of a raw image with O_DIRECT, past the page cache (default true;
   * ignored for qcow2 and with `imageDigest`, which read the image back; a file system without
   * direct I/O falls back by itself). Measured: bench/restore/README.md.
   */
  readonly directIo?: boolean;
  /** Password of an encrypted chain. */
  readonly password?: string;
  readonly signal?: AbortSignal;
  readonly onProgress?: (p: { bytesDone: number; bytesWritten: number; size: number }) => void;
}

export interface RestoreDiskResult {
  readonly path: string;
  readonly format: RestoreDiskFormat;
  readonly size: number;
  /** SHA-256 (hex) of the disk's contents, i.e. of the raw image; only with `imageDigest`. */
  readonly sha256?: string;
  /** Bytes of data written (blocks that do not read as zeroes). */
  readonly bytesWritten: number;
  readonly durationMs: number;
  /** Milliseconds from the start until every block was written, synced to disk, and hashed. */
  readonly timings: { readonly written: number; readonly synced: number; readonly hashed: number };
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

/** tmpfs: O_DIRECT is accepted but the data lands in memory pages all the same (nothing to bypass). */
const TMPFS_MAGIC = 0x01021994;

/**
 * The file opened for direct writes, or null where the file system has no O_DIRECT or nothing to
 * gain from it (tmpfs: the aligned copies of stored blocks would only add work).
 */
async function openDirect(file: string): Promise<FileHandle | null> {
  if ((await statfs(path.dirname(file))).type === TMPFS_MAGIC) return null;
  try {
    return await open(file, fsConstants.O_WRONLY | fsConstants.O_DIRECT);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
    return null;
  }
}

/** Stored blocks per decoder batch: about 2 MiB of plain data (one pread, one pwritev). */
function batchBlocks(blockSize: number): number {
  return Math.max(1, Math.floor((2 * 1024 * 1024) / blockSize));
}
/** Blocks resolved per round of table-page reads. */
const RESOLVE_BLOCKS = 2048;

/**
 * Starts an fdatasync each time `every` more bytes were written (one at a time, in libuv's pool),
 * so the disk writes back while the decoders work and the final sync finds little left.
 */
class Flusher {
  readonly #fh: FileHandle;
  readonly #every: number;
  #pending: Promise<void> | null = null;
  #error: Error | null = null;
  #mark = 0;

  /** `every` 0: never sync (a temporary raw image that qemu-img converts). */
  constructor(fh: FileHandle, every: number) {
    this.#fh = fh;
    this.#every = every;
  }

  written(total: number): void {
    if (this.#every === 0 || this.#pending || total - this.#mark < this.#every) return;
    this.#mark = total;
    this.#pending = this.#fh.datasync().then(
      () => void (this.#pending = null),
      (err: unknown) => {
        this.#error ??= err instanceof Error ? err : new Error(`fdatasync: ${String(err)}`);
        this.#pending = null;
      },
    );
  }

  async finish(): Promise<void> {
    if (this.#pending) await this.#pending;
    if (this.#error !== null) throw this.#error;
    if (this.#every > 0) await this.#fh.datasync();
  }
}
const FLUSH_EVERY = 256 * 1024 * 1024;

/** A range of the image, in disk order, handed to the hasher once written. */
interface Segment {
  readonly kind: 'data' | 'zero';
  readonly from: number;
  readonly to: number;
  done: boolean;
}

interface WriteOutcome {
  readonly bytesWritten: number;
}

/**
 * Writes every block of `disk` into the open, sized, empty file `outFd`: batches of stored blocks
 * to the decoders, holes skipped; feeds the hasher in disk order as ranges complete.
 */
async function writeImage(
  point: RestorePoint,
  disk: RestorePointDisk,
  pool: DecodePool,
  hasher: ImageHasher | null,
  flusher: Flusher,
  o: RestoreDiskOptions,
): Promise<WriteOutcome> {
  const bs = disk.blockSize;
  const perBatch = batchBlocks(bs);
  // Tests only: a pause before each batch, so a restore of a few hundred MiB runs long enough to
  // watch its progress and stop it (test/server/restore-progress.test.ts).
  const pace = Number(process.env.BULWARK_TEST_RESTORE_PACE_MS ?? 0);
  const fileIndex = new Map(point.files.map((f, i) => [f, i]));
  const order: Segment[] = [];
  let head = 0;
  let bytesDone = 0;
  let bytesWritten = 0;
  let failure: unknown = null;
  const batches: Promise<void>[] = [];
  const advance = (): void => {
    while (head < order.length && order[head]!.done) {
      const s = order[head++]!;
      hasher?.feed(s.kind, s.from, s.to);
    }
    if (head > 4096) {
      order.splice(0, head);
      head = 0;
    }
  };
  for (let first = 0; first < disk.blockCount && failure === null; first += RESOLVE_BLOCKS) {
    const rs = await point.resolveRange(disk.name, first, Math.min(RESOLVE_BLOCKS, disk.blockCount - first));
    let k = 0;
    while (k < rs.length && failure === null) {
      o.signal?.throwIfAborted();
      const r = rs[k]!;
      const from = (first + k) * bs;
      if (r.kind !== 'stored') {
        let e = k + 1;
        while (e < rs.length && rs[e]!.kind !== 'stored') e++;
        const to = Math.min(disk.size, (first + e) * bs);
        order.push({ kind: 'zero', from, to, done: true });
        bytesDone += to - from;
        k = e;
        advance();
        continue;
      }
      // A batch: stored blocks of one file whose records lie back to back (one pread).
      const blocks: number[] = [];
      const digests = new Uint8Array(32 * perBatch);
      let e = k;
      let next = r.entry.recordOffset;
      while (e < rs.length && e - k < perBatch) {
        const x = rs[e]!;
        if (x.kind !== 'stored' || x.file !== r.file || x.entry.recordOffset !== next) break;
        const i = first + e;
        const expected = Math.min(bs, disk.size - i * bs);
        // A longer block than the disk has there is damage; a shorter one (the disk grew since)
        // leaves the rest a hole, which reads as the zeroes it must be.
        if (x.entry.plainLength > expected) {
          throw corrupt(
            `damaged block table in ${path.basename(x.file.path)}: disk ${disk.name}, block ${i} (disk offset ${i * bs}) holds ${x.entry.plainLength} bytes, more than the ${expected} the disk has there (restore point ${point.info.id})`,
            { file: x.file.path, disk: disk.name, block: i, offset: i * bs, point: point.info.id },
          );
        }
        blocks.push(i, x.entry.recordOffset, x.entry.storedLength, x.entry.plainLength, x.entry.crc);
        digests.set(x.entry.digest, 32 * (e - k));
        next = x.entry.recordOffset + RECORD_HEADER_SIZE + x.entry.storedLength;
        e++;
      }
      const seg: Segment = { kind: 'data', from, to: Math.min(disk.size, (first + e) * bs), done: false };
      order.push(seg);
      if (pace > 0) await sleep(pace);
      await pool.ready();
      batches.push(
        pool.submit({ file: fileIndex.get(r.file)!, blocks, digests: digests.subarray(0, 32 * (e - k)) }).then(
          (written) => {
            seg.done = true;
            bytesWritten += written;
            bytesDone += seg.to - seg.from;
            flusher.written(bytesWritten);
            o.onProgress?.({ bytesDone, bytesWritten, size: disk.size });
            advance();
          },
          (err: unknown) => {
            failure ??= err;
          },
        ),
      );
      k = e;
    }
  }
  await Promise.all(batches);
  if (failure !== null) throw describeBatchFailure(failure, point, disk);
  o.onProgress?.({ bytesDone, bytesWritten, size: disk.size });
  return { bytesWritten };
}

function describeBatchFailure(err: unknown, point: RestorePoint, disk: RestorePointDisk): Error {
  if (err instanceof BlockDecodeError) {
    const file = point.files[err.file]!.path;
    const offset = err.block * disk.blockSize;
    return corrupt(
      `damaged block in ${path.basename(file)}: disk ${disk.name}, block ${err.block} (disk offset ${offset}), file offset ${err.fileOffset}, restore point ${point.info.id}: ${err.message}`,
      { file, disk: disk.name, block: err.block, offset, fileOffset: err.fileOffset, point: point.info.id },
      err,
    );
  }
  if (err instanceof BulwarkError) return err;
  return new BulwarkError(`restoring disk ${disk.name} of restore point ${point.info.id} failed: ${(err as Error).message}`, {
    kind: 'internal',
    context: { disk: disk.name, point: point.info.id },
    cause: err,
  });
}

/**
 * How long `qemu-img convert` of a raw image of `bytes` may take: runTool's 10-minute default
 * would kill the conversion of any disk past a few hundred GiB, so the deadline grows with the
 * size, at a floor rate of 20 MiB/s (far below what a disk does; only a hung tool reaches it).
 */
export function conversionDeadlineMs(bytes: number): number {
  return Math.max(600_000, Math.ceil(bytes / (20 * 1024 * 1024)) * 1000);
}

/**
 * The last step of every disk restore: the synced raw image `rawTmp` becomes `target` — converted
 * to qcow2 through `outTmp` (synced) when asked — without replacing a file that appeared meanwhile
 * unless `overwrite`; the folder is synced after the rename, so the name survives a crash too.
 * The temporaries are the caller's to remove on failure.
 */
export async function placeRestoredImage(o: { rawTmp: string; outTmp: string; target: string; format: RestoreDiskFormat; overwrite: boolean }): Promise<void> {
  const { rawTmp, outTmp, target } = o;
  if (o.format === 'qcow2') {
    const { size } = await stat(rawTmp);
    // qemu-img creates its output 0644 (less the umask): a guest's disk, readable by every user of
    // this host while it is written and after. It writes into a folder only this user can enter,
    // and the image leaves it 0600, as the raw images are created.
    const privateDir = await mkdtemp(path.join(path.dirname(target), '.bulwark-restore-'));
    try {
      const converted = path.join(privateDir, `image.${o.format}`);
      await runTool('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', rawTmp, converted], `qemu-img convert to qcow2 for ${target}`, {
        context: { file: target },
        timeoutMs: conversionDeadlineMs(size),
      });
      const q = await open(converted, 'r');
      try {
        await q.chmod(0o600);
        await q.sync();
      } finally {
        await q.close();
      }
      await rename(converted, outTmp);
    } finally {
      await rm(privateDir, { recursive: true, force: true });
    }
    await rm(rawTmp, { force: true });
  }
  if (!o.overwrite && (await exists(target))) {
    throw new BulwarkError(`${target} appeared while restoring`, { kind: 'conflict', context: { file: target } });
  }
  await publish(o.format === 'qcow2' ? outTmp : rawTmp, target);
}

function whatIs(st: Stats): string {
  if (st.isDirectory()) return 'a folder';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFIFO()) return 'a named pipe';
  if (st.isSocket()) return 'a socket';
  return 'not a regular file';
}

/**
 * Where a restore may write its image (checked before a block is read): an existing folder, and
 * in it nothing at `target`, or with `overwrite` a file or a link (the link itself
 * is replaced, never followed). Anything else (a folder, a block device such as /dev/vg/lv or a
 * link to one) is refused before a block is read: the image would replace the device's node (in
 * /dev: a file of the disk's size in memory) or fail after the whole restore with EISDIR.
 */
export async function assertImageTarget(target: string, overwrite: boolean): Promise<void> {
  await assertFolderOf(target);
  let st: Stats;
  try {
    st = await stat(target);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    if (!(await exists(target))) return; // nothing there (a dangling link is a file in the way)
    st = await lstat(target);
  }
  if (!st.isFile() && !st.isSymbolicLink()) {
    const what = whatIs(st);
    throw new BulwarkError(`cannot restore to ${target}: it is ${what}, and a restore writes an image file`, {
      kind: 'invalid',
      context: { file: target },
      hint: st.isDirectory()
        ? `name the image file inside it, e.g. ${path.join(target, 'disk.raw')}`
        : `restore to an image file, then copy it onto the device (qemu-img convert -n -f raw -O raw FILE ${target})`,
    });
  }
  if (!overwrite) {
    throw new BulwarkError(`${target} already exists`, { kind: 'conflict', context: { file: target }, hint: 'choose another path, or allow overwriting (--overwrite)' });
  }
}

/** The target's folder must exist (the temporaries go beside the target): say so, not ENOENT of a temporary's name. */
async function assertFolderOf(target: string): Promise<void> {
  const folder = path.dirname(target);
  let st;
  try {
    st = await stat(folder);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    throw new BulwarkError(`cannot restore to ${target}: the folder ${folder} does not exist`, { kind: 'not-found', context: { file: target }, hint: `create it first (mkdir -p ${folder}), or choose another path` });
  }
  if (!st.isDirectory()) {
    throw new BulwarkError(`cannot restore to ${target}: ${folder} is not a folder`, { kind: 'invalid', context: { file: target }, hint: 'choose another path' });
  }
}

/** Restores one disk; see the file comment. */
export async function restoreDisk(o: RestoreDiskOptions): Promise<RestoreDiskResult> {
  const started = Date.now();
  const format = o.format ?? 'raw';
  const target = path.resolve(o.to);
  await assertImageTarget(target, o.overwrite === true);
  const point = await o.repository.openRestorePoint(o.pointId, o.password === undefined ? {} : { password: o.password });
  const tag = `.bulwark-restore-${process.pid}-${Date.now()}`;
  const rawTmp = `${target}${tag}.raw`;
  const outTmp = `${target}${tag}.${format}`;
  try {
    const disk = point.openDisk(o.disk);
    let sha256 = '';
    let bytesWritten: number;
    // Milliseconds from the start until all blocks were written, synced, hashed (for the log).
    const timings = { written: 0, synced: 0, hashed: 0 };
    const fh = await open(rawTmp, 'wx+', 0o600); // read too: the hasher reads the image back
    let direct: FileHandle | null = null;
    let pool: DecodePool | null = null;
    let hasher: ImageHasher | null = null;
    try {
      await fh.truncate(disk.size);
      // The image is read back (hash, qemu-img) from the page cache: direct writes only when not.
      if (format === 'raw' && o.imageDigest !== true && o.directIo !== false) direct = await openDirect(rawTmp);
      const keys = point.keys;
      pool = new DecodePool(
        {
          files: point.files.map((f) => ({ fd: f.handle.fd, aad: new Uint8Array(f.aad) })),
          outFd: fh.fd,
          directFd: direct?.fd ?? null,
          blockSize: disk.blockSize,
          blockKey: keys ? new Uint8Array(keys.blockKey) : null,
          digestKey: keys ? new Uint8Array(keys.digestKey) : null,
          verify: o.verify ?? false,
        },
        o.threads ?? availableParallelism(),
      );
      hasher = o.imageDigest === true ? new ImageHasher(fh.fd) : null;
      // The raw image of a qcow2 restore is a temporary: only the converted file is synced.
      const flusher = new Flusher(fh, format === 'raw' ? FLUSH_EVERY : 0);
      ({ bytesWritten } = await writeImage(point, disk, pool, hasher, flusher, o));
      timings.written = Date.now() - started;
      // Flush to disk while the hasher finishes reading back the tail.
      const digest = hasher
        ? hasher.digest().catch((err: unknown) => {
            throw new BulwarkError(`computing the SHA-256 of ${rawTmp} failed: ${(err as Error).message}`, { kind: 'internal', context: { file: rawTmp }, cause: err });
          })
        : Promise.resolve('');
      [, sha256] = await Promise.all([flusher.finish().then(() => void (timings.synced = Date.now() - started)), digest]);
      timings.hashed = Date.now() - started;
      // A stop while the tail was synced or hashed: nothing is published.
      o.signal?.throwIfAborted();
    } finally {
      // Threads first: they use this file's and the backup files' descriptors.
      await pool?.close();
      await hasher?.close();
      await direct?.close();
      await fh.close();
    }
    await placeRestoredImage({ rawTmp, outTmp, target, format, overwrite: o.overwrite === true });
    const result: RestoreDiskResult = { path: target, format, size: disk.size, ...(o.imageDigest === true ? { sha256 } : {}), bytesWritten, durationMs: Date.now() - started, timings };
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
