// QEMU guest agent (qemu-ga) client: talks to the agent inside a VM through the host end of its
// virtio-serial channel (a unix socket). The agent answers one command at a time and keeps no
// request ids, so the client serializes commands and re-synchronizes the stream with
// guest-sync-delimited (0xFF reset byte + a random id) on connect and after any timeout, when a
// late answer could otherwise be taken for the next one. Follows QEMU's qemu-ga reference.
import { randomInt } from 'node:crypto';
import net from 'node:net';
import { BulwarkError, type ErrorKind } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { endAndWait, whenConnected } from '../socket.js';

const log = logger('qga-client');

export interface QgaConnectOptions {
  /** Host end of the agent channel (the chardev socket of org.qemu.guest_agent.0). */
  readonly socketPath: string;
  /** Deadline of each command unless the call gives another. Default 30 s. */
  readonly timeoutMs?: number;
  /** A name for messages (e.g. the VM name); defaults to the socket path. */
  readonly label?: string;
}

/**
 * command: the agent answered with an error (`errorClass`, `desc`). timeout: no answer in time
 * (an agent that is not running in the guest looks like this). closed / connect / protocol: the
 * channel failed.
 */
export type QgaErrorReason = 'command' | 'timeout' | 'closed' | 'connect' | 'protocol';

export class QgaError extends BulwarkError {
  readonly reason: QgaErrorReason;
  readonly command: string | undefined;
  readonly errorClass: string | undefined;
  readonly desc: string | undefined;

  constructor(
    message: string,
    reason: QgaErrorReason,
    details: { agent: string; command?: string; errorClass?: string; desc?: string; cause?: unknown; hint?: string },
  ) {
    super(message, {
      kind: kindOf(reason),
      context: { agent: details.agent, command: details.command, errorClass: details.errorClass },
      cause: details.cause,
      hint: details.hint,
    });
    this.name = 'QgaError';
    this.reason = reason;
    this.command = details.command;
    this.errorClass = details.errorClass;
    this.desc = details.desc;
  }
}

function kindOf(reason: QgaErrorReason): ErrorKind {
  switch (reason) {
    case 'timeout':
    case 'closed':
    case 'connect':
      return 'unavailable';
    case 'command':
    case 'protocol':
      return 'internal';
  }
}

/** guest-info: agent version and which commands this agent instance allows. */
export interface QgaInfo {
  readonly version: string;
  readonly supported_commands: ReadonlyArray<{ name: string; enabled: boolean; 'success-response': boolean }>;
}

/** One mounted file system as guest-get-fsinfo reports it. */
export interface QgaFsInfo {
  readonly name: string;
  readonly mountpoint: string;
  readonly type: string;
  readonly 'used-bytes'?: number;
  readonly 'total-bytes'?: number;
  readonly disk: ReadonlyArray<{
    'bus-type': string;
    bus: number;
    target: number;
    unit: number;
    dev?: string;
    serial?: string;
    'pci-controller': { domain: number; bus: number; slot: number; function: number };
  }>;
}

/** guest-exec-status as the agent reports it (output still base64). */
export interface QgaExecStatus {
  readonly exited: boolean;
  readonly exitcode?: number;
  readonly signal?: number;
  readonly 'out-data'?: string;
  readonly 'err-data'?: string;
  readonly 'out-truncated'?: boolean;
  readonly 'err-truncated'?: boolean;
}

/** The outcome of `exec`: exit code (or signal) and the captured output. */
export interface QgaExecResult {
  readonly pid: number;
  /** Exit code; -1 when the process was killed by a signal. */
  readonly exitCode: number;
  readonly signal: number | undefined;
  readonly stdout: Buffer;
  readonly stderr: Buffer;
  /** The agent cut the output (it keeps at most 16 MiB per stream). */
  readonly truncated: boolean;
}

export interface QgaCallOptions {
  /** Deadline for this call (0 = none). Default: the client's `timeoutMs`. */
  readonly timeoutMs?: number;
}

export interface QgaExecOptions extends QgaCallOptions {
  /** Environment entries, "NAME=value". */
  readonly env?: readonly string[];
  /** Bytes for the process's stdin. */
  readonly input?: Buffer;
  /** How often to ask whether the process has exited. Default 50 ms. */
  readonly pollIntervalMs?: number;
}

/** guest-file-read chunk size: the agent caps a read at 48 MiB; base64 makes lines 4/3 larger. */
const FILE_CHUNK = 1024 * 1024;

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
export class QgaClient {
  readonly #socket: net.Socket;
  readonly #label: string;
  readonly #timeoutMs: number;
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
    this.#socket = socket;
    this.#label = label;
    this.#timeoutMs = timeoutMs;
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
      await this.#sync(options.timeoutMs ?? this.#timeoutMs);
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
      log.debug({ agent: this.#label }, 'guest agent: dropped a stale answer while synchronizing');
    }
    this.#needsSync = false;
  }

