// A bounded pool of block encoders on worker threads. Plain blocks are copied once, into shared
// input slots (SharedArrayBuffer: the workers read them in place, nothing is cloned or
// transferred per block); workers write payloads into shared output slots; the caller writes the
// record straight from the slots (an incompressible block's payload is its input slot: no second
// copy) and releases the slot once written. Memory is slots x (block size + payload bound),
// whatever the disk size; when all slots are busy, acquire() waits (back-pressure on the source).
//
// Jobs and results cross threads through a shared control block, not messages: the caller puts
// a slot number in a job ring and wakes a worker (Atomics.notify); a worker claims jobs with a
// compare-and-swap, loops without an event loop (Atomics.wait when the ring is empty), writes the
// result (lengths, codec, CRC, digest) into the slot's result words and bumps a completion
// counter the caller waits on with Atomics.waitAsync; one wake-up collects every finished slot.
// Only an encoder error travels as a message (with its text).
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
  /** Control block: Int32 words, layout in CTL below. */
  readonly control: SharedArrayBuffer;
  readonly slots: number;
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
/** An encoder failure (the only message a worker sends while it serves a pool). */
export interface WorkerError {
  readonly slot: number;
  readonly error: string;
}
/** A worker has left its pool (after STOP) and can serve another. */
export interface WorkerIdle {
  readonly idle: true;
}
/** Sent to an idle worker: serve this pool. */
export interface WorkerServe {
  readonly serve: WorkerInit;
}

/**
 * Encoder threads left by closed pools, kept for the next pool of this process (unreferenced:
 * they do not keep it alive). A long-running agent writes restore point after restore point;
 * starting two threads for each cost 200-600 CPU-ms and 230-900 ms to the first encoded block,
 * and terminating them 60-470 ms at commit, at load 6-10 (bench/backup/README.md, 2026-11-26).
 */
const idleWorkers: Worker[] = [];
const IDLE_WORKERS_MAX = 4;
/** How long close() waits for a worker to leave the pool before it terminates it. */
const LEAVE_TIMEOUT_MS = 5000;

/** Encoder threads kept idle right now (for tests and the bench). */
export function idleEncoderThreads(): number {
  return idleWorkers.length;
}

/**
 * The slot memory of the last closed pool whose slots were all back (none lent, none held by a
 * writer) and whose threads had left it: the next pool of the same shape takes it instead of
 * allocating (and touching) new shared memory, and the kept threads, which still hold views of
 * it until their next garbage collection, pin no other.
 */
interface PoolMemory {
  readonly input: SharedArrayBuffer;
  readonly output: SharedArrayBuffer;
  readonly control: SharedArrayBuffer;
}
let idleMemory: PoolMemory | null = null;

function poolMemory(inputBytes: number, outputBytes: number, controlBytes: number): PoolMemory {
  const m = idleMemory;
  if (m && m.input.byteLength === inputBytes && m.output.byteLength === outputBytes && m.control.byteLength === controlBytes) {
    idleMemory = null;
    new Int32Array(m.control).fill(0);
    return m;
  }
  return { input: new SharedArrayBuffer(inputBytes), output: new SharedArrayBuffer(outputBytes), control: new SharedArrayBuffer(controlBytes) };
}

/** Keeps `worker` for a later pool, or ends it when enough are kept. */
function keepIdle(worker: Worker): Promise<void> {
  if (idleWorkers.length >= IDLE_WORKERS_MAX) return worker.terminate().then(() => undefined);
  const forget = () => {
    const i = idleWorkers.indexOf(worker);
    if (i >= 0) idleWorkers.splice(i, 1);
  };
  // An idle thread that fails or ends is dropped (an 'error' event must have a listener).
  worker.once('error', forget);
  worker.once('exit', forget);
  worker.unref();
  idleWorkers.push(worker);
  return Promise.resolve();
}

