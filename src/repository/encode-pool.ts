// A bounded pool of block encoders on worker threads. Plain blocks are copied once, into shared
// input slots (SharedArrayBuffer: the workers read them in place, nothing is cloned or
// transferred per block); workers write payloads into shared output slots; the caller writes the
// record straight from the slots (an incompressible block's payload is its input slot: no second
// copy) and releases the slot once written. Memory is slots x (block size + payload bound),
// whatever the disk size; when all slots are busy, acquire() waits (back-pressure on the source).
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { BulwarkError } from '../common/errors.js';
import type { Compression } from '../format/index.js';
import { RECORD_HEADER_SIZE } from '../format/index.js';
import { BlockEncoder, payloadBound, type EncodedBlock } from './block-codec.js';
import type { ChainKeys } from './chain-keys.js';

export interface WorkerInit {
  readonly input: SharedArrayBuffer;
  readonly output: SharedArrayBuffer;
  readonly inputStride: number;
  readonly outputStride: number;
  /** Where the payload starts inside an output slot (room for the record header before it). */
  readonly payloadAt: number;
  readonly blockSize: number;
  readonly compression: Compression;
  readonly blockKey: Uint8Array | null;
  readonly digestKey: Uint8Array | null;
  readonly aad: Uint8Array;
}
export interface WorkerJob {
  readonly id: number;
  readonly slot: number;
  readonly length: number;
}
export type WorkerResult =
  | { readonly id: number; readonly ok: true; readonly storedLength: number; readonly compression: Compression; readonly crc: number; readonly digest: Uint8Array; readonly raw: boolean }
  | { readonly id: number; readonly ok: false; readonly error: string };

/** An encoded block sitting in a slot: the caller fills `header` and writes header + payload. */
export interface EncodedSlot extends EncodedBlock {
  readonly slot: number;
  /** RECORD_HEADER_SIZE bytes (in the output slot) for the caller to fill. */
  readonly header: Buffer;
  /** The stored payload: in the output slot, or the input slot itself when `raw`. */
  readonly payload: Buffer;
}

export interface EncodePoolOptions {
  readonly blockSize: number;
  readonly compression: Compression;
  readonly keys: ChainKeys | null;
  readonly aad: Buffer;
  /** Worker threads; 0 encodes on the calling thread. Default: min(2, cores). */
  readonly threads?: number;
  /** Blocks in flight (encoding, or encoded and waiting to be written); default 12 MiB of blocks, at least 6. */
  readonly slots?: number;
}

/** Starts the worker: compiled .js directly, or from sources (.ts under tsx/vitest) through tsx. */
function startWorker(init: WorkerInit): Worker {
  // An encoder allocates almost nothing per block: a small young generation keeps its RSS low.
  const resourceLimits = { maxYoungGenerationSizeMb: 4 };
  if (!import.meta.url.endsWith('.ts')) return new Worker(new URL('./block-worker.js', import.meta.url), { workerData: init, resourceLimits });
  const src = new URL('./block-worker.ts', import.meta.url).href;
  const tsxApi = pathToFileURL(createRequire(import.meta.url).resolve('tsx/esm/api').replace(/\.cjs$/, '.mjs')).href;
  const boot = `import { register } from ${JSON.stringify(tsxApi)}; register(); await import(${JSON.stringify(src)});`;
  return new Worker(new URL(`data:text/javascript,${encodeURIComponent(boot)}`), { workerData: init, resourceLimits });
}

export class EncodePool {
  readonly #input: SharedArrayBuffer;
  readonly #output: SharedArrayBuffer;
  readonly #inputStride: number;
  readonly #outputStride: number;
  readonly #free: number[] = [];
  readonly #waiters: Array<{ resolve: (slot: number) => void; reject: (err: Error) => void }> = [];
  readonly #workers: Worker[] = [];
  readonly #outstanding: number[] = [];
  readonly #pending = new Map<number, { resolve: (r: WorkerResult) => void; reject: (e: Error) => void; worker: number }>();
  readonly #local: BlockEncoder | null;
  readonly #slotCount: number;
  #nextId = 1;
  #closed = false;
  #failure: Error | null = null;

