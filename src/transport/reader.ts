// The reader end of a restore: opens N streams to the target agent that holds the restore point,
// asks each for a share of a disk's blocks (READ), verifies every block's CRC (NACK and the target
// resends), hands blocks to a consumer in any order, and acknowledges them once consumed (credit
// back-pressure). A dropped stream's unread blocks are asked for again on a reconnected stream.
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { BulwarkError } from '../common/errors.js';
import { logger, type Logger } from '../common/log.js';
import { FramedConnection, connectTls, type TlsIdentity } from './connection.js';
import {
  MessageType,
  NackReason,
  PROTOCOL_VERSION,
  decodeBlock,
  decodeError,
  decodeOpenDisk,
  decodeZeroRun,
  encodeAck,
  encodeJson,
  encodeNack,
  messageTypeName,
  type Frame,
  type OpenDiskMessage,
  type ReceivedBlockMessage,
} from './frame.js';
import { DEFAULT_RESUME_WINDOW_MS, DEFAULT_STREAMS } from './sender.js';

export interface TransferReaderOptions {
  readonly target: { readonly host: string; readonly port: number; readonly servername?: string };
  readonly tls: TlsIdentity;
  readonly taskId: string;
  readonly taskSecret: string;
  readonly streams?: number;
  /** How long one stream may stay down before the restore fails. */
  readonly resumeWindowMs?: number;
  /** Blocks asked for per READ request. */
  readonly chunkBlocks?: number;
  readonly reconnectDelayMs?: number;
  readonly connectTimeoutMs?: number;
  /** Test hook: return true to flip a byte of this block as it arrives (before the CRC check). */
  readonly corruptOnArrival?: (block: { disk: number; index: number; attempt: number }) => boolean;
  readonly log?: Logger;
}

/** Where restored blocks go: called concurrently from several streams, in no particular order. */
export interface RestoreConsumer {
  block(block: ReceivedBlockMessage): Promise<void>;
  zeroRun?(run: { disk: number; start: number; count: number }): Promise<void>;
}

export interface TransferReaderStats {
  blocks: number;
  zeroBlocks: number;
  nacks: number;
  reconnects: number;
}

interface Chunk {
  readonly disk: number;
  readonly start: number;
  readonly count: number;
}

interface ReaderStream {
  readonly index: number;
  conn: FramedConnection | undefined;
  /** The chunk this stream is reading and the indexes of it still missing. */
  chunk: Chunk | undefined;
  missing: Set<number>;
  chain: Promise<void>;
  done: (() => void) | undefined;
  lost: ((err: Error) => void) | undefined;
  attempts: Map<number, number>;
}

export class TransferReader {
  readonly stats: TransferReaderStats = { blocks: 0, zeroBlocks: 0, nacks: 0, reconnects: 0 };
  readonly #o: TransferReaderOptions;
  readonly #log: Logger;
  readonly #streams: ReaderStream[];
  #disks: OpenDiskMessage[] = [];
  #consumer: RestoreConsumer | undefined;
  #failure: Error | undefined;
  #closed = false;

