// Worker thread: encodes blocks (digest, compress, encrypt, CRC) from shared input slots into
// shared output slots, so the main thread only copies, writes and keeps the tables. Jobs come
// from the pool's shared job ring and results go back in the slot's result words (encode-pool.ts,
// CTL): no event loop, no message per block; only a failure is posted, with its text. A thread
// outlives its pool: kept idle, it serves the next pool of the process (encode-pool.ts).
import { parentPort, workerData } from 'node:worker_threads';
import { BlockEncoder } from './block-codec.js';
import { CODECS, CTL, resultAt, SLOT_DONE, SLOT_FAILED, type WorkerError, type WorkerIdle, type WorkerInit, type WorkerServe } from './encode-pool.js';

/** Serves one pool: encodes the jobs of its ring until it says STOP. */
function serve(init: WorkerInit): void {
  const keys = init.blockKey && init.digestKey ? { blockKey: Buffer.from(init.blockKey), digestKey: Buffer.from(init.digestKey) } : null;
  const encoder = new BlockEncoder(init.compression, keys, Buffer.from(init.aad), init.blockSize);
  const ctl = new Int32Array(init.control);
  const digestBytes = new Uint8Array(init.control);
  // One view per slot, made once.
  const inputs = Array.from({ length: init.slots }, (_, s) => Buffer.from(init.input, s * init.inputStride, init.inputStride));
  const outputs = Array.from({ length: init.slots }, (_, s) => Buffer.from(init.output, s * init.outputStride + init.payloadAt, init.outputStride - init.payloadAt));

  const encode = (slot: number): void => {
    const at = resultAt(init.slots, slot);
    const plain = inputs[slot]!.subarray(0, ctl[at + CTL.LENGTH]);
    try {
      const e = encoder.encodeInto(plain, outputs[slot]!);
      ctl[at + CTL.STORED] = e.storedLength;
      ctl[at + CTL.CODEC] = CODECS.indexOf(e.compression);
      ctl[at + CTL.CRC] = e.crc | 0;
      ctl[at + CTL.RAW] = e.raw ? 1 : 0;
      digestBytes.set(e.digest, (at + CTL.DIGEST) * 4);
      Atomics.store(ctl, at + CTL.STATE, SLOT_DONE);
    } catch (err) {
      Atomics.store(ctl, at + CTL.STATE, SLOT_FAILED);
      const m: WorkerError = { slot, error: (err as Error).message };
      parentPort!.postMessage(m);
    }
    Atomics.add(ctl, CTL.DONE, 1);
    Atomics.notify(ctl, CTL.DONE);
  };

  for (;;) {
    if (Atomics.load(ctl, CTL.STOP) !== 0) break;
    const head = Atomics.load(ctl, CTL.HEAD);
    const tail = Atomics.load(ctl, CTL.TAIL);
    if (head === tail) {
      Atomics.wait(ctl, CTL.TAIL, tail);
      continue;
    }
    if (Atomics.compareExchange(ctl, CTL.HEAD, head, (head + 1) | 0) !== head) continue;
    encode(Atomics.load(ctl, CTL.RING + ((head >>> 0) % init.slots)));
  }
}

// The pool that started this thread, then (kept idle between pools, encode-pool.ts) the next
// ones: each sends its init when it takes the thread; the thread says when it has left a pool.
serve(workerData as WorkerInit);
parentPort!.postMessage({ idle: true } satisfies WorkerIdle);
parentPort!.on('message', (m: WorkerServe) => {
  serve(m.serve);
  parentPort!.postMessage({ idle: true } satisfies WorkerIdle);
});
