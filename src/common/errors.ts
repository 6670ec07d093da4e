// Errors that carry what a user needs: what failed, on which object, why (cause), and what to do.
// The API edge maps `kind` to an HTTP status; the console maps it to an exit code.

/** What kind of failure this is, in terms the API edge and the console can act on. */
export type ErrorKind =
  | 'invalid' // bad input: 400 / exit 2
  | 'unauthorized' // 401
  | 'forbidden' // 403
  | 'not-found' // 404
  | 'conflict' // stale edit, refused delete, duplicate name: 409
  | 'unavailable' // a peer (agent, hypervisor, database) cannot be reached: 503
  | 'corrupt' // stored data failed a check
  | 'internal';

export interface BulwarkErrorOptions {
  kind?: ErrorKind;
  /** The objects involved: vm, disk, file, block, repository, job… */
  context?: Record<string, string | number | boolean | undefined>;
  /** What the user should do next. */
  hint?: string;
  cause?: unknown;
}

export class BulwarkError extends Error {
  readonly kind: ErrorKind;
  readonly context: Readonly<Record<string, string | number | boolean | undefined>>;
  readonly hint: string | undefined;

  constructor(message: string, options: BulwarkErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'BulwarkError';
    this.kind = options.kind ?? 'internal';
    this.context = options.context ?? {};
    this.hint = options.hint;
  }
}

/**
 * The kind of an HTTP error status from a Bulwark server: the inverse of the API edge's mapping,
 * for clients (console, agent) that got a status without a readable error body.
 */
export function errorKindOfStatus(status: number): ErrorKind {
  switch (status) {
    case 400:
    case 422:
      return 'invalid';
    case 401:
      return 'unauthorized';
    case 403:
      return 'forbidden';
    case 404:
      return 'not-found';
    case 409:
      return 'conflict';
    case 502:
    case 503:
    case 504:
      return 'unavailable';
    default:
      return 'internal';
  }
}

/** The message of any thrown value, with the chain of causes, for logs and console output. */
export function describeError(err: unknown): string {
  const parts: string[] = [];
  let cur: unknown = err;
  for (let depth = 0; cur !== undefined && cur !== null && depth < 8; depth++) {
    if (cur instanceof Error) {
      parts.push(cur.message);
      cur = cur.cause;
    } else {
      parts.push(typeof cur === 'string' ? cur : JSON.stringify(cur));
      break;
    }
  }
  const text = parts.filter((p, i) => i === 0 || !parts[0]!.includes(p)).join(': ');
  const hint = err instanceof BulwarkError && err.hint ? ` (${err.hint})` : '';
  return text + hint;
}

/** Exhaustiveness guard for switches over unions. */
export function assertNever(value: never, what = 'value'): never {
  throw new BulwarkError(`unexpected ${what}: ${JSON.stringify(value)}`);
}
