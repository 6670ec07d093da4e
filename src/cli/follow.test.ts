import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import type { Session } from '../server/services/model.js';
import { BarView, exitCodeOf, JsonView, PlainView, sessionSubject } from './follow.js';

const session = (state: Session['state'], percent: number, log: string[] = []): Session => ({
  id: 's1',
  jobName: 'nightly',
  jobId: 'j1',
  state,
  full: false,
  startedAt: '2026-11-25T10:00:00Z',
  ...(state === 'success' || state === 'failed' ? { endedAt: '2026-11-25T10:01:05Z' } : {}),
  progress: { percent, bytesRead: percent * 2 ** 20, bytesTransferred: 0, bytesStored: 0, processingRate: 3 * 2 ** 20 },
  tasks: [],
  log: log.map((message) => ({ time: '2026-11-25T10:00:01Z', level: 'info' as const, message })),
});

function buffer(): { out: string; err: string; output: { out(s: string): void; err(s: string): void } } {
  const b = { out: '', err: '', output: { out: (s: string) => (b.out += s), err: (s: string) => (b.err += s) } };
  return b;
}

describe('session views', () => {
  it('names what a session is about: the job of a job run or health check, the kind and VM of a restore', () => {
    const s = session('running', 0);
    expect([
      sessionSubject(s),
      sessionSubject({ ...s, kind: 'health-check' }),
      sessionSubject({ ...s, jobName: '', jobId: null, kind: 'restore-disk', vm: 'web1' }),
      sessionSubject({ ...s, jobName: '', jobId: null, kind: 'instant-recovery', vm: 'web1-ir' }),
      sessionSubject({ ...s, jobName: '', jobId: null, kind: 'restore-files' }),
    ]).toEqual(['job nightly', 'job nightly', 'restore-disk of web1', 'instant-recovery of web1-ir', 'restore-files']);
  });

  it('exit code: 0 for success and warning, 1 otherwise', () => {
    expect([exitCodeOf('success'), exitCodeOf('warning'), exitCodeOf('failed'), exitCodeOf('stopped'), exitCodeOf('running')]).toEqual([0, 0, 1, 1, 1]);
  });

  it('plain lines: state changes, new log lines once, every 10 %, then a summary', () => {
    const b = buffer();
    const v = new PlainView(b.output);
    v.update(session('running', 0, ['a']));
    v.update(session('running', 5, ['a']));
    v.update(session('running', 12, ['a', 'b']));
    v.finish(session('success', 100, ['a', 'b']));
    const lines = b.out.trimEnd().split('\n');
    expect(lines.filter((l) => l.endsWith('  a'))).toHaveLength(1);
    expect(lines.filter((l) => /%/.test(l)).map((l) => /(\d+)%/.exec(l)![1])).toEqual(['0', '12']);
    expect(lines.filter((l) => l.includes('): '))).toHaveLength(3); // running, success, summary
    expect(lines.at(-1)).toBe('session s1 (job nightly): success after 1m05s; read 100 MiB, transferred 0 B, stored 0 B');
  });

  it('a progress bar on a terminal, with rate and ETA; the summary on stdout', () => {
    let drawn = '';
    const tty = Object.assign(
      new Writable({
        write(chunk: Buffer, _enc, cb) {
          drawn += chunk.toString();
          cb();
        },
      }),
      { isTTY: true, columns: 120, cursorTo: () => true, clearLine: () => true, moveCursor: () => true, clearScreenDown: () => true },
    );
    const b = buffer();
    const v = new BarView(b.output, tty);
    v.update(session('running', 40, ['first line']));
    v.finish(session('success', 100, ['first line']));
    expect(drawn).toContain('first line');
    expect(drawn).toMatch(/success\s+\[[^\]]+\] 100% \| 3.00 MiB\/s \| ETA \S+ \| read 100 MiB/);
    expect(b.out).toContain('success after 1m05s');
  });

  it('--json: every update as a line with --follow, the last object with --wait', () => {
    const lines = buffer();
    const follow = new JsonView(lines.output, true);
    follow.update(session('running', 1));
    follow.finish(session('success', 100));
    expect(lines.out.trimEnd().split('\n').map((l) => (JSON.parse(l) as Session).state)).toEqual(['running', 'success']);
    const last = buffer();
    const wait = new JsonView(last.output, false);
    wait.update(session('running', 1));
    wait.finish(session('success', 100));
    expect((JSON.parse(last.out) as Session).state).toBe('success');
  });
});
