// One NBD client connection: the fixed-newstyle option haggling, then the read-only
// transmission phase. Wire layout follows doc/proto.md of the NBD project; every reply of a
// request (or every chunk of a structured reply) goes out in one socket write so replies of
// requests in flight interleave only at chunk boundaries, as the protocol allows.
import type { Socket } from 'node:net';
import { describeError } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import type { Extent } from '../../disk/types.js';
import * as P from '../../hypervisor/nbd/protocol.js';
import type { NbdExport } from './server.js';
import { ConnectionClosed, SocketReader } from './socket-reader.js';

export interface ConnectionConfig {
  readonly exports: ReadonlyMap<string, NbdExport>;
  readonly maxInFlight: number;
  readonly maxRequest: number;
  /** A client that has not finished the handshake after this long is dropped. */
  readonly handshakeTimeoutMs: number;
  readonly log: Logger;
}

/** Option payloads larger than this are refused (names are at most 4096 bytes). */
const MAX_OPTION_LENGTH = 64 * 1024;
/** Block-status replies carry at most this many descriptors; the client asks again for the rest. */
const MAX_DESCRIPTORS = 8192;
const BASE_ALLOCATION_ID = 1;
/** Read bytes one connection may have in flight (beyond one request of any allowed size). */
const MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024;
const PREFERRED_BLOCK = 4096;

/** Thrown to end the connection on a protocol violation the spec says to disconnect on. */
class ProtocolViolation extends Error {}

export class NbdConnection {
  readonly #socket: Socket;
  readonly #reader: SocketReader;
  readonly #cfg: ConnectionConfig;
  #log: Logger;
  #noZeroes = false;
  #structured = false;
  /** The export the negotiated meta contexts belong to; null when none is negotiated. */
  #metaExport: string | null = null;
  #export: NbdExport | null = null;

  constructor(socket: Socket, cfg: ConnectionConfig) {
    this.#socket = socket;
    this.#cfg = cfg;
    this.#log = cfg.log;
    this.#reader = new SocketReader(socket);
    // Each request waiting for 'drain' holds a listener; that many are expected, not a leak.
    socket.setMaxListeners(cfg.maxInFlight * 2 + 16);
  }

