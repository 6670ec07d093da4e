// The QEMU guest agent's commands, whatever the channel: the agent's own socket (QgaClient,
// plain QEMU) or libvirt's `qemu-agent-command` (LibvirtGuestAgent, where libvirtd holds the
// socket). A channel only has to run one command and return its answer; everything else
// (exec with polling, file transfers in chunks) is built here once.
import { BulwarkError, type ErrorKind } from '../../common/errors.js';

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
export const FILE_CHUNK = 1024 * 1024;

/** The guest agent of one VM, reached through some channel. */
export abstract class GuestAgent {
  /** A name for messages (the VM name, or the socket path). */
  abstract readonly label: string;
  /** Deadline of each command unless the call gives another (ms; 0 = none). */
  abstract readonly timeoutMs: number;
  /** Largest guest-file-write this channel carries in one command (bytes of data). */
  readonly maxWriteBytes: number = FILE_CHUNK;

  /**
   * Runs an agent command and resolves with its `return` value. Fails with a `QgaError` naming
   * the command: reason 'command' (with the agent's class and description), 'timeout', 'closed'.
   */
  abstract execute<T = unknown>(command: string, args?: Record<string, unknown>, options?: QgaCallOptions): Promise<T>;

  /** Lets go of the channel. Idempotent. */
  abstract close(): Promise<void>;

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
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
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
        throw new QgaError(`guest process ${path} (pid ${pid}) on ${this.label} did not exit within ${timeoutMs} ms`, 'timeout', {
          agent: this.label,
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
      for (let pos = 0; pos < data.length; pos += this.maxWriteBytes) {
        const part = data.subarray(pos, pos + this.maxWriteBytes);
        const n = await this.fileWrite(h, part, options);
        if (n !== part.length) {
          throw new QgaError(`short write to guest file ${path} on ${this.label}: ${n} of ${part.length} bytes at ${pos}`, 'command', { agent: this.label, command: 'guest-file-write' });
        }
      }
      await this.execute('guest-file-flush', { handle: h }, options);
    } finally {
      await this.fileClose(h, options);
    }
  }
}
