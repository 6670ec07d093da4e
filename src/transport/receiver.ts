// The target end of data-mover tasks: a TLS listener (client certificates from the server CA
// required) that authenticates each task by its secret, verifies every block's CRC on arrival
// (NACK on mismatch, the task goes on), feeds verified messages to the task's sink one at a time,
// and acknowledges them once the sink made them durable. Sessions survive dropped streams for the
// resume window; after that the sink is aborted so no restore point appears.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import tls from 'node:tls';
import { BulwarkError, describeError } from '../common/errors.js';
import { logger, type Logger } from '../common/log.js';
import { FramedConnection, serverTlsOptions, type TlsIdentity } from './connection.js';
import { ReadServer, type RestoreSource } from './read-serve.js';
import { DEFAULT_RESUME_WINDOW_MS } from './sender.js';
import {
  FLAG_RESUME,
  MessageType,
  NackReason,
  PROTOCOL_VERSION,
  decodeAbort,
  decodeBeginPoint,
  decodeBlock,
  decodeEndDisk,
  decodeHello,
  decodeOpenDisk,
  decodeZeroRun,
  encodeAck,
  encodeJson,
  encodeNack,
  messageTypeName,
  type BeginPointMessage,
  type EndDiskMessage,
  type Frame,
  type OpenDiskMessage,
  type ReceivedBlockMessage,
  type ZeroRunMessage,
} from './frame.js';

export const DEFAULT_WINDOW = 64 * 1024 * 1024;

/** Where a task's data goes on the target (the repository writer). Each call resolves once durable. */
export interface TransferSink {
  /** BEGIN_POINT: the restore point the task's disks go into (senders that name one send it first). */
  beginPoint?(point: BeginPointMessage): Promise<void>;
  openDisk(disk: OpenDiskMessage): Promise<void>;
  /** A block whose CRC was verified; `data` is stored bytes (`compression`), `sha256` of the plain block. */
  writeBlock(block: ReceivedBlockMessage): Promise<void>;
  writeZeroRun(run: ZeroRunMessage): Promise<void>;
  endDisk(summary: EndDiskMessage): Promise<void>;
  /** Make the restore point visible (fsync, rename); what it returns goes to the source in COMMITTED as `point`. */
  commit(): Promise<void | Record<string, unknown>>;
  /** Discard everything of the task; nothing becomes visible. */
  abort(reason: string): Promise<void>;
}

/** What the server told this agent about a task: a backup it will receive, or a restore it will serve. */
export interface TransferTaskGrant {
  readonly secret: string;
  /** Backup: opens the sink when the first stream of the task arrives. */
  openSink?(info: { sessionId: string; peerCertificate: tls.PeerCertificate }): Promise<TransferSink>;
  /** Restore: opens the restore point for one reader stream (closed when the stream ends). */
  openSource?(info: { peerCertificate: tls.PeerCertificate }): Promise<RestoreSource>;
}

export type SessionOutcome = 'committed' | 'aborted' | 'failed';

export interface TransferReceiverOptions {
  readonly tls: TlsIdentity;
  readonly host?: string;
  readonly port?: number;
  /** The grant for a task id, or undefined when this agent was not handed that task. */
  readonly grant: (taskId: string) => TransferTaskGrant | undefined;
  readonly window?: number;
  readonly resumeWindowMs?: number;
  readonly keepaliveMs?: number;
  readonly deadPeerMs?: number;
  readonly onSessionEnd?: (info: { sessionId: string; taskId: string; outcome: SessionOutcome; reason?: string }) => void;
  readonly log?: Logger;
}

export interface ReceiverSessionStats {
  blocks: number;
  zeroRuns: number;
  nacks: number;
  duplicates: number;
  bytesReceived: number;
  /** Verified bytes held in memory waiting for the sink, now and at most. */
  queuedBytes: number;
  maxQueuedBytes: number;
  framesByStream: number[];
  connections: number;
}

type SessionState = 'open' | 'committing' | 'committed' | 'aborted';

interface Queued {
  readonly frame: Frame;
  readonly conn: FramedConnection;
  readonly block?: ReceivedBlockMessage;
}

