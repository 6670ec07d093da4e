// Signatures this machine cannot create with real tools (no pvcreate, no mkntfs) are built by
// hand from their documented layout; real mkfs output is checked against blkid in test/restore/.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { detectFromBytes } from './fs-detect.js';

describe('detectFromBytes', () => {
  it('recognises an LVM2 physical volume label', () => {
    const b = Buffer.alloc(4096);
    b.write('LABELONE', 512, 'latin1');
    b.write('LVM2 001', 512 + 24, 'latin1');
    b.write('abcdefghijklmnopqrstuvwxyz012345', 512 + 32, 'latin1');
    expect(detectFromBytes(b)).toEqual({ type: 'lvm2-pv', uuid: 'abcdef-ghij-klmn-opqr-stuv-wxyz-012345' });
  });

  it('recognises an NTFS boot sector and gives its serial', () => {
    const b = Buffer.alloc(4096);
    b.write('NTFS    ', 3, 'latin1');
    b.writeBigUInt64LE(0x1234abcd5678ef01n, 0x48);
    b[510] = 0x55;
    b[511] = 0xaa;
    expect(detectFromBytes(b)).toEqual({ type: 'ntfs', uuid: '1234ABCD5678EF01' });
  });

  it('finds nothing in zeroes and never throws on random bytes', () => {
    expect(detectFromBytes(Buffer.alloc(70000))).toBeNull();
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 70000 }), (bytes) => {
        const r = detectFromBytes(Buffer.from(bytes));
        expect(r === null || typeof r.type === 'string').toBe(true);
      }),
      { numRuns: 100 },
    );
  });
});
