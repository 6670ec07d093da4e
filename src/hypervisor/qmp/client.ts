// QMP client: the JSON monitor protocol of QEMU and qemu-storage-daemon. Greeting, capability
// negotiation, commands matched to replies by id with a deadline each, asynchronous events
// (listeners, async iteration, waitForEvent), and typed errors naming the command. Follows QEMU's
// docs/interop/qmp-spec; tested against qemu-storage-daemon and qemu-system-x86_64.
import net from 'node:net';
import { BulwarkError, type ErrorKind } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { endAndWait, whenConnected } from '../socket.js';

const log = logger('qmp-client');

/** Where a QMP monitor listens: a unix socket (the usual case) or TCP. */
export type QmpEndpoint = { readonly socketPath: string } | { readonly host: string; readonly port: number };

export interface QmpConnectOptions {
  readonly endpoint: QmpEndpoint;
  /** Deadline of each command unless `execute` is given another. Default 60 s. */
  readonly commandTimeoutMs?: number;
  /** Deadline for connecting, the greeting and qmp_capabilities. Default 10 s. */
  readonly connectTimeoutMs?: number;
  /** A name for messages and logs (e.g. the VM name); defaults to the endpoint. */
  readonly label?: string;
}

/** The server's greeting. */
export interface QmpGreeting {
  readonly version: { qemu: { major: number; minor: number; micro: number }; package: string };
  readonly capabilities: readonly string[];
}

/** An asynchronous event from the server. */
export interface QmpEvent {
  readonly event: string;
  readonly data: Record<string, unknown>;
  readonly timestamp: { seconds: number; microseconds: number };
}

/**
 * command: the server answered the command with an error (`errorClass`, `desc`). timeout: no
 * answer in time. closed: the connection ended with the command unanswered. connect / protocol:
 * the monitor could not be reached or spoke something else.
 */
export type QmpErrorReason = 'command' | 'timeout' | 'closed' | 'connect' | 'protocol';

/** A failure of a QMP command or of the monitor connection. */
export class QmpError extends BulwarkError {
  readonly reason: QmpErrorReason;
  /** The command that failed (`qmp_capabilities` during connect), when there is one. */
  readonly command: string | undefined;
  /** QMP error class (GenericError, CommandNotFound, DeviceNotFound, …) for reason 'command'. */
  readonly errorClass: string | undefined;
  /** QMP's human description for reason 'command'. */
  readonly desc: string | undefined;

  constructor(
    message: string,
    reason: QmpErrorReason,
    details: { command?: string; errorClass?: string; desc?: string; monitor: string; hint?: string; cause?: unknown },
  ) {
    super(message, {
      kind: kindOf(reason, details.errorClass),
      context: { monitor: details.monitor, command: details.command, errorClass: details.errorClass },
      hint: details.hint,
      cause: details.cause,
    });
    this.name = 'QmpError';
    this.reason = reason;
    this.command = details.command;
    this.errorClass = details.errorClass;
    this.desc = details.desc;
  }
}

function kindOf(reason: QmpErrorReason, errorClass: string | undefined): ErrorKind {
  switch (reason) {
    case 'command':
      return errorClass === 'DeviceNotFound' || errorClass === 'CommandNotFound' ? 'not-found' : 'internal';
    case 'timeout':
    case 'closed':
    case 'connect':
      return 'unavailable';
    case 'protocol':
      return 'internal';
  }
}

interface PendingCommand {
  readonly command: string;
  readonly resolve: (value: unknown) => void;
  readonly reject: (err: Error) => void;
  readonly timer: NodeJS.Timeout | undefined;
}

type Listener = (event: QmpEvent) => void;

/** Options of one command. */
export interface QmpExecuteOptions {
  /** Deadline for this command (0 = none). Default: the client's `commandTimeoutMs`. */
  readonly timeoutMs?: number;
}

/**
 * A connection to one QMP monitor, in command mode after `connect`.
 *
 * Events: arm `waitForEvent` BEFORE the command that causes the event, because QEMU may send the
 * event before the command's reply.
 *
 * @example
 * const qmp = await QmpClient.connect({ endpoint: { socketPath: '/run/vm1/qmp.sock' } });
 * try {
 *   const cancelled = qmp.waitForEvent('BLOCK_JOB_CANCELLED', (e) => e.data.device === 'job0', 10_000);
 *   await qmp.execute('block-job-cancel', { device: 'job0' });
 *   await cancelled;
 * } finally { await qmp.close(); }
 */
export class QmpClient {
  readonly #socket: net.Socket;
  readonly #label: string;
  readonly #timeoutMs: number;
  readonly #pending = new Map<string, PendingCommand>();
  readonly #listeners = new Map<string, Set<Listener>>();
  readonly #closeListeners = new Set<(err: QmpError) => void>();
  #buffer = '';
  #nextId = 1;
  #greeting: QmpGreeting | undefined;
  #greetingWaiter: ((g: QmpGreeting) => void) | undefined;
  #failure: QmpError | undefined;
  #closing = false;
  readonly #closed: Promise<void>;

