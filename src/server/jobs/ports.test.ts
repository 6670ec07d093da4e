import { describe, expect, it } from 'vitest';
import { canTransition, isFinalState, runStates, type RunState } from './ports.js';

// Rows: from; columns in runStates order: queued running success warning failed stopped.
const sessionTable: Record<RunState, string> = {
  queued: '. R . . F S',
  running: '. . S W F S',
  success: '. . . . . .',
  warning: '. . . . . .',
  failed: '. . . . . .',
  stopped: '. . . . . .',
};
const taskTable: Record<RunState, string> = { ...sessionTable, success: '. . . . F .', warning: '. . . . F .', failed: 'Q . . . . .' };

describe('run state machine', () => {
  for (const [subject, table] of [['session', sessionTable], ['task', taskTable]] as const) {
    for (const from of runStates) {
      const row = table[from].split(' ');
      runStates.forEach((to, i) => {
        const legal = row[i] !== '.';
        it(`${subject}: ${from} -> ${to} is ${legal ? 'legal' : 'illegal'}`, () => {
          expect(canTransition(subject, from, to)).toBe(legal);
        });
      });
    }
  }

  it('knows which states are final', () => {
    expect(runStates.filter(isFinalState)).toEqual(['success', 'warning', 'failed', 'stopped']);
  });
});
