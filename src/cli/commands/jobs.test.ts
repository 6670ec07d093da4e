import { describe, expect, it } from 'vitest';
import { backupRunText } from './jobs.js';

const line = (message: string) => ({ time: '2026-11-26T13:00:00Z', level: 'info' as const, message });

describe('backupRunText (session show: what a job run backed up)', () => {
  it('the kind each run took, from its plan line, not whether --full was asked', () => {
    expect(backupRunText({ full: false, log: [line('Job demo started (manual)'), line('demo/vda: this run: full (no restore point yet)')] })).toBe('full');
    expect(backupRunText({ full: false, log: [line('demo/vda: this run: incremental (incremental on full point p1)')] })).toBe('incremental');
    expect(backupRunText({ full: true, log: [line('demo/vda: this run: full (a full backup was asked for)')] })).toBe('full (full requested)');
  });
  it('several VMs: each kind once, in order; synthetic full and reverse in words', () => {
    const log = [
      line('web/vda: this run: incremental (incremental on full point p1)'),
      line('web/vdb: this run: incremental (incremental on full point p1)'),
      line('db/vda: this run: full (no restore point yet)'),
      line('app/vda: this run: synthetic-full (synthetic full scheduled on sat)'),
      line('rev/vda: this run: reverse (reverse incremental: inject the changes into the full)'),
    ];
    expect(backupRunText({ full: false, log })).toBe('incremental; full; incremental, then synthetic full; reverse incremental');
  });
  it('nothing planned: undefined (shown as -), or that a full was requested', () => {
    expect(backupRunText({ full: false, log: [line('simulated: no data moved')] })).toBeUndefined();
    expect(backupRunText({ full: true, log: [] })).toBe('full requested');
  });
});