/** An idle worker to serve `init`, if one is kept. */
function takeIdle(init: WorkerInit): Worker | undefined {
  const worker = idleWorkers.pop();
  if (!worker) return undefined;
  worker.removeAllListeners('error');
  worker.removeAllListeners('exit');
  worker.ref();
  worker.postMessage({ serve: init } satisfies WorkerServe);
  return worker;
}

/** Layout of the control block (Int32 words). */
export const CTL = {
  /** Jobs put in the ring so far (written by the caller). */
  TAIL: 0,
  /** Jobs claimed by workers so far (compare-and-swap). */
  HEAD: 1,
  /** Jobs finished so far (the caller waits on it). */
  DONE: 2,
  /** Non-zero: workers return. */
  STOP: 3,
  /** The job ring (slot numbers), `slots` words. */
  RING: 8,
  /** Words per slot in the result area after the ring. */
  RESULT_WORDS: 16,
  // Result words of a slot:
  STATE: 0,
  LENGTH: 1,
  STORED: 2,
  CODEC: 3,
  CRC: 4,
  RAW: 5,
  /** 8 words: the 32-byte digest. */
  DIGEST: 8,
} as const;
export const SLOT_IDLE = 0;
export const SLOT_QUEUED = 1;
export const SLOT_DONE = 2;
export const SLOT_FAILED = 3;
export const CODECS: readonly Compression[] = ['none', 'zstd', 'lz4'];
export function resultAt(slots: number, slot: number): number {
  return CTL.RING + slots + slot * CTL.RESULT_WORDS;
}

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
  /** Blocks in flight (encoding, or encoded and waiting to be written); default `defaultSlots`. */
  readonly slots?: number;
}

/**
 * Encoder slots by default: 12 MiB of blocks, at least 6 and at most 24 (1 MiB blocks: 12; 256 and
 * 512 KiB: 24, i.e. 6 and 12 MiB; 4 MiB: 6). More small slots only hold more memory: a 256 KiB
 * full with 48 slots peaked at 4 MiB more RSS for no CPU or wall difference (docs/decisions/0010).
 */
