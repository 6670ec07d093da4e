// The source end of a data-mover task: spreads a disk's blocks over N TLS streams to the target
// agent, keeps at most one credit window of unacknowledged bytes in flight, resends what the
// target NACKs, and reconnects dropped streams within the resume window (data-mover-protocol.md).
import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { BulwarkError } from '../common/errors.js';
import { logger, type Logger } from '../common/log.js';
import type { DiskBlock } from '../disk/types.js';
import { FramedConnection, connectTls, type TlsIdentity } from './connection.js';
import {
  BLOCK_HEADER_SIZE,
  FLAG_RESEND,
  FRAME_HEADER_SIZE,
  FLAG_RESUME,
  MessageType,
  PROTOCOL_VERSION,
  decodeAck,
  decodeAbort,
  decodeCommitted,
  decodeError,
  decodeNack,
  decodeWelcome,
  encodeBlock,
  encodeFrame,
  encodeJson,
  encodeZeroRun,
  messageTypeName,
  type BeginPointMessage,
  type BlockMessage,
  type CompressionName,
  type Frame,
  type MessageTypeCode,
} from './frame.js';
import type { StageTimes } from './stage-times.js';
import type { Throttle } from './throttle.js';

export const DEFAULT_STREAMS = 5;
export const DEFAULT_RESUME_WINDOW_MS = 30_000;
export const MAX_BLOCK_ATTEMPTS = 8;
/** At most this many bytes (and a quarter of the credit window) wait for rate-limit tokens at once. */
const MAX_THROTTLE_AHEAD = 8 * 1024 * 1024;

/** A block ready to send: already hashed and (optionally) compressed by the proxy stage. */
export interface OutgoingBlock {
  readonly index: number;
  readonly plainLength: number;
  readonly compression: CompressionName;
  readonly sha256: Buffer;
  readonly data: Buffer;
}
/** A run of blocks that read as zeroes: nothing but the range crosses the wire. */
export interface OutgoingZeroRun {
  readonly zeroStart: number;
  readonly zeroCount: number;
}
export type OutgoingItem = OutgoingBlock | OutgoingZeroRun;

export interface DiskToSend {
  readonly name: string;
  readonly size: number;
  readonly blockSize: number;
  /** Full read into an increment: the target keeps only blocks that differ from the parent point. */
  readonly compareWithParent?: boolean;
}

export interface DiskSendSummary {
  readonly disk: number;
  readonly blocks: number;
  readonly zeroBlocks: number;
  /** Stored (wire payload) bytes of the blocks. */
  readonly bytes: number;
}

export interface TransferSenderOptions {
  readonly target: { readonly host: string; readonly port: number; readonly servername?: string };
  readonly tls: TlsIdentity;
  readonly taskId: string;
  readonly taskSecret: string;
  /** Parallel TCP streams; 5 by default, 1 when the job's "multithreaded transfer" is off. */
  readonly streams?: number;
  readonly resumeWindowMs?: number;
  /** Limits on the bytes written (repository share, throttling rules); see `allOf`. */
  readonly throttle?: Throttle;
  /** Where waits are counted: source, network, target, throttling. */
  readonly stageTimes?: StageTimes;
  readonly keepaliveMs?: number;
  readonly deadPeerMs?: number;
  readonly reconnectDelayMs?: number;
  readonly connectTimeoutMs?: number;
  /** Test hook: return true to flip one payload byte of this transmission on the wire. */
  readonly corruptInTransit?: (block: { sequence: number; disk: number; index: number; attempt: number }) => boolean;
  readonly log?: Logger;
}

export interface TransferSenderStats {
  blocks: number;
  zeroRuns: number;
  bytesSent: number;
  resends: number;
  nacks: number;
  reconnects: number;
  inFlightBytes: number;
  maxInFlightBytes: number;
  creditWaits: number;
  framesByStream: number[];
  /** performance.now() when the first block started its way out (before any rate limit), and when the last message was written. */
  firstTransmitAt: number | undefined;
  lastWrittenAt: number | undefined;
}

interface Pending {
  readonly sequence: number;
  readonly type: MessageTypeCode;
  readonly payload: readonly Buffer[];
  readonly bytes: number;
  readonly block?: { disk: number; index: number };
  /** The disk whose frame this message belongs to (OPEN_DISK, BLOCK, ZERO_RUN). */
  readonly disk?: number;
  stream: number | undefined;
  attempts: number;
  readonly acked: { resolve: () => void; promise: Promise<void> };
}