class ReceiverSession {
  readonly id: string;
  readonly taskId: string;
  readonly secretDigest: Buffer;
  readonly stats: ReceiverSessionStats;
  state: SessionState = 'open';
  /** The COMMITTED payload, repeated to a source that resumes and asks again. */
  committedReply: Buffer = encodeJson({});
  sink: TransferSink | undefined;
  sinkOpening: Promise<TransferSink> | undefined;
  readonly conns = new Set<FramedConnection>();
  readonly received = new Set<number>();
  durableBelow = 1;
  readonly durableAbove = new Set<number>();
  /** Verified messages waiting for the sink, by sequence: the sink takes them in sequence order. */
  readonly queue = new Map<number, Queued>();
  /** The sequence the sink takes next. */
  nextToSink = 1;
  working = false;
  current: Promise<void> | undefined;
  expiry: NodeJS.Timeout | undefined;
  readonly pendingAcks = new Map<FramedConnection, number[]>();
  ackFlush: NodeJS.Immediate | undefined;
  /**
   * Where to acknowledge a message sent again (on a resumed stream) while its first copy still
   * waits for the sink: the first copy's stream may be dead without this side knowing (a reset
   * seen only by the source), so the ACK goes to the stream the source sent it on last.
   */
  readonly ackTo = new Map<number, FramedConnection>();

  constructor(id: string, taskId: string, secretDigest: Buffer) {
    this.id = id;
    this.taskId = taskId;
    this.secretDigest = secretDigest;
    this.stats = { blocks: 0, zeroRuns: 0, nacks: 0, duplicates: 0, bytesReceived: 0, queuedBytes: 0, maxQueuedBytes: 0, framesByStream: [], connections: 0 };
  }

  isDurable(seq: number): boolean {
    return seq < this.durableBelow || this.durableAbove.has(seq);
  }

  /** A sequence number already taken in (durable, or queued for the sink). */
  hasReceived(seq: number): boolean {
    return seq < this.durableBelow || this.received.has(seq);
  }

  markDurable(seq: number): void {
    this.durableAbove.add(seq);
    // Below durableBelow the watermark answers for `received`: memory stays one window, not one
    // entry per block of the disk.
    while (this.durableAbove.delete(this.durableBelow)) this.received.delete(this.durableBelow++);
  }
}

function isReadHello(f: Frame): boolean {
  try {
    return f.type === MessageType.hello && decodeHello(f.payload).role === 'read';
  } catch {
    return false;
  }
}

function digest(secret: string): Buffer {
  return createHash('sha256').update(secret, 'utf8').digest();
}

/** Listens for source agents and receives their tasks into sinks. */
export class TransferReceiver {
  readonly #o: TransferReceiverOptions;
  readonly #log: Logger;
  readonly #server: tls.Server;
  readonly #sessions = new Map<string, ReceiverSession>();
  readonly #conns = new Set<FramedConnection>();
  readonly #window: number;
  readonly #resumeWindowMs: number;

  private constructor(options: TransferReceiverOptions) {
    this.#o = options;
    this.#log = options.log ?? logger('transport-receiver');
    this.#window = options.window ?? DEFAULT_WINDOW;
    this.#resumeWindowMs = options.resumeWindowMs ?? DEFAULT_RESUME_WINDOW_MS;
    this.#server = tls.createServer(serverTlsOptions(options.tls), (socket) => this.#accept(socket));
    this.#server.on('tlsClientError', (err) => this.#log.warn({ err: err.message }, 'rejected a data-mover connection during TLS'));
  }

