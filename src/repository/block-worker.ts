// Worker thread: encodes blocks (digest, compress, encrypt, CRC) from shared input slots into
// shared output slots, so the main thread only copies, writes and keeps the tables.
import { parentPort, workerData } from 'node:worker_threads';
import { BlockEncoder } from './block-codec.js';
import type { WorkerInit, WorkerJob, WorkerResult } from './encode-pool.js';

const init = workerData as WorkerInit;
const keys = init.blockKey && init.digestKey ? { blockKey: Buffer.from(init.blockKey), digestKey: Buffer.from(init.digestKey) } : null;
const encoder = new BlockEncoder(init.compression, keys, Buffer.from(init.aad), init.blockSize);

parentPort!.on('message', (job: WorkerJob) => {
  const plain = Buffer.from(init.input, job.slot * init.inputStride, job.length);
  const out = Buffer.from(init.output, job.slot * init.outputStride + init.payloadAt, init.outputStride - init.payloadAt);
  try {
    const e = encoder.encodeInto(plain, out);
    const result: WorkerResult = { id: job.id, ok: true, storedLength: e.storedLength, compression: e.compression, crc: e.crc, digest: e.digest, raw: e.raw };
    parentPort!.postMessage(result);
  } catch (err) {
    const result: WorkerResult = { id: job.id, ok: false, error: (err as Error).message };
    parentPort!.postMessage(result);
  }
});