interface StreamSlot {
  readonly index: number;
  conn: FramedConnection | undefined;
  downSince: number | undefined;
  reconnecting: boolean;
}

function deferred(): { resolve: () => void; reject: (e: Error) => void; promise: Promise<void> } {
  let resolve!: () => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => undefined);
  return { resolve, reject, promise };
}

/**
 * Sends one task's disks to a target agent. Use: `open` → `sendDisk` per disk → `commit`
 * (or `abort`) → `close`. Any method rejects once the transfer failed (`failure`).
 */
export class TransferSender {
  readonly sessionId: string;
  readonly stats: TransferSenderStats;
  readonly #o: TransferSenderOptions;
  readonly #log: Logger;
  readonly #slots: StreamSlot[];
  readonly #pending = new Map<number, Pending>();
  #nextSequence = 1;
  #nextDisk = 0;
  #window = 0;
  #resumeWindowMs: number;
  #failure: Error | undefined;
  #closing = false;
  #committed: ReturnType<typeof deferred> | undefined;
  #committedPoint: Record<string, unknown> | undefined;
  #waiters: Array<() => void> = [];
  /** Bytes of messages waiting for rate-limit tokens, and when the last such wait ended (for the union). */
  #awaitingTokens = 0;
  #throttledUntil = 0;

  private constructor(options: TransferSenderOptions) {
    this.#o = options;
    this.sessionId = randomBytes(16).toString('hex');
    this.#resumeWindowMs = options.resumeWindowMs ?? DEFAULT_RESUME_WINDOW_MS;
    const n = options.streams ?? DEFAULT_STREAMS;
    if (!Number.isInteger(n) || n < 1 || n > 64) throw new BulwarkError(`streams must be 1..64, got ${n}`, { kind: 'invalid' });
    this.#slots = Array.from({ length: n }, (_, index) => ({ index, conn: undefined, downSince: undefined, reconnecting: false }));
    this.stats = {
      blocks: 0,
      zeroRuns: 0,
      bytesSent: 0,
      resends: 0,
      nacks: 0,
      reconnects: 0,
      inFlightBytes: 0,
      maxInFlightBytes: 0,
      creditWaits: 0,
      framesByStream: new Array<number>(n).fill(0),
      firstTransmitAt: undefined,
      lastWrittenAt: undefined,
    };
    this.#log = options.log ?? logger('transport', { task: options.taskId, session: this.sessionId });
  }

