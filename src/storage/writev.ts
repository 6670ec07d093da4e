// Gathered writes that finish what a short pwritev left (rare: signals, quotas, some file
// systems). Dependency-free so worker threads (the restore decoders) can use it too.
import { writevSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';

/** `bufs` without their first `written` bytes (the buffers are not copied). */
export function unwritten(bufs: readonly Buffer[], written: number): Buffer[] {
  let skip = written;
  const rest: Buffer[] = [];
  for (const b of bufs) {
    if (skip >= b.length) skip -= b.length;
    else {
      rest.push(skip > 0 ? b.subarray(skip) : b);
      skip = 0;
    }
  }
  return rest;
}

/** Writes all `bytes` of `bufs` at `at`, continuing after short writes. */
export async function writevAll(fh: FileHandle, bufs: Buffer[], at: number, bytes: number): Promise<void> {
  let done = 0;
  let rest = bufs;
  for (;;) {
    const { bytesWritten } = await fh.writev(rest, at + done);
    done += bytesWritten;
    if (done >= bytes) return;
    if (bytesWritten === 0) throw new Error(`short write at offset ${at + done}`);
    rest = unwritten(rest, bytesWritten);
  }
}

/** writevAll for a file descriptor, synchronously (worker threads). */
export function writevAllSync(fd: number, bufs: Buffer[], at: number): void {
  let total = 0;
  for (const b of bufs) total += b.length;
  let done = 0;
  let rest = bufs;
  for (;;) {
    const n = writevSync(fd, rest, at + done);
    done += n;
    if (done >= total) return;
    if (n === 0) throw new Error(`short write at offset ${at + done}`);
    rest = unwritten(rest, n);
  }
}
