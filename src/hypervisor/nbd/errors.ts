// Typed errors of the NBD client: every failure names the export, the option or command, the
// byte range where there is one, and carries the cause (a socket error, the server's message).
import { BulwarkError, type ErrorKind } from '../../common/errors.js';

/** Where an NBD failure happened; every field that is known is filled in. */
export interface NbdErrorContext {
  /** The export name as asked for (may be the empty default export). */
  export: string;
  /** The endpoint: a unix socket path or host:port. */
  endpoint: string;
  /** The handshake option (NBD_OPT_…) name, when the failure is in the handshake. */
  option?: string;
  /** The command (NBD_CMD_…) name, when the failure is in transmission. */
  command?: string;
  offset?: number;
  length?: number;
  /** The errno-like value from the server (NBD_EIO, …) or the option error (NBD_REP_ERR_…). */
  code?: number;
}

/**
 * Any failure of the NBD client. `nbdCode` is the server's error value when the server reported
 * one; `reason` says which kind of failure it is, so callers can react without parsing messages.
 */
export class NbdError extends BulwarkError {
  readonly reason: NbdErrorReason;
  readonly nbd: Readonly<NbdErrorContext>;

  constructor(
    message: string,
    reason: NbdErrorReason,
    nbd: NbdErrorContext,
    options: { cause?: unknown; hint?: string; kind?: ErrorKind } = {},
  ) {
    super(message, {
      kind: options.kind ?? kindOf(reason),
      context: { ...nbd },
      hint: options.hint,
      cause: options.cause,
    });
    this.name = 'NbdError';
    this.reason = reason;
    this.nbd = nbd;
  }
}

/**
 * connect: the socket could not be opened. handshake: the server broke the protocol or refused
 * an option. export: the export does not exist or was refused. command: the server answered a
 * command with an error. protocol: a reply did not follow the protocol. closed: the connection
 * ended (or was closed) with the request unanswered. timeout: no reply within the deadline.
 */
export type NbdErrorReason = 'connect' | 'handshake' | 'export' | 'command' | 'protocol' | 'closed' | 'timeout';

function kindOf(reason: NbdErrorReason): ErrorKind {
  switch (reason) {
    case 'connect':
    case 'closed':
    case 'timeout':
      return 'unavailable';
    case 'export':
      return 'not-found';
    case 'handshake':
    case 'command':
    case 'protocol':
      return 'internal';
  }
}