  /** Runs the connection to its end. Resolves when the client leaves; rejects on I/O errors. */
  async run(): Promise<void> {
    try {
      // Idle clients in transmission are normal (a mounted FUSE view); idle ones before it are not.
      this.#socket.setTimeout(this.#cfg.handshakeTimeoutMs, () => {
        this.#log.warn('NBD client did not finish the handshake in time; disconnecting');
        this.#socket.destroy();
      });
      const entered = await this.#handshake();
      this.#socket.setTimeout(0);
      if (!entered) return;
      await this.#transmission();
    } catch (err) {
      if (err instanceof ConnectionClosed) return;
      if (err instanceof ProtocolViolation) {
        this.#log.warn({ reason: err.message }, 'NBD client broke the protocol; disconnecting');
        return;
      }
      throw err;
    }
  }

  // ---- handshake ----------------------------------------------------------------------------

  /** True when the client entered transmission, false when it left during the handshake. */
  async #handshake(): Promise<boolean> {
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(P.NBD_MAGIC, 0);
    hello.writeBigUInt64BE(P.NBD_IHAVEOPT, 8);
    hello.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    await this.#write(hello);
    const clientFlags = (await this.#reader.read(4)).readUInt32BE(0);
    const known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES;
    if ((clientFlags & ~known) !== 0) throw new ProtocolViolation(`unknown client flags 0x${clientFlags.toString(16)}`);
    this.#noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;

    for (;;) {
      const head = await this.#reader.read(16);
      if (head.readBigUInt64BE(0) !== P.NBD_IHAVEOPT) throw new ProtocolViolation('bad option magic');
      const option = head.readUInt32BE(8);
      const length = head.readUInt32BE(12);
      if (length > MAX_OPTION_LENGTH) {
        if (option === P.NBD_OPT_EXPORT_NAME) throw new ProtocolViolation('export name too long');
        await this.#reader.skip(length);
        await this.#optionReply(option, P.NBD_REP_ERR_TOO_BIG, textData('option data too long'));
        continue;
      }
      const data = await this.#reader.read(length);
      switch (option) {
        case P.NBD_OPT_EXPORT_NAME: {
          const exp = this.#lookup(data.toString('utf8'));
          if (!exp) throw new ProtocolViolation(`unknown export "${data.toString('utf8')}"`);
          const reply = Buffer.alloc(this.#noZeroes ? 10 : 134);
          reply.writeBigUInt64BE(BigInt(exp.disk.size), 0);
          reply.writeUInt16BE(this.#transmissionFlags(), 8);
          await this.#write(reply);
          this.#enter(exp);
          return true;
        }
        case P.NBD_OPT_ABORT:
          await this.#optionReply(option, P.NBD_REP_ACK);
          return false;
        case P.NBD_OPT_LIST:
          if (length !== 0) {
            await this.#optionReply(option, P.NBD_REP_ERR_INVALID, textData('NBD_OPT_LIST takes no data'));
            break;
          }
          for (const name of this.#cfg.exports.keys()) {
            const n = Buffer.from(name, 'utf8');
            const d = Buffer.alloc(4 + n.length);
            d.writeUInt32BE(n.length, 0);
            n.copy(d, 4);
            await this.#optionReply(option, P.NBD_REP_SERVER, d);
          }
          await this.#optionReply(option, P.NBD_REP_ACK);
          break;
        case P.NBD_OPT_INFO:
        case P.NBD_OPT_GO:
          if (await this.#infoOrGo(option, data)) return true;
          break;
        case P.NBD_OPT_STRUCTURED_REPLY:
          if (length !== 0) {
            await this.#optionReply(option, P.NBD_REP_ERR_INVALID, textData('NBD_OPT_STRUCTURED_REPLY takes no data'));
            break;
          }
          this.#structured = true;
          await this.#optionReply(option, P.NBD_REP_ACK);
          break;
        case P.NBD_OPT_LIST_META_CONTEXT:
        case P.NBD_OPT_SET_META_CONTEXT:
          await this.#metaContext(option, data);
          break;
        default:
          // STARTTLS and anything unknown: not supported, the client may go on.
          await this.#optionReply(option, P.NBD_REP_ERR_UNSUP, textData(`option ${option} is not supported`));
      }
    }
  }

  /** An empty name selects the only export when there is exactly one (qemu's default export). */
  #lookup(name: string): NbdExport | undefined {
    const exp = this.#cfg.exports.get(name);
    if (exp || name !== '' || this.#cfg.exports.size !== 1) return exp;
    return this.#cfg.exports.values().next().value;
  }

  #transmissionFlags(): number {
    let flags =
      P.NBD_FLAG_HAS_FLAGS |
      P.NBD_FLAG_READ_ONLY |
      P.NBD_FLAG_SEND_FLUSH |
      P.NBD_FLAG_SEND_CACHE |
      P.NBD_FLAG_CAN_MULTI_CONN;
    if (this.#structured) flags |= P.NBD_FLAG_SEND_DF;
    return flags;
  }

  #enter(exp: NbdExport): void {
    this.#export = exp;
    if (this.#metaExport !== null && this.#lookup(this.#metaExport) !== exp) this.#metaExport = null;
    this.#log = this.#cfg.log.child({ export: exp.name });
    this.#log.debug({ structured: this.#structured, meta: this.#metaExport !== null }, 'NBD client connected');
  }

  /** NBD_OPT_INFO / NBD_OPT_GO. True when GO succeeded (transmission starts). */
  async #infoOrGo(option: number, data: Buffer): Promise<boolean> {
    const parsed = parseNameAndInfos(data);
    if (!parsed) {
      await this.#optionReply(option, P.NBD_REP_ERR_INVALID, textData('malformed request'));
      return false;
    }
    const exp = this.#lookup(parsed.name);
    if (!exp) {
      await this.#optionReply(option, P.NBD_REP_ERR_UNKNOWN, textData(`no export named "${parsed.name}"`));
      return false;
    }
    const info = Buffer.alloc(12);
    info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.disk.size), 2);
    info.writeUInt16BE(this.#transmissionFlags(), 10);
    await this.#optionReply(option, P.NBD_REP_INFO, info);
    // Block sizes are sent whether asked or not (the spec allows it): any alignment works here.
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
    bs.writeUInt32BE(1, 2);
    bs.writeUInt32BE(PREFERRED_BLOCK, 6);
    bs.writeUInt32BE(this.#cfg.maxRequest, 10);
    await this.#optionReply(option, P.NBD_REP_INFO, bs);
    for (const req of parsed.infos) {
      if (req === P.NBD_INFO_NAME) {
        const n = Buffer.from(exp.name, 'utf8');
        await this.#optionReply(option, P.NBD_REP_INFO, Buffer.concat([u16(P.NBD_INFO_NAME), n]));
      } else if (req === P.NBD_INFO_DESCRIPTION && exp.description !== undefined) {
        const d = Buffer.from(exp.description, 'utf8').subarray(0, 4096);
        await this.#optionReply(option, P.NBD_REP_INFO, Buffer.concat([u16(P.NBD_INFO_DESCRIPTION), d]));
      }
    }
    await this.#optionReply(option, P.NBD_REP_ACK);
    if (option !== P.NBD_OPT_GO) return false;
    this.#enter(exp);
    return true;
  }

  async #metaContext(option: number, data: Buffer): Promise<void> {
    const parsed = parseMetaRequest(data);
    if (!parsed) {
      await this.#optionReply(option, P.NBD_REP_ERR_INVALID, textData('malformed request'));
      return;
    }
    const isSet = option === P.NBD_OPT_SET_META_CONTEXT;
    if (isSet && !this.#structured) {
      await this.#optionReply(option, P.NBD_REP_ERR_INVALID, textData('negotiate structured replies first'));
      return;
    }
    if (!this.#lookup(parsed.name)) {
      await this.#optionReply(option, P.NBD_REP_ERR_UNKNOWN, textData(`no export named "${parsed.name}"`));
      return;
    }
    // base:allocation is the only context; LIST matches it by the empty query or by "base:".
    const wanted = isSet
      ? parsed.queries.some((q) => q === P.BASE_ALLOCATION)
      : parsed.queries.length === 0 || parsed.queries.some((q) => q === P.BASE_ALLOCATION || q === 'base:');
    if (isSet) this.#metaExport = wanted ? parsed.name : null;
    if (wanted) {
      const name = Buffer.from(P.BASE_ALLOCATION, 'utf8');
      const reply = Buffer.alloc(4 + name.length);
      reply.writeUInt32BE(isSet ? BASE_ALLOCATION_ID : 0, 0);
      name.copy(reply, 4);
      await this.#optionReply(option, P.NBD_REP_META_CONTEXT, reply);
    }
    await this.#optionReply(option, P.NBD_REP_ACK);
  }

  async #optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Promise<void> {
    const head = Buffer.alloc(P.NBD_OPTION_REPLY_HEADER_SIZE);
    head.writeBigUInt64BE(P.NBD_OPT_REPLY_MAGIC, 0);
    head.writeUInt32BE(option >>> 0, 8);
    head.writeUInt32BE(type >>> 0, 12);
    head.writeUInt32BE(data.length, 16);
    await this.#write(Buffer.concat([head, data]));
  }

  // ---- transmission -------------------------------------------------------------------------

  async #transmission(): Promise<void> {
    const exp = this.#export!;
    let inFlight = 0;
    let bytesInFlight = 0;
    let slotFreed: (() => void) | null = null;
    const running = new Set<Promise<void>>();
    try {
      for (;;) {
        const req = await this.#reader.read(P.NBD_REQUEST_SIZE);
        if (req.readUInt32BE(0) !== P.NBD_REQUEST_MAGIC) throw new ProtocolViolation('bad request magic');
        const flags = req.readUInt16BE(4);
        const type = req.readUInt16BE(6);
        const cookie = req.subarray(8, 16);
        const offset = Number(req.readBigUInt64BE(16));
        const length = req.readUInt32BE(24);
        if (type === P.NBD_CMD_DISC) return;
        if (type === P.NBD_CMD_WRITE) {
          // The payload must be consumed to stay in step; a huge one is not worth reading.
          if (length > this.#cfg.maxRequest) throw new ProtocolViolation(`write of ${length} bytes`);
          await this.#reader.skip(length);
        }
        // Bounded by count and by bytes being read, so big reads in flight cannot exhaust memory.
        const cost = type === P.NBD_CMD_READ ? Math.min(length, this.#cfg.maxRequest) : 0;
        while (inFlight >= this.#cfg.maxInFlight || (inFlight > 0 && bytesInFlight + cost > MAX_BYTES_IN_FLIGHT)) {
          await new Promise<void>((r) => (slotFreed = r));
        }
        inFlight++;
        bytesInFlight += cost;
        const task = this.#request(exp, { flags, type, cookie: Buffer.from(cookie), offset, length }).finally(() => {
          inFlight--;
          bytesInFlight -= cost;
          running.delete(task);
          const wake = slotFreed;
          slotFreed = null;
          wake?.();
        });
        running.add(task);
      }
    } finally {
      // Requests already received are answered before the connection ends (NBD_CMD_DISC rule).
      await Promise.allSettled([...running]);
    }
  }

  async #request(exp: NbdExport, r: Request): Promise<void> {
    try {
      switch (r.type) {
        case P.NBD_CMD_READ:
          return await this.#read(exp, r);
        case P.NBD_CMD_BLOCK_STATUS:
          return await this.#blockStatus(exp, r);
        case P.NBD_CMD_FLUSH:
        case P.NBD_CMD_CACHE:
          return await this.#done(r);
        case P.NBD_CMD_WRITE:
        case P.NBD_CMD_TRIM:
        case P.NBD_CMD_WRITE_ZEROES:
          return await this.#error(r, P.NBD_EPERM, 'the export is read-only');
        default:
          return await this.#error(r, P.NBD_EINVAL, `unknown command ${r.type}`);
      }
    } catch (err) {
      if (err instanceof ConnectionClosed) return;
      // Socket write failures end the connection through the reader; nothing else to do here.
      this.#log.debug({ err: describeError(err) }, 'NBD reply not sent');
    }
  }

  #checkRange(exp: NbdExport, r: Request): string | null {
    if (r.length === 0) return 'zero length';
    if (r.length > this.#cfg.maxRequest) return `length ${r.length} exceeds the maximum ${this.#cfg.maxRequest}`;
    if (r.offset + r.length > exp.disk.size) return `range ${r.offset}+${r.length} passes the end (${exp.disk.size})`;
    return null;
  }

  async #read(exp: NbdExport, r: Request): Promise<void> {
    const bad = this.#checkRange(exp, r);
    if (bad !== null) return this.#error(r, P.NBD_EINVAL, bad);
    const disk = exp.disk;
    try {
      if (!this.#structured) {
        const data = await disk.read(r.offset, r.length);
        const head = Buffer.alloc(P.NBD_SIMPLE_REPLY_SIZE);
        head.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
        r.cookie.copy(head, 8);
        return await this.#write(head, data);
      }
      const single = (r.flags & P.NBD_CMD_FLAG_DF) !== 0;
      const extents: Extent[] =
        !single && disk.extents
          ? await disk.extents(r.offset, r.length)
          : [{ offset: r.offset, length: r.length, kind: 'data' }];
      const runs = mergeRuns(extents, r.offset, r.length);
      for (let i = 0; i < runs.length; i++) {
        const run = runs[i]!;
        const last = i === runs.length - 1;
        if (run.zero) {
          const p = Buffer.alloc(12);
          p.writeBigUInt64BE(BigInt(run.offset), 0);
          p.writeUInt32BE(run.length, 8);
          await this.#chunk(r, P.NBD_REPLY_TYPE_OFFSET_HOLE, p, last);
        } else {
          const data = await disk.read(run.offset, run.length);
          const p = Buffer.alloc(8);
          p.writeBigUInt64BE(BigInt(run.offset), 0);
          await this.#chunk(r, P.NBD_REPLY_TYPE_OFFSET_DATA, p, last, data);
        }
      }
    } catch (err) {
      if (err instanceof ConnectionClosed) throw err;
      this.#log.error({ offset: r.offset, length: r.length, err: describeError(err) }, 'disk read failed; replied EIO');
      return this.#error(r, P.NBD_EIO, `read failed at offset ${r.offset}`, r.offset);
    }
  }

  async #blockStatus(exp: NbdExport, r: Request): Promise<void> {
    if (this.#metaExport === null) return this.#error(r, P.NBD_EINVAL, 'no meta context was negotiated');
    // Block status is cheap, so any length up to the end of the disk is accepted.
    const bad = this.#checkRange(exp, { ...r, length: Math.min(r.length, this.#cfg.maxRequest) });
    if (bad !== null || r.offset + r.length > exp.disk.size) {
      return this.#error(r, P.NBD_EINVAL, bad ?? `range ${r.offset}+${r.length} passes the end (${exp.disk.size})`);
    }
    let extents: Extent[];
    try {
      extents = exp.disk.extents
        ? await exp.disk.extents(r.offset, r.length)
        : [{ offset: r.offset, length: r.length, kind: 'data' }];
    } catch (err) {
      this.#log.error({ offset: r.offset, length: r.length, err: describeError(err) }, 'extent query failed; replied EIO');
      return this.#error(r, P.NBD_EIO, `block status failed at offset ${r.offset}`, r.offset);
    }
    const descriptors: Array<[number, number]> = [];
    for (const e of clip(extents, r.offset, r.length)) {
      const status = e.kind === 'data' ? 0 : e.kind === 'zero' ? P.NBD_STATE_ZERO : P.NBD_STATE_HOLE | P.NBD_STATE_ZERO;
      const prev = descriptors[descriptors.length - 1];
      if (prev && prev[1] === status) prev[0] += e.length;
      else descriptors.push([e.length, status]);
    }
    if (descriptors.length === 0) descriptors.push([r.length, 0]);
    const count = (r.flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0 ? 1 : Math.min(descriptors.length, MAX_DESCRIPTORS);
    const p = Buffer.alloc(4 + count * 8);
    p.writeUInt32BE(BASE_ALLOCATION_ID, 0);
    for (let i = 0; i < count; i++) {
      const [len, status] = descriptors[i]!;
      p.writeUInt32BE(len, 4 + i * 8);
      p.writeUInt32BE(status, 8 + i * 8);
    }
    return this.#chunk(r, P.NBD_REPLY_TYPE_BLOCK_STATUS, p, true);
  }

  async #done(r: Request): Promise<void> {
    if (this.#structured) return this.#chunk(r, P.NBD_REPLY_TYPE_NONE, Buffer.alloc(0), true);
    const head = Buffer.alloc(P.NBD_SIMPLE_REPLY_SIZE);
    head.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
    r.cookie.copy(head, 8);
    return this.#write(head);
  }

  async #error(r: Request, errno: number, message: string, offset?: number): Promise<void> {
    if (!this.#structured) {
      const head = Buffer.alloc(P.NBD_SIMPLE_REPLY_SIZE);
      head.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
      head.writeUInt32BE(errno, 4);
      r.cookie.copy(head, 8);
      return this.#write(head);
    }
    const msg = Buffer.from(message, 'utf8').subarray(0, 4096);
    const withOffset = offset !== undefined && r.type === P.NBD_CMD_READ;
    const p = Buffer.alloc(6 + msg.length + (withOffset ? 8 : 0));
    p.writeUInt32BE(errno, 0);
    p.writeUInt16BE(msg.length, 4);
    msg.copy(p, 6);
    if (withOffset) p.writeBigUInt64BE(BigInt(offset), 6 + msg.length);
    return this.#chunk(r, withOffset ? P.NBD_REPLY_TYPE_ERROR_OFFSET : P.NBD_REPLY_TYPE_ERROR, p, true);
  }

  /** One structured reply chunk; `data` (read payload) follows `payload` without being copied. */
  async #chunk(r: Request, type: number, payload: Buffer, done: boolean, data?: Buffer): Promise<void> {
    const head = Buffer.alloc(P.NBD_STRUCTURED_REPLY_HEADER_SIZE);
    head.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
    head.writeUInt16BE(done ? P.NBD_REPLY_FLAG_DONE : 0, 4);
    head.writeUInt16BE(type, 6);
    r.cookie.copy(head, 8);
    head.writeUInt32BE(payload.length + (data?.length ?? 0), 16);
    return data ? this.#write(head, payload, data) : this.#write(head, payload);
  }

  /**
   * Writes the buffers as one unit (corked, so no other reply lands between them and nothing is
   * copied), then waits for the socket to drain when its buffer is full (reply back-pressure).
   */
  #write(...bufs: Buffer[]): Promise<void> {
    const s = this.#socket;
    if (s.destroyed || !s.writable) return Promise.reject(new ConnectionClosed());
    let ok = true;
    s.cork();
    for (const b of bufs) if (b.length > 0) ok = s.write(b);
    s.uncork();
    if (ok) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const onDrain = (): void => {
        s.off('close', onClose);
        resolve();
      };
      const onClose = (): void => {
        s.off('drain', onDrain);
        reject(new ConnectionClosed());
      };
      s.once('drain', onDrain);
      s.once('close', onClose);
    });
  }
}

