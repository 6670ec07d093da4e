// The data-mover wire protocol in code: frame header, message payloads, and an incremental frame
// decoder. Pure (no I/O). docs/formats/data-mover-protocol.md is the specification; every
// constant and offset here follows it, and a change to either changes both.
import { crc32c } from '@node-rs/crc32';
import { BulwarkError } from '../common/errors.js';

export const FRAME_MAGIC = 0x4d445742; // bytes "BWDM"
export const PROTOCOL_VERSION = 1;
export const FRAME_HEADER_SIZE = 32;
export const BLOCK_HEADER_SIZE = 64;
export const ZERO_RUN_SIZE = 24;
export const NACK_SIZE = 16;
export const MAX_PAYLOAD = 64 * 1024 * 1024 + BLOCK_HEADER_SIZE;
/** Control (JSON) payloads are small; a larger one is a protocol error, not an allocation. */
export const MAX_CONTROL_PAYLOAD = 1024 * 1024;

export const FLAG_RESUME = 1;
export const FLAG_RESEND = 2;
const KNOWN_FLAGS = FLAG_RESUME | FLAG_RESEND;

export const MessageType = {
  hello: 1,
  welcome: 2,
  openDisk: 3,
  block: 4,
  zeroRun: 5,
  ack: 6,
  nack: 7,
  endDisk: 8,
  commit: 9,
  committed: 10,
  abort: 11,
  error: 12,
  keepalive: 13,
  read: 14,
  beginPoint: 15,
} as const;
export type MessageTypeName = keyof typeof MessageType;
export type MessageTypeCode = (typeof MessageType)[MessageTypeName];

export const Compression = { none: 0, zstd: 1, lz4: 2 } as const;
export type CompressionName = keyof typeof Compression;

export const NackReason = { crc: 1, digest: 2 } as const;

export interface FrameHeader {
  readonly type: MessageTypeCode;
  readonly flags: number;
  readonly stream: number;
  readonly length: number;
  readonly sequence: number;
}

/** A decoded frame: header fields plus the raw payload (a view into the received bytes). */
export interface Frame extends FrameHeader {
  readonly payload: Buffer;
}

export interface HelloMessage {
  protocol: number;
  role: 'send' | 'read';
  taskId: string;
  taskSecret: string;
  sessionId: string;
  streams: number;
}
export interface WelcomeMessage {
  sessionId: string;
  window: number;
  resumeWindowMs: number;
  durableBelow: number;
  durable: number[];
}
export interface OpenDiskMessage {
  disk: number;
  name: string;
  size: number;
  blockSize: number;
  /** Full read into an increment: the target stores only blocks whose digest differs from the parent's. */
  compareWithParent?: boolean;
}
/** BEGIN_POINT: what restore point the task's data goes into (section 4 of the spec). */
export interface BeginPointMessage {
  /** reverse: a reverse injection into `parent`, the full of the latest reverse chain. */
  kind: 'full' | 'incremental' | 'reverse';
  /** Incremental / reverse: the parent restore point id. */
  parent?: string;
  /** Full only: the method of the new chain (default forward). */
  chainMethod?: 'forward' | 'reverse';
  /** Full (new chain): repository block size and compression. */
  blockSize?: number;
  compression?: 'none' | 'zstd' | 'lz4';
  /** The point's VM configuration (point metadata), base64. */
  vmConfig: string;
  disks: Array<{ name: string; size: number }>;
}
export interface EndDiskMessage {
  disk: number;
  blocks: number;
  zeroBlocks: number;
  bytes: number;
}
export interface ErrorMessage {
  kind: string;
  message: string;
}
export interface AbortMessage {
  reason: string;
}
export interface ReadMessage {
  disk: number;
  start: number;
  count: number;
}

export interface BlockMessage {
  readonly disk: number;
  readonly index: number;
  readonly plainLength: number;
  readonly compression: CompressionName;
  /** SHA-256 of the plain block (32 bytes). */
  readonly sha256: Buffer;
  /** The stored (possibly compressed) bytes. */
  readonly data: Buffer;
}

/** A BLOCK as received: the sender's CRC and whether the bytes that arrived match it. */
export interface ReceivedBlockMessage extends BlockMessage {
  readonly crc: number;
  readonly crcValid: boolean;
}
export interface ZeroRunMessage {
  readonly disk: number;
  readonly start: number;
  readonly count: number;
}
export interface AckMessage {
  readonly window: number;
  readonly sequences: number[];
}
export interface NackMessage {
  readonly sequence: number;
  readonly reason: number;
}

