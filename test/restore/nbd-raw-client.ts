// A deliberately small NBD client for tests that need wire-level control (simple vs structured
// replies, REQ_ONE, writes, pipelining, errors) which real clients do not expose.
import { connect, type Socket } from 'node:net';
import * as P from '../../src/hypervisor/nbd/protocol.js';
import { SocketReader } from '../../src/restore/nbd-server/socket-reader.js';

export interface Chunk {
  flags: number;
  type: number;
  payload: Buffer;
}
export interface Reply {
  cookie: bigint;
  error: number;
  /** Simple reply data (reads), or the structured chunks. */
  data?: Buffer;
  chunks?: Chunk[];
}

export class RawNbdClient {
  readonly socket: Socket;
  readonly reader: SocketReader;
  size = 0;
  flags = 0;
  #structured = false;
  #cookie = 1n;

  private constructor(socket: Socket) {
    this.socket = socket;
    this.reader = new SocketReader(socket);
  }

  static async open(socketPath: string): Promise<RawNbdClient> {
    const socket = connect(socketPath);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new RawNbdClient(socket);
  }

  /** Haggles: optional structured replies + base:allocation, then NBD_OPT_GO on `name`. */
  async handshake(name: string, structured: boolean): Promise<void> {
    const hello = await this.reader.read(18);
    if (hello.readBigUInt64BE(0) !== P.NBD_MAGIC) throw new Error('bad magic');
    this.socket.write(u32(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
    if (structured) {
      this.option(P.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0));
      const r = await this.optionReply();
      if (r.type !== P.NBD_REP_ACK) throw new Error(`structured reply refused: ${r.type}`);
      this.#structured = true;
      const n = Buffer.from(name);
      const q = Buffer.from(P.BASE_ALLOCATION);
      this.option(P.NBD_OPT_SET_META_CONTEXT, Buffer.concat([u32(n.length), n, u32(1), u32(q.length), q]));
      for (;;) {
        const m = await this.optionReply();
        if (m.type === P.NBD_REP_ACK) break;
      }
    }
    const n = Buffer.from(name);
    this.option(P.NBD_OPT_GO, Buffer.concat([u32(n.length), n, Buffer.from([0, 0])]));
    for (;;) {
      const r = await this.optionReply();
      if (r.type === P.NBD_REP_ACK) break;
      if (r.type >= P.NBD_REP_FLAG_ERROR >>> 0) throw new Error(`GO refused: ${r.type}`);
      if (r.type === P.NBD_REP_INFO && r.data.readUInt16BE(0) === P.NBD_INFO_EXPORT) {
        this.size = Number(r.data.readBigUInt64BE(2));
        this.flags = r.data.readUInt16BE(10);
      }
    }
  }

  option(option: number, data: Buffer): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(P.NBD_IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.reader.read(20);
    const data = await this.reader.read(h.readUInt32BE(16));
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** Sends one request; returns its cookie. */
  send(type: number, offset: number, length: number, flags = 0, payload?: Buffer): bigint {
    const cookie = this.#cookie++;
    const r = Buffer.alloc(P.NBD_REQUEST_SIZE);
    r.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    r.writeUInt16BE(flags, 4);
    r.writeUInt16BE(type, 6);
    r.writeBigUInt64BE(cookie, 8);
    r.writeBigUInt64BE(BigInt(offset), 16);
    r.writeUInt32BE(length, 24);
    this.socket.write(payload ? Buffer.concat([r, payload]) : r);
    return cookie;
  }

  /** Reads one whole reply (all chunks up to DONE for structured replies). */
  async reply(readLength: (cookie: bigint) => number): Promise<Reply> {
    const magic = (await this.reader.read(4)).readUInt32BE(0);
    if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
      const h = await this.reader.read(12);
      const error = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      const len = readLength(cookie);
      return { cookie, error, data: error === 0 && len > 0 ? await this.reader.read(len) : Buffer.alloc(0) };
    }
    if (magic !== P.NBD_STRUCTURED_REPLY_MAGIC || !this.#structured) throw new Error(`bad reply magic ${magic}`);
    // Chunks of different requests may interleave; this helper is used one request at a time
    // for structured replies, so the first chunk's cookie is the request's.
    const chunks: Chunk[] = [];
    let cookie = 0n;
    let error = 0;
    let first = true;
    for (;;) {
      if (!first && (await this.reader.read(4)).readUInt32BE(0) !== P.NBD_STRUCTURED_REPLY_MAGIC) throw new Error('bad chunk magic');
      first = false;
      const h = await this.reader.read(16);
      const flags = h.readUInt16BE(0);
      const type = h.readUInt16BE(2);
      cookie = h.readBigUInt64BE(4);
      const payload = await this.reader.read(h.readUInt32BE(12));
      chunks.push({ flags, type, payload });
      if (type & 0x8000) error = payload.readUInt32BE(0);
      if (flags & P.NBD_REPLY_FLAG_DONE) break;
    }
    return { cookie, error, chunks };
  }

  close(): void {
    this.socket.destroy();
  }
}

/** The bytes a structured read reply describes, as one buffer of `length` bytes from `offset`. */
export function assembleRead(chunks: readonly Chunk[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length, 0xee);
  for (const c of chunks) {
    if (c.type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
      const at = Number(c.payload.readBigUInt64BE(0)) - offset;
      c.payload.copy(out, at, 8);
    } else if (c.type === P.NBD_REPLY_TYPE_OFFSET_HOLE) {
      const at = Number(c.payload.readBigUInt64BE(0)) - offset;
      out.fill(0, at, at + c.payload.readUInt32BE(8));
    }
  }
  return out;
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}
