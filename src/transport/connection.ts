// One data-mover connection: a TLS socket carrying frames. Decodes incoming bytes into frames,
// writes frames with socket back-pressure (a write resolves once the socket accepted it or
// drained), sends KEEPALIVE when idle and declares a silent peer dead. Shared by both ends.
import type { Socket } from 'node:net';
import tls from 'node:tls';
import { BulwarkError } from '../common/errors.js';
import {
  FrameDecoder,
  MAX_PAYLOAD,
  MessageType,
  encodeFrame,
  type Frame,
  type MessageTypeCode,
} from './frame.js';

/** PEM strings: this agent's enrollment key and certificate, and the server CA that issued them. */
export interface TlsIdentity {
  readonly key: string;
  readonly cert: string;
  readonly ca: string;
}

export const DEFAULT_KEEPALIVE_MS = 5_000;
export const DEFAULT_DEAD_PEER_MS = 15_000;

export interface FramedConnectionOptions {
  readonly keepaliveMs?: number;
  readonly deadPeerMs?: number;
  readonly maxPayload?: number;
  readonly onFrame: (frame: Frame) => void;
  /** Called once when the connection is gone; `error` is undefined for an orderly close. */
  readonly onClose: (error: Error | undefined) => void;
}

export class FramedConnection {
  readonly socket: Socket;
  readonly #decoder: FrameDecoder;
  readonly #options: FramedConnectionOptions;
  #closed = false;
  #lastSent = Date.now();
  #lastReceived = Date.now();
  #timer: NodeJS.Timeout | undefined;
  #drainWaiters: Array<(err?: Error) => void> = [];

  constructor(socket: Socket, options: FramedConnectionOptions) {
    this.socket = socket;
    this.#options = options;
    this.#decoder = new FrameDecoder(options.maxPayload ?? MAX_PAYLOAD);
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('drain', () => this.#wakeDrain());
    socket.on('error', (err) => this.close(err));
    socket.on('close', () => this.close(this.#closed ? undefined : new Error('connection closed by peer')));
    const keepalive = options.keepaliveMs ?? DEFAULT_KEEPALIVE_MS;
    const dead = options.deadPeerMs ?? DEFAULT_DEAD_PEER_MS;
    this.#timer = setInterval(() => this.#tick(keepalive, dead), Math.max(50, Math.min(keepalive, dead) / 4));
    this.#timer.unref();
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Bytes queued in the socket and not yet handed to the kernel. */
  get writableLength(): number {
    return this.socket.writableLength;
  }

  get remoteAddress(): string | undefined {
    return this.socket.remoteAddress;
  }

  /** Writes one frame; resolves when the socket took it (waits for 'drain' when its buffer is full). */
  async send(type: MessageTypeCode, payload: Buffer | readonly Buffer[], opts: { stream?: number; sequence?: number; flags?: number } = {}): Promise<void> {
    await this.sendRaw(encodeFrame(type, payload, opts));
  }

  async sendRaw(parts: readonly Buffer[]): Promise<void> {
    if (this.#closed) throw new BulwarkError('data-mover connection is closed', { kind: 'unavailable' });
    this.#lastSent = Date.now();
    this.socket.cork();
    let ok = true;
    for (const p of parts) ok = this.socket.write(p);
    this.socket.uncork();
    if (ok) return;
    await new Promise<void>((resolve, reject) => {
      this.#drainWaiters.push((err) => (err ? reject(err) : resolve()));
    });
  }

  /** Ends the connection. With an error, the socket is destroyed at once. */
  close(error?: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    const err = error ?? new BulwarkError('data-mover connection is closed', { kind: 'unavailable' });
    for (const w of this.#drainWaiters.splice(0)) w(err);
    if (error) this.socket.destroy();
    else this.socket.end();
    this.#options.onClose(error);
  }

  #wakeDrain(): void {
    for (const w of this.#drainWaiters.splice(0)) w();
  }

  #onData(chunk: Buffer): void {
    if (this.#closed) return;
    this.#lastReceived = Date.now();
    let frames: Frame[];
    try {
      frames = this.#decoder.push(chunk);
    } catch (err) {
      this.close(err instanceof Error ? err : new Error(String(err)));
      return;
    }
    for (const f of frames) {
      if (this.#closed) return;
      if (f.type === MessageType.keepalive) continue;
      this.#options.onFrame(f);
    }
  }

  #tick(keepaliveMs: number, deadMs: number): void {
    const now = Date.now();
    if (now - this.#lastReceived >= deadMs) {
      this.close(new BulwarkError(`data-mover peer silent for ${Math.round((now - this.#lastReceived) / 1000)} s`, { kind: 'unavailable' }));
      return;
    }
    if (now - this.#lastSent >= keepaliveMs && this.socket.writableLength === 0) {
      this.sendRaw(encodeFrame(MessageType.keepalive, Buffer.alloc(0))).catch(() => undefined);
    }
  }
}

/** TLS options for the listening (target) side: TLS 1.3, client certificate from our CA required. */
export function serverTlsOptions(identity: TlsIdentity): tls.TlsOptions {
  return {
    key: identity.key,
    cert: identity.cert,
    ca: identity.ca,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: 'TLSv1.3',
  };
}

/** Opens a mutually authenticated TLS connection; `servername` is the name the target's certificate must carry. */
export async function connectTls(
  endpoint: { host: string; port: number; servername?: string },
  identity: TlsIdentity,
  timeoutMs: number,
): Promise<tls.TLSSocket> {
  return await new Promise<tls.TLSSocket>((resolve, reject) => {
    const socket = tls.connect({
      host: endpoint.host,
      port: endpoint.port,
      servername: endpoint.servername ?? (isIpAddress(endpoint.host) ? undefined : endpoint.host),
      checkServerIdentity: (host, cert) => tls.checkServerIdentity(endpoint.servername ?? host, cert),
      key: identity.key,
      cert: identity.cert,
      ca: identity.ca,
      minVersion: 'TLSv1.3',
    });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new BulwarkError(`timed out connecting to target agent ${endpoint.host}:${endpoint.port}`, { kind: 'unavailable' }));
    }, timeoutMs);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', (cause) => {
      clearTimeout(timer);
      socket.destroy();
      reject(new BulwarkError(`cannot connect to target agent ${endpoint.host}:${endpoint.port}`, { kind: 'unavailable', cause }));
    });
  });
}

function isIpAddress(host: string): boolean {
  return /^[\d.]+$/.test(host) || host.includes(':');
}