  static async listen(options: TransferReceiverOptions): Promise<TransferReceiver> {
    const r = new TransferReceiver(options);
    await new Promise<void>((resolve, reject) => {
      r.#server.once('error', reject);
      r.#server.listen(options.port ?? 0, options.host ?? '127.0.0.1', () => {
        r.#server.off('error', reject);
        resolve();
      });
    });
    return r;
  }

  get address(): { host: string; port: number } {
    const a = this.#server.address() as AddressInfo;
    return { host: a.address, port: a.port };
  }

  /** Statistics of a live (or recently ended) session. */
  sessionStats(sessionId: string): ReceiverSessionStats | undefined {
    return this.#sessions.get(sessionId)?.stats;
  }

  /** Aborts the sessions of a task (the server stopped it): nothing of them becomes visible. */
  abortTask(taskId: string, reason: string): void {
    for (const s of this.#sessions.values()) if (s.taskId === taskId) void this.#abort(s, 'aborted', reason);
  }

  /** Stops listening, drops every connection and aborts every session that was not committed. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    for (const c of [...this.#conns]) c.close(new BulwarkError('target agent is shutting down', { kind: 'unavailable' }));
    await Promise.all([...this.#sessions.values()].map((s) => this.#abort(s, 'failed', 'target agent is shutting down')));
    await closed;
  }

  #accept(socket: tls.TLSSocket): void {
    // A stream is first unauthenticated (expects HELLO), then handshaking (no frames expected
    // until we sent WELCOME), then attached to its session.
    let phase: 'hello' | 'handshaking' | 'attached' | 'reading' = 'hello';
    let session: ReceiverSession | undefined;
    let reads: ReadServer | undefined;
    let source: RestoreSource | undefined;
    let stream = 0;
    const conn: FramedConnection = new FramedConnection(socket, {
      keepaliveMs: this.#o.keepaliveMs,
      deadPeerMs: this.#o.deadPeerMs,
      onFrame: (f) => {
        switch (phase) {
          case 'hello':
            phase = 'handshaking';
            if (isReadHello(f)) {
              this.#helloRead(conn, socket, f).then(
                (r) => {
                  reads = r.server;
                  source = r.source;
                  phase = 'reading';
                  if (conn.closed) {
                    r.server.close();
                    void r.source.close().catch(() => undefined);
                  }
                },
                (err: unknown) => {
                  const e = err instanceof BulwarkError ? err : new BulwarkError(describeError(err), { kind: 'internal', cause: err });
                  this.#log.warn({ err: describeError(e), remote: socket.remoteAddress }, 'refused a restore stream');
                  conn.send(MessageType.error, encodeJson({ kind: e.kind, message: e.message })).finally(() => conn.close()).catch(() => undefined);
                },
              );
              return;
            }
            this.#hello(conn, socket, f).then(
              (s) => {
                session = s;
                stream = f.stream;
                phase = 'attached';
                if (conn.closed) this.#detach(s, conn);
              },
              (err: unknown) => {
                const e = err instanceof BulwarkError ? err : new BulwarkError(describeError(err), { kind: 'internal', cause: err });
                this.#log.warn({ err: describeError(e), remote: socket.remoteAddress }, 'refused a data-mover stream');
                conn.send(MessageType.error, encodeJson({ kind: e.kind, message: e.message })).finally(() => conn.close()).catch(() => undefined);
              },
            );
            return;
          case 'handshaking':
            conn.close(new BulwarkError('data-mover client sent frames before WELCOME', { kind: 'invalid' }));
            return;
          case 'attached':
            this.#onFrame(session!, conn, stream, f);
            return;
          case 'reading':
            reads!.onFrame(f);
            return;
        }
      },
      onClose: () => {
        this.#conns.delete(conn);
        if (session) this.#detach(session, conn);
        reads?.close();
        void source?.close().catch(() => undefined);
      },
    });
    this.#conns.add(conn);
  }

  async #helloRead(conn: FramedConnection, socket: tls.TLSSocket, f: Frame): Promise<{ server: ReadServer; source: RestoreSource }> {
    const hello = decodeHello(f.payload);
    if (hello.protocol !== PROTOCOL_VERSION) throw new BulwarkError(`unsupported data-mover protocol ${hello.protocol}`, { kind: 'invalid' });
    const grant = this.#o.grant(hello.taskId);
    if (!grant || !timingSafeEqual(digest(grant.secret), digest(hello.taskSecret))) {
      throw new BulwarkError(`task ${hello.taskId} was not granted to this agent, or its secret is wrong`, { kind: 'unauthorized', context: { task: hello.taskId } });
    }
    if (!grant.openSource) throw new BulwarkError(`task ${hello.taskId} is not a restore`, { kind: 'invalid', context: { task: hello.taskId } });
    const source = await grant.openSource({ peerCertificate: socket.getPeerCertificate() });
    const server = new ReadServer(conn, source, this.#window);
    try {
      await server.start();
      await conn.send(MessageType.welcome, encodeJson({ sessionId: hello.sessionId, window: this.#window, resumeWindowMs: this.#resumeWindowMs, durableBelow: 0, durable: [] }), { stream: f.stream });
    } catch (cause) {
      server.close();
      await source.close().catch(() => undefined);
      throw new BulwarkError('restore stream closed during the handshake', { kind: 'unavailable', cause });
    }
    return { server, source };
  }

  async #hello(conn: FramedConnection, socket: tls.TLSSocket, f: Frame): Promise<ReceiverSession> {
    if (f.type !== MessageType.hello) throw new BulwarkError(`expected HELLO, got ${messageTypeName(f.type)}`, { kind: 'invalid' });
    const hello = decodeHello(f.payload);
    if (hello.protocol !== PROTOCOL_VERSION) throw new BulwarkError(`unsupported data-mover protocol ${hello.protocol}`, { kind: 'invalid' });
    const ctx = { task: hello.taskId, session: hello.sessionId };
    const secret = digest(hello.taskSecret);
    let s = this.#sessions.get(hello.sessionId);
    if (!s) {
      if ((f.flags & FLAG_RESUME) !== 0) {
        throw new BulwarkError('transfer session expired or unknown', { kind: 'not-found', context: ctx });
      }
      const grant = this.#o.grant(hello.taskId);
      if (!grant || !timingSafeEqual(digest(grant.secret), secret)) {
        throw new BulwarkError(`task ${hello.taskId} was not granted to this agent, or its secret is wrong`, { kind: 'unauthorized', context: ctx });
      }
      if (!grant.openSink) throw new BulwarkError(`task ${hello.taskId} is not a backup`, { kind: 'invalid', context: ctx });
      s = new ReceiverSession(hello.sessionId, hello.taskId, secret);
      this.#sessions.set(s.id, s);
      s.sinkOpening = grant.openSink({ sessionId: s.id, peerCertificate: socket.getPeerCertificate() });
      this.#log.info(ctx, 'transfer session opened');
    } else if (s.taskId !== hello.taskId || !timingSafeEqual(s.secretDigest, secret)) {
      throw new BulwarkError('stream does not belong to this transfer session', { kind: 'unauthorized', context: ctx });
    }
    if (s.state === 'aborted') throw new BulwarkError('transfer session was aborted', { kind: 'not-found', context: ctx });
    const session = s;
    try {
      session.sink ??= await session.sinkOpening;
    } catch (cause) {
      await this.#abort(session, 'failed', `cannot open the task's sink: ${describeError(cause)}`);
      throw new BulwarkError('target agent cannot store this task', { kind: 'unavailable', cause, context: ctx });
    }
    if (conn.closed) {
      // Arms the session's expiry when no other stream is attached, so an orphan session is aborted.
      this.#detach(session, conn);
      throw new BulwarkError('stream closed during the handshake', { kind: 'unavailable', context: ctx });
    }
    clearTimeout(session.expiry);
    session.expiry = undefined;
    session.conns.add(conn);
    session.stats.connections = session.conns.size;
    const durable = [...session.durableAbove].sort((a, b) => a - b);
    try {
      await conn.send(
        MessageType.welcome,
        encodeJson({ sessionId: session.id, window: this.#window, resumeWindowMs: this.#resumeWindowMs, durableBelow: session.durableBelow, durable }),
        { stream: f.stream },
      );
      if (session.state === 'committed') await conn.send(MessageType.committed, session.committedReply, { stream: f.stream });
    } catch (cause) {
      this.#detach(session, conn);
      throw new BulwarkError('stream closed during the handshake', { kind: 'unavailable', context: ctx, cause });
    }
    return session;
  }

  #onFrame(s: ReceiverSession, conn: FramedConnection, stream: number, f: Frame): void {
    s.stats.framesByStream[stream] = (s.stats.framesByStream[stream] ?? 0) + 1;
    switch (f.type) {
      case MessageType.beginPoint:
      case MessageType.openDisk:
      case MessageType.zeroRun:
      case MessageType.endDisk:
      case MessageType.block: {
        if (s.state !== 'open') return;
        if (f.sequence === 0) {
          conn.close(new BulwarkError(`${messageTypeName(f.type)} without a sequence number`, { kind: 'invalid' }));
          return;
        }
        if (s.hasReceived(f.sequence)) {
          s.stats.duplicates++;
          if (s.isDurable(f.sequence)) this.#ack(s, conn, f.sequence);
          else s.ackTo.set(f.sequence, conn);
          return;
        }
        let block: ReceivedBlockMessage | undefined;
        if (f.type === MessageType.block) {
          try {
            block = decodeBlock(f.payload);
          } catch {
            block = undefined;
          }
          if (!block?.crcValid) {
            s.stats.nacks++;
            this.#log.warn({ task: s.taskId, sequence: f.sequence, stream }, 'block failed its CRC check on arrival; asking for it again');
            conn.send(MessageType.nack, encodeNack({ sequence: f.sequence, reason: NackReason.crc }), { stream }).catch(() => undefined);
            return;
          }
          s.stats.blocks++;
        }
        s.received.add(f.sequence);
        s.stats.bytesReceived += f.payload.length;
        s.stats.queuedBytes += f.payload.length;
        s.stats.maxQueuedBytes = Math.max(s.stats.maxQueuedBytes, s.stats.queuedBytes);
        if (s.stats.queuedBytes > this.#window * 2 + 64 * 1024 * 1024) {
          void this.#abort(s, 'failed', 'source agent ignored the credit window');
          return;
        }
        s.queue.set(f.sequence, { frame: f, conn, block });
        void this.#work(s);
        return;
      }
      case MessageType.commit:
        if (s.state === 'committed') {
          conn.send(MessageType.committed, s.committedReply, { stream }).catch(() => undefined);
          return;
        }
        if (s.state !== 'open') return;
        s.state = 'committing';
        void this.#commit(s, conn, stream);
        return;
      case MessageType.abort:
        void this.#abort(s, 'aborted', `source agent aborted the task: ${decodeAbort(f.payload).reason}`);
        return;
      case MessageType.error:
        void this.#abort(s, 'failed', 'source agent reported an error');
        return;
      case MessageType.hello:
      case MessageType.welcome:
      case MessageType.ack:
      case MessageType.nack:
      case MessageType.committed:
      case MessageType.keepalive:
      case MessageType.read:
        conn.close(new BulwarkError(`unexpected ${messageTypeName(f.type)} from source agent`, { kind: 'invalid' }));
        return;
    }
  }

  /**
   * Feeds queued messages to the sink one at a time in sequence order (streams deliver out of
   * order; the sender numbers messages in the order the sink needs them), acknowledging each once
   * durable. A gap waits for its message: the sender's credit window bounds what waits behind it.
   */
  async #work(s: ReceiverSession): Promise<void> {
    if (s.working) return;
    s.working = true;
    try {
      while (s.queue.has(s.nextToSink) && s.state !== 'aborted') {
        const q = s.queue.get(s.nextToSink)!;
        s.queue.delete(s.nextToSink);
        s.nextToSink++;
        const sink = s.sink!;
        const f = q.frame;
        const run = async (): Promise<void> => {
          switch (f.type) {
            case MessageType.beginPoint:
              if (!sink.beginPoint) throw new BulwarkError('this target does not take BEGIN_POINT', { kind: 'invalid' });
              return sink.beginPoint(decodeBeginPoint(f.payload));
            case MessageType.openDisk:
              return sink.openDisk(decodeOpenDisk(f.payload));
            case MessageType.block:
              return sink.writeBlock(q.block!);
            case MessageType.zeroRun:
              s.stats.zeroRuns++;
              return sink.writeZeroRun(decodeZeroRun(f.payload));
            case MessageType.endDisk:
              return sink.endDisk(decodeEndDisk(f.payload));
            default:
              throw new BulwarkError(`cannot store ${messageTypeName(f.type)}`, { kind: 'internal' });
          }
        };
        s.current = run();
        try {
          await s.current;
        } catch (cause) {
          const e = new BulwarkError(`target agent failed to store the task's data: ${describeError(cause)}`, { kind: 'internal', cause, context: { task: s.taskId } });
          for (const c of s.conns) c.send(MessageType.error, encodeJson({ kind: e.kind, message: e.message })).catch(() => undefined);
          s.queue.clear();
          s.stats.queuedBytes = 0;
          s.current = undefined;
          s.working = false;
          await this.#abort(s, 'failed', e.message);
          return;
        }
        s.current = undefined;
        s.stats.queuedBytes -= f.payload.length;
        s.markDurable(f.sequence);
        const to = s.ackTo.get(f.sequence) ?? q.conn;
        s.ackTo.delete(f.sequence);
        this.#ack(s, to, f.sequence);
      }
    } finally {
      s.working = false;
    }
  }

  #ack(s: ReceiverSession, conn: FramedConnection, sequence: number): void {
    const target = !conn.closed ? conn : [...s.conns].find((c) => !c.closed);
    if (!target) return; // the WELCOME of a resumed stream reports it
    const list = s.pendingAcks.get(target) ?? [];
    list.push(sequence);
    s.pendingAcks.set(target, list);
    s.ackFlush ??= setImmediate(() => {
      s.ackFlush = undefined;
      for (const [c, seqs] of s.pendingAcks) {
        if (!c.closed) c.send(MessageType.ack, encodeAck({ window: this.#window, sequences: seqs })).catch(() => undefined);
      }
      s.pendingAcks.clear();
    });
  }

  async #commit(s: ReceiverSession, conn: FramedConnection, stream: number): Promise<void> {
    while (s.working || s.queue.size > 0) await new Promise((r) => setImmediate(r));
    let point: void | Record<string, unknown>;
    try {
      point = await s.sink!.commit();
    } catch (cause) {
      const e = new BulwarkError(`target agent could not commit the task: ${describeError(cause)}`, { kind: 'internal', cause, context: { task: s.taskId } });
      for (const c of s.conns) c.send(MessageType.error, encodeJson({ kind: e.kind, message: e.message })).catch(() => undefined);
      await this.#abort(s, 'failed', e.message);
      return;
    }
    s.state = 'committed';
    this.#log.info({ task: s.taskId, session: s.id }, 'transfer session committed');
    // Tell the source before anyone else hears of it (a listener may shut this agent down); a
    // lost COMMITTED is sent again when the source resumes and repeats COMMIT.
    const to = !conn.closed ? conn : [...s.conns].find((c) => !c.closed);
    s.committedReply = encodeJson(point ? { point } : {});
    await to?.send(MessageType.committed, s.committedReply, { stream }).catch(() => undefined);
    this.#o.onSessionEnd?.({ sessionId: s.id, taskId: s.taskId, outcome: 'committed' });
    if (s.conns.size === 0) this.#forgetLater(s);
  }

  async #abort(s: ReceiverSession, outcome: SessionOutcome, reason: string): Promise<void> {
    if (s.state === 'aborted' || s.state === 'committed') return;
    s.state = 'aborted';
    clearTimeout(s.expiry);
    s.queue.clear();
    s.stats.queuedBytes = 0;
    this.#log.warn({ task: s.taskId, session: s.id, reason }, 'transfer session aborted; nothing of it becomes visible');
    await s.current?.catch(() => undefined);
    const sink = s.sink ?? (await s.sinkOpening?.catch(() => undefined));
    await sink?.abort(reason).catch((err: unknown) => this.#log.error({ err: describeError(err), task: s.taskId }, 'sink abort failed'));
    this.#o.onSessionEnd?.({ sessionId: s.id, taskId: s.taskId, outcome, reason });
    for (const c of [...s.conns]) c.close();
    this.#forgetLater(s);
  }

  #detach(s: ReceiverSession, conn: FramedConnection): void {
    s.conns.delete(conn);
    s.pendingAcks.delete(conn);
    s.stats.connections = s.conns.size;
    if (s.conns.size > 0) return;
    // Only an open session expires: one that is committing finishes its commit (a long fsync on a
    // slow repository) and is then remembered for a resume; aborting it there would report
    // "failed" for a point that the commit then makes visible.
    if (s.state === 'committing') return;
    if (s.state === 'open') {
      clearTimeout(s.expiry);
      s.expiry = setTimeout(() => {
        void this.#abort(s, 'failed', `all streams of the task were down for more than ${Math.round(this.#resumeWindowMs / 1000)} s`);
      }, this.#resumeWindowMs);
      s.expiry.unref();
    } else {
      this.#forgetLater(s);
    }
  }

  /** Ended sessions are remembered for one resume window so a late resume gets a clear answer. */
  #forgetLater(s: ReceiverSession): void {
    clearTimeout(s.expiry);
    s.expiry = setTimeout(() => {
      if (s.conns.size === 0) this.#sessions.delete(s.id);
    }, this.#resumeWindowMs);
    s.expiry.unref();
  }
}