  /** Connects all streams and opens the task session on the target. */
  static async open(options: TransferSenderOptions): Promise<TransferSender> {
    const sender = new TransferSender(options);
    try {
      await Promise.all(sender.#slots.map((slot) => sender.#connect(slot, false)));
    } catch (err) {
      sender.#fail(err instanceof Error ? err : new Error(String(err)));
      sender.#closeAll();
      throw err;
    }
    return sender;
  }

  get failure(): Error | undefined {
    return this.#failure;
  }

  /** Sends one disk: OPEN_DISK, its blocks and zero runs (in any order), END_DISK; resolves when all are durable on the target. */
  async sendDisk(disk: DiskToSend, items: AsyncIterable<OutgoingItem>): Promise<DiskSendSummary> {
    const diskNo = this.#nextDisk++;
    const ctx = { disk: disk.name };
    const open = await this.#sequenced(MessageType.openDisk, [
      encodeJson({ disk: diskNo, name: disk.name, size: disk.size, blockSize: disk.blockSize, ...(disk.compareWithParent ? { compareWithParent: true } : {}) }),
    ]);
    await this.#race(open.acked.promise);
    let blocks = 0;
    let zeroBlocks = 0;
    let bytes = 0;
    const iterator = items[Symbol.asyncIterator]();
    try {
      for (;;) {
        const next = this.#o.stageTimes ? await this.#o.stageTimes.measure('source', () => iterator.next()) : await iterator.next();
        if (next.done) break;
        this.#check();
        const item = next.value;
        if ('zeroStart' in item) {
          zeroBlocks += item.zeroCount;
          this.stats.zeroRuns++;
          await this.#sequenced(MessageType.zeroRun, [encodeZeroRun({ disk: diskNo, start: item.zeroStart, count: item.zeroCount })], undefined, diskNo);
        } else {
          const block: BlockMessage = { disk: diskNo, ...item };
          blocks++;
          bytes += item.data.length;
          this.stats.blocks++;
          await this.#sequenced(MessageType.block, encodeBlock(block), { disk: diskNo, index: item.index });
        }
      }
    } catch (err) {
      await iterator.return?.().catch(() => undefined);
      throw this.#failure ?? new BulwarkError(`sending disk ${disk.name} failed`, { kind: 'internal', context: ctx, cause: err });
    }
    // This disk's messages only: the other disks of the point go on side by side (one task each),
    // and waiting for all of them would hold this disk's end (and its task's slot) until they pause.
    await this.#allAcked(diskNo);
    const end = await this.#sequenced(MessageType.endDisk, [encodeJson({ disk: diskNo, blocks, zeroBlocks, bytes })]);
    await this.#race(end.acked.promise);
    return { disk: diskNo, blocks, zeroBlocks, bytes };
  }

  /** Names the restore point the task's disks go into (BEGIN_POINT); resolves once the target opened it. */
  async beginPoint(point: BeginPointMessage): Promise<void> {
    const p = await this.#sequenced(MessageType.beginPoint, [encodeJson(point)]);
    await this.#race(p.acked.promise);
  }

  /**
   * Asks the target to commit; resolves when the restore point data is committed there, with the
   * point as the target described it in COMMITTED (undefined when it sent none).
   */
  async commit(): Promise<Record<string, unknown> | undefined> {
    await this.#allAcked();
    this.#committed = deferred();
    await this.#sendCommit();
    await this.#race(this.#committed.promise);
    return this.#committedPoint;
  }

  /** Tells the target to discard the task; nothing of it becomes visible. */
  async abort(reason: string): Promise<void> {
    await this.#sendAbort(reason);
    this.#fail(new BulwarkError(`transfer aborted: ${reason}`, { kind: 'internal', context: { task: this.#o.taskId } }));
  }

  async #sendAbort(reason: string): Promise<void> {
    const slot = this.#slots.find((s) => s.conn && !s.conn.closed);
    if (slot?.conn) await slot.conn.send(MessageType.abort, encodeJson({ reason }), { stream: slot.index }).catch(() => undefined);
  }

  close(): void {
    this.#closing = true;
    this.#closeAll();
    this.#wake();
  }

  // ---- sending ----

  async #sequenced(type: MessageTypeCode, payload: Buffer[], block?: { disk: number; index: number }, disk = block?.disk): Promise<Pending> {
    const bytes = payload.reduce((n, p) => n + p.length, 0);
    // Under a rate limit at most a quarter of the window (8 MiB at most) waits for tokens: the
    // rest of the window is for data on its way to the target, so a credit wait means the
    // target (or the network) is slow, not a rule; and a limit that changes applies after that
    // much, not after a whole window of token debt.
    if (block) this.stats.firstTransmitAt ??= performance.now();
    if (this.#o.throttle) await this.#throttleRoom(bytes);
    await this.#credit(bytes);
    const acked = deferred();
    const p: Pending = { sequence: this.#nextSequence++, type, payload, bytes, block, ...(disk !== undefined ? { disk } : {}), stream: undefined, attempts: 0, acked };
    this.#pending.set(p.sequence, p);
    this.stats.inFlightBytes += bytes;
    this.stats.maxInFlightBytes = Math.max(this.stats.maxInFlightBytes, this.stats.inFlightBytes);
    this.#transmit(p);
    return p;
  }

  /** Waits until `bytes` more fit in the credit window (always lets one message through when nothing is in flight). */
  async #credit(bytes: number): Promise<void> {
    this.#check();
    if (this.stats.inFlightBytes === 0 || this.stats.inFlightBytes + bytes <= this.#window) return;
    this.stats.creditWaits++;
    const wait = async (): Promise<void> => {
      while (this.stats.inFlightBytes > 0 && this.stats.inFlightBytes + bytes > this.#window) {
        await this.#nextEvent();
        this.#check();
      }
    };
    if (this.#o.stageTimes) await this.#o.stageTimes.measure('target', wait);
    else await wait();
  }

  /** Waits while the messages waiting for tokens fill their share of the window (always lets one through). */
  async #throttleRoom(bytes: number): Promise<void> {
    const ahead = Math.max(1, Math.min(MAX_THROTTLE_AHEAD, this.#window / 4));
    while (this.#awaitingTokens > 0 && this.#awaitingTokens + bytes > ahead) {
      await this.#nextEvent();
      this.#check();
    }
  }

  /**
   * Waits until the rate limits let `bytes` (and the frame header) go. Throttling counts the time
   * during which at least one message waited for tokens (the union of the waits, not their sum:
   * many messages wait side by side).
   */
  async #throttle(bytes: number): Promise<void> {
    const throttle = this.#o.throttle;
    if (!throttle) return;
    this.#awaitingTokens += bytes;
    const started = performance.now();
    try {
      const waited = await throttle.acquire(bytes + FRAME_HEADER_SIZE);
      if (waited > 0) {
        const ended = performance.now();
        this.#o.stageTimes?.add('throttling', ended - Math.max(started, this.#throttledUntil));
        this.#throttledUntil = Math.max(this.#throttledUntil, ended);
      }
    } finally {
      this.#awaitingTokens -= bytes;
      this.#wake();
    }
  }

  /** Sends (or re-sends) a pending message on the least loaded stream; failures are handled by the stream's reconnect. */
  #transmit(p: Pending): void {
    const run = async (): Promise<void> => {
      const resend = p.attempts > 0;
      p.attempts++;
      if (p.block) this.stats.firstTransmitAt ??= performance.now();
      // Every transmission, a message sent again too, waits for its tokens.
      await this.#throttle(p.bytes);
      const slot = await this.#pickStream();
      if (!this.#pending.has(p.sequence)) return; // acknowledged while we waited (resume)
      p.stream = slot.index;
      let payload = p.payload;
      if (p.block && this.#o.corruptInTransit?.({ sequence: p.sequence, ...p.block, attempt: p.attempts })) {
        payload = corrupt(payload);
      }
      const parts = encodeFrame(p.type, payload, { stream: slot.index, sequence: p.sequence, flags: resend ? FLAG_RESEND : 0 });
      const conn = slot.conn!;
      const write = conn.sendRaw(parts);
      this.stats.framesByStream[slot.index]!++;
      this.stats.bytesSent += p.bytes + FRAME_HEADER_SIZE;
      try {
        if (this.#o.stageTimes) await this.#o.stageTimes.measure('network', () => write);
        else await write;
        this.stats.lastWrittenAt = performance.now();
      } catch {
        // The stream died. If it died before this message was assigned to it, its re-queue
        // missed this message: send it again here. Otherwise the re-queue already did.
        if (this.#pending.has(p.sequence) && p.stream === slot.index && slot.conn !== conn) {
          p.stream = undefined;
          this.#transmit(p);
        }
      }
    };
    run().catch(() => undefined); // only fails when the whole transfer failed (#check)
  }

  async #pickStream(): Promise<StreamSlot> {
    for (;;) {
      this.#check();
      let best: StreamSlot | undefined;
      for (const s of this.#slots) {
        if (!s.conn || s.conn.closed) continue;
        if (!best || s.conn.writableLength < best.conn!.writableLength) best = s;
      }
      if (best) return best;
      await this.#nextEvent();
    }
  }

  async #sendCommit(): Promise<void> {
    const slot = await this.#pickStream();
    await slot.conn!.send(MessageType.commit, encodeJson({}), { stream: slot.index }).catch(() => undefined);
  }

  /** Waits until every message sent so far (with `disk`: every message of that disk) is acknowledged. */
  async #allAcked(disk?: number): Promise<void> {
    this.#check();
    const waiting = (): boolean => (disk === undefined ? this.#pending.size > 0 : [...this.#pending.values()].some((p) => p.disk === disk));
    while (waiting()) {
      await this.#nextEvent();
      this.#check();
    }
  }

  // ---- receiving ----

  #onFrame(slot: StreamSlot, f: Frame): void {
    switch (f.type) {
      case MessageType.ack: {
        const ack = decodeAck(f.payload);
        this.#window = ack.window;
        for (const s of ack.sequences) this.#acknowledge(s);
        break;
      }
      case MessageType.nack: {
        const nack = decodeNack(f.payload);
        const p = this.#pending.get(nack.sequence);
        this.stats.nacks++;
        if (!p) break;
        if (p.attempts >= MAX_BLOCK_ATTEMPTS) {
          this.#fail(new BulwarkError(`block ${p.block?.index ?? '?'} of disk ${p.block?.disk ?? '?'} failed its CRC check ${p.attempts} times on arrival`, {
            kind: 'corrupt',
            context: { task: this.#o.taskId, sequence: p.sequence },
            hint: 'check memory and network hardware on the source and target hosts',
          }));
          break;
        }
        this.stats.resends++;
        this.#log.warn({ sequence: p.sequence, block: p.block, reason: nack.reason }, 'target reported a damaged block; resending');
        this.#transmit(p);
        break;
      }
      case MessageType.committed:
        try {
          this.#committedPoint = decodeCommitted(f.payload).point;
        } catch {
          this.#committedPoint = undefined;
        }
        this.#committed?.resolve();
        break;
      case MessageType.error: {
        const e = decodeError(f.payload);
        this.#fail(new BulwarkError(`target agent: ${e.message}`, { kind: errorKind(e.kind), context: { task: this.#o.taskId } }));
        break;
      }
      case MessageType.abort:
        this.#fail(new BulwarkError(`target agent aborted the task: ${decodeAbort(f.payload).reason}`, { kind: 'internal', context: { task: this.#o.taskId } }));
        break;
      case MessageType.hello:
      case MessageType.welcome:
      case MessageType.openDisk:
      case MessageType.block:
      case MessageType.zeroRun:
      case MessageType.endDisk:
      case MessageType.commit:
      case MessageType.keepalive:
      case MessageType.read:
      case MessageType.beginPoint:
        slot.conn?.close(new BulwarkError(`unexpected ${messageTypeName(f.type)} from target agent`, { kind: 'invalid' }));
        break;
    }
    this.#wake();
  }

  #acknowledge(sequence: number): void {
    const p = this.#pending.get(sequence);
    if (!p) return;
    this.#pending.delete(sequence);
    this.stats.inFlightBytes -= p.bytes;
    p.acked.resolve();
  }

  // ---- streams, resume ----

  async #connect(slot: StreamSlot, resume: boolean): Promise<void> {
    const o = this.#o;
    const socket = await connectTls(o.target, o.tls, o.connectTimeoutMs ?? 10_000);
    const welcome = await new Promise<Frame>((resolve, reject) => {
      let settled = false;
      const conn = new FramedConnection(socket, {
        keepaliveMs: o.keepaliveMs,
        deadPeerMs: o.deadPeerMs,
        onFrame: (f) => {
          if (!settled) {
            settled = true;
            if (f.type === MessageType.welcome) {
              slot.conn = conn;
              resolve(f);
            } else {
              const msg = f.type === MessageType.error ? decodeError(f.payload) : { kind: 'invalid', message: `expected WELCOME, got ${messageTypeName(f.type)}` };
              conn.close();
              reject(new BulwarkError(`target agent refused the task: ${msg.message}`, { kind: errorKind(msg.kind), context: { task: o.taskId } }));
            }
            return;
          }
          this.#onFrame(slot, f);
        },
        onClose: (err) => {
          if (!settled) {
            settled = true;
            reject(new BulwarkError('target agent closed the connection during the handshake', { kind: 'unavailable', cause: err, context: { task: o.taskId } }));
            return;
          }
          if (slot.conn === conn) this.#streamDown(slot, err);
        },
      });
      const hello = { protocol: PROTOCOL_VERSION, role: 'send', taskId: o.taskId, taskSecret: o.taskSecret, sessionId: this.sessionId, streams: this.#slots.length };
      conn.send(MessageType.hello, encodeJson(hello), { stream: slot.index, flags: resume ? FLAG_RESUME : 0 }).catch(() => undefined);
    });
    const w = decodeWelcome(welcome.payload);
    this.#window = w.window;
    this.#resumeWindowMs = Math.min(this.#resumeWindowMs, w.resumeWindowMs);
    slot.downSince = undefined;
    if (resume) {
      for (const s of [...this.#pending.keys()]) if (s < w.durableBelow) this.#acknowledge(s);
      for (const s of w.durable) this.#acknowledge(s);
      if (this.#committed) await this.#sendCommit();
    }
    this.#wake();
  }

  #streamDown(slot: StreamSlot, err: Error | undefined): void {
    slot.conn = undefined;
    if (this.#closing || this.#failure) return;
    slot.downSince ??= Date.now();
    this.#log.warn({ stream: slot.index, err: err?.message }, 'data stream to target agent dropped; resending its blocks on other streams');
    for (const p of this.#pending.values()) if (p.stream === slot.index) {
      p.stream = undefined;
      this.#transmit(p);
    }
    this.#wake();
    if (!slot.reconnecting) void this.#reconnect(slot);
  }

  async #reconnect(slot: StreamSlot): Promise<void> {
    slot.reconnecting = true;
    try {
      let delay = this.#o.reconnectDelayMs ?? 200;
      while (!this.#closing && !this.#failure) {
        const down = Date.now() - (slot.downSince ?? Date.now());
        if (down > this.#resumeWindowMs) {
          this.#fail(new BulwarkError(`lost the connection to target agent ${this.#o.target.host}:${this.#o.target.port} for more than ${Math.round(this.#resumeWindowMs / 1000)} s`, {
            kind: 'unavailable',
            context: { task: this.#o.taskId, session: this.sessionId },
            hint: 'the task was aborted and no restore point was created; check the network and the target agent, then retry',
          }));
          return;
        }
        await sleep(delay);
        delay = Math.min(delay * 2, 2_000);
        try {
          await this.#connect(slot, true);
          this.stats.reconnects++;
          this.#log.info({ stream: slot.index }, 'data stream to target agent resumed');
          return;
        } catch (err) {
          if (err instanceof BulwarkError && err.kind === 'not-found') {
            this.#fail(new BulwarkError('the target agent no longer has this transfer session', { kind: 'unavailable', cause: err, context: { task: this.#o.taskId } }));
            return;
          }
        }
      }
    } finally {
      slot.reconnecting = false;
    }
  }

  // ---- plumbing ----

  /** The transfer failed: tell the target to discard the task (best effort) and close every stream. */
  #fail(err: Error): void {
    if (this.#failure) return;
    this.#failure = err;
    this.#committed?.reject(err);
    this.#log.warn({ err: err.message }, 'transfer failed; aborting the task on the target');
    void this.#sendAbort(err.message).finally(() => this.close());
    this.#wake();
  }

  #check(): void {
    if (this.#failure) throw this.#failure;
    if (this.#closing) throw new BulwarkError('transfer is closed', { kind: 'internal' });
  }

  async #race(p: Promise<void>): Promise<void> {
    for (;;) {
      this.#check();
      let done = false;
      await Promise.race([p.then(() => (done = true)), this.#nextEvent()]);
      if (done) return;
    }
  }

  #nextEvent(): Promise<void> {
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  #wake(): void {
    for (const w of this.#waiters.splice(0)) w();
  }

  #closeAll(): void {
    for (const s of this.#slots) {
      const c = s.conn;
      s.conn = undefined;
      c?.close();
    }
  }
}