function protocolError(message: string, context: Record<string, string | number> = {}): BulwarkError {
  return new BulwarkError(`data-mover protocol: ${message}`, { kind: 'invalid', context });
}

const typeCodes = new Set<number>(Object.values(MessageType));

export function messageTypeName(code: number): string {
  const entry = Object.entries(MessageType).find(([, v]) => v === code);
  return entry ? entry[0] : `unknown(${code})`;
}

function writeU64(buf: Buffer, value: number, offset: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw protocolError(`u64 field out of range: ${value}`);
  buf.writeBigUInt64LE(BigInt(value), offset);
}

function readU64(buf: Buffer, offset: number, what: string): number {
  const v = buf.readBigUInt64LE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError(`${what} too large: ${v}`);
  return Number(v);
}

function checkU32(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw protocolError(`${what} out of range: ${value}`);
}

/** Encodes a frame header for `payloadLength` bytes of payload. */
export function encodeHeader(header: FrameHeader): Buffer {
  checkU32(header.stream, 'stream');
  if (!Number.isInteger(header.length) || header.length < 0 || header.length > MAX_PAYLOAD) {
    throw protocolError(`payload length out of range: ${header.length}`);
  }
  if ((header.flags & ~KNOWN_FLAGS) !== 0) throw protocolError(`unknown flags: ${header.flags}`);
  const buf = Buffer.alloc(FRAME_HEADER_SIZE);
  buf.writeUInt32LE(FRAME_MAGIC, 0);
  buf.writeUInt8(PROTOCOL_VERSION, 4);
  buf.writeUInt8(header.type, 5);
  buf.writeUInt16LE(header.flags, 6);
  buf.writeUInt32LE(header.stream, 8);
  buf.writeUInt32LE(header.length, 12);
  writeU64(buf, header.sequence, 16);
  buf.writeUInt32LE(0, 24);
  buf.writeUInt32LE(crc32c(buf.subarray(0, 28)), 28);
  return buf;
}

/** Decodes and verifies a frame header (exactly FRAME_HEADER_SIZE bytes). Throws on any defect. */
export function decodeHeader(buf: Buffer): FrameHeader {
  if (buf.length < FRAME_HEADER_SIZE) throw protocolError(`short frame header: ${buf.length} bytes`);
  const magic = buf.readUInt32LE(0);
  if (magic !== FRAME_MAGIC) throw protocolError(`bad frame magic 0x${magic.toString(16)}`);
  const crc = buf.readUInt32LE(28);
  const expected = crc32c(buf.subarray(0, 28));
  if (crc !== expected) throw protocolError('frame header CRC mismatch', { expected, actual: crc });
  const version = buf.readUInt8(4);
  if (version !== PROTOCOL_VERSION) throw protocolError(`unsupported protocol version ${version}`);
  const type = buf.readUInt8(5);
  if (!typeCodes.has(type)) throw protocolError(`unknown message type ${type}`);
  const flags = buf.readUInt16LE(6);
  if ((flags & ~KNOWN_FLAGS) !== 0) throw protocolError(`unknown flags 0x${flags.toString(16)}`);
  if (buf.readUInt32LE(24) !== 0) throw protocolError('reserved header bytes are not zero');
  const length = buf.readUInt32LE(12);
  if (length > MAX_PAYLOAD) throw protocolError(`payload length ${length} exceeds ${MAX_PAYLOAD}`);
  return {
    type: type as MessageTypeCode,
    flags,
    stream: buf.readUInt32LE(8),
    length,
    sequence: readU64(buf, 16, 'sequence'),
  };
}

/** One whole frame (header + payload) as a list of buffers, ready for a socket write. */
export function encodeFrame(
  type: MessageTypeCode,
  payload: Buffer | readonly Buffer[],
  opts: { stream?: number; sequence?: number; flags?: number } = {},
): Buffer[] {
  const parts = Buffer.isBuffer(payload) ? [payload] : [...payload];
  const length = parts.reduce((n, p) => n + p.length, 0);
  const header = encodeHeader({
    type,
    flags: opts.flags ?? 0,
    stream: opts.stream ?? 0,
    length,
    sequence: opts.sequence ?? 0,
  });
  return [header, ...parts];
}

// ---- control (JSON) payloads ----

export function encodeJson(value: object): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

function parseJsonObject(payload: Buffer, what: string): Record<string, unknown> {
  if (payload.length > MAX_CONTROL_PAYLOAD) throw protocolError(`${what} payload too large: ${payload.length}`);
  let value: unknown;
  try {
    value = JSON.parse(payload.toString('utf8'));
  } catch (cause) {
    throw new BulwarkError(`data-mover protocol: ${what} payload is not JSON`, { kind: 'invalid', cause });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw protocolError(`${what} payload is not a JSON object`);
  }
  return value as Record<string, unknown>;
}