  constructor(opts: EncodePoolOptions) {
    const threads = opts.threads ?? Math.min(2, availableParallelism());
    const slots = opts.slots ?? Math.max(6, Math.floor((12 * 1024 * 1024) / opts.blockSize));
    this.#slotCount = slots;
    this.#inputStride = opts.blockSize;
    this.#outputStride = RECORD_HEADER_SIZE + payloadBound(opts.blockSize);
    this.#input = new SharedArrayBuffer(this.#inputStride * slots);
    this.#output = new SharedArrayBuffer(this.#outputStride * slots);
    for (let i = 0; i < slots; i++) this.#free.push(i);
    if (threads === 0) {
      this.#local = new BlockEncoder(opts.compression, opts.keys, opts.aad, opts.blockSize);
      return;
    }
    this.#local = null;
    const init: WorkerInit = {
      input: this.#input,
      output: this.#output,
      inputStride: this.#inputStride,
      outputStride: this.#outputStride,
      payloadAt: RECORD_HEADER_SIZE,
      blockSize: opts.blockSize,
      compression: opts.compression,
      blockKey: opts.keys ? new Uint8Array(opts.keys.blockKey) : null,
      digestKey: opts.keys ? new Uint8Array(opts.keys.digestKey) : null,
      aad: new Uint8Array(opts.aad),
    };
    for (let w = 0; w < threads; w++) {
      const worker = startWorker(init);
      worker.on('message', (r: WorkerResult) => {
        const p = this.#pending.get(r.id);
        if (!p) return;
        this.#pending.delete(r.id);
        this.#outstanding[p.worker]! -= 1;
        p.resolve(r);
      });
      worker.on('error', (err) => this.#fail(err));
      worker.on('exit', (code) => {
        if (!this.#closed) this.#fail(new Error(`block encoder thread exited with code ${code}`));
      });
      this.#workers.push(worker);
      this.#outstanding.push(0);
    }
  }

  #fail(err: Error): void {
    this.#failure ??= err;
    for (const [id, p] of this.#pending) {
      this.#pending.delete(id);
      p.reject(err);
    }
    for (const w of this.#waiters.splice(0)) w.reject(err);
  }

  /** Number of slots (blocks that can be in flight at once). */
  get slots(): number {
    return this.#slotCount;
  }

  /** Gives a slot back: to the longest waiting acquire() if any (first come, first served). */
  release(slot: number): void {
    const w = this.#waiters.shift();
    if (w) w.resolve(slot);
    else this.#free.push(slot);
  }

  /** A free slot now, or undefined. */
  tryAcquire(): number | undefined {
    if (this.#failure) throw this.#failure;
    return this.#free.pop();
  }

  /** Waits for a free slot (back-pressure). Pass it to submit(). */
  acquire(): Promise<number> {
    if (this.#failure) return Promise.reject(this.#failure);
    const s = this.#free.pop();
    if (s !== undefined) return Promise.resolve(s);
    return new Promise<number>((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /**
   * Copies `plain` into `slot` synchronously (the caller may reuse `plain` as soon as this
   * returns) and encodes it. The result's slot must be released after its record is written.
   */
  submit(slot: number, plain: Buffer): Promise<EncodedSlot> {
    if (plain.length > this.#inputStride) {
      this.release(slot);
      return Promise.reject(new BulwarkError(`block of ${plain.length} bytes exceeds the block size`, { kind: 'invalid' }));
    }
    const input = Buffer.from(this.#input, slot * this.#inputStride, plain.length);
    const output = Buffer.from(this.#output, slot * this.#outputStride, this.#outputStride);
    plain.copy(input);
    const done = (e: EncodedBlock): EncodedSlot => ({
      ...e,
      slot,
      header: output.subarray(0, RECORD_HEADER_SIZE),
      payload: e.raw ? input : output.subarray(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + e.storedLength),
    });
    if (this.#local) {
      try {
        return Promise.resolve(done(this.#local.encodeInto(input, output.subarray(RECORD_HEADER_SIZE))));
      } catch (err) {
        this.release(slot);
        return Promise.reject(err instanceof Error ? err : new Error(String(err)));
      }
    }
    let worker = 0;
    for (let w = 1; w < this.#workers.length; w++) if (this.#outstanding[w]! < this.#outstanding[worker]!) worker = w;
    const id = this.#nextId++;
    return new Promise<WorkerResult>((resolve, reject) => {
      if (this.#failure) return reject(this.#failure);
      this.#pending.set(id, { resolve, reject, worker });
      this.#outstanding[worker]! += 1;
      const job: WorkerJob = { id, slot, length: plain.length };
      this.#workers[worker]!.postMessage(job);
    })
      .then((r) => {
        if (!r.ok) throw new Error(`block encoder: ${r.error}`);
        return done({ storedLength: r.storedLength, compression: r.compression, crc: r.crc, digest: Buffer.from(r.digest.buffer, r.digest.byteOffset, r.digest.length), raw: r.raw });
      })
      .catch((err: unknown) => {
        this.release(slot);
        throw err;
      });
  }

  /** acquire() + submit(). */
  async encode(plain: Buffer): Promise<EncodedSlot> {
    return this.submit(await this.acquire(), plain);
  }

  /** Stops the encoders; encodes still pending and waiting acquire() calls are rejected. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#fail(new BulwarkError('the block encoders were closed', { kind: 'invalid' }));
    await Promise.all(this.#workers.map((w) => w.terminate()));
  }
}
