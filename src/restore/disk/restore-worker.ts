// Worker thread of a disk restore, in one of two roles.
// - decode: runs batches through restore-decoder.ts (read, check, decode, pwritev into the output);
//   no block data crosses threads, the main thread only plans and counts.
// - hash: follows the restore in disk order and computes the SHA-256 of the raw image, reading
//   back the data ranges the decoders wrote (from the page cache) and feeding zeroes for holes.
import { createHash } from 'node:crypto';
import { parentPort, workerData } from 'node:worker_threads';
import { createDecoder, readFully } from './restore-decoder.js';
import type { DecodeJob, HashInit, HashMessage, HashResult, RestoreWorkerInit } from './restore-pool.js';

const init = workerData as RestoreWorkerInit;
if (init.role === 'decode') {
  const decode = createDecoder(init);
  parentPort!.on('message', (job: DecodeJob) => parentPort!.postMessage(decode(job)));
} else startHasher(init);

function startHasher(o: HashInit): void {
  const hash = createHash('sha256');
  const CHUNK = 1024 * 1024;
  const buf = Buffer.allocUnsafe(CHUNK);
  const zeroes = Buffer.alloc(CHUNK);
  let failed = false;
  parentPort!.on('message', (m: HashMessage) => {
    if (failed) return;
    try {
      if (m.kind === 'end') {
        const result: HashResult = { ok: true, sha256: hash.digest('hex') };
        parentPort!.postMessage(result);
        return;
      }
      for (let at = m.from; at < m.to; at += CHUNK) {
        const len = Math.min(CHUNK, m.to - at);
        if (m.kind === 'zero') {
          hash.update(zeroes.subarray(0, len));
        } else {
          readFully(o.outFd, buf.subarray(0, len), at);
          hash.update(buf.subarray(0, len));
        }
      }
    } catch (err) {
      failed = true;
      const result: HashResult = { ok: false, error: (err as Error).message };
      parentPort!.postMessage(result);
    }
  });
}
