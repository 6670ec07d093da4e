import { describe, expect, it } from 'vitest';
import { BulwarkError, describeError } from './errors.js';

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
