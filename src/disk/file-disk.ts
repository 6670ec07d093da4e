// A RandomAccessDisk over a raw image file, read-only. Its allocation map
// comes from SEEK_DATA/SEEK_HOLE, which Node cannot call, so it is taken once at open time from
// `xfs_io -c 'seek -a -r 0'` (xfsprogs; works on any file system with lseek support); without
// xfs_io the whole disk is reported as data, which is always correct, only slower to copy.
import { open, type FileHandle } from 'node:fs/promises';
import { BulwarkError } from '../common/errors.js';
import { runTool } from '../common/process.js';
import type { Extent, RandomAccessDisk } from './types.js';

export interface FileDiskOptions {
  /** Ask the file system for holes (default true). False: report everything as data. */
  readonly allocationMap?: boolean;
}

/** Opens a raw image file read-only as a RandomAccessDisk. The caller closes it. */
export async function openFileDisk(path: string, options: FileDiskOptions = {}): Promise<RandomAccessDisk> {
  let handle: FileHandle;
  try {
    handle = await open(path, 'r');
  } catch (cause) {
    throw new BulwarkError(`cannot open disk image ${path}`, { kind: 'not-found', context: { file: path }, cause });
  }
  try {
    const st = await handle.stat();
    if (!st.isFile()) {
      throw new BulwarkError(`disk image ${path} is not a regular file`, { kind: 'invalid', context: { file: path } });
    }
    const size = st.size;
    const map = options.allocationMap === false ? null : await dataRanges(path, size);
    return new FileDisk(path, handle, size, map);
  } catch (err) {
    await handle.close();
    throw err;
  }
}

/** The [start, end) ranges holding data, from SEEK_DATA/SEEK_HOLE; null when unknown. */
async function dataRanges(path: string, size: number): Promise<Array<[number, number]> | null> {
  let out: string;
  try {
    out = await runTool('xfs_io', ['-r', '-c', 'seek -a -r 0', path], `allocation map of ${path}`, { timeoutMs: 60_000 });
  } catch {
    return null;
  }
  const marks: Array<{ kind: 'DATA' | 'HOLE'; at: number }> = [];
  for (const line of out.split('\n')) {
    const m = /^(DATA|HOLE)\s+(\d+|EOF)\s*$/.exec(line);
    if (!m) continue;
    marks.push({ kind: m[1] as 'DATA' | 'HOLE', at: m[2] === 'EOF' ? size : Number(m[2]) });
  }
  if (marks.length === 0) return null;
  const ranges: Array<[number, number]> = [];
  for (let i = 0; i < marks.length; i++) {
    const mark = marks[i]!;
    if (mark.kind !== 'DATA') continue;
    const end = Math.min(marks[i + 1]?.at ?? size, size);
    if (end > mark.at) ranges.push([mark.at, end]);
  }
  return ranges;
}

class FileDisk implements RandomAccessDisk {
  readonly size: number;
  readonly #path: string;
  readonly #handle: FileHandle;
  readonly #data: Array<[number, number]> | null;

  constructor(path: string, handle: FileHandle, size: number, data: Array<[number, number]> | null) {
    this.#path = path;
    this.#handle = handle;
    this.size = size;
    this.#data = data;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new BulwarkError(`read past the end of disk image ${this.#path}`, {
        kind: 'invalid',
        context: { file: this.#path, offset, length, size: this.size },
      });
    }
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.#handle.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) {
        throw new BulwarkError(`disk image ${this.#path} ended early (was it truncated?)`, {
          kind: 'corrupt',
          context: { file: this.#path, offset: offset + done },
        });
      }
      done += bytesRead;
    }
    return buf;
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    const end = Math.min(offset + length, this.size);
    if (this.#data === null) return Promise.resolve(end > offset ? [{ offset, length: end - offset, kind: 'data' }] : []);
    const out: Extent[] = [];
    let at = offset;
    for (const [ds, de] of this.#data) {
      if (de <= at) continue;
      if (ds >= end) break;
      if (ds > at) out.push({ offset: at, length: ds - at, kind: 'hole' });
      const e = Math.min(de, end);
      out.push({ offset: Math.max(ds, at), length: e - Math.max(ds, at), kind: 'data' });
      at = e;
    }
    if (at < end) out.push({ offset: at, length: end - at, kind: 'hole' });
    return Promise.resolve(out);
  }

  async close(): Promise<void> {
    await this.#handle.close();
  }
}
