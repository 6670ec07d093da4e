import { describe, expect, it } from 'vitest';
import { BulwarkError, describeError, errorKindOfStatus } from './errors.js';

describe('describeError', () => {
  it('joins the cause chain and the hint', () => {
    const err = new BulwarkError('cannot open repository "main"', {
      kind: 'unavailable',
      hint: 'check that the agent is running',
      cause: new Error('ECONNREFUSED 10.0.0.2:9393'),
    });
    expect(describeError(err)).toBe(
      'cannot open repository "main": ECONNREFUSED 10.0.0.2:9393 (check that the agent is running)',
    );
  });
  it('does not repeat a cause already quoted in the message', () => {
    const cause = new Error('disk full');
    expect(describeError(new Error('write failed: disk full', { cause }))).toBe('write failed: disk full');
  });
  it('describes non-errors', () => {
    expect(describeError('boom')).toBe('boom');
  });
});

describe('errorKindOfStatus', () => {
  it.each([
    [400, 'invalid'],
    [422, 'invalid'],
    [401, 'unauthorized'],
    [403, 'forbidden'],
    [404, 'not-found'],
    [409, 'conflict'],
    [502, 'unavailable'],
    [503, 'unavailable'],
    [504, 'unavailable'],
    [500, 'internal'],
    [418, 'internal'],
  ] as const)('%i is %s', (status, kind) => {
    expect(errorKindOfStatus(status)).toBe(kind);
  });
});