function str(obj: Record<string, unknown>, key: string, what: string, maxLength = 4096): string {
  const v = obj[key];
  if (typeof v !== 'string' || v.length > maxLength) throw protocolError(`${what}.${key} must be a string`);
  return v;
}

function uint(obj: Record<string, unknown>, key: string, what: string): number {
  const v = obj[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw protocolError(`${what}.${key} must be a non-negative integer`);
  }
  return v;
}

export function decodeHello(payload: Buffer): HelloMessage {
  const o = parseJsonObject(payload, 'HELLO');
  const role = o.role;
  if (role !== 'send' && role !== 'read') throw protocolError('HELLO.role must be "send" or "read"');
  const streams = uint(o, 'streams', 'HELLO');
  if (streams < 1 || streams > 64) throw protocolError(`HELLO.streams out of range: ${streams}`);
  return {
    protocol: uint(o, 'protocol', 'HELLO'),
    role,
    taskId: str(o, 'taskId', 'HELLO', 256),
    taskSecret: str(o, 'taskSecret', 'HELLO', 256),
    sessionId: str(o, 'sessionId', 'HELLO', 64),
    streams,
  };
}

export function decodeWelcome(payload: Buffer): WelcomeMessage {
  const o = parseJsonObject(payload, 'WELCOME');
  const durable = o.durable;
  if (!Array.isArray(durable) || !durable.every((s) => typeof s === 'number' && Number.isSafeInteger(s) && s > 0)) {
    throw protocolError('WELCOME.durable must be a list of sequence numbers');
  }
  return {
    sessionId: str(o, 'sessionId', 'WELCOME', 64),
    window: uint(o, 'window', 'WELCOME'),
    resumeWindowMs: uint(o, 'resumeWindowMs', 'WELCOME'),
    durableBelow: uint(o, 'durableBelow', 'WELCOME'),
    durable: durable as number[],
  };
}

export function decodeOpenDisk(payload: Buffer): OpenDiskMessage {
  const o = parseJsonObject(payload, 'OPEN_DISK');
  const blockSize = uint(o, 'blockSize', 'OPEN_DISK');
  if (blockSize === 0) throw protocolError('OPEN_DISK.blockSize must be positive');
  const compare = o.compareWithParent;
  if (compare !== undefined && typeof compare !== 'boolean') throw protocolError('OPEN_DISK.compareWithParent must be a boolean');
  return {
    disk: uint(o, 'disk', 'OPEN_DISK'),
    name: str(o, 'name', 'OPEN_DISK'),
    size: uint(o, 'size', 'OPEN_DISK'),
    blockSize,
    ...(compare !== undefined ? { compareWithParent: compare } : {}),
  };
}

export function decodeBeginPoint(payload: Buffer): BeginPointMessage {
  const o = parseJsonObject(payload, 'BEGIN_POINT');
  const kind = o.kind;
  if (kind !== 'full' && kind !== 'incremental' && kind !== 'reverse') throw protocolError('BEGIN_POINT.kind must be "full", "incremental" or "reverse"');
  const chainMethod = o.chainMethod;
  if (chainMethod !== undefined && chainMethod !== 'forward' && chainMethod !== 'reverse') throw protocolError('BEGIN_POINT.chainMethod must be "forward" or "reverse"');
  const disks = o.disks;
  if (!Array.isArray(disks) || disks.length === 0 || disks.length > 256) throw protocolError('BEGIN_POINT.disks must be a non-empty list');
  const compression = o.compression;
  if (compression !== undefined && compression !== 'none' && compression !== 'zstd' && compression !== 'lz4') throw protocolError('BEGIN_POINT.compression is unknown');
  const vmConfig = str(o, 'vmConfig', 'BEGIN_POINT', MAX_CONTROL_PAYLOAD);
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(vmConfig)) throw protocolError('BEGIN_POINT.vmConfig must be base64');
  return {
    kind,
    ...(o.parent !== undefined ? { parent: str(o, 'parent', 'BEGIN_POINT', 256) } : {}),
    ...(chainMethod !== undefined ? { chainMethod } : {}),
    ...(o.blockSize !== undefined ? { blockSize: uint(o, 'blockSize', 'BEGIN_POINT') } : {}),
    ...(compression !== undefined ? { compression } : {}),
    vmConfig,
    disks: disks.map((d: unknown) => {
      if (typeof d !== 'object' || d === null) throw protocolError('BEGIN_POINT.disks[] must be objects');
      const r = d as Record<string, unknown>;
      return { name: str(r, 'name', 'BEGIN_POINT.disks[]', 255), size: uint(r, 'size', 'BEGIN_POINT.disks[]') };
    }),
  };
}

