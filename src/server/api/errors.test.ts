import { describe, expect, it } from 'vitest';
import { BulwarkError, type ErrorKind } from '../../common/errors.js';
import { errorBody, statusOf } from './errors.js';

describe('statusOf', () => {
  it.each<[ErrorKind, number]>([
    ['invalid', 400],
    ['unauthorized', 401],
    ['forbidden', 403],
    ['not-found', 404],
    ['conflict', 409],
    ['unavailable', 503],
    ['corrupt', 500],
    ['internal', 500],
  ])('%s -> %i', (kind, status) => expect(statusOf(kind)).toBe(status));
});

function validation(context: string, errors: Array<{ instancePath: string; keyword: string; message?: string; params: Record<string, unknown> }>) {
  return Object.assign(new Error('validation'), { validation: errors, validationContext: context, statusCode: 400 });
}

describe('errorBody', () => {
  it('keeps kind, message, hint and the field of a BulwarkError', () => {
    const e = new BulwarkError('vms: name at least one VM', { kind: 'invalid', context: { field: 'vms' }, hint: 'add --vm' });
    expect(errorBody(e)).toEqual({ status: 400, body: { error: { kind: 'invalid', message: 'vms: name at least one VM', hint: 'add --vm', field: 'vms' } } });
  });

  it.each([
    ['a nested type error', [{ instancePath: '/retries/count', keyword: 'type', message: 'must be integer', params: {} }], 'retries.count', 'retries.count: must be integer'],
    ['a missing property', [{ instancePath: '', keyword: 'required', message: "must have required property 'vms'", params: { missingProperty: 'vms' } }], 'vms', 'vms: is required'],
    ['an unknown property', [{ instancePath: '', keyword: 'additionalProperties', params: { additionalProperty: 'colour' } }], 'colour', 'colour: is not a known field'],
    [
      'a union of literals',
      [
        { instancePath: '/method', keyword: 'const', params: { allowedValue: 'forward' } },
        { instancePath: '/method', keyword: 'const', params: { allowedValue: 'reverse' } },
        { instancePath: '/method', keyword: 'anyOf', params: {} },
      ],
      'method',
      'method: must be one of "forward", "reverse"',
    ],
    ['the whole body', [{ instancePath: '', keyword: 'type', message: 'must be object', params: {} }], 'body', 'body: must be object'],
  ])('names the field of %s', (_what, errors, field, message) => {
    const { status, body } = errorBody(validation('body', errors));
    expect(status).toBe(400);
    expect(body.error).toEqual({ kind: 'invalid', field, message });
  });

  it('a query-string error names the parameter', () => {
    const { body } = errorBody(validation('querystring', [{ instancePath: '/limit', keyword: 'minimum', message: 'must be >= 1', params: {} }]));
    expect(body.error.field).toBe('limit');
  });

  it('anything else is an internal error with the cause chain', () => {
    const { status, body } = errorBody(new Error('outer', { cause: new Error('inner') }));
    expect(status).toBe(500);
    expect(body.error).toEqual({ kind: 'internal', message: 'outer: inner' });
  });
});
