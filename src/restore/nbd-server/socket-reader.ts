// Exact-length reads from a socket with back-pressure: bytes queue until a caller asks for them,
// and the socket is paused while more than `highWater` bytes wait, so a client that pipelines
// faster than the disk answers is slowed down by TCP instead of filling memory.
import type { Socket } from 'node:net';

/** The peer closed the connection (or it broke) before the bytes asked for arrived. */
export class ConnectionClosed extends Error {
  constructor(message = 'connection closed by the peer') {
    super(message);
    this.name = 'ConnectionClosed';
  }
}

export class SocketReader {
  readonly #socket: Socket;
  readonly #highWater: number;
  #chunks: Buffer[] = [];
  #queued = 0;
  #closed = false;
  #wake: (() => void) | null = null;

  constructor(socket: Socket, highWater = 1 << 20) {
    this.#socket = socket;
    this.#highWater = highWater;
    socket.on('data', (chunk: Buffer) => {
      this.#chunks.push(chunk);
      this.#queued += chunk.length;
      if (this.#queued > this.#highWater) socket.pause();
      this.#notify();
    });
    const onEnd = (): void => {
      this.#closed = true;
      this.#notify();
    };
    socket.on('end', onEnd);
    socket.on('close', onEnd);
    socket.on('error', onEnd);
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  /** Resolves with exactly n bytes, or rejects with ConnectionClosed. */
  async read(n: number): Promise<Buffer> {
    while (this.#queued < n) {
      if (this.#closed) throw new ConnectionClosed();
      if (this.#socket.isPaused()) this.#socket.resume();
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
    const out = this.#take(n);
    if (this.#queued <= this.#highWater && this.#socket.isPaused() && !this.#closed) this.#socket.resume();
    return out;
  }

  /** Reads and drops n bytes without holding them all in memory. */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      const step = Math.min(left, this.#highWater);
      await this.read(step);
      left -= step;
    }
  }

  #take(n: number): Buffer {
    const first = this.#chunks[0];
    if (first !== undefined && first.length >= n) {
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
      this.#queued -= n;
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let done = 0;
    while (done < n) {
      const c = this.#chunks[0]!;
      const step = Math.min(c.length, n - done);
      c.copy(out, done, 0, step);
      done += step;
      if (step === c.length) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(step);
    }
    this.#queued -= n;
    return out;
  }
}