/** COMMITTED: `{}` or `{ point }`, the committed restore point as the target's repository describes it. */
export function decodeCommitted(payload: Buffer): { point?: Record<string, unknown> } {
  const o = parseJsonObject(payload, 'COMMITTED');
  const point = o.point;
  if (point === undefined) return {};
  if (typeof point !== 'object' || point === null || Array.isArray(point)) throw protocolError('COMMITTED.point must be an object');
  return { point: point as Record<string, unknown> };
}

export function decodeEndDisk(payload: Buffer): EndDiskMessage {
  const o = parseJsonObject(payload, 'END_DISK');
  return {
    disk: uint(o, 'disk', 'END_DISK'),
    blocks: uint(o, 'blocks', 'END_DISK'),
    zeroBlocks: uint(o, 'zeroBlocks', 'END_DISK'),
    bytes: uint(o, 'bytes', 'END_DISK'),
  };
}

export function decodeError(payload: Buffer): ErrorMessage {
  const o = parseJsonObject(payload, 'ERROR');
  return { kind: str(o, 'kind', 'ERROR', 64), message: str(o, 'message', 'ERROR') };
}

export function decodeAbort(payload: Buffer): AbortMessage {
  const o = parseJsonObject(payload, 'ABORT');
  return { reason: str(o, 'reason', 'ABORT') };
}

export function decodeRead(payload: Buffer): ReadMessage {
  const o = parseJsonObject(payload, 'READ');
  return { disk: uint(o, 'disk', 'READ'), start: uint(o, 'start', 'READ'), count: uint(o, 'count', 'READ') };
}

// ---- data (binary) payloads ----

const compressionByCode = new Map<number, CompressionName>(
  Object.entries(Compression).map(([k, v]) => [v, k as CompressionName]),
);

/**
 * The CRC32C of a BLOCK payload: over the 64-byte block header with its CRC field (bytes 28..31)
 * taken as zero, then the data. It covers disk, index and digest too, so a flipped index cannot
 * put good data in the wrong place.
 */
export function blockCrc(header: Buffer, data: Buffer): number {
  const h = Buffer.from(header.subarray(0, BLOCK_HEADER_SIZE));
  h.writeUInt32LE(0, 28);
  return crc32c(data, crc32c(h));
}

/** The 64-byte block header plus the data, as two buffers (the data is not copied). */
export function encodeBlock(block: BlockMessage): Buffer[] {
  checkU32(block.disk, 'block disk');
  checkU32(block.plainLength, 'block plainLength');
  if (block.sha256.length !== 32) throw protocolError(`block SHA-256 must be 32 bytes, got ${block.sha256.length}`);
  const h = Buffer.alloc(BLOCK_HEADER_SIZE);
  h.writeUInt32LE(block.disk, 0);
  writeU64(h, block.index, 8);
  h.writeUInt32LE(block.plainLength, 16);
  h.writeUInt32LE(block.data.length, 20);
  h.writeUInt8(Compression[block.compression], 24);
  block.sha256.copy(h, 32);
  h.writeUInt32LE(blockCrc(h, block.data), 28);
  return [h, block.data];
}

/**
 * Decodes a BLOCK payload. A CRC mismatch is reported in `crcValid`, not thrown: the receiver
 * answers it with NACK and the task goes on. Structural defects throw.
 */
export function decodeBlock(payload: Buffer): ReceivedBlockMessage {
  if (payload.length < BLOCK_HEADER_SIZE) throw protocolError(`BLOCK payload too short: ${payload.length}`);
  const storedLength = payload.readUInt32LE(20);
  if (storedLength !== payload.length - BLOCK_HEADER_SIZE) {
    throw protocolError(`BLOCK stored length ${storedLength} does not match payload ${payload.length - BLOCK_HEADER_SIZE}`);
  }
  if (payload.readUInt32LE(4) !== 0 || payload.readUIntLE(25, 3) !== 0) throw protocolError('BLOCK reserved bytes are not zero');
  const compression = compressionByCode.get(payload.readUInt8(24));
  if (compression === undefined) throw protocolError(`BLOCK unknown compression ${payload.readUInt8(24)}`);
  const plainLength = payload.readUInt32LE(16);
  if (compression === 'none' && plainLength !== storedLength) {
    throw protocolError(`BLOCK uncompressed but plain length ${plainLength} != stored ${storedLength}`);
  }
  const crc = payload.readUInt32LE(28);
  const data = payload.subarray(BLOCK_HEADER_SIZE);
  return {
    disk: payload.readUInt32LE(0),
    index: readU64(payload, 8, 'BLOCK index'),
    plainLength,
    compression,
    crc,
    crcValid: crc === blockCrc(payload, data),
    sha256: payload.subarray(32, 64),
    data,
  };
}

