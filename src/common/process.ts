// One way to run an external tool (qemu-img, virsh, xfs_io, pg_dump, losetup, …): no shell, a
// deadline, bounded output, and a failure that says what was being done, with the tool's own
// words (its stderr) in the message and the command line in the context.
import { execFile } from 'node:child_process';
import { BulwarkError, type ErrorKind } from './errors.js';

export interface RunToolOptions {
  /** Deadline; the tool is killed (SIGTERM) when it passes. Default 10 minutes. */
  readonly timeoutMs?: number;
  /** Environment of the tool (default: this process's). */
  readonly env?: NodeJS.ProcessEnv;
  /** Largest stdout kept (default 64 MiB); more fails the call. */
  readonly maxBuffer?: number;
  /** Context added to the error (file, vm, disk …). */
  readonly context?: Readonly<Record<string, string | number | boolean | undefined>>;
  /** Error kind of a failure (default: from the tool's words, else `internal`). */
  readonly kind?: ErrorKind;
  /** What the user can do when it fails. */
  readonly hint?: string;
}

/** A tool that failed: its stderr (trimmed), exit code, and whether the deadline killed it. */
export class ToolError extends BulwarkError {
  readonly stderr: string;
  readonly exitCode: number | null;
  readonly timedOut: boolean;
  constructor(message: string, details: { stderr: string; exitCode: number | null; timedOut: boolean; kind: ErrorKind; context: Record<string, string | number | boolean | undefined>; hint?: string | undefined; cause: unknown }) {
    super(message, { kind: details.kind, context: details.context, hint: details.hint, cause: details.cause });
    this.name = 'ToolError';
    this.stderr = details.stderr;
    this.exitCode = details.exitCode;
    this.timedOut = details.timedOut;
  }
}

function kindOf(stderr: string, code: string | undefined): ErrorKind {
  if (code === 'ENOENT') return 'unavailable';
  if (/no such file|not found|does not exist/i.test(stderr)) return 'not-found';
  if (/permission denied|operation not permitted/i.test(stderr)) return 'forbidden';
  return 'internal';
}

/**
 * Runs `cmd args…` and resolves with its stdout. `what` names the action for the error message
 * ("qemu-img convert of /x/y.raw"); a failure rejects with a {@link ToolError}.
 */
export async function runTool(cmd: string, args: readonly string[], what: string, opts: RunToolOptions = {}): Promise<string> {
  const timeoutMs = opts.timeoutMs ?? 600_000;
  return new Promise((resolve, reject) => {
    execFile(cmd, [...args], { timeout: timeoutMs, maxBuffer: opts.maxBuffer ?? 64 << 20, env: opts.env, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (!err) {
        resolve(stdout);
        return;
      }
      const e = err as NodeJS.ErrnoException & { killed?: boolean; code?: string | number | null };
      const words = stderr.trim();
      const timedOut = e.killed === true && typeof e.code !== 'number';
      const errno = typeof e.code === 'string' ? e.code : undefined;
      const reason = timedOut ? `no answer within ${timeoutMs} ms` : errno === 'ENOENT' ? `${cmd} is not installed` : words || e.message;
      reject(
        new ToolError(`${what} failed: ${reason}`, {
          stderr: words,
          exitCode: typeof e.code === 'number' ? e.code : null,
          timedOut,
          kind: opts.kind ?? kindOf(words, errno),
          context: { ...opts.context, command: [cmd, ...args].join(' ') },
          hint: opts.hint ?? (errno === 'ENOENT' ? `install ${cmd} (scripts/setup.sh installs what Bulwark needs)` : undefined),
          cause: err,
        }),
      );
    });
  });
}
