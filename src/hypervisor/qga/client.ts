// QEMU guest agent (qemu-ga) client: talks to the agent inside a VM through the host end of its
// virtio-serial channel (a unix socket). The agent answers one command at a time and keeps no
// request ids, so the client serializes commands and re-synchronizes the stream with
// guest-sync-delimited (0xFF reset byte + a random id) on connect and after any timeout, when a
// late answer could otherwise be taken for the next one. Follows QEMU's qemu-ga reference.
import { randomInt } from 'node:crypto';
import net from 'node:net';
import { logger } from '../../common/log.js';
import { endAndWait, whenConnected } from '../socket.js';
import { GuestAgent, QgaError, type QgaCallOptions } from './guest-agent.js';

export { GuestAgent, QgaError } from './guest-agent.js';
export type { QgaCallOptions, QgaErrorReason, QgaExecOptions, QgaExecResult, QgaExecStatus, QgaFsInfo, QgaInfo } from './guest-agent.js';

const log = logger('qga-client');

export interface QgaConnectOptions {
  /** Host end of the agent channel (the chardev socket of org.qemu.guest_agent.0). */
  readonly socketPath: string;
  /** Deadline of each command unless the call gives another. Default 30 s. */
  readonly timeoutMs?: number;
  /** A name for messages (e.g. the VM name); defaults to the socket path. */
  readonly label?: string;
}

interface Call {
  readonly command: string;
  readonly resolve: (msg: Record<string, unknown>) => void;
  readonly reject: (err: Error) => void;
}

/**
 * A connection to one guest agent.
 *
 * @example
 * const qga = await QgaClient.connect({ socketPath: '/run/vm1/qga.sock', timeoutMs: 10_000 });
 * try {
 *   await qga.ping();
 *   const frozen = await qga.fsfreezeFreeze();
 *   try { ...snapshot... } finally { await qga.fsfreezeThaw(); }
 * } finally { await qga.close(); }
 */
export class QgaClient extends GuestAgent {
  readonly #socket: net.Socket;
  readonly label: string;
  readonly timeoutMs: number;
  #bytes: Buffer = Buffer.alloc(0);
  /** Discard input up to the next 0xFF (after guest-sync-delimited was sent). */
  #awaitingDelimiter = false;
  #call: Call | undefined;
  /** Commands run one at a time: each waits for the previous one. */
  #queue: Promise<unknown> = Promise.resolve();
  #needsSync = true;
  #failure: QgaError | undefined;
  #closing = false;
  readonly #closed: Promise<void>;

  private constructor(socket: net.Socket, label: string, timeoutMs: number) {
    super();
    this.#socket = socket;
    this.label = label;
    this.timeoutMs = timeoutMs;
    this.#closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (b: Buffer) => this.#onBytes(b));
    socket.on('error', (err) => this.#fail(new QgaError(`guest agent channel ${label} failed`, 'closed', { agent: label, cause: err })));
    socket.on('close', () => this.#fail(new QgaError(`guest agent channel ${label} ${this.#closing ? 'was closed' : 'was closed by QEMU'}`, 'closed', { agent: label })));
  }

  /**
   * Connects and synchronizes with the agent (guest-sync-delimited). Fails with reason 'timeout'
   * when no agent answers within `timeoutMs` — the usual sign that the agent is not running.
   */
  static async connect(options: QgaConnectOptions): Promise<QgaClient> {
    const label = options.label ?? options.socketPath;
    const socket = net.connect({ path: options.socketPath });
    try {
      await whenConnected(socket);
    } catch (err) {
      throw new QgaError(`cannot connect to the guest agent channel ${label}`, 'connect', { agent: label, cause: err });
    }
    const client = new QgaClient(socket, label, options.timeoutMs ?? 30_000);
    try {
      await client.sync();
    } catch (err) {
      socket.destroy();
      throw err;
    }
    return client;
  }

  /** Whether the channel has ended. */
  get isClosed(): boolean {
    return this.#failure !== undefined;
  }

  /**
   * Re-synchronizes the stream: sends the 0xFF parser reset and guest-sync-delimited with a
   * random id, and drops everything until the agent echoes that id.
   */
  async sync(options: QgaCallOptions = {}): Promise<void> {
    await this.#serialize(async () => {
      await this.#sync(options.timeoutMs ?? this.timeoutMs);
    });
  }

