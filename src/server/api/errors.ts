// The API edge of errors: BulwarkError kinds become HTTP status codes and the documented body
// `{ error: { kind, message, hint?, field? } }`; schema validation errors name the field.
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { BulwarkError, describeError, type ErrorKind } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';

export function statusOf(kind: ErrorKind): number {
  switch (kind) {
    case 'invalid':
      return 400;
    case 'unauthorized':
      return 401;
    case 'forbidden':
      return 403;
    case 'not-found':
      return 404;
    case 'conflict':
      return 409;
    case 'unavailable':
      return 503;
    case 'corrupt':
    case 'internal':
      return 500;
  }
}

export interface ErrorBodyT {
  error: { kind: string; message: string; hint?: string; field?: string };
}

interface AjvError {
  instancePath: string;
  keyword: string;
  message?: string;
  params: Record<string, unknown>;
}

/** `/retention/points` + missing `days` -> `retention.points` / `retention.days`. */
function fieldOf(e: AjvError, context: string | undefined): string {
  const path = e.instancePath.split('/').filter(Boolean);
  const extra = e.params.missingProperty ?? e.params.additionalProperty;
  if (typeof extra === 'string') path.push(extra);
  const base = path.join('.');
  if (base) return base;
  return context === 'querystring' ? 'query' : (context ?? 'body');
}

function validationBody(err: FastifyError): ErrorBodyT {
  const errors = (err.validation ?? []) as AjvError[];
  // anyOf/oneOf produce one error per branch plus a summary; the first specific one reads best.
  const first = errors.find((e) => e.keyword !== 'anyOf' && e.keyword !== 'oneOf') ?? errors[0];
  if (!first) return { error: { kind: 'invalid', message: err.message } };
  const field = fieldOf(first, err.validationContext);
  let message = first.message ?? 'is not valid';
  if (first.keyword === 'required') message = 'is required';
  if (first.keyword === 'additionalProperties') message = 'is not a known field';
  if (first.keyword === 'enum' || first.keyword === 'const') {
    const allowed = errors.filter((e) => e.instancePath === first.instancePath && (e.keyword === 'const' || e.keyword === 'enum'));
    const values = allowed.flatMap((e) => (e.params.allowedValue !== undefined ? [JSON.stringify(e.params.allowedValue)] : []));
    if (values.length > 0) message = `must be one of ${values.join(', ')}`;
  }
  return { error: { kind: 'invalid', message: `${field}: ${message}`, field } };
}

export function errorBody(err: unknown): { status: number; body: ErrorBodyT } {
  if (err instanceof BulwarkError) {
    const field = typeof err.context.field === 'string' ? err.context.field : undefined;
    return {
      status: statusOf(err.kind),
      body: { error: { kind: err.kind, message: err.message, ...(err.hint ? { hint: err.hint } : {}), ...(field ? { field } : {}) } },
    };
  }
  const fe = err as FastifyError;
  if (fe && typeof fe === 'object' && Array.isArray(fe.validation)) return { status: 400, body: validationBody(fe) };
  if (fe && typeof fe === 'object' && typeof fe.statusCode === 'number' && fe.statusCode < 500) {
    const kind: ErrorKind = fe.statusCode === 404 ? 'not-found' : fe.statusCode === 401 ? 'unauthorized' : 'invalid';
    return { status: fe.statusCode, body: { error: { kind, message: fe.message } } };
  }
  return { status: 500, body: { error: { kind: 'internal', message: describeError(err) } } };
}

export function makeErrorHandler(log: Logger) {
  return (err: unknown, req: FastifyRequest, reply: FastifyReply): void => {
    const { status, body } = errorBody(err);
    if (status >= 500) log.error({ err, url: req.url, method: req.method }, 'request failed');
    void reply.status(status).send(body);
  };
}