export function encodeZeroRun(run: ZeroRunMessage): Buffer {
  checkU32(run.disk, 'zero-run disk');
  const b = Buffer.alloc(ZERO_RUN_SIZE);
  b.writeUInt32LE(run.disk, 0);
  writeU64(b, run.start, 8);
  writeU64(b, run.count, 16);
  return b;
}

export function decodeZeroRun(payload: Buffer): ZeroRunMessage {
  if (payload.length !== ZERO_RUN_SIZE) throw protocolError(`ZERO_RUN payload must be ${ZERO_RUN_SIZE} bytes, got ${payload.length}`);
  if (payload.readUInt32LE(4) !== 0) throw protocolError('ZERO_RUN reserved bytes are not zero');
  return {
    disk: payload.readUInt32LE(0),
    start: readU64(payload, 8, 'ZERO_RUN start'),
    count: readU64(payload, 16, 'ZERO_RUN count'),
  };
}

export function encodeAck(ack: AckMessage): Buffer {
  checkU32(ack.window, 'ACK window');
  const b = Buffer.alloc(8 + 8 * ack.sequences.length);
  b.writeUInt32LE(ack.window, 0);
  b.writeUInt32LE(ack.sequences.length, 4);
  ack.sequences.forEach((s, i) => writeU64(b, s, 8 + 8 * i));
  return b;
}

export function decodeAck(payload: Buffer): AckMessage {
  if (payload.length < 8) throw protocolError(`ACK payload too short: ${payload.length}`);
  const count = payload.readUInt32LE(4);
  if (payload.length !== 8 + 8 * count) throw protocolError(`ACK of ${count} sequences has ${payload.length} bytes`);
  const sequences: number[] = [];
  for (let i = 0; i < count; i++) sequences.push(readU64(payload, 8 + 8 * i, 'ACK sequence'));
  return { window: payload.readUInt32LE(0), sequences };
}

export function encodeNack(nack: NackMessage): Buffer {
  const b = Buffer.alloc(NACK_SIZE);
  writeU64(b, nack.sequence, 0);
  checkU32(nack.reason, 'NACK reason');
  b.writeUInt32LE(nack.reason, 8);
  return b;
}

export function decodeNack(payload: Buffer): NackMessage {
  if (payload.length !== NACK_SIZE) throw protocolError(`NACK payload must be ${NACK_SIZE} bytes, got ${payload.length}`);
  return { sequence: readU64(payload, 0, 'NACK sequence'), reason: payload.readUInt32LE(8) };
}

/**
 * Incremental frame decoder: feed it bytes as they arrive, take out whole frames. A malformed
 * header throws, after which the decoder must be discarded (the byte stream is unframed).
 */
export class FrameDecoder {
  #chunks: Buffer[] = [];
  #buffered = 0;
  #header: FrameHeader | undefined;
  readonly #maxPayload: number;

  constructor(maxPayload = MAX_PAYLOAD) {
    this.#maxPayload = maxPayload;
  }

  get bufferedBytes(): number {
    return this.#buffered;
  }

  push(chunk: Buffer): Frame[] {
    if (chunk.length > 0) {
      this.#chunks.push(chunk);
      this.#buffered += chunk.length;
    }
    const frames: Frame[] = [];
    for (;;) {
      if (this.#header === undefined) {
        if (this.#buffered < FRAME_HEADER_SIZE) break;
        const header = decodeHeader(this.#take(FRAME_HEADER_SIZE));
        if (header.length > this.#maxPayload) {
          throw protocolError(`payload length ${header.length} exceeds this connection's limit ${this.#maxPayload}`);
        }
        this.#header = header;
      }
      const header: FrameHeader = this.#header;
      if (this.#buffered < header.length) break;
      const payload = this.#take(header.length);
      this.#header = undefined;
      frames.push({ ...header, payload });
    }
    return frames;
  }

  #take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.#chunks[0]!;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const c = this.#chunks[0]!;
        const use = Math.min(c.length, n - filled);
        c.copy(out, filled, 0, use);
        filled += use;
        if (use === c.length) this.#chunks.shift();
        else this.#chunks[0] = c.subarray(use);
      }
    }
    this.#buffered -= n;
    return out;
  }
}
