import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import * as m from './magic.js';

const first = (name: string, n: number) => createHash('sha256').update(name).digest().subarray(0, n);

describe('magic numbers', () => {
  it('are the first bytes of SHA-256 of their versioned names', () => {
    expect(m.FULL_FILE_MAGIC).toEqual(first(m.MAGIC_NAMES.full, 8));
    expect(m.FORWARD_INCREMENT_MAGIC).toEqual(first(m.MAGIC_NAMES.forward, 8));
    expect(m.REVERSE_INCREMENT_MAGIC).toEqual(first(m.MAGIC_NAMES.reverse, 8));
    expect(m.INDEX_MAGIC).toEqual(first(m.MAGIC_NAMES.index, 8));
    expect(m.RECORD_MAGIC).toEqual(first(m.MAGIC_NAMES.record, 4));
    expect(m.CHAIN_METADATA_MAGIC).toEqual(first(m.MAGIC_NAMES.chainMetadata, 8));
  });
});
