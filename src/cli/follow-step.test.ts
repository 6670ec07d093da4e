// The console shows a running maintenance step (merge, synthetic-full, compact, inject,
// health-check) while a job runs: `job run --wait` / `session show --follow` print a line when
// a step starts and every 10 % of it (the bar on a terminal carries runningStep's text);
// `session show` names it.
import { expect, it } from 'vitest';
import type { Session } from '../server/services/model.js';
import { PlainView, runningStep, stepText } from './follow.js';

const MiB = 2 ** 20;
type Step = NonNullable<Session['tasks'][number]['progress']['step']>;

const session = (state: Session['state'], step?: Step, taskState: Session['state'] = 'running'): Session => ({
  id: 's1',
  jobName: 'nightly',
  jobId: 'j1',
  state,
  full: false,
  startedAt: '2026-11-25T10:00:00Z',
  ...(state === 'success' ? { endedAt: '2026-11-25T10:01:05Z' } : {}),
  progress: { percent: 99, bytesRead: 99 * MiB, bytesTransferred: 0, bytesStored: 0, processingRate: MiB },
  tasks: [
    { id: 't0', vm: 'db1', disk: 'vda', state: 'success', progress: { percent: 100, bytesRead: MiB, bytesTransferred: MiB, bytesStored: MiB, processingRate: 0 } },
    { id: 't1', vm: 'web1', disk: 'vda', state: taskState, progress: { percent: 100, bytesRead: MiB, bytesTransferred: MiB, bytesStored: MiB, processingRate: 0, ...(step ? { step } : {}) } },
  ],
  log: [],
});

it('step text: name, percent of the step, bytes done of total', () => {
  expect(stepText({ name: 'merge', bytesDone: 1536 * MiB, bytesTotal: 4096 * MiB })).toBe('merge 37% (1.50 GiB of 4.00 GiB)');
  expect(stepText({ name: 'compact', bytesDone: 0, bytesTotal: 0 })).toBe('compact 100% (0 B of 0 B)');
});

it('the running step is a running task\'s; a finished task\'s last step is not running', () => {
  expect(runningStep(session('running', { name: 'synthetic-full', bytesDone: MiB, bytesTotal: 4 * MiB }))).toEqual({
    key: 't1:synthetic-full', percent: 25, text: 'VM web1: synthetic-full 25% (1.00 MiB of 4.00 MiB)',
  });
  expect(runningStep(session('running', { name: 'merge', bytesDone: MiB, bytesTotal: MiB }, 'success'))).toBeUndefined();
  expect(runningStep(session('running'))).toBeUndefined();
});

it('plain lines: a line when a step starts (also the next of the same name) and every 10 % of it, none once the session ended', () => {
  const b = { out: '', output: { out: (s: string) => (b.out += s), err: () => undefined } };
  const v = new PlainView(b.output);
  const merge = (done: number): Step => ({ name: 'merge', bytesDone: done * MiB, bytesTotal: 100 * MiB });
  for (const done of [0, 5, 12, 19, 57, 100, 0, 3]) v.update(session('running', merge(done)));
  v.update(session('running', { name: 'compact', bytesDone: 0, bytesTotal: 10 * MiB }));
  v.finish(session('success', { name: 'compact', bytesDone: 10 * MiB, bytesTotal: 10 * MiB }, 'success'));
  const steps = b.out.split('\n').filter((l) => l.includes('maintenance  '));
  expect(steps.map((l) => l.replace(/^.*maintenance {2}/, ''))).toEqual([
    'VM web1: merge 0% (0 B of 100 MiB)',
    'VM web1: merge 12% (12.0 MiB of 100 MiB)',
    'VM web1: merge 57% (57.0 MiB of 100 MiB)',
    'VM web1: merge 100% (100 MiB of 100 MiB)',
    'VM web1: merge 0% (0 B of 100 MiB)', // a second merge
    'VM web1: compact 0% (0 B of 10.0 MiB)',
  ]);
});