export function defaultSlots(blockSize: number): number {
  return Math.min(24, Math.max(6, Math.floor((12 * 1024 * 1024) / blockSize)));
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

/** Atomics.waitAsync (Node 20 has it; TypeScript's lib here does not declare it). */
interface AtomicsWaitAsync {
  waitAsync(a: Int32Array, index: number, value: number): { async: false; value: string } | { async: true; value: Promise<string> };
}

export class EncodePool {
  readonly #input: SharedArrayBuffer;
  readonly #output: SharedArrayBuffer;
  readonly #ctl: Int32Array;
  readonly #inputStride: number;
  readonly #outputStride: number;
  readonly #free: number[] = [];
  /** Slots whose input buffer is lent to a source (lend()). */
  readonly #lent = new Set<number>();
  readonly #waiters: Array<{ resolve: (slot: number) => void; reject: (err: Error) => void }> = [];
  readonly #workers: Array<{ readonly worker: Worker; readonly left: Promise<boolean>; readonly detach: () => void }> = [];
  /** Submitted slots (worker path): the EncodedSlot is built when the result is collected. */
  readonly #pending = new Map<number, { resolve: (r: EncodedSlot) => void; reject: (e: Error) => void; length: number }>();
  readonly #local: BlockEncoder | null;
  readonly #slotCount: number;
  /** A waitAsync on the completion counter is outstanding. */
  #collecting = false;
  #closed = false;
  #closing: Promise<void> | null = null;
  #failure: Error | null = null;

  constructor(opts: EncodePoolOptions) {
    const threads = opts.threads ?? Math.min(2, availableParallelism());
    const slots = opts.slots ?? defaultSlots(opts.blockSize);
    this.#slotCount = slots;
    this.#inputStride = opts.blockSize;
    this.#outputStride = RECORD_HEADER_SIZE + payloadBound(opts.blockSize);
    const memory = poolMemory(this.#inputStride * slots, this.#outputStride * slots, 4 * resultAt(slots, slots));
    this.#input = memory.input;
    this.#output = memory.output;
    const control = memory.control;
    this.#ctl = new Int32Array(control);
    for (let i = 0; i < slots; i++) this.#free.push(i);
    if (threads === 0) {
      this.#local = new BlockEncoder(opts.compression, opts.keys, opts.aad, opts.blockSize);
      return;
    }
    this.#local = null;
    const init: WorkerInit = {
      input: this.#input,
      output: this.#output,
      control,
      slots,
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
      const worker = takeIdle(init) ?? startWorker(init);
      let leave: (left: boolean) => void = () => undefined;
      const left = new Promise<boolean>((resolve) => (leave = resolve));
      const onMessage = (m: WorkerError | WorkerIdle) => {
        if ('idle' in m) return leave(true);
        const p = this.#pending.get(m.slot);
        if (!p) return;
        this.#pending.delete(m.slot);
        Atomics.store(this.#ctl, resultAt(slots, m.slot) + CTL.STATE, SLOT_IDLE);
        p.reject(new Error(`block encoder: ${m.error}`));
      };
      const onError = (err: Error) => {
        leave(false);
        this.#fail(err);
      };
      const onExit = (code: number) => {
        leave(false);
        if (!this.#closed) this.#fail(new Error(`block encoder thread exited with code ${code}`));
      };
      worker.on('message', onMessage);
      worker.on('error', onError);
      worker.on('exit', onExit);
      const detach = () => {
        worker.off('message', onMessage);
        worker.off('error', onError);
        worker.off('exit', onExit);
      };
      this.#workers.push({ worker, left, detach });
    }
  }

  /** Collects finished slots whenever the completion counter moves, while any are pending. */
  #collect(): void {
    if (this.#collecting || this.#pending.size === 0 || this.#failure) return;
    const ctl = this.#ctl;
    const seen = Atomics.load(ctl, CTL.DONE);
    for (const [slot, p] of this.#pending) {
      const at = resultAt(this.#slotCount, slot);
      if (Atomics.load(ctl, at + CTL.STATE) !== SLOT_DONE) continue;
      Atomics.store(ctl, at + CTL.STATE, SLOT_IDLE);
      this.#pending.delete(slot);
      const digest = Buffer.allocUnsafe(32);
      digest.set(new Uint8Array(ctl.buffer, (at + CTL.DIGEST) * 4, 32));
      p.resolve(this.#result(slot, p.length, { storedLength: ctl[at + CTL.STORED]!, compression: CODECS[ctl[at + CTL.CODEC]!]!, crc: ctl[at + CTL.CRC]! >>> 0, digest, raw: ctl[at + CTL.RAW] === 1 }));
    }
    if (this.#pending.size === 0) return;
    const w = (Atomics as unknown as AtomicsWaitAsync).waitAsync(ctl, CTL.DONE, seen);
    if (!w.async) return queueMicrotask(() => this.#collect());
    this.#collecting = true;
    void w.value.then(() => {
      this.#collecting = false;
      this.#collect();
    });
  }

  #result(slot: number, length: number, e: EncodedBlock): EncodedSlot {
    const output = Buffer.from(this.#output, slot * this.#outputStride, this.#outputStride);
    return {
      ...e,
      slot,
      header: output.subarray(0, RECORD_HEADER_SIZE),
      payload: e.raw ? Buffer.from(this.#input, slot * this.#inputStride, length) : output.subarray(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + e.storedLength),
    };
  }

  #fail(err: Error): void {
    this.#failure ??= err;
    for (const [slot, p] of this.#pending) {
      this.#pending.delete(slot);
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

  /** Slots free right now. */
  get freeSlots(): number {
    return this.#free.length;
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
    // A lent buffer already holds the block: nothing to copy.
    if (plain.buffer !== this.#input || plain.byteOffset !== input.byteOffset) plain.copy(input);
    if (this.#local) {
      try {
        const output = Buffer.from(this.#output, slot * this.#outputStride + RECORD_HEADER_SIZE, this.#outputStride - RECORD_HEADER_SIZE);
        return Promise.resolve(this.#result(slot, plain.length, this.#local.encodeInto(input, output)));
      } catch (err) {
        this.release(slot);
        return Promise.reject(err instanceof Error ? err : new Error(String(err)));
      }
    }
    if (this.#failure) {
      this.release(slot);
      return Promise.reject(this.#failure);
    }
    const ctl = this.#ctl;
    const at = resultAt(this.#slotCount, slot);
    ctl[at + CTL.LENGTH] = plain.length;
    Atomics.store(ctl, at + CTL.STATE, SLOT_QUEUED);
    const tail = Atomics.load(ctl, CTL.TAIL);
    // (Counters wrap after 2^31 jobs, far beyond one restore point's blocks.)
    Atomics.store(ctl, CTL.RING + ((tail >>> 0) % this.#slotCount), slot);
    Atomics.store(ctl, CTL.TAIL, (tail + 1) | 0);
    Atomics.notify(ctl, CTL.TAIL, 1);
    return new Promise<EncodedSlot>((resolve, reject) => {
      this.#pending.set(slot, {
        resolve,
        reject: (err) => {
          this.release(slot);
          reject(err);
        },
        length: plain.length,
      });
      this.#collect();
    });
  }

  /**
   * Lends a free slot's input buffer (block-size bytes) to a source, which reads the next block
   * straight into it and yields a view of it from offset 0 as the block's data: submit() then
   * encodes it in place, with no copy (a zero block's slot is released). A buffer the source does
   * not use goes back with giveBack(). Lent slots count against the pool: lend a few at most.
   */
  async lend(): Promise<Buffer> {
    const slot = await this.acquire();
    this.#lent.add(slot);
    return Buffer.from(this.#input, slot * this.#inputStride, this.#inputStride);
  }

  /** The slot of a lent buffer (or a view of it from its start), taking it back; else undefined. */
  takeLent(buf: Uint8Array): number | undefined {
    if (buf.buffer !== this.#input || buf.byteOffset % this.#inputStride !== 0) return undefined;
    const slot = buf.byteOffset / this.#inputStride;
    if (!this.#lent.delete(slot)) return undefined;
    return slot;
  }

  /** Returns a lent buffer that was not used. */
  giveBack(buf: Uint8Array): void {
    const slot = this.takeLent(buf);
    if (slot !== undefined) this.release(slot);
  }

  /** acquire() + submit(). */
  async encode(plain: Buffer): Promise<EncodedSlot> {
    return this.submit(await this.acquire(), plain);
  }

  /**
   * Stops the encoders; encodes still pending and waiting acquire() calls are rejected. The
   * threads, once they have left this pool, are kept for the next pool of the process (a few).
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    this.#closed = true;
    this.#fail(new BulwarkError('the block encoders were closed', { kind: 'invalid' }));
    Atomics.store(this.#ctl, CTL.STOP, 1);
    Atomics.notify(this.#ctl, CTL.TAIL);
    const left = await Promise.all(
      this.#workers.map(async ({ worker, left, detach }) => {
        let timer: NodeJS.Timeout | undefined;
        const out = await Promise.race([left, new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), LEAVE_TIMEOUT_MS)))]);
        clearTimeout(timer);
        detach();
        if (out) await keepIdle(worker);
        else await worker.terminate();
        return out;
      }),
    );
    // Nobody can touch the slots any more (every one is back, no thread serves this pool): the next pool may have them.
    if (left.every(Boolean) && this.#free.length === this.#slotCount && this.#lent.size === 0) {
      idleMemory = { input: this.#input, output: this.#output, control: this.#ctl.buffer as SharedArrayBuffer };
    }
  }
}
