// NBD client: the fixed newstyle handshake (structured replies, meta contexts, NBD_OPT_GO), then
// many reads and block-status queries in flight on one connection, replies matched by handle and
// copied straight into the caller's buffers. `NbdExport` pools several connections to one export
// for parallel reads and is the `RandomAccessDisk` the rest of Bulwark reads a VM disk through.
// Follows the NBD project's doc/proto.md; the peers it is tested against are qemu-storage-daemon,
// qemu-nbd and nbdkit.
import net from 'node:net';
import type { Extent, ExtentKind, RandomAccessDisk } from '../../disk/types.js';
import { logger } from '../../common/log.js';
import { NbdError, type NbdErrorContext, type NbdErrorReason } from './errors.js';
import * as P from './protocol.js';
import { whenConnected } from '../socket.js';

export { NbdError, type NbdErrorContext, type NbdErrorReason } from './errors.js';

const log = logger('nbd-client');

/** Where an NBD server listens: a unix socket, or TCP host and port. */
export type NbdEndpoint = { readonly socketPath: string } | { readonly host: string; readonly port: number };

/** Options for one NBD connection (and, through `NbdExportOptions`, for each pooled one). */
export interface NbdConnectOptions {
  readonly endpoint: NbdEndpoint;
  /** Export to attach to; '' (the default) is the server's default export. */
  readonly exportName?: string;
  /**
   * Meta contexts to negotiate for NBD_CMD_BLOCK_STATUS, e.g. `base:allocation` (the default) and
   * `qemu:dirty-bitmap:bm0`. A context the server does not offer is left out (see `info`), not an
   * error: `extents()` then reports everything as data and `dirtyExtents()` throws.
   */
  readonly metaContexts?: readonly string[];
  /** Requests in flight on the connection at once; more wait their turn. Default 16. */
  readonly maxInFlight?: number;
  /** Deadline for each request; a request that passes it fails and closes the connection. 0 = none. Default 120 s. */
  readonly requestTimeoutMs?: number;
  /** Deadline for connecting plus the handshake. Default 15 s. */
  readonly connectTimeoutMs?: number;
  /**
   * Ask for each read's data in one piece (NBD_CMD_FLAG_DF) when the server supports it, instead
   * of letting it send holes as OFFSET_HOLE chunks. Saves the server a block-status lookup per
   * read; worth it when only data extents are read. Default false.
   */
  readonly noFragment?: boolean;
}

/** What the handshake learnt about the export. */
export interface NbdExportInfo {
  readonly exportName: string;
  /** Export size in bytes. */
  readonly size: number;
  /** Transmission flags (NBD_FLAG_…). */
  readonly flags: number;
  readonly readOnly: boolean;
  /** The server promises that all connections to the export see the same data (NBD_FLAG_CAN_MULTI_CONN). */
  readonly canMultiConn: boolean;
  readonly structuredReplies: boolean;
  /** Block size constraints (NBD_INFO_BLOCK_SIZE), or the protocol's defaults when not sent. */
  readonly minimumBlockSize: number;
  readonly preferredBlockSize: number;
  readonly maximumBlockSize: number;
  /** Negotiated meta contexts: name -> id the server assigned. */
  readonly metaContexts: ReadonlyMap<string, number>;
}

/** One extent of a meta context as the server reported it: raw status flags of the context. */
export interface StatusExtent {
  readonly offset: number;
  readonly length: number;
  readonly flags: number;
}

/** One extent of a dirty bitmap (`qemu:dirty-bitmap:NAME`). */
export interface DirtyExtent {
  readonly offset: number;
  readonly length: number;
  readonly dirty: boolean;
}

/** Largest range asked of one NBD_CMD_BLOCK_STATUS (the length field is 32 bits). */
const STATUS_REQUEST_MAX = 1 << 30;
/** Size of the buffer socket reads land in before being copied to their target. */
const SOCKET_READ_BUFFER = 1 << 20;
/** Payload left to read from which the socket reads straight into the caller's buffer. */
const DIRECT_READ_MIN = 64 * 1024;

/** A readable endpoint label for messages: the socket path or host:port. */
export function describeEndpoint(endpoint: NbdEndpoint): string {
  return 'socketPath' in endpoint ? endpoint.socketPath : `${endpoint.host}:${endpoint.port}`;
}

/**
 * Parses an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`) as nbdinfo and
 * qemu accept them.
 */
export function parseNbdUri(uri: string): { endpoint: NbdEndpoint; exportName: string } {
  const u = new URL(uri);
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd+unix:') {
    const socketPath = u.searchParams.get('socket');
    if (!socketPath) throw new NbdError(`NBD URI ${uri} has no socket= parameter`, 'connect', { export: exportName, endpoint: uri });
    return { endpoint: { socketPath }, exportName };
  }
  if (u.protocol === 'nbd:') {
    return { endpoint: { host: u.hostname, port: u.port ? Number(u.port) : 10809 }, exportName };
  }
  throw new NbdError(`unsupported NBD URI scheme in ${uri} (use nbd:// or nbd+unix://)`, 'connect', { export: exportName, endpoint: uri });
}

