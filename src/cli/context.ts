// What every command needs: where to print, the environment, a client for the server named by
// the global options, and small helpers shared by the nouns (paths, option parsers).
import { InvalidArgumentError, type Command } from 'commander';
import { BulwarkError } from '../common/errors.js';
import { ApiClient, resolveServer } from './client.js';
import type { Output } from './output.js';
import type { Env } from './paths.js';

export interface GlobalOptions {
  server?: string;
  data?: string;
}

export interface CliContext {
  output: Output;
  env: Env;
  /** Whether standard output is a terminal (progress bars, prompts). */
  tty: boolean;
  /** How long a follow/wait keeps retrying a lost server (5 minutes; tests shorten it). */
  reconnectLimitMs: number;
  /** The exit code a command that finished without throwing asks for (0 unless it sets it). */
  exitCode: number;
}

/** The global options (`--server`, `--data`) wherever on the command line they were given. */
export function globals(cmd: Command): GlobalOptions {
  return cmd.optsWithGlobals<GlobalOptions>();
}

export async function clientFor(ctx: CliContext, cmd: Command): Promise<ApiClient> {
  const g = globals(cmd);
  return new ApiClient(await resolveServer({ server: g.server, data: g.data, env: ctx.env }));
}

/** `/jobs/` + an encoded name. */
export const at = (collection: string, name: string, ...rest: string[]): string =>
  [collection, encodeURIComponent(name), ...rest].join('/');

/** List replies are `{ items: [...] }`. */
export interface ItemList<T> {
  items: T[];
}

// ---- option parsers: a bad value is a usage error (exit 2) that names the option

export function positiveInt(name: string) {
  return (value: string): number => {
    if (!/^\d+$/.test(value) || Number(value) < 1) throw new InvalidArgumentError(`${name} must be a whole number of at least 1, not "${value}"`);
    return Number(value);
  };
}

export function nonNegativeInt(name: string) {
  return (value: string): number => {
    if (!/^\d+$/.test(value)) throw new InvalidArgumentError(`${name} must be a whole number, not "${value}"`);
    return Number(value);
  };
}

export function positiveNumber(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (value.trim() === '' || !Number.isFinite(n) || n <= 0) throw new InvalidArgumentError(`${name} must be a number above 0, not "${value}"`);
    return n;
  };
}

export function oneOf<T extends string>(name: string, values: readonly T[]) {
  return (value: string): T => {
    if (!(values as readonly string[]).includes(value)) throw new InvalidArgumentError(`${name} must be one of ${values.join(', ')}, not "${value}"`);
    return value as T;
  };
}

/** Repeatable / variadic option: `--vm a --vm b` and `--vm a b` both give [a, b]. */
export function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** "1M", "512K", "4MiB", "1048576" -> bytes. */
export function parseSize(name: string) {
  return (value: string): number => {
    const m = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(value.trim());
    if (!m) throw new InvalidArgumentError(`${name} must be a size such as 1M or 512K, not "${value}"`);
    const power = ['', 'k', 'm', 'g', 't'].indexOf(m[2]!.toLowerCase());
    return Number(m[1]) * 1024 ** power;
  };
}

/** An operation the user asked for that needs at least one of some options. */
export function nothingToDo(what: string, options: string): BulwarkError {
  return new BulwarkError(`${what}: nothing to change`, { kind: 'invalid', hint: `give at least one of ${options}` });
}
