// `restore disk` progress lines (not a terminal): the session's id once, then a line at every new
// 10 % and at least every 5 s while the restore moves, never one per update; figures as text.
import { describe, expect, it } from 'vitest';
import type { Session } from '../../server/services/model.js';
import { restoreFigures, RestoreLines, restoreProgressText } from './restore.js';

const MiB = 1024 * 1024;

function session(state: Session['state'], done: number, size: number, rate: number): Session {
  return {
    id: 's1', jobName: '', jobId: null, state, full: false, startedAt: '2026-11-26T13:00:00Z', tasks: [], log: [], kind: 'restore-disk',
    progress: { percent: (done * 100) / size, bytesRead: done, bytesTransferred: 0, bytesStored: done, processingRate: rate },
  };
}

describe('restore disk progress lines', () => {
  it('print the session once, then every new 10 % or every 5 s while it moves', () => {
    let out = '';
    let now = Date.parse('2026-11-26T13:00:00Z');
    const view = new RestoreLines({ out: (s) => (out += s), err: () => undefined }, 'restore of disk vda', () => 1000 * MiB, { now: () => now });
    view.update(session('running', 0, 1000 * MiB, 0));
    // 200 updates of 0.5 MiB in 0.1 s steps (10 % = 100 MiB): 0 % to 10 % over 20 s.
    for (let i = 1; i <= 200; i++) {
      now += 100;
      view.update(session('running', i * 0.5 * MiB, 1000 * MiB, 5 * MiB));
    }
    // Then quickly to 95 %: one line per decile, not per update.
    for (let i = 1; i <= 850; i++) view.update(session('running', (100 + i) * MiB, 1000 * MiB, 50 * MiB));
    // 5 s on, it has moved since the 90 % line: a line; 5 s more with the same figures: none.
    now += 5_000;
    view.update(session('running', 950 * MiB, 1000 * MiB, 50 * MiB));
    now += 5_000;
    view.update(session('running', 950 * MiB, 1000 * MiB, 50 * MiB));
    view.update(session('success', 1000 * MiB, 1000 * MiB, 50 * MiB));
    const lines = out.trimEnd().split('\n');
    expect(lines[0]).toContain('restore of disk vda: session s1 (stop it with: bulwark session stop s1)');
    const progress = lines.slice(1);
    // 0 %: the first (0.5 MiB), then every 5 s (at 25, 50, 75 MiB), 10 % … 90 %, 95 % 5 s later.
    expect(progress.map((l) => /restoring {2}(\d+)%/.exec(l)?.[1])).toEqual(['0', '2', '5', '7', '10', '20', '30', '40', '50', '60', '70', '80', '90', '95']);
    expect(progress[0]).toMatch(/restoring {2}0% \(512 KiB of 1000 MiB\), 5\.00 MiB\/s, ETA 3m20s$/);
  });

  it('text: bytes of the total, rate and time left; no rate or ETA before one was measured', () => {
    expect(restoreProgressText(restoreFigures(session('running', 100 * MiB, 400 * MiB, 100 * MiB), 400 * MiB))).toBe('25% (100 MiB of 400 MiB), 100 MiB/s, ETA 3s');
    expect(restoreProgressText(restoreFigures(session('running', 4 * MiB, 400 * MiB, 0), undefined))).toBe('1% (4.00 MiB of 400 MiB), ETA -');
  });
});
