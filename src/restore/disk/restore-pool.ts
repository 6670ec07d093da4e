// The threads of a disk restore (see restore-worker.ts): a pool of decoders that read, check,
// decode and write batches of blocks, and one hasher that follows the written image in disk
// order. The main thread only resolves the block tables, hands out batches and counts; a worker
// that fails or dies fails every batch it holds.
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { createDecoder } from './restore-decoder.js';

export interface DecodeInit {
  readonly role: 'decode';
  /** The chain's backup files, as open descriptors of this process (threads share them). */
  readonly files: readonly { readonly fd: number; readonly aad: Uint8Array }[];
  readonly outFd: number;
  /** The output opened with O_DIRECT (whole aligned runs are written through it), or null. */
  readonly directFd?: number | null;
  readonly blockSize: number;
  readonly blockKey: Uint8Array | null;
  readonly digestKey: Uint8Array | null;
  /** Check each block's plain data against its SHA-256 (HMAC) in the block table. */
  readonly verify: boolean;
}
export interface HashInit {
  readonly role: 'hash';
  readonly outFd: number;
}
export type RestoreWorkerInit = DecodeInit | HashInit;

/**
 * Blocks whose records lie back to back in file `file`; `blocks` holds 5 numbers per block:
 * disk block index, record offset, stored length, plain length, CRC32C; `digests` 32 bytes each.
 */
export interface DecodeJob {
  readonly id: number;
  readonly file: number;
  readonly blocks: number[];
  readonly digests: Uint8Array;
}
export type DecodeResult =
  | { readonly id: number; readonly ok: true; readonly bytesWritten: number }
  | { readonly id: number; readonly ok: false; readonly block: number; readonly fileOffset: number; readonly error: string };

export type HashMessage = { readonly kind: 'data' | 'zero'; readonly from: number; readonly to: number } | { readonly kind: 'end' };
export type HashResult = { readonly ok: true; readonly sha256: string } | { readonly ok: false; readonly error: string };

/** A batch failed: which block, where in which file, and why. */
export class BlockDecodeError extends Error {
  constructor(
    readonly file: number,
    readonly block: number,
    readonly fileOffset: number,
    message: string,
  ) {
    super(message);
  }
}

/** Starts the worker: compiled .js directly, or from sources (.ts under tsx/vitest) through tsx. */
function startWorker(init: RestoreWorkerInit): Worker {
  // The workers allocate almost nothing per block: a small young generation keeps RSS low.
  const resourceLimits = { maxYoungGenerationSizeMb: 4 };
  if (!import.meta.url.endsWith('.ts')) return new Worker(new URL('./restore-worker.js', import.meta.url), { workerData: init, resourceLimits });
  const src = new URL('./restore-worker.ts', import.meta.url).href;
  const tsxApi = pathToFileURL(createRequire(import.meta.url).resolve('tsx/esm/api').replace(/\.cjs$/, '.mjs')).href;
  const boot = `import { register } from ${JSON.stringify(tsxApi)}; register(); await import(${JSON.stringify(src)});`;
  return new Worker(new URL(`data:text/javascript,${encodeURIComponent(boot)}`), { workerData: init, resourceLimits });
}

interface Pending {
  readonly resolve: (bytesWritten: number) => void;
  readonly reject: (err: Error) => void;
  readonly worker: number;
  readonly file: number;
}

export class DecodePool {
  readonly #workers: Worker[] = [];
  readonly #queued: number[] = [];
  readonly #pending = new Map<number, Pending>();
  readonly #depth: number;
  readonly #local: ((job: DecodeJob) => DecodeResult) | null = null;
  #waiters: Array<() => void> = [];
  #nextId = 1;
  #failure: Error | null = null;
  #closed = false;

  /**
   * `threads` decoders, each given at most `depth` batches at a time (deep enough that a decoder
   * has work while the main thread waits for a core); 0: on the calling thread.
   */
  constructor(init: Omit<DecodeInit, 'role'>, threads: number, depth = 6) {
    this.#depth = depth;
    if (threads <= 0) {
      this.#local = createDecoder(init);
      return;
    }
    for (let w = 0; w < threads; w++) {
      const worker = startWorker({ role: 'decode', ...init });
      worker.on('message', (r: DecodeResult) => {
        const p = this.#pending.get(r.id);
        if (!p) return;
        this.#pending.delete(r.id);
        this.#queued[p.worker]! -= 1;
        if (r.ok) p.resolve(r.bytesWritten);
        else p.reject(new BlockDecodeError(p.file, r.block, r.fileOffset, r.error));
        this.#wake();
      });
      worker.on('error', (err) => this.#fail(err));
      worker.on('exit', (code) => {
        if (!this.#closed) this.#fail(new Error(`restore decoder thread exited with code ${code}`));
      });
      this.#workers.push(worker);
      this.#queued.push(0);
    }
  }

  #fail(err: Error): void {
    this.#failure ??= err;
    for (const [id, p] of this.#pending) {
      this.#pending.delete(id);
      p.reject(err);
    }
    this.#wake();
  }

  #wake(): void {
    const ws = this.#waiters;
    this.#waiters = [];
    for (const w of ws) w();
  }

  #leastBusy(): number {
    let best = 0;
    for (let w = 1; w < this.#workers.length; w++) if (this.#queued[w]! < this.#queued[best]!) best = w;
    return best;
  }

  /** Resolves when a worker can take another batch (back-pressure on the planner). */
  async ready(): Promise<void> {
    if (this.#local) return;
    while (!this.#failure && this.#queued[this.#leastBusy()]! >= this.#depth) await new Promise<void>((r) => this.#waiters.push(r));
    if (this.#failure) throw this.#failure;
  }

  /** Hands a batch to the least busy decoder; resolves with the bytes it wrote. */
  submit(job: Omit<DecodeJob, 'id'>): Promise<number> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#local) {
      const r = this.#local({ id: 0, ...job });
      return r.ok ? Promise.resolve(r.bytesWritten) : Promise.reject(new BlockDecodeError(job.file, r.block, r.fileOffset, r.error));
    }
    const worker = this.#leastBusy();
    const id = this.#nextId++;
    return new Promise<number>((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, worker, file: job.file });
      this.#queued[worker]! += 1;
      this.#workers[worker]!.postMessage({ id, ...job } satisfies DecodeJob);
    });
  }

  async close(): Promise<void> {
    this.#closed = true;
    await Promise.all(this.#workers.map((w) => w.terminate()));
  }
}

/** SHA-256 of the raw image, in a thread of its own, fed ranges in disk order. */
export class ImageHasher {
  readonly #worker: Worker;
  readonly #result: Promise<string>;
  #closed = false;

  constructor(outFd: number) {
    this.#worker = startWorker({ role: 'hash', outFd });
    this.#result = new Promise<string>((resolve, reject) => {
      this.#worker.on('message', (r: HashResult) => (r.ok ? resolve(r.sha256) : reject(new Error(r.error))));
      this.#worker.on('error', reject);
      this.#worker.on('exit', (code) => {
        if (!this.#closed) reject(new Error(`restore hash thread exited with code ${code}`));
      });
    });
    this.#result.catch(() => undefined);
  }

  /** Bytes [from, to) of the image: read back from the file (data) or zeroes (a hole). */
  feed(kind: 'data' | 'zero', from: number, to: number): void {
    if (to > from) this.#worker.postMessage({ kind, from, to } satisfies HashMessage);
  }

  /** The digest once every range is fed. */
  digest(): Promise<string> {
    this.#worker.postMessage({ kind: 'end' } satisfies HashMessage);
    return this.#result;
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#worker.terminate();
  }
}