  /**
   * Runs an agent command and resolves with its `return` value. Fails with a `QgaError` naming
   * the command: reason 'command' (with the agent's class and description), 'timeout', 'closed'.
   */
  async execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QgaCallOptions = {}): Promise<T> {
    return this.#serialize(async () => {
      const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
      if (this.#needsSync) await this.#sync(timeoutMs);
      const msg = await this.#send(command, args, timeoutMs, true);
      if ('return' in msg) return msg.return as T;
      const e = (msg.error ?? {}) as { class?: string; desc?: string };
      throw new QgaError(`guest agent command ${command} on ${this.#label} failed: ${e.desc ?? 'no description'} (${e.class ?? 'unknown class'})`, 'command', {
        agent: this.#label,
        command,
        errorClass: e.class,
        desc: e.desc,
      });
    });
  }

  /** guest-ping: resolves when the agent answers. */
  async ping(options?: QgaCallOptions): Promise<void> {
    await this.execute('guest-ping', undefined, options);
  }

  /** guest-info: version and the commands this agent allows. */
  async info(options?: QgaCallOptions): Promise<QgaInfo> {
    return this.execute<QgaInfo>('guest-info', undefined, options);
  }

  /** guest-fsfreeze-status. */
  async fsfreezeStatus(options?: QgaCallOptions): Promise<'thawed' | 'frozen'> {
    return this.execute<'thawed' | 'frozen'>('guest-fsfreeze-status', undefined, options);
  }

  /**
   * Freezes the guest's file systems (all, or only `mountpoints`); resolves with how many were
   * frozen. Always pair with `fsfreezeThaw` in a finally.
   */
  async fsfreezeFreeze(options: QgaCallOptions & { mountpoints?: readonly string[] } = {}): Promise<number> {
    return options.mountpoints
      ? this.execute<number>('guest-fsfreeze-freeze-list', { mountpoints: options.mountpoints }, options)
      : this.execute<number>('guest-fsfreeze-freeze', undefined, options);
  }

  /** Thaws the guest's file systems; resolves with how many were thawed. */
  async fsfreezeThaw(options?: QgaCallOptions): Promise<number> {
    return this.execute<number>('guest-fsfreeze-thaw', undefined, options);
  }

  /** guest-get-fsinfo: mounted file systems and the disks under them. */
  async getFsInfo(options?: QgaCallOptions): Promise<QgaFsInfo[]> {
    return this.execute<QgaFsInfo[]>('guest-get-fsinfo', undefined, options);
  }

  /** guest-exec: starts a process (output captured) and resolves with its pid. */
  async execStart(path: string, args: readonly string[] = [], options: Omit<QgaExecOptions, 'pollIntervalMs'> = {}): Promise<number> {
    const r = await this.execute<{ pid: number }>(
      'guest-exec',
      {
        path,
        arg: args,
        'capture-output': true,
        ...(options.env ? { env: options.env } : {}),
        ...(options.input ? { 'input-data': options.input.toString('base64') } : {}),
      },
      options,
    );
    return r.pid;
  }

  /**
   * guest-exec-status. Once it has reported `exited: true` the agent forgets the pid, and asking
   * again fails with "Invalid parameter 'pid'".
   */
  async execStatus(pid: number, options?: QgaCallOptions): Promise<QgaExecStatus> {
    return this.execute<QgaExecStatus>('guest-exec-status', { pid }, options);
  }

  /**
   * Runs a program in the guest to its end and returns exit code and output. `timeoutMs` bounds
   * the whole run (each agent command too); a process still running then fails with 'timeout'.
   */
  async exec(path: string, args: readonly string[] = [], options: QgaExecOptions = {}): Promise<QgaExecResult> {
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    const deadline = timeoutMs > 0 ? Date.now() + timeoutMs : Infinity;
    const pid = await this.execStart(path, args, options);
    const poll = options.pollIntervalMs ?? 50;
    for (;;) {
      const s = await this.execStatus(pid, options);
      if (s.exited) {
        return {
          pid,
          exitCode: s.exitcode ?? -1,
          signal: s.signal,
          stdout: Buffer.from(s['out-data'] ?? '', 'base64'),
          stderr: Buffer.from(s['err-data'] ?? '', 'base64'),
          truncated: Boolean(s['out-truncated'] || s['err-truncated']),
        };
      }
      if (Date.now() + poll > deadline) {
        throw new QgaError(`guest process ${path} (pid ${pid}) on ${this.#label} did not exit within ${timeoutMs} ms`, 'timeout', {
          agent: this.#label,
          command: 'guest-exec',
        });
      }
      await new Promise((r) => setTimeout(r, poll));
    }
  }

  /** guest-file-open; resolves with the agent's file handle. Mode as fopen: 'r', 'w', 'a', 'r+'… */
  async fileOpen(path: string, mode = 'r', options?: QgaCallOptions): Promise<number> {
    return this.execute<number>('guest-file-open', { path, mode }, options);
  }

  /** guest-file-read of up to `count` bytes. */
  async fileRead(handle: number, count = FILE_CHUNK, options?: QgaCallOptions): Promise<{ data: Buffer; eof: boolean }> {
    const r = await this.execute<{ count: number; 'buf-b64': string; eof: boolean }>('guest-file-read', { handle, count }, options);
    return { data: Buffer.from(r['buf-b64'], 'base64'), eof: r.eof };
  }

  /** guest-file-write; resolves with the bytes written. */
  async fileWrite(handle: number, data: Buffer, options?: QgaCallOptions): Promise<number> {
    const r = await this.execute<{ count: number; eof: boolean }>('guest-file-write', { handle, 'buf-b64': data.toString('base64'), count: data.length }, options);
    return r.count;
  }

  /** guest-file-seek; whence 'set' | 'cur' | 'end'. Resolves with the new position. */
  async fileSeek(handle: number, offset: number, whence: 'set' | 'cur' | 'end' = 'set', options?: QgaCallOptions): Promise<number> {
    const r = await this.execute<{ position: number; eof: boolean }>('guest-file-seek', { handle, offset, whence }, options);
    return r.position;
  }

  async fileClose(handle: number, options?: QgaCallOptions): Promise<void> {
    await this.execute('guest-file-close', { handle }, options);
  }

  /** Reads a whole guest file (in 1 MiB chunks). */
  async readFile(path: string, options?: QgaCallOptions): Promise<Buffer> {
    const h = await this.fileOpen(path, 'r', options);
    try {
      const parts: Buffer[] = [];
      for (;;) {
        const { data, eof } = await this.fileRead(h, FILE_CHUNK, options);
        parts.push(data);
        if (eof || data.length === 0) break;
      }
      return Buffer.concat(parts);
    } finally {
      await this.fileClose(h, options);
    }
  }

  /** Writes (creates or truncates) a guest file, in 1 MiB chunks. */
  async writeFile(path: string, data: Buffer, options?: QgaCallOptions): Promise<void> {
    const h = await this.fileOpen(path, 'w', options);
    try {
      for (let pos = 0; pos < data.length; pos += FILE_CHUNK) {
        const part = data.subarray(pos, pos + FILE_CHUNK);
        const n = await this.fileWrite(h, part, options);
        if (n !== part.length) {
          throw new QgaError(`short write to guest file ${path} on ${this.#label}: ${n} of ${part.length} bytes at ${pos}`, 'command', { agent: this.#label, command: 'guest-file-write' });
        }
      }
      await this.execute('guest-file-flush', { handle: h }, options);
    } finally {
      await this.fileClose(h, options);
    }
  }

  /**
   * guest-shutdown. The agent sends no answer when it works (the guest goes down), so this
   * resolves once the command is sent and either the channel closes or a short wait passes; an
   * error answer fails it.
   */
  async shutdown(mode: 'powerdown' | 'reboot' | 'halt' = 'powerdown', options: QgaCallOptions = {}): Promise<void> {
    await this.#serialize(async () => {
      if (this.#needsSync) await this.#sync(options.timeoutMs ?? this.#timeoutMs);
      try {
        const msg = await this.#send('guest-shutdown', { mode }, 1000, true);
        if (msg.error) {
          const e = msg.error as { class?: string; desc?: string };
          throw new QgaError(`guest agent command guest-shutdown on ${this.#label} failed: ${e.desc ?? ''} (${e.class ?? ''})`, 'command', {
            agent: this.#label,
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
  async close(): Promise<void> {
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
      throw new QgaError(`cannot run ${command} on ${this.#label}: ${this.#failure.message}`, 'closed', { agent: this.#label, command, cause: this.#failure });
    }
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              this.#call = undefined;
              this.#needsSync = true;
              reject(
                new QgaError(`guest agent command ${command} on ${this.#label} got no answer within ${timeoutMs} ms`, 'timeout', {
                  agent: this.#label,
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
        log.warn({ agent: this.#label, line: line.slice(0, 200) }, 'guest agent sent a line that is not JSON; dropped');
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
    call?.reject(new QgaError(`guest agent command ${call.command} on ${this.#label} did not complete: ${err.message}`, 'closed', { agent: this.#label, command: call.command, cause: err }));
  }
}
