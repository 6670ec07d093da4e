// The target agent's side of a restore stream (role "read"): answers READ requests with BLOCK and
// ZERO_RUN frames from the task's restore source, keeps at most one credit window unacknowledged
// per stream, and resends what the reader NACKs. Streams are independent: reads are idempotent,
// so a reader whose stream drops simply asks again elsewhere.
import { BulwarkError, describeError } from '../common/errors.js';
import type { FramedConnection } from './connection.js';
import {
  MessageType,
  decodeAck,
  decodeNack,
  decodeRead,
  encodeBlock,
  encodeFrame,
  encodeJson,
  encodeZeroRun,
  messageTypeName,
  type Frame,
  type OpenDiskMessage,
} from './frame.js';
import type { OutgoingBlock } from './sender.js';

/** What a restore reads from on the target: the disks of a restore point, block by block. */
export interface RestoreSource {
  readonly disks: readonly OpenDiskMessage[];
  /** The block at `index` as stored (hashed, maybe compressed), or null when it reads as zeroes. */
  readBlock(disk: number, index: number): Promise<OutgoingBlock | null>;
  close(): Promise<void>;
}

export const MAX_READ_RESENDS = 8;

export class ReadServer {
  readonly #conn: FramedConnection;
  readonly #source: RestoreSource;
  readonly #window: number;
  readonly #sent = new Map<number, { parts: Buffer[]; bytes: number; attempts: number }>();
  readonly #ranges: Array<{ disk: number; start: number; count: number }> = [];
  #inFlight = 0;
  #nextSequence = 1;
  #working = false;
  #waiters: Array<() => void> = [];
  #closed = false;

  constructor(conn: FramedConnection, source: RestoreSource, window: number) {
    this.#conn = conn;
    this.#source = source;
    this.#window = window;
  }

  /** Sends the restore point's disks (before WELCOME): the reader needs their sizes before it asks for blocks. */
  async start(): Promise<void> {
    for (const d of this.#source.disks) await this.#conn.send(MessageType.openDisk, encodeJson(d));
  }

  onFrame(f: Frame): void {
    switch (f.type) {
      case MessageType.read: {
        const r = decodeRead(f.payload);
        const disk = this.#source.disks.find((d) => d.disk === r.disk);
        const blocks = disk ? Math.ceil(disk.size / disk.blockSize) : 0;
        if (!disk || r.start + r.count > blocks) {
          this.#error(new BulwarkError(`READ of blocks ${r.start}+${r.count} is outside disk ${r.disk}`, { kind: 'invalid' }));
          return;
        }
        this.#ranges.push(r);
        void this.#work();
        return;
      }
      case MessageType.ack:
        for (const s of decodeAck(f.payload).sequences) {
          const sent = this.#sent.get(s);
          if (!sent) continue;
          this.#sent.delete(s);
          this.#inFlight -= sent.bytes;
        }
        this.#wake();
        return;
      case MessageType.nack: {
        const n = decodeNack(f.payload);
        const sent = this.#sent.get(n.sequence);
        if (!sent) return;
        if (++sent.attempts > MAX_READ_RESENDS) {
          this.#error(new BulwarkError(`a block failed its CRC check ${sent.attempts} times at the reader`, { kind: 'corrupt' }));
          return;
        }
        this.#conn.sendRaw(sent.parts).catch(() => undefined);
        return;
      }
      case MessageType.hello:
      case MessageType.welcome:
      case MessageType.openDisk:
      case MessageType.block:
      case MessageType.zeroRun:
      case MessageType.endDisk:
      case MessageType.commit:
      case MessageType.committed:
      case MessageType.abort:
      case MessageType.error:
      case MessageType.keepalive:
      case MessageType.beginPoint:
        this.#conn.close(new BulwarkError(`unexpected ${messageTypeName(f.type)} on a restore stream`, { kind: 'invalid' }));
        return;
    }
  }

  close(): void {
    this.#closed = true;
    this.#wake();
  }

  async #work(): Promise<void> {
    if (this.#working) return;
    this.#working = true;
    try {
      while (this.#ranges.length > 0 && !this.#closed) {
        const r = this.#ranges.shift()!;
        let zero: { start: number; count: number } | undefined;
        for (let index = r.start; index < r.start + r.count && !this.#closed; index++) {
          const block = await this.#source.readBlock(r.disk, index);
          if (block === null) {
            if (zero && zero.start + zero.count === index) zero.count++;
            else {
              if (zero) await this.#send(MessageType.zeroRun, [encodeZeroRun({ disk: r.disk, ...zero })]);
              zero = { start: index, count: 1 };
            }
            continue;
          }
          if (zero) await this.#send(MessageType.zeroRun, [encodeZeroRun({ disk: r.disk, ...zero })]);
          zero = undefined;
          await this.#send(MessageType.block, encodeBlock({ disk: r.disk, ...block }));
        }
        if (zero) await this.#send(MessageType.zeroRun, [encodeZeroRun({ disk: r.disk, ...zero })]);
      }
    } catch (err) {
      this.#error(err);
    } finally {
      this.#working = false;
    }
  }

  async #send(type: typeof MessageType.block | typeof MessageType.zeroRun, payload: Buffer[]): Promise<void> {
    const bytes = payload.reduce((n, p) => n + p.length, 0);
    while (this.#inFlight > 0 && this.#inFlight + bytes > this.#window && !this.#closed) {
      await new Promise<void>((r) => this.#waiters.push(r));
    }
    if (this.#closed) return;
    const sequence = this.#nextSequence++;
    const parts = encodeFrame(type, payload, { sequence });
    this.#sent.set(sequence, { parts, bytes, attempts: 0 });
    this.#inFlight += bytes;
    await this.#conn.sendRaw(parts);
  }

  #error(err: unknown): void {
    const e = err instanceof BulwarkError ? err : new BulwarkError(describeError(err), { kind: 'internal', cause: err });
    this.#conn.send(MessageType.error, encodeJson({ kind: e.kind, message: e.message })).finally(() => this.#conn.close()).catch(() => undefined);
    this.close();
  }

  #wake(): void {
    for (const w of this.#waiters.splice(0)) w();
  }
}