interface Request {
  readonly flags: number;
  readonly type: number;
  readonly cookie: Buffer;
  readonly offset: number;
  readonly length: number;
}

/** Extents clipped to [offset, offset + length), dropping empty pieces. */
function clip(extents: readonly Extent[], offset: number, length: number): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  for (const e of extents) {
    const s = Math.max(e.offset, offset);
    const t = Math.min(e.offset + e.length, end);
    if (t > s) out.push({ offset: s, length: t - s, kind: e.kind });
  }
  return out;
}

/**
 * The read range as alternating data / zero runs. Gaps the disk did not describe are read as
 * data, so a short or unordered extent list can never turn data into zeroes.
 */
function mergeRuns(extents: readonly Extent[], offset: number, length: number): Array<{ offset: number; length: number; zero: boolean }> {
  const runs: Array<{ offset: number; length: number; zero: boolean }> = [];
  const push = (o: number, l: number, zero: boolean): void => {
    const prev = runs[runs.length - 1];
    if (prev && prev.zero === zero && prev.offset + prev.length === o) prev.length += l;
    else runs.push({ offset: o, length: l, zero });
  };
  let at = offset;
  for (const e of clip(extents, offset, length).sort((a, b) => a.offset - b.offset)) {
    if (e.offset + e.length <= at) continue;
    const s = Math.max(e.offset, at);
    if (s > at) push(at, s - at, false);
    push(s, e.offset + e.length - s, e.kind !== 'data');
    at = e.offset + e.length;
  }
  if (at < offset + length) push(at, offset + length - at, false);
  return runs;
}

function parseNameAndInfos(data: Buffer): { name: string; infos: number[] } | null {
  if (data.length < 6) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 6) return null;
  const name = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 6 + nameLen + count * 2) return null;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLen + i * 2));
  return { name, infos };
}

function parseMetaRequest(data: Buffer): { name: string; queries: string[] } | null {
  if (data.length < 8) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 8) return null;
  const name = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt32BE(4 + nameLen);
  const queries: string[] = [];
  let at = 8 + nameLen;
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return null;
    const len = data.readUInt32BE(at);
    if (len > data.length - at - 4) return null;
    queries.push(data.toString('utf8', at + 4, at + 4 + len));
    at += 4 + len;
  }
  if (at !== data.length) return null;
  return { name, queries };
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

function textData(message: string): Buffer {
  return Buffer.from(message, 'utf8');
}
