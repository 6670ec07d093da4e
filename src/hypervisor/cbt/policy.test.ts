import { describe, expect, it } from 'vitest';
import type { Checkpoint } from '../types.js';
import { describeChanges, planDiskChanges, type DiskChangeFacts } from './policy.js';

const prev: Checkpoint = {
  chainId: 'job1',
  name: 'bulwark-job1-3',
  sequence: 3,
  instance: 'pid-100@5000',
  disks: { vda: { size: 1 << 30 } },
  createdAt: '2026-01-01T00:00:00Z',
};
const base: DiskChangeFacts = {
  diskName: 'vda',
  virtualSize: 1 << 30,
  previous: prev,
  fullRequested: false,
  instance: 'pid-100@5000',
  bitmap: { present: true, inconsistent: false },
};

describe('planDiskChanges', () => {
  const cases: Array<[string, Partial<DiskChangeFacts>, string, boolean?]> = [
    ['usable bitmap', {}, 'bitmap'],
    ['full requested', { fullRequested: true }, 'full-requested', false],
    ['first backup', { previous: null }, 'no-checkpoint', false],
    // A run plan's full on a chain's first backup (executor: full: plan.kind === 'full') is not a request.
    ['first backup of a run planned as full', { previous: null, fullRequested: true, fullReason: 'no restore point yet' }, 'no-checkpoint', false],
    ['disk added', { diskName: 'vdb' }, 'disk-new', false],
    ['disk resized', { virtualSize: 2 << 30 }, 'disk-resized', true],
    ['bitmap deleted', { bitmap: { present: false } }, 'bitmap-missing', true],
    ['QEMU restarted, bitmap gone', { bitmap: { present: false }, instance: 'pid-200@9000' }, 'hypervisor-restarted', true],
    ['QEMU killed, bitmap inconsistent', { bitmap: { present: true, inconsistent: true }, instance: 'pid-200@9000' }, 'bitmap-inconsistent', true],
    ['QEMU restarted cleanly, bitmap saved', { instance: 'pid-200@9000' }, 'bitmap'],
  ];
  for (const [name, facts, expected, digests] of cases) {
    it(name, () => {
      const c = planDiskChanges({ ...base, ...facts });
      if (expected === 'bitmap') {
        expect(c).toEqual({ kind: 'bitmap', bitmap: 'bulwark-job1-3', context: 'qemu:dirty-bitmap:bulwark-job1-3' });
      } else {
        expect(c.kind).toBe('full');
        if (c.kind === 'full') {
          expect(c.reason).toBe(expected);
          expect(c.compareDigests).toBe(digests);
          expect(c.detail).toContain(facts.diskName ?? (c.reason === 'full-requested' || c.reason === 'no-checkpoint' ? '' : 'vda'));
        }
      }
    });
  }
});

describe('full read reasons in the session log', () => {
  it('the first backup says so, even when the run asked for a full', () => {
    const c = planDiskChanges({ ...base, previous: null, fullRequested: true, fullReason: 'no restore point yet' });
    expect(describeChanges('vda', c)).toBe('vda: full read (no-checkpoint: first backup of the chain)');
  });
  it('a requested full carries the reason it was asked for', () => {
    expect(describeChanges('vda', planDiskChanges({ ...base, fullRequested: true, fullReason: 'active full scheduled on sun' }))).toBe('vda: full read (full-requested: active full scheduled on sun)');
    expect(describeChanges('vda', planDiskChanges({ ...base, fullRequested: true }))).toBe('vda: full read (full-requested: an active full backup was requested)');
  });
});