  async #sync(timeoutMs: number): Promise<void> {
    const id = randomInt(1, 2 ** 47);
    this.#awaitingDelimiter = true;
    this.#bytes = Buffer.alloc(0);
    this.#socket.write(Buffer.from([0xff]));
    for (let first = true; ; first = false) {
      // A stale answer (from a command that timed out) may come first; skip until ours.
      const msg = await this.#send('guest-sync-delimited', { id }, timeoutMs, first);
      if (msg.return === id) break;
      log.debug({ agent: this.label }, 'guest agent: dropped a stale answer while synchronizing');
    }
    this.#needsSync = false;
  }

  /**
   * Runs an agent command and resolves with its `return` value. Fails with a `QgaError` naming
   * the command: reason 'command' (with the agent's class and description), 'timeout', 'closed'.
   */
  override async execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QgaCallOptions = {}): Promise<T> {
    return this.#serialize(async () => {
      const timeoutMs = options.timeoutMs ?? this.timeoutMs;
      if (this.#needsSync) await this.#sync(timeoutMs);
      const msg = await this.#send(command, args, timeoutMs, true);
      if ('return' in msg) return msg.return as T;
      const e = (msg.error ?? {}) as { class?: string; desc?: string };
      throw new QgaError(`guest agent command ${command} on ${this.label} failed: ${e.desc ?? 'no description'} (${e.class ?? 'unknown class'})`, 'command', {
        agent: this.label,
        command,
        errorClass: e.class,
        desc: e.desc,
      });
    });
  }

  /**
   * guest-shutdown. The agent sends no answer when it works (the guest goes down), so this
   * resolves once the command is sent and either the channel closes or a short wait passes; an
   * error answer fails it.
   */
  async shutdown(mode: 'powerdown' | 'reboot' | 'halt' = 'powerdown', options: QgaCallOptions = {}): Promise<void> {
    await this.#serialize(async () => {
      if (this.#needsSync) await this.#sync(options.timeoutMs ?? this.timeoutMs);
      try {
        const msg = await this.#send('guest-shutdown', { mode }, 1000, true);
        if (msg.error) {
          const e = msg.error as { class?: string; desc?: string };
          throw new QgaError(`guest agent command guest-shutdown on ${this.label} failed: ${e.desc ?? ''} (${e.class ?? ''})`, 'command', {
            agent: this.label,
            command: 'guest-shutdown',
            errorClass: e.class,
            desc: e.desc,
          });
        }
      } catch (err) {
        // No answer (timeout) or the channel closed: that is what success looks like.
        if (err instanceof QgaError && (err.reason === 'timeout' || err.reason === 'closed')) {
          this.#needsSync = true;
          return;
        }
        throw err;
      }
    });
  }

  /** Closes the channel. Idempotent. */
  override async close(): Promise<void> {
    this.#closing = true;
    await endAndWait(this.#socket, this.#closed);
  }

  async #serialize<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => undefined);
    return run;
  }

  /** Sends one command and resolves with the next message from the agent. */
  async #send(command: string, args: Record<string, unknown> | undefined, timeoutMs: number, write: boolean): Promise<Record<string, unknown>> {
    if (this.#failure) {
      throw new QgaError(`cannot run ${command} on ${this.label}: ${this.#failure.message}`, 'closed', { agent: this.label, command, cause: this.#failure });
    }
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              this.#call = undefined;
              this.#needsSync = true;
              reject(
                new QgaError(`guest agent command ${command} on ${this.label} got no answer within ${timeoutMs} ms`, 'timeout', {
                  agent: this.label,
                  command,
                  hint: 'is qemu-guest-agent running in the guest?',
                }),
              );
            }, timeoutMs)
          : undefined;
      this.#call = {
        command,
        resolve: (m) => {
          if (timer) clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          if (timer) clearTimeout(timer);
          reject(e);
        },
      };
      if (write) this.#socket.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
      this.#drain();
    });
  }

  #onBytes(b: Buffer): void {
    this.#bytes = this.#bytes.length ? Buffer.concat([this.#bytes, b]) : b;
    this.#drain();
  }

  /** Hands complete messages to the waiting call; without one, messages are stale and dropped. */
  #drain(): void {
    for (;;) {
      if (this.#awaitingDelimiter) {
        const ff = this.#bytes.indexOf(0xff);
        if (ff < 0) {
          this.#bytes = Buffer.alloc(0);
          return;
        }
        this.#bytes = this.#bytes.subarray(ff + 1);
        this.#awaitingDelimiter = false;
      }
      const nl = this.#bytes.indexOf(0x0a);
      if (nl < 0) return;
      const call = this.#call;
      if (!call) {
        // Nobody waits: leave the bytes for the next call (sync drops what it does not expect).
        return;
      }
      const line = this.#bytes.subarray(0, nl).toString('utf8').trim();
      this.#bytes = this.#bytes.subarray(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        log.warn({ agent: this.label, line: line.slice(0, 200) }, 'guest agent sent a line that is not JSON; dropped');
        continue;
      }
      this.#call = undefined;
      call.resolve(msg);
    }
  }

  #fail(err: QgaError): void {
    if (this.#failure) return;
    this.#failure = err;
    const call = this.#call;
    this.#call = undefined;
    call?.reject(new QgaError(`guest agent command ${call.command} on ${this.label} did not complete: ${err.message}`, 'closed', { agent: this.label, command: call.command, cause: err }));
  }
}
