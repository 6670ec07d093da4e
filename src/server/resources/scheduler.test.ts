import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { ResourceScheduler, SchedulerTaskSlots, type Lease } from './scheduler.js';
import type { TaskRequirements } from './task-slots.js';

const task = (id: string, jobId = 'job', vmHost = 'h1', repository = 'repo'): TaskRequirements => ({ taskId: id, jobId, repository, need: { vm: `vm-${id}`, disk: 'vda', vmHost } });
const flush = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('ResourceScheduler', () => {
  it('4 tasks on a proxy limited to 2 run 2 at a time, in queue order', async () => {
    const s = new ResourceScheduler({ proxies: [{ name: 'p1', host: 'h1', online: true, maxTasks: 2, reaches: [] }], repositories: [{ name: 'repo', maxTasks: 8 }] });
    const events: string[] = [];
    let running = 0;
    let maxRunning = 0;
    const leases = new Map<string, Lease>();
    const all = ['t1', 't2', 't3', 't4'].map((id) =>
      s.acquire(task(id)).then((lease) => {
        events.push(`start ${id}`);
        running++;
        maxRunning = Math.max(maxRunning, running);
        leases.set(id, lease);
      }),
    );
    await flush();
    expect(events).toEqual(['start t1', 'start t2']);
    expect(s.snapshot().queued).toEqual(['t3', 't4']);
    const end = (id: string): void => {
      events.push(`end ${id}`);
      running--;
      leases.get(id)!.release();
    };
    end('t2');
    await flush();
    end('t1');
    await flush();
    end('t3');
    end('t4');
    await Promise.all(all);
    expect(events).toEqual(['start t1', 'start t2', 'end t2', 'start t3', 'end t1', 'start t4', 'end t3', 'end t4']);
    expect(maxRunning).toBe(2);
    expect(s.snapshot()).toEqual({ running: [], queued: [] });
  });

  it('a lease carries its current share of the repository rate, updated as tasks come and go', async () => {
    const s = new ResourceScheduler({ proxies: [{ name: 'p1', host: 'h1', online: true, maxTasks: 4, reaches: [] }], repositories: [{ name: 'repo', maxTasks: 4, rateLimit: 300 }] });
    const a = await s.acquire(task('a'));
    expect(a.rateLimit()).toBe(300);
    const seen: Array<number | undefined> = [];
    a.watchRate((r) => seen.push(r));
    const b = await s.acquire(task('b'));
    const c = await s.acquire(task('c'));
    expect([a.rateLimit(), b.rateLimit(), c.rateLimit()]).toEqual([100, 100, 100]);
    c.release();
    c.release(); // a second release does nothing
    expect(a.rateLimit()).toBe(150);
    expect(seen).toEqual([150, 100, 150]);
    a.release();
    expect(b.rateLimit()).toBe(300);
    b.release();
  });

  it('rejects with reasons when no proxy can ever serve the task, and a stop while waiting', async () => {
    const s = new ResourceScheduler({ proxies: [{ name: 'p1', host: 'h1', online: true, maxTasks: 1, reaches: [] }], repositories: [{ name: 'repo', maxTasks: 8 }] });
    const err = await s.acquire(task('x', 'job', 'h9')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect((err as BulwarkError).kind).toBe('unavailable');
    expect((err as BulwarkError).message).toContain('proxy p1 is not on host h9');

    const first = await s.acquire(task('a'));
    const ctl = new AbortController();
    const waiting = s.acquire(task('b'), ctl.signal).catch((e: unknown) => e);
    ctl.abort(new Error('session stopped'));
    expect(await waiting).toBeInstanceOf(BulwarkError);
    expect(s.snapshot().queued).toEqual([]);
    first.release();
  });

  it('a proxy that comes online starts waiting tasks', async () => {
    const s = new ResourceScheduler({ proxies: [{ name: 'p1', host: 'h1', online: true, maxTasks: 1, reaches: [] }], repositories: [{ name: 'repo', maxTasks: 8 }] });
    const a = await s.acquire(task('a'));
    let bLease: Lease | undefined;
    const b = s.acquire({ ...task('b'), need: { ...task('b').need, storage: 'nfs' } }).then((l) => (bLease = l));
    await flush();
    expect(bLease).toBeUndefined();
    s.setProxies([
      { name: 'p1', host: 'h1', online: true, maxTasks: 1, reaches: [] },
      { name: 'p2', host: 'h2', online: true, maxTasks: 1, reaches: ['nfs'] },
    ]);
    await b;
    expect(bLease).toMatchObject({ proxy: 'p2', via: 'off-host' });
    a.release();
    bLease!.release();
  });

  it('serves the job engine through SchedulerTaskSlots', async () => {
    const s = new ResourceScheduler({ proxies: [{ name: 'agent-h1', host: 'h1', online: true, maxTasks: 1, reaches: [] }], repositories: [{ name: 'repo', maxTasks: 1 }] });
    const slots = new SchedulerTaskSlots(s);
    const lease = await slots.acquire({ sessionId: 's', taskId: 't', jobId: 'j', vm: 'vm1', disk: { name: 'vda', location: { host: 'h1' } }, repository: 'repo' }, new AbortController().signal);
    expect(lease.proxy).toBe('agent-h1');
    lease.release();
    expect(s.snapshot().running).toEqual([]);
  });

  it('a waiting task is told why, once per change of the reasons', async () => {
    const s = new ResourceScheduler({ proxies: [{ name: 'p1', host: 'h1', online: true, maxTasks: 1, reaches: [] }], repositories: [{ name: 'repo', maxTasks: 1 }] });
    const told: string[] = [];
    const first = await s.acquire(task('a'));
    const waiting = s.acquire(task('b'), undefined, (reasons) => told.push(reasons.join('; ')));
    s.setProxies([{ name: 'p1', host: 'h1', online: true, maxTasks: 2, reaches: [] }]);
    s.setProxies([{ name: 'p1', host: 'h1', online: true, maxTasks: 2, reaches: [] }]);
    expect(told).toEqual(['repository repo is at its task limit (1 of 1)']);
    first.release();
    (await waiting).release();
    expect(told).toHaveLength(1);
  });
});