  private constructor(options: TransferReaderOptions) {
    this.#o = options;
    this.#log = options.log ?? logger('transport-reader', { task: options.taskId });
    const n = options.streams ?? DEFAULT_STREAMS;
    this.#streams = Array.from({ length: n }, (_, index) => ({
      index,
      conn: undefined,
      chunk: undefined,
      missing: new Set<number>(),
      chain: Promise.resolve(),
      done: undefined,
      lost: undefined,
      attempts: new Map<number, number>(),
    }));
  }

  static async open(options: TransferReaderOptions): Promise<TransferReader> {
    const r = new TransferReader(options);
    try {
      await Promise.all(r.#streams.map((s) => r.#connect(s)));
    } catch (err) {
      r.close();
      throw err;
    }
    return r;
  }

  /** The disks of the restore point, as the target announced them. */
  get disks(): readonly OpenDiskMessage[] {
    return this.#disks;
  }

  /** Reads every block of `disk` over all streams into `consumer`; resolves when all were consumed. */
  async readDisk(disk: number, consumer: RestoreConsumer): Promise<void> {
    const d = this.#disks.find((x) => x.disk === disk);
    if (!d) throw new BulwarkError(`the restore point has no disk ${disk}`, { kind: 'not-found', context: { task: this.#o.taskId } });
    return this.readBlocks(disk, 0, Math.ceil(d.size / d.blockSize), consumer);
  }

  /**
   * Reads blocks `first` .. `first + count - 1` of `disk` over all streams into `consumer` (random
   * access, e.g. instant recovery's on-demand reads). One call at a time per reader.
   */
  async readBlocks(disk: number, first: number, count: number, consumer: RestoreConsumer): Promise<void> {
    if (!this.#disks.some((x) => x.disk === disk)) throw new BulwarkError(`the restore point has no disk ${disk}`, { kind: 'not-found', context: { task: this.#o.taskId } });
    this.#consumer = consumer;
    const total = first + count;
    const per = this.#o.chunkBlocks ?? 256;
    const queue: Chunk[] = [];
    for (let start = first; start < total; start += per) queue.push({ disk, start, count: Math.min(per, total - start) });
    await Promise.all(this.#streams.map((s) => this.#worker(s, queue)));
    if (this.#failure) throw this.#failure;
  }

  close(): void {
    this.#closed = true;
    for (const s of this.#streams) s.conn?.close();
  }

  async #worker(s: ReaderStream, queue: Chunk[]): Promise<void> {
    for (;;) {
      if (this.#failure) throw this.#failure;
      const chunk = s.chunk ?? queue.shift();
      if (!chunk) return;
      s.chunk = chunk;
      if (s.missing.size === 0) for (let i = chunk.start; i < chunk.start + chunk.count; i++) s.missing.add(i);
      try {
        if (!s.conn || s.conn.closed) await this.#reconnect(s);
        await new Promise<void>((resolve, reject) => {
          s.done = resolve;
          s.lost = reject;
          // Ask only for what is still missing (after a reconnect, part of the chunk arrived).
          for (const [start, count] of runs([...s.missing].sort((a, b) => a - b))) {
            s.conn!.send(MessageType.read, encodeJson({ disk: chunk.disk, start, count })).catch(() => undefined);
          }
        });
        s.chunk = undefined;
      } catch (err) {
        if (this.#failure || !(err instanceof BulwarkError) || err.kind !== 'unavailable') {
          this.#fail(err instanceof Error ? err : new Error(String(err)));
          throw this.#failure ?? err;
        }
        // the stream dropped: loop, reconnect, and ask again for the missing blocks
      }
    }
  }

  async #reconnect(s: ReaderStream): Promise<void> {
    const since = Date.now();
    const window = this.#o.resumeWindowMs ?? DEFAULT_RESUME_WINDOW_MS;
    let delay = this.#o.reconnectDelayMs ?? 200;
    for (;;) {
      if (this.#closed) throw new BulwarkError('restore reader is closed', { kind: 'internal' });
      try {
        await this.#connect(s);
        this.stats.reconnects++;
        return;
      } catch (err) {
        if (err instanceof BulwarkError && err.kind !== 'unavailable') throw err;
        if (Date.now() - since > window) {
          throw new BulwarkError(`lost the connection to target agent ${this.#o.target.host}:${this.#o.target.port} for more than ${Math.round(window / 1000)} s during a restore`, {
            kind: 'internal',
            cause: err,
            context: { task: this.#o.taskId },
          });
        }
        await sleep(delay);
        delay = Math.min(delay * 2, 2_000);
      }
    }
  }

  async #connect(s: ReaderStream): Promise<void> {
    const o = this.#o;
    const socket = await connectTls(o.target, o.tls, o.connectTimeoutMs ?? 10_000);
    await new Promise<void>((resolve, reject) => {
      let state: 'welcome' | 'ready' = 'welcome';
      const disks: OpenDiskMessage[] = [];
      const conn = new FramedConnection(socket, {
        onFrame: (f) => {
          if (state === 'welcome') {
            if (f.type === MessageType.welcome) {
              state = 'ready';
              s.conn = conn;
              s.chain = Promise.resolve();
              s.attempts.clear();
              if (this.#disks.length === 0) this.#disks = disks;
              resolve();
            } else if (f.type === MessageType.openDisk) {
              disks.push(decodeOpenDisk(f.payload)); // the restore point's disks come before WELCOME
            } else {
              const msg = f.type === MessageType.error ? decodeError(f.payload) : { kind: 'invalid', message: `expected WELCOME, got ${messageTypeName(f.type)}` };
              reject(new BulwarkError(`target agent refused the restore: ${msg.message}`, { kind: msg.kind === 'unauthorized' ? 'unauthorized' : 'invalid', context: { task: o.taskId } }));
              conn.close();
            }
            return;
          }
          s.chain = s.chain.then(() => this.#onData(s, conn, f)).catch((err: unknown) => {
            this.#fail(err instanceof Error ? err : new Error(String(err)));
            s.lost?.(this.#failure!);
          });
        },
        onClose: (err) => {
          if (state === 'welcome') {
            reject(new BulwarkError('target agent closed the restore stream during the handshake', { kind: 'unavailable', cause: err }));
            return;
          }
          if (s.conn === conn) s.conn = undefined;
          if (!this.#closed) this.#log.warn({ stream: s.index, err: err?.message }, 'restore stream dropped; asking again for its missing blocks');
          s.lost?.(new BulwarkError('restore stream dropped', { kind: 'unavailable', cause: err }));
        },
      });
      const hello = { protocol: PROTOCOL_VERSION, role: 'read', taskId: o.taskId, taskSecret: o.taskSecret, sessionId: randomBytes(16).toString('hex'), streams: this.#streams.length };
      conn.send(MessageType.hello, encodeJson(hello), { stream: s.index }).catch(() => undefined);
    });
  }

  async #onData(s: ReaderStream, conn: FramedConnection, f: Frame): Promise<void> {
    const consumer = this.#consumer;
    switch (f.type) {
      case MessageType.block: {
        let payload = f.payload;
        let block: ReceivedBlockMessage | undefined;
        try {
          block = decodeBlock(payload);
          const attempt = (s.attempts.get(f.sequence) ?? 0) + 1;
          s.attempts.set(f.sequence, attempt);
          if (this.#o.corruptOnArrival?.({ disk: block.disk, index: block.index, attempt })) {
            payload = Buffer.from(payload);
            payload[payload.length - 1]! ^= 0xff;
            block = decodeBlock(payload);
          }
        } catch {
          block = undefined;
        }
        if (!block?.crcValid) {
          this.stats.nacks++;
          await conn.send(MessageType.nack, encodeNack({ sequence: f.sequence, reason: NackReason.crc }));
          return;
        }
        s.attempts.delete(f.sequence);
        if (s.missing.has(block.index)) {
          await consumer!.block(block);
          this.stats.blocks++;
          s.missing.delete(block.index);
        }
        break;
      }
      case MessageType.zeroRun: {
        const run = decodeZeroRun(f.payload);
        const wanted = [...range(run.start, run.count)].some((i) => s.missing.has(i));
        if (wanted) {
          await consumer?.zeroRun?.(run);
          this.stats.zeroBlocks += run.count;
          for (const i of range(run.start, run.count)) s.missing.delete(i);
        }
        break;
      }
      case MessageType.error: {
        const e = decodeError(f.payload);
        throw new BulwarkError(`target agent: ${e.message}`, { kind: e.kind === 'corrupt' ? 'corrupt' : 'internal', context: { task: this.#o.taskId } });
      }
      default:
        conn.close(new BulwarkError(`unexpected ${messageTypeName(f.type)} on a restore stream`, { kind: 'invalid' }));
        return;
    }
    await conn.send(MessageType.ack, encodeAck({ window: 0, sequences: [f.sequence] })).catch(() => undefined);
    if (s.missing.size === 0) s.done?.();
  }

  #fail(err: Error): void {
    this.#failure ??= err;
  }
}

function* range(start: number, count: number): Generator<number> {
  for (let i = start; i < start + count; i++) yield i;
}

/** Consecutive runs [start, count] of sorted indexes. */
function runs(sorted: number[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const i of sorted) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === i) last[1]++;
    else out.push([i, 1]);
  }
  return out;
}