function corrupt(payload: readonly Buffer[]): Buffer[] {
  const whole = Buffer.concat(payload);
  const at = whole.length > BLOCK_HEADER_SIZE ? BLOCK_HEADER_SIZE + Math.floor((whole.length - BLOCK_HEADER_SIZE) / 2) : whole.length - 1;
  whole[at]! ^= 0xff;
  return [whole];
}

function errorKind(kind: string): BulwarkError['kind'] {
  const kinds: readonly string[] = ['invalid', 'unauthorized', 'forbidden', 'not-found', 'conflict', 'unavailable', 'corrupt', 'internal'];
  return (kinds.includes(kind) ? kind : 'internal') as BulwarkError['kind'];
}

/**
 * The proxy stage in its simplest form: hashes each block, coalesces zero blocks into runs, and
 * optionally compresses (`compress` returns the stored bytes and the codec used).
 */
export async function* prepareBlocks(
  blocks: AsyncIterable<DiskBlock>,
  options: {
    compress?: (plain: Buffer) => { compression: CompressionName; data: Buffer } | Promise<{ compression: CompressionName; data: Buffer }>;
    stageTimes?: StageTimes;
  } = {},
): AsyncGenerator<OutgoingItem> {
  let run: { zeroStart: number; zeroCount: number } | undefined;
  for await (const b of blocks) {
    if (b.data === null || isZero(b.data)) {
      if (run && run.zeroStart + run.zeroCount === b.index) run.zeroCount++;
      else {
        if (run) yield run;
        run = { zeroStart: b.index, zeroCount: 1 };
      }
      continue;
    }
    if (run) {
      yield run;
      run = undefined;
    }
    const plain = b.data;
    const started = performance.now();
    const sha256 = createHash('sha256').update(plain).digest();
    const stored = options.compress ? await options.compress(plain) : { compression: 'none' as const, data: plain };
    options.stageTimes?.add('proxy', performance.now() - started);
    yield { index: b.index, plainLength: plain.length, compression: stored.compression, sha256, data: stored.data };
  }
  if (run) yield run;
}

const ZERO_CHUNK = Buffer.alloc(64 * 1024);
function isZero(data: Buffer): boolean {
  for (let off = 0; off < data.length; off += ZERO_CHUNK.length) {
    const part = data.subarray(off, off + ZERO_CHUNK.length);
    if (!part.equals(ZERO_CHUNK.subarray(0, part.length))) return false;
  }
  return true;
}