const optionNames: Record<number, string> = {
  [P.NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
  [P.NBD_OPT_ABORT]: 'NBD_OPT_ABORT',
  [P.NBD_OPT_LIST]: 'NBD_OPT_LIST',
  [P.NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS',
  [P.NBD_OPT_INFO]: 'NBD_OPT_INFO',
  [P.NBD_OPT_GO]: 'NBD_OPT_GO',
  [P.NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
  [P.NBD_OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
  [P.NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
};
const commandNames: Record<number, string> = {
  [P.NBD_CMD_READ]: 'NBD_CMD_READ',
  [P.NBD_CMD_WRITE]: 'NBD_CMD_WRITE',
  [P.NBD_CMD_DISC]: 'NBD_CMD_DISC',
  [P.NBD_CMD_FLUSH]: 'NBD_CMD_FLUSH',
  [P.NBD_CMD_TRIM]: 'NBD_CMD_TRIM',
  [P.NBD_CMD_CACHE]: 'NBD_CMD_CACHE',
  [P.NBD_CMD_WRITE_ZEROES]: 'NBD_CMD_WRITE_ZEROES',
  [P.NBD_CMD_BLOCK_STATUS]: 'NBD_CMD_BLOCK_STATUS',
};
const optionErrorNames: Record<number, string> = {
  [P.NBD_REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
  [P.NBD_REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
  [P.NBD_REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
  [P.NBD_REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
  [P.NBD_REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
  [P.NBD_REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
  [P.NBD_REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
  [P.NBD_REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [P.NBD_REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
};
const errnoNames: Record<number, string> = {
  [P.NBD_EPERM]: 'EPERM',
  [P.NBD_EIO]: 'EIO',
  [P.NBD_ENOMEM]: 'ENOMEM',
  [P.NBD_EINVAL]: 'EINVAL',
  [P.NBD_ENOSPC]: 'ENOSPC',
  [P.NBD_EOVERFLOW]: 'EOVERFLOW',
  [P.NBD_ENOTSUP]: 'ENOTSUP',
  [P.NBD_ESHUTDOWN]: 'ESHUTDOWN',
};
const nameOf = (table: Record<number, string>, v: number): string => table[v] ?? `#${v}`;

/** A request waiting for its reply. */
interface Pending {
  readonly handle: number;
  readonly type: number;
  readonly offset: number;
  readonly length: number;
  /** READ: where the data goes (exactly `length` bytes). */
  readonly target: Buffer | undefined;
  /** BLOCK_STATUS: descriptors per context id. */
  readonly status: Map<number, Buffer>;
  error: NbdError | undefined;
  timer: NodeJS.Timeout | undefined;
  resolve(): void;
  reject(err: Error): void;
}

type RecvState =
  | { kind: 'collect'; into: Buffer; have: number; then: (bytes: Buffer) => void }
  | { kind: 'payload'; into: Buffer; pos: number; end: number; then: () => void };

/**
 * One NBD connection in the transmission phase. Many requests can be in flight (up to
 * `maxInFlight`); replies may come in any order. A failure of the connection (peer closed, socket
 * error, protocol violation, timeout) fails every request in flight and every later one.
 *
 * @example
 * const c = await NbdConnection.connect({ endpoint: { socketPath: '/run/nbd.sock' }, exportName: 'disk0' });
 * try {
 *   const map = await c.extents(0, c.size);
 *   const head = await c.read(0, 65536);
 * } finally { await c.close(); }
 */
export class NbdConnection implements RandomAccessDisk {
  readonly #socket: net.Socket;
  readonly #ctx: NbdErrorContext;
  readonly #maxInFlight: number;
  readonly #timeoutMs: number;
  readonly #noFragment: boolean;
  #readFlags = 0;
  #info: NbdExportInfo | undefined;
  // Handshake: bytes queue until a reader takes them.
  #hsChunks: Buffer[] = [];
  #hsLength = 0;
  #hsWaiter: (() => void) | undefined;
  // Transmission.
  #transmitting = false;
  #state: RecvState | undefined;
  /** The payload state whose target the pending socket read writes into directly. */
  #direct: Extract<RecvState, { kind: 'payload' }> | undefined;
  readonly #header = Buffer.alloc(32);
  readonly #pending = new Map<number, Pending>();
  #nextHandle = 1;
  #inFlight = 0;
  readonly #slotWaiters: Array<{ go: () => void; fail: (e: Error) => void }> = [];
  #failure: NbdError | undefined;
  #closing = false;
  /** Requests begun and not finished (waiting for a slot or for the reply). */
  #active = 0;
  readonly #idleWaiters: Array<() => void> = [];
  readonly #closed: Promise<void>;

  private constructor(socket: net.Socket, ctx: NbdErrorContext, options: NbdConnectOptions) {
    this.#socket = socket;
    this.#ctx = ctx;
    this.#maxInFlight = Math.max(1, options.maxInFlight ?? 16);
    this.#timeoutMs = options.requestTimeoutMs ?? 120_000;
    this.#noFragment = options.noFragment ?? false;
    this.#closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('error', (err) => this.#fail(this.#error(`connection to NBD export '${ctx.export}' at ${ctx.endpoint} failed`, 'closed', {}, err)));
    socket.on('close', () => {
      const what = this.#closing ? 'was closed' : 'was closed by the server';
      this.#fail(this.#error(`connection to NBD export '${ctx.export}' at ${ctx.endpoint} ${what}`, 'closed', {}));
    });
  }

  /** Connects, negotiates and attaches to the export. Fails with an `NbdError` naming the option the server refused. */
  static async connect(options: NbdConnectOptions): Promise<NbdConnection> {
    const exportName = options.exportName ?? '';
    const ctx: NbdErrorContext = { export: exportName, endpoint: describeEndpoint(options.endpoint) };
    const readBuffer = Buffer.allocUnsafe(SOCKET_READ_BUFFER);
    // The socket delivers bytes before the connection object exists: park them until it does.
    const sink: { conn?: NbdConnection; early: Buffer[] } = { early: [] };
    const socket = net.connect({
      ...('socketPath' in options.endpoint ? { path: options.endpoint.socketPath } : { host: options.endpoint.host, port: options.endpoint.port }),
      onread: {
        // Asked before every socket read: while a large read payload is expected the kernel
        // writes straight into the caller's buffer; otherwise into the shared read buffer.
        buffer: () => (sink.conn ? sink.conn.#nextReadBuffer(readBuffer) : readBuffer),
        callback: (n: number, buf: Uint8Array) => {
          if (sink.conn) sink.conn.#onRead(n, buf);
          else sink.early.push(Buffer.from(buf.buffer, buf.byteOffset, n));
          return true;
        },
      },
    });
    const timeoutMs = options.connectTimeoutMs ?? 15_000;
    try {
      await whenConnected(socket);
    } catch (err) {
      throw new NbdError(`cannot connect to NBD server at ${ctx.endpoint} for export '${exportName}'`, 'connect', ctx, { cause: err });
    }
    if ('host' in options.endpoint) socket.setNoDelay(true);
    const conn = new NbdConnection(socket, ctx, options);
    sink.conn = conn;
    for (const b of sink.early.splice(0)) conn.#onBytes(b);
    const timer = setTimeout(() => {
      conn.#fail(conn.#error(`NBD handshake with ${ctx.endpoint} for export '${exportName}' took longer than ${timeoutMs} ms`, 'timeout', {}));
      socket.destroy();
    }, timeoutMs);
    try {
      await conn.#handshake(options);
    } catch (err) {
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    log.debug({ export: exportName, endpoint: ctx.endpoint, size: conn.size }, 'NBD connection ready');
    return conn;
  }

  /** What the handshake learnt: size, flags, block sizes, negotiated meta contexts. */
  get info(): NbdExportInfo {
    if (!this.#info) throw new Error('NbdConnection used before the handshake finished');
    return this.#info;
  }

  get size(): number {
    return this.info.size;
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Whether the connection has failed or been closed (every request would fail). */
  get isClosed(): boolean {
    return this.#failure !== undefined;
  }

  // ---------------------------------------------------------------------------------------------
  // Handshake

  /** The socket read buffer for the next read (see `onread` in `connect`). */
  #nextReadBuffer(shared: Buffer): Buffer {
    const st = this.#state;
    if (this.#transmitting && st?.kind === 'payload' && st.end - st.pos >= DIRECT_READ_MIN) {
      this.#direct = st;
      return st.into.subarray(st.pos, st.end);
    }
    this.#direct = undefined;
    return shared;
  }

  #onRead(n: number, buf: Uint8Array): void {
    const direct = this.#direct;
    this.#direct = undefined;
    if (direct && direct === this.#state) {
      // The bytes are already in place.
      direct.pos += n;
      if (direct.pos === direct.end) {
        this.#state = undefined;
        direct.then();
      }
      return;
    }
    this.#onBytes(Buffer.from(buf.buffer, buf.byteOffset, n));
  }

  #onBytes(bytes: Buffer): void {
    if (this.#transmitting) {
      this.#receive(bytes);
      return;
    }
    this.#hsChunks.push(Buffer.from(bytes)); // the socket's read buffer is reused: copy
    this.#hsLength += bytes.length;
    const w = this.#hsWaiter;
    this.#hsWaiter = undefined;
    w?.();
  }

  async #readExact(n: number, what: string): Promise<Buffer> {
    while (this.#hsLength < n) {
      if (this.#failure) throw this.#error(`NBD server closed the connection during the handshake (${what})`, 'handshake', {}, this.#failure);
      await new Promise<void>((resolve) => {
        this.#hsWaiter = resolve;
        // A failure must also wake the reader.
        this.#wakeOnFailure = resolve;
      });
    }
    const all = this.#hsChunks.length === 1 ? this.#hsChunks[0]! : Buffer.concat(this.#hsChunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.#hsChunks = rest.length ? [rest] : [];
    this.#hsLength = rest.length;
    return out;
  }

  #wakeOnFailure: (() => void) | undefined;

  async #handshake(options: NbdConnectOptions): Promise<void> {
    const exportName = options.exportName ?? '';
    const hello = await this.#readExact(18, 'greeting');
    if (hello.readBigUInt64BE(0) !== P.NBD_MAGIC || hello.readBigUInt64BE(8) !== P.NBD_IHAVEOPT) {
      throw this.#error(`${this.#ctx.endpoint} is not a newstyle NBD server (bad greeting magic)`, 'handshake', {});
    }
    const serverFlags = hello.readUInt16BE(16);
    if (!(serverFlags & P.NBD_FLAG_FIXED_NEWSTYLE)) {
      throw this.#error(`NBD server at ${this.#ctx.endpoint} does not speak the fixed newstyle handshake`, 'handshake', {});
    }
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | (serverFlags & P.NBD_FLAG_NO_ZEROES ? P.NBD_FLAG_C_NO_ZEROES : 0));
    this.#socket.write(clientFlags);

    // Structured replies: needed for block status and sparse reads.
    this.#sendOption(P.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0));
    const sr = await this.#readOptionReply(P.NBD_OPT_STRUCTURED_REPLY);
    const structuredReplies = sr.type === P.NBD_REP_ACK;
    if (!structuredReplies && sr.type !== P.NBD_REP_ERR_UNSUP) this.#throwOptionError(P.NBD_OPT_STRUCTURED_REPLY, sr);

    const metaContexts = new Map<string, number>();
    const wanted = options.metaContexts ?? [P.BASE_ALLOCATION];
    if (structuredReplies && wanted.length > 0) {
      const name = Buffer.from(exportName, 'utf8');
      const queries = wanted.map((q) => Buffer.from(q, 'utf8'));
      const data = Buffer.alloc(4 + name.length + 4 + queries.reduce((s, q) => s + 4 + q.length, 0));
      let p = data.writeUInt32BE(name.length, 0);
      p += name.copy(data, p);
      p = data.writeUInt32BE(queries.length, p);
      for (const q of queries) {
        p = data.writeUInt32BE(q.length, p);
        p += q.copy(data, p);
      }
      this.#sendOption(P.NBD_OPT_SET_META_CONTEXT, data);
      for (;;) {
        const r = await this.#readOptionReply(P.NBD_OPT_SET_META_CONTEXT);
        if (r.type === P.NBD_REP_ACK) break;
        if (r.type === P.NBD_REP_META_CONTEXT) {
          if (r.data.length < 4) throw this.#error('NBD_REP_META_CONTEXT reply too short', 'handshake', { option: 'NBD_OPT_SET_META_CONTEXT' });
          metaContexts.set(r.data.subarray(4).toString('utf8'), r.data.readUInt32BE(0));
          continue;
        }
        if (r.type & P.NBD_REP_FLAG_ERROR) {
          // Unknown export shows here first on some servers: report it as such.
          if (r.type === P.NBD_REP_ERR_UNKNOWN) this.#throwOptionError(P.NBD_OPT_SET_META_CONTEXT, r);
          log.warn({ export: exportName, error: nameOf(optionErrorNames, r.type) }, 'NBD server refused meta contexts; block status unavailable');
          break;
        }
        // Other reply types are unexpected here; skip them as the protocol allows.
      }
    }

    // NBD_OPT_GO, asking for block size constraints.
    const name = Buffer.from(exportName, 'utf8');
    const go = Buffer.alloc(4 + name.length + 2 + 2);
    let p = go.writeUInt32BE(name.length, 0);
    p += name.copy(go, p);
    p = go.writeUInt16BE(1, p);
    go.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, p);
    this.#sendOption(P.NBD_OPT_GO, go);
    let size: number | undefined;
    let flags = 0;
    let minimumBlockSize = 1;
    let preferredBlockSize = 4096;
    let maximumBlockSize = P.NBD_MAX_PAYLOAD;
    for (;;) {
      const r = await this.#readOptionReply(P.NBD_OPT_GO);
      if (r.type === P.NBD_REP_ACK) break;
      if (r.type & P.NBD_REP_FLAG_ERROR) this.#throwOptionError(P.NBD_OPT_GO, r);
      if (r.type !== P.NBD_REP_INFO || r.data.length < 2) continue;
      const infoType = r.data.readUInt16BE(0);
      if (infoType === P.NBD_INFO_EXPORT && r.data.length >= 12) {
        size = Number(r.data.readBigUInt64BE(2));
        flags = r.data.readUInt16BE(10);
      } else if (infoType === P.NBD_INFO_BLOCK_SIZE && r.data.length >= 14) {
        minimumBlockSize = r.data.readUInt32BE(2);
        preferredBlockSize = r.data.readUInt32BE(6);
        maximumBlockSize = r.data.readUInt32BE(10);
      }
    }
    if (size === undefined) throw this.#error(`NBD server sent no export size for '${exportName}'`, 'handshake', { option: 'NBD_OPT_GO' });
    this.#info = {
      exportName,
      size,
      flags,
      readOnly: (flags & P.NBD_FLAG_READ_ONLY) !== 0,
      canMultiConn: (flags & P.NBD_FLAG_CAN_MULTI_CONN) !== 0,
      structuredReplies,
      minimumBlockSize,
      preferredBlockSize,
      maximumBlockSize: Math.min(maximumBlockSize, P.NBD_MAX_PAYLOAD),
      metaContexts,
    };
    if (this.#noFragment && structuredReplies && flags & P.NBD_FLAG_SEND_DF) this.#readFlags = P.NBD_CMD_FLAG_DF;
    // Whatever already arrived beyond the handshake belongs to transmission (nothing should).
    this.#transmitting = true;
    const rest = this.#hsChunks;
    this.#hsChunks = [];
    this.#hsLength = 0;
    for (const b of rest) this.#receive(b);
  }

  #sendOption(option: number, data: Buffer): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(P.NBD_IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.#socket.write(data.length ? Buffer.concat([h, data]) : h);
  }

  async #readOptionReply(option: number): Promise<{ type: number; data: Buffer }> {
    const optName = nameOf(optionNames, option);
    const h = await this.#readExact(P.NBD_OPTION_REPLY_HEADER_SIZE, optName);
    if (h.readBigUInt64BE(0) !== P.NBD_OPT_REPLY_MAGIC) throw this.#error(`bad option reply magic from NBD server for ${optName}`, 'handshake', { option: optName });
    const replyOption = h.readUInt32BE(8);
    if (replyOption !== option) {
      throw this.#error(`NBD server answered ${nameOf(optionNames, replyOption)} when ${optName} was asked`, 'handshake', { option: optName });
    }
    // Signed: protocol.ts builds the NBD_REP_ERR_* values with `|`, which makes them negative int32s.
    const type = h.readInt32BE(12);
    const length = h.readUInt32BE(16);
    if (length > 16 * 1024 * 1024) throw this.#error(`NBD option reply of ${length} bytes is too large`, 'handshake', { option: optName });
    const data = length ? await this.#readExact(length, optName) : Buffer.alloc(0);
    return { type, data };
  }

  #throwOptionError(option: number, reply: { type: number; data: Buffer }): never {
    const optName = nameOf(optionNames, option);
    const errName = nameOf(optionErrorNames, reply.type);
    const message = reply.data.toString('utf8');
    const exportName = this.#ctx.export;
    const isExport = option === P.NBD_OPT_GO && (reply.type === P.NBD_REP_ERR_UNKNOWN || reply.type === P.NBD_REP_ERR_POLICY);
    const isUnknown = reply.type === P.NBD_REP_ERR_UNKNOWN;
    throw this.#error(
      `NBD server at ${this.#ctx.endpoint} refused ${optName} for export '${exportName}': ${errName}${message ? ` (${message})` : ''}`,
      isExport || isUnknown ? 'export' : 'handshake',
      { option: optName, code: reply.type },
      undefined,
      isUnknown ? 'check the export name; `nbdinfo --list` shows the exports the server has' : undefined,
    );
  }

  // ---------------------------------------------------------------------------------------------
  // Transmission: requests

  /**
   * Reads `target.length` bytes at `offset` into `target` (no extra copy). Splits reads larger
   * than the server's maximum block size. Resolves with `target`.
   */
  async readInto(offset: number, target: Buffer): Promise<Buffer> {
    this.#checkRange('NBD_CMD_READ', offset, target.length);
    if (target.length === 0) return target;
    const max = this.info.maximumBlockSize;
    if (target.length <= max) {
      await this.#request(P.NBD_CMD_READ, offset, target.length, target);
      return target;
    }
    const parts: Array<Promise<unknown>> = [];
    for (let pos = 0; pos < target.length; pos += max) {
      const len = Math.min(max, target.length - pos);
      parts.push(this.#request(P.NBD_CMD_READ, offset + pos, len, target.subarray(pos, pos + len)));
    }
    await settleAll(parts);
    return target;
  }

  /** Reads exactly `length` bytes at `offset`. */
  async read(offset: number, length: number): Promise<Buffer> {
    return this.readInto(offset, Buffer.allocUnsafe(length));
  }

  /**
   * Block status of one negotiated meta context over [offset, offset + length): in order, without
   * gaps, clipped to the range. Large ranges are asked in several requests, and a server that
   * answers for less than asked is asked again from where it stopped.
   */
  async blockStatus(context: string, offset: number, length: number): Promise<StatusExtent[]> {
    const id = this.info.metaContexts.get(context);
    if (id === undefined) {
      const offered = [...this.info.metaContexts.keys()].join(', ') || 'none';
      throw this.#error(
        `meta context '${context}' was not negotiated on NBD export '${this.#ctx.export}' (negotiated: ${offered})`,
        'command',
        { command: 'NBD_CMD_BLOCK_STATUS', offset, length },
        undefined,
        context.startsWith('qemu:dirty-bitmap:') ? 'export the bitmap with the NBD export (block-export-add "bitmaps") and pass the context in metaContexts' : undefined,
      );
    }
    this.#checkRange('NBD_CMD_BLOCK_STATUS', offset, length);
    const out: StatusExtent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const len = Math.min(end - pos, STATUS_REQUEST_MAX);
      const status = await this.#request(P.NBD_CMD_BLOCK_STATUS, pos, len, undefined);
      const desc = status.get(id);
      if (!desc || desc.length < 8) {
        throw this.#error(`NBD server sent no extents for context '${context}'`, 'protocol', { command: 'NBD_CMD_BLOCK_STATUS', offset: pos, length: len });
      }
      const start = pos;
      for (let i = 0; i + 8 <= desc.length && pos < end; i += 8) {
        const extLen = Math.min(desc.readUInt32BE(i), end - pos);
        if (extLen === 0) break;
        pushMerged(out, pos, extLen, desc.readUInt32BE(i + 4));
        pos += extLen;
      }
      if (pos === start) {
        throw this.#error(`NBD server sent an empty extent list for context '${context}'`, 'protocol', { command: 'NBD_CMD_BLOCK_STATUS', offset: pos, length: len });
      }
    }
    return out;
  }

  /**
   * The allocation map (`base:allocation`) of [offset, offset + length). Without that context
   * the whole range is reported as data.
   */
  async extents(offset: number, length: number): Promise<Extent[]> {
    if (!this.info.metaContexts.has(P.BASE_ALLOCATION)) {
      this.#checkRange('NBD_CMD_BLOCK_STATUS', offset, length);
      return length > 0 ? [{ offset, length, kind: 'data' }] : [];
    }
    return allocationExtents(await this.blockStatus(P.BASE_ALLOCATION, offset, length));
  }

  /** The dirty map of a `qemu:dirty-bitmap:NAME` context over [offset, offset + length). */
  async dirtyExtents(context: string, offset: number, length: number): Promise<DirtyExtent[]> {
    return dirtyFromStatus(await this.blockStatus(context, offset, length));
  }

  /**
   * Waits for requests in flight, sends NBD_CMD_DISC and closes the socket. Idempotent.
   */
  async close(): Promise<void> {
    if (this.#closing) return this.#closed;
    this.#closing = true;
    if (!this.#failure && this.#transmitting) {
      while (this.#active > 0 && !this.#failure) await new Promise<void>((r) => this.#idleWaiters.push(r));
      if (!this.#failure) {
        this.#socket.write(requestHeader(P.NBD_CMD_DISC, 0, 0, 0, 0));
        this.#socket.end();
      }
    }
    // Nothing to say goodbye on (failed, or still in the handshake): just drop the socket.
    if (this.#failure || !this.#transmitting) this.#socket.destroy();
    const t = setTimeout(() => this.#socket.destroy(), 5000);
    await this.#closed;
    clearTimeout(t);
  }

  /** Drops the connection at once; requests in flight fail. */
  destroy(): void {
    this.#closing = true;
    this.#socket.destroy();
  }

  #checkRange(command: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw this.#error(
        `${command} of ${length} bytes at offset ${offset} is outside NBD export '${this.#ctx.export}' of ${this.size} bytes`,
        'command',
        { command, offset, length },
        undefined,
        undefined,
        'invalid',
      );
    }
  }

  #throwIfFailed(): void {
    if (this.#failure) throw this.#failure;
  }

  async #acquireSlot(): Promise<void> {
    if (this.#failure) throw this.#failure;
    if (this.#inFlight < this.#maxInFlight) {
      this.#inFlight++;
      return;
    }
    await new Promise<void>((go, fail) => this.#slotWaiters.push({ go, fail }));
  }

  #releaseSlot(): void {
    const next = this.#slotWaiters.shift();
    if (next) next.go();
    else this.#inFlight--;
  }

  async #request(type: number, offset: number, length: number, target: Buffer | undefined): Promise<Map<number, Buffer>> {
    const command = nameOf(commandNames, type);
    if (this.#failure) throw this.#failure;
    if (this.#closing) throw this.#error(`NBD connection to export '${this.#ctx.export}' is closing`, 'closed', { command, offset, length });
    this.#active++;
    try {
      await this.#acquireSlot();
      try {
        this.#throwIfFailed(); // it may have failed while this request waited for a slot
        const handle = this.#nextHandle;
        this.#nextHandle = this.#nextHandle >= 0xffffffff ? 1 : this.#nextHandle + 1;
        const status = new Map<number, Buffer>();
        await new Promise<void>((resolve, reject) => {
          const p: Pending = { handle, type, offset, length, target, status, error: undefined, timer: undefined, resolve, reject };
          if (this.#timeoutMs > 0) {
            p.timer = setTimeout(() => {
              this.#fail(this.#error(
                `${command} of ${length} bytes at offset ${offset} on NBD export '${this.#ctx.export}' got no reply within ${this.#timeoutMs} ms`,
                'timeout',
                { command, offset, length },
              ));
              this.#socket.destroy();
            }, this.#timeoutMs);
          }
          this.#pending.set(handle, p);
          this.#socket.write(requestHeader(type, type === P.NBD_CMD_READ ? this.#readFlags : 0, handle, offset, length));
        });
        return status;
      } finally {
        this.#releaseSlot();
      }
    } finally {
      if (--this.#active === 0) for (const w of this.#idleWaiters.splice(0)) w();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Transmission: replies. A small state machine over the incoming bytes: headers are collected
  // into a scratch buffer, read payloads are copied straight into the caller's buffer.

  #receive(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length && !this.#failure) {
      const st = this.#state ?? this.#expectReplyHeader();
      if (st.kind === 'collect') {
        const n = Math.min(st.into.length - st.have, chunk.length - pos);
        chunk.copy(st.into, st.have, pos, pos + n);
        st.have += n;
        pos += n;
        if (st.have === st.into.length) {
          this.#state = undefined;
          st.then(st.into);
        }
      } else {
        const n = Math.min(st.end - st.pos, chunk.length - pos);
        chunk.copy(st.into, st.pos, pos, pos + n);
        st.pos += n;
        pos += n;
        if (st.pos === st.end) {
          this.#state = undefined;
          st.then();
        }
      }
    }
  }

  #collect(into: Buffer, then: (bytes: Buffer) => void): void {
    if (into.length === 0) {
      this.#state = undefined;
      then(into);
      return;
    }
    this.#state = { kind: 'collect', into, have: 0, then };
  }

  #expectReplyHeader(): RecvState {
    // Both reply kinds are at least 16 bytes; the magic tells whether 4 more follow.
    this.#collect(this.#header.subarray(0, P.NBD_SIMPLE_REPLY_SIZE), (h) => this.#onReplyStart(h));
    return this.#state!;
  }

  #onReplyStart(h: Buffer): void {
    const magic = h.readUInt32BE(0);
    if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
      this.#onSimpleReply(h.readUInt32BE(4), h.readUInt32BE(8), h.readUInt32BE(12));
    } else if (magic === P.NBD_STRUCTURED_REPLY_MAGIC) {
      this.#collect(this.#header.subarray(16, 20), () => {
        const full = this.#header;
        this.#onChunkHeader(full.readUInt16BE(4), full.readUInt16BE(6), full.readUInt32BE(8), full.readUInt32BE(12), full.readUInt32BE(16));
      });
    } else {
      this.#protocolError(`bad reply magic 0x${magic.toString(16)}`);
    }
  }

  #lookup(handleHi: number, handleLo: number): Pending | undefined {
    const p = handleHi === 0 ? this.#pending.get(handleLo) : undefined;
    if (!p) this.#protocolError(`reply for unknown handle ${handleHi}:${handleLo}`);
    return p;
  }

  #onSimpleReply(error: number, handleHi: number, handleLo: number): void {
    const p = this.#lookup(handleHi, handleLo);
    if (!p) return;
    if (error !== 0) {
      p.error = this.#commandError(p, error, '');
      this.#finish(p);
      return;
    }
    if (p.type === P.NBD_CMD_READ && p.target && p.length > 0) {
      this.#state = { kind: 'payload', into: p.target, pos: 0, end: p.length, then: () => this.#finish(p) };
      return;
    }
    this.#finish(p);
  }

  #onChunkHeader(flags: number, type: number, handleHi: number, handleLo: number, length: number): void {
    const p = this.#lookup(handleHi, handleLo);
    if (!p) return;
    const done = (flags & P.NBD_REPLY_FLAG_DONE) !== 0;
    const after = (): void => {
      if (done) this.#finish(p);
    };
    if (type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
      if (length < 8 || !p.target) return this.#protocolError(`OFFSET_DATA chunk of ${length} bytes for ${nameOf(commandNames, p.type)}`);
      this.#collect(this.#header.subarray(20, 28), (o) => {
        const at = readU64(o, 0) - p.offset;
        const dataLen = length - 8;
        if (at < 0 || at + dataLen > p.length) return this.#protocolError(`OFFSET_DATA chunk at ${at + p.offset}+${dataLen} outside the read at ${p.offset}+${p.length}`);
        if (dataLen === 0) return after();
        this.#state = { kind: 'payload', into: p.target!, pos: at, end: at + dataLen, then: after };
      });
      return;
    }
    if (length > 64 * 1024 * 1024) return this.#protocolError(`reply chunk of ${length} bytes is too large`);
    const into = length <= 12 ? this.#header.subarray(20, 20 + length) : Buffer.allocUnsafe(length);
    this.#collect(into, (data) => {
      switch (type) {
        case P.NBD_REPLY_TYPE_NONE:
          break;
        case P.NBD_REPLY_TYPE_OFFSET_HOLE: {
          if (data.length !== 12 || !p.target) return this.#protocolError('malformed OFFSET_HOLE chunk');
          const at = readU64(data, 0) - p.offset;
          const holeLen = data.readUInt32BE(8);
          if (at < 0 || at + holeLen > p.length) return this.#protocolError('OFFSET_HOLE chunk outside the read');
          p.target.fill(0, at, at + holeLen);
          break;
        }
        case P.NBD_REPLY_TYPE_BLOCK_STATUS: {
          if (data.length < 4 || (data.length - 4) % 8 !== 0) return this.#protocolError('malformed BLOCK_STATUS chunk');
          // `data` may be the scratch header buffer: copy it.
          p.status.set(data.readUInt32BE(0), Buffer.from(data.subarray(4)));
          break;
        }
        default: {
          if (type & 0x8000) {
            const code = data.length >= 4 ? data.readUInt32BE(0) : P.NBD_EIO;
            const msgLen = data.length >= 6 ? data.readUInt16BE(4) : 0;
            const msg = data.subarray(6, 6 + msgLen).toString('utf8');
            p.error ??= this.#commandError(p, code, msg);
          } else {
            return this.#protocolError(`unknown reply chunk type ${type}`);
          }
        }
      }
      after();
    });
  }

  #commandError(p: Pending, code: number, message: string): NbdError {
    const cmd = nameOf(commandNames, p.type);
    return this.#error(
      `${cmd} of ${p.length} bytes at offset ${p.offset} on NBD export '${this.#ctx.export}' failed: ${nameOf(errnoNames, code)}${message ? ` (${message})` : ''}`,
      'command',
      { command: cmd, offset: p.offset, length: p.length, code },
      undefined,
      undefined,
      code === P.NBD_EINVAL ? 'invalid' : 'internal',
    );
  }

  #finish(p: Pending): void {
    this.#pending.delete(p.handle);
    if (p.timer) clearTimeout(p.timer);
    if (p.error) p.reject(p.error);
    else p.resolve();
  }

  #protocolError(message: string): void {
    const err = this.#error(`NBD server for export '${this.#ctx.export}' broke the protocol: ${message}`, 'protocol', {});
    this.#fail(err);
    this.#socket.destroy();
  }

  /** Fails the connection: every pending and waiting request, and all later ones. */
  #fail(err: NbdError): void {
    if (this.#failure) return;
    this.#failure = err;
    const inFlight = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of inFlight) {
      if (p.timer) clearTimeout(p.timer);
      const cmd = nameOf(commandNames, p.type);
      p.reject(
        err.reason === 'timeout' || err.reason === 'protocol'
          ? err
          : this.#error(`${cmd} of ${p.length} bytes at offset ${p.offset} on NBD export '${this.#ctx.export}' failed: ${err.message}`, err.reason, { command: cmd, offset: p.offset, length: p.length }, err),
      );
    }
    for (const w of this.#slotWaiters.splice(0)) w.fail(err);
    for (const w of this.#idleWaiters.splice(0)) w();
    const wake = this.#wakeOnFailure;
    this.#wakeOnFailure = undefined;
    wake?.();
  }

  #error(
    message: string,
    reason: NbdErrorReason,
    extra: Partial<NbdErrorContext>,
    cause?: unknown,
    hint?: string,
    kind?: 'invalid' | 'internal',
  ): NbdError {
    return new NbdError(message, reason, { ...this.#ctx, ...extra }, { cause, hint, kind });
  }
}

/** Options for a pool of connections to one export. */
export interface NbdExportOptions extends NbdConnectOptions {
  /** Connections to open (parallel reads). Default 4. */
  readonly connections?: number;
  /** Reads larger than this are split and spread over the connections. Default 2 MiB. */
  readonly splitSize?: number;
}

/**
 * An NBD export read through a pool of connections: the `RandomAccessDisk` of a VM disk served
 * over NBD. Reads go to the least busy connection; large reads are split and spread. Block-status
 * queries use the first connection.
 *
 * @example
 * const disk = await NbdExport.open({
 *   endpoint: { socketPath: nbdSock }, exportName: 'backup2',
 *   metaContexts: ['base:allocation', 'qemu:dirty-bitmap:bm0'], connections: 4,
 * });
 * try {
 *   for (const e of await disk.dirtyExtents('qemu:dirty-bitmap:bm0', 0, disk.size)) if (e.dirty) await disk.read(e.offset, e.length);
 * } finally { await disk.close(); }
 */
export class NbdExport implements RandomAccessDisk {
  readonly #connections: NbdConnection[];
  readonly #splitSize: number;
  #next = 0;

  private constructor(connections: NbdConnection[], splitSize: number) {
    this.#connections = connections;
    this.#splitSize = splitSize;
  }

  /** Opens `connections` connections to the export (all or nothing). */
  static async open(options: NbdExportOptions): Promise<NbdExport> {
    const n = Math.max(1, options.connections ?? 4);
    // All at once: each handshake is several round trips, and the time to the first read of a
    // backup waits for them (docs/decisions/0008).
    const settled = await Promise.allSettled(Array.from({ length: n }, () => NbdConnection.connect(options)));
    const conns = settled.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      await Promise.allSettled(conns.map((c) => c.close()));
      throw failed.reason as Error;
    }
    const first = conns[0]!;
    const split = Math.min(options.splitSize ?? 2 * 1024 * 1024, first.info.maximumBlockSize);
    return new NbdExport(conns, Math.max(split, first.info.minimumBlockSize));
  }

  get info(): NbdExportInfo {
    return this.#connections[0]!.info;
  }

  get size(): number {
    return this.info.size;
  }

  /** Number of connections in the pool. */
  get connections(): number {
    return this.#connections.length;
  }

  #pick(): NbdConnection {
    // Least requests in flight; ties go round-robin so idle connections all get work.
    let best: NbdConnection | undefined;
    const n = this.#connections.length;
    for (let i = 0; i < n; i++) {
      const c = this.#connections[(this.#next + i) % n]!;
      if (c.isClosed) continue;
      if (!best || c.inFlight < best.inFlight) best = c;
    }
    this.#next = (this.#next + 1) % n;
    return best ?? this.#connections[0]!;
  }

  /** Reads `target.length` bytes at `offset` into `target`, spread over the connections. */
  async readInto(offset: number, target: Buffer): Promise<Buffer> {
    if (target.length <= this.#splitSize) return this.#pick().readInto(offset, target);
    const parts: Array<Promise<unknown>> = [];
    for (let pos = 0; pos < target.length; pos += this.#splitSize) {
      const len = Math.min(this.#splitSize, target.length - pos);
      parts.push(this.#pick().readInto(offset + pos, target.subarray(pos, pos + len)));
    }
    await settleAll(parts);
    return target;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return this.readInto(offset, Buffer.allocUnsafe(length));
  }

  async blockStatus(context: string, offset: number, length: number): Promise<StatusExtent[]> {
    return this.#connections[0]!.blockStatus(context, offset, length);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.#connections[0]!.extents(offset, length);
  }

  async dirtyExtents(context: string, offset: number, length: number): Promise<DirtyExtent[]> {
    return this.#connections[0]!.dirtyExtents(context, offset, length);
  }

  /** Closes every connection (waiting for requests in flight). */
  async close(): Promise<void> {
    await Promise.allSettled(this.#connections.map((c) => c.close()));
  }
}

/** Maps base:allocation status flags to extent kinds and merges neighbours of the same kind. */
export function allocationExtents(status: readonly StatusExtent[]): Extent[] {
  const out: Extent[] = [];
  for (const s of status) {
    const kind = allocationKind(s.flags);
    const last = out[out.length - 1];
    if (last && last.kind === kind && last.offset + last.length === s.offset) {
      out[out.length - 1] = { offset: last.offset, length: last.length + s.length, kind };
    } else {
      out.push({ offset: s.offset, length: s.length, kind });
    }
  }
  return out;
}

/** base:allocation flags -> kind. A hole that is not known to read as zeroes must be read. */
export function allocationKind(flags: number): ExtentKind {
  const zero = (flags & P.NBD_STATE_ZERO) !== 0;
  if (!zero) return 'data';
  return flags & P.NBD_STATE_HOLE ? 'hole' : 'zero';
}

function dirtyFromStatus(status: readonly StatusExtent[]): DirtyExtent[] {
  const out: DirtyExtent[] = [];
  for (const s of status) {
    const dirty = (s.flags & P.NBD_STATE_DIRTY) !== 0;
    const last = out[out.length - 1];
    if (last && last.dirty === dirty && last.offset + last.length === s.offset) {
      out[out.length - 1] = { offset: last.offset, length: last.length + s.length, dirty };
    } else {
      out.push({ offset: s.offset, length: s.length, dirty });
    }
  }
  return out;
}

function pushMerged(out: StatusExtent[], offset: number, length: number, flags: number): void {
  const last = out[out.length - 1];
  if (last && last.flags === flags && last.offset + last.length === offset) {
    out[out.length - 1] = { offset: last.offset, length: last.length + length, flags };
  } else {
    out.push({ offset, length, flags });
  }
}

function requestHeader(type: number, flags: number, handle: number, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(P.NBD_REQUEST_SIZE);
  b.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(0, 8);
  b.writeUInt32BE(handle, 12);
  b.writeUInt32BE(Math.floor(offset / 0x100000000), 16);
  b.writeUInt32BE(offset >>> 0, 20);
  b.writeUInt32BE(length, 24);
  return b;
}

function readU64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x100000000 + b.readUInt32BE(at + 4);
}

/** Waits for all; rejects with the first failure only after every part has settled (targets stay owned). */
async function settleAll(parts: Array<Promise<unknown>>): Promise<void> {
  const results = await Promise.allSettled(parts);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason as Error;
}