  private constructor(socket: net.Socket, label: string, timeoutMs: number) {
    this.#socket = socket;
    this.#label = label;
    this.#timeoutMs = timeoutMs;
    this.#closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => this.#onText(text));
    socket.on('error', (err) => this.#fail(new QmpError(`QMP connection to ${label} failed`, 'closed', { monitor: label, cause: err })));
    socket.on('close', () =>
      this.#fail(new QmpError(`QMP connection to ${label} ${this.#closing ? 'was closed' : 'was closed by QEMU'}`, 'closed', { monitor: label })),
    );
  }

  /** Connects, reads the greeting and enters command mode (qmp_capabilities). */
  static async connect(options: QmpConnectOptions): Promise<QmpClient> {
    const ep = options.endpoint;
    const label = options.label ?? ('socketPath' in ep ? ep.socketPath : `${ep.host}:${ep.port}`);
    const socket = 'socketPath' in ep ? net.connect({ path: ep.socketPath }) : net.connect({ host: ep.host, port: ep.port });
    try {
      await whenConnected(socket);
    } catch (err) {
      throw new QmpError(`cannot connect to the QMP monitor at ${label}`, 'connect', {
        monitor: label,
        cause: err,
        hint: 'is QEMU running with -qmp (or --monitor) on this socket?',
      });
    }
    const client = new QmpClient(socket, label, options.commandTimeoutMs ?? 60_000);
    const connectTimeout = options.connectTimeoutMs ?? 10_000;
    const timer = setTimeout(() => {
      client.#fail(new QmpError(`QMP monitor at ${label} sent no greeting within ${connectTimeout} ms`, 'timeout', { monitor: label }));
      socket.destroy();
    }, connectTimeout);
    try {
      await client.#waitGreeting();
      await client.execute('qmp_capabilities', {}, { timeoutMs: connectTimeout });
    } catch (err) {
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    log.debug({ monitor: label, version: client.greeting.version.qemu }, 'QMP connected');
    return client;
  }

  /** The greeting: QEMU version and capabilities. */
  get greeting(): QmpGreeting {
    if (!this.#greeting) throw new Error('QmpClient used before the greeting');
    return this.#greeting;
  }

  /** Whether the connection has ended (every command would fail). */
  get isClosed(): boolean {
    return this.#failure !== undefined;
  }

  async #waitGreeting(): Promise<QmpGreeting> {
    if (this.#greeting) return this.#greeting;
    if (this.#failure) throw this.#failure;
    return new Promise<QmpGreeting>((resolve, reject) => {
      this.#closeListeners.add(reject);
      this.#greetingWaiter = (g) => {
        this.#closeListeners.delete(reject);
        resolve(g);
      };
    });
  }

  /**
   * Runs a command and resolves with its `return` value. Fails with `QmpError` (reason 'command',
   * with `errorClass` and `desc`) when QEMU answers with an error, 'timeout' after the deadline,
   * 'closed' when the connection ends first.
   */
  async execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QmpExecuteOptions = {}): Promise<T> {
    if (this.#failure) {
      throw new QmpError(`cannot run ${command} on ${this.#label}: ${this.#failure.message}`, 'closed', { command, monitor: this.#label, cause: this.#failure });
    }
    const id = `b${this.#nextId++}`;
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    const line = JSON.stringify(args && Object.keys(args).length ? { execute: command, arguments: args, id } : { execute: command, id }) + '\n';
    return new Promise<T>((resolve, reject) => {
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              this.#pending.delete(id);
              reject(new QmpError(`QMP command ${command} on ${this.#label} got no answer within ${timeoutMs} ms`, 'timeout', { command, monitor: this.#label }));
            }, timeoutMs)
          : undefined;
      this.#pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.#socket.write(line);
    });
  }

  /** Calls `listener` for every event named `name` ('*' for all). Returns the unsubscribe function. */
  on(name: string, listener: Listener): () => void {
    let set = this.#listeners.get(name);
    if (!set) this.#listeners.set(name, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  /** Calls `listener` once when the connection ends (with the reason). Returns the unsubscribe function. */
  onClose(listener: (err: QmpError) => void): () => void {
    if (this.#failure) {
      const f = this.#failure;
      queueMicrotask(() => listener(f));
      return () => undefined;
    }
    this.#closeListeners.add(listener);
    return () => this.#closeListeners.delete(listener);
  }

  /**
   * Resolves with the first event named `name` (from now on) for which `predicate` holds. Rejects
   * with a 'timeout' QmpError after `timeoutMs` (0 = never) or 'closed' when the connection ends.
   */
  async waitForEvent(name: string, predicate: (event: QmpEvent) => boolean = () => true, timeoutMs = this.#timeoutMs): Promise<QmpEvent> {
    if (this.#failure) throw this.#failure;
    return new Promise<QmpEvent>((resolve, reject) => {
      const cleanup = (): void => {
        off();
        offClose();
        if (timer) clearTimeout(timer);
      };
      const off = this.on(name, (ev) => {
        let ok = false;
        try {
          ok = predicate(ev);
        } catch (err) {
          cleanup();
          reject(err instanceof Error ? err : new Error(String(err)));
          return;
        }
        if (ok) {
          cleanup();
          resolve(ev);
        }
      });
      const offClose = this.onClose((err) => {
        cleanup();
        reject(new QmpError(`connection to ${this.#label} ended while waiting for event ${name}`, 'closed', { monitor: this.#label, cause: err }));
      });
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              cleanup();
              reject(new QmpError(`QMP event ${name} did not arrive from ${this.#label} within ${timeoutMs} ms`, 'timeout', { monitor: this.#label }));
            }, timeoutMs)
          : undefined;
    });
  }

  /**
   * Events from now on as an async iterator (optionally only those named in `names`); it ends when
   * the connection ends or the loop breaks.
   */
  events(names?: readonly string[]): AsyncIterableIterator<QmpEvent> {
    const queue: QmpEvent[] = [];
    let wake: (() => void) | undefined;
    let done = false;
    const offs = (names ?? ['*']).map((n) =>
      this.on(n, (ev) => {
        queue.push(ev);
        wake?.();
      }),
    );
    const offClose = this.onClose(() => {
      done = true;
      wake?.();
    });
    const stop = (): void => {
      done = true;
      for (const off of offs) off();
      offClose();
      wake?.();
    };
    const iterator: AsyncIterableIterator<QmpEvent> = {
      next: async (): Promise<IteratorResult<QmpEvent>> => {
        for (;;) {
          const ev = queue.shift();
          if (ev) return { value: ev, done: false };
          if (done) return { value: undefined, done: true };
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
        }
      },
      return: async (): Promise<IteratorResult<QmpEvent>> => {
        stop();
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /** Closes the connection; commands still pending fail with reason 'closed'. Idempotent. */
  async close(): Promise<void> {
    this.#closing = true;
    await endAndWait(this.#socket, this.#closed);
  }

  #onText(text: string): void {
    this.#buffer += text;
    let nl: number;
    while ((nl = this.#buffer.indexOf('\n')) >= 0) {
      const line = this.#buffer.slice(0, nl).trim();
      this.#buffer = this.#buffer.slice(nl + 1);
      if (line) this.#onMessage(line);
    }
  }

  #onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch (err) {
      this.#fail(new QmpError(`QMP monitor ${this.#label} sent a line that is not JSON: ${line.slice(0, 200)}`, 'protocol', { monitor: this.#label, cause: err }));
      this.#socket.destroy();
      return;
    }
    if ('QMP' in msg) {
      const g = msg.QMP as QmpGreeting;
      this.#greeting = g;
      const w = this.#greetingWaiter;
      this.#greetingWaiter = undefined;
      w?.(g);
      return;
    }
    if (typeof msg.event === 'string') {
      const ev: QmpEvent = {
        event: msg.event,
        data: (msg.data as Record<string, unknown> | undefined) ?? {},
        timestamp: (msg.timestamp as QmpEvent['timestamp'] | undefined) ?? { seconds: 0, microseconds: 0 },
      };
      log.debug({ monitor: this.#label, event: ev.event }, 'QMP event');
      for (const key of [ev.event, '*']) {
        for (const l of [...(this.#listeners.get(key) ?? [])]) l(ev);
      }
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id === undefined ? undefined : this.#pending.get(id);
    if (!p || id === undefined) return; // an answer after its deadline passed, or without our id
    this.#pending.delete(id);
    if (p.timer) clearTimeout(p.timer);
    if ('return' in msg) {
      p.resolve(msg.return);
    } else if (msg.error && typeof msg.error === 'object') {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(
        new QmpError(`QMP command ${p.command} on ${this.#label} failed: ${e.desc ?? 'no description'} (${e.class ?? 'unknown class'})`, 'command', {
          command: p.command,
          errorClass: e.class,
          desc: e.desc,
          monitor: this.#label,
        }),
      );
    } else {
      p.reject(new QmpError(`QMP monitor ${this.#label} answered ${p.command} with neither return nor error`, 'protocol', { command: p.command, monitor: this.#label }));
    }
  }

  #fail(err: QmpError): void {
    if (this.#failure) return;
    this.#failure = err;
    for (const p of this.#pending.values()) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(new QmpError(`QMP command ${p.command} on ${this.#label} did not complete: ${err.message}`, err.reason, { command: p.command, monitor: this.#label, cause: err }));
    }
    this.#pending.clear();
    for (const l of [...this.#closeListeners]) l(err);
    this.#closeListeners.clear();
  }
}
