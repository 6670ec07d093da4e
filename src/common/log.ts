// Structured logs (pino). Every role logs JSON lines to stderr (or a file under the data
// directory); the level comes from BULWARK_LOG_LEVEL (default info; tests default to silent).
import { destination, pino, type Logger } from 'pino';

export type { Logger };

const defaultLevel = process.env.BULWARK_LOG_LEVEL ?? (process.env.VITEST ? 'silent' : 'info');

const root: Logger = pino({ level: defaultLevel, base: { pid: process.pid } }, destination(2));

/** A child logger for one module or role, e.g. `logger('repository')`. */
export function logger(component: string, bindings: Record<string, unknown> = {}): Logger {
  return root.child({ component, ...bindings });
}
