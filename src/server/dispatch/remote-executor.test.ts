// The server's side of a backup into a repository on another agent, with scripted agents on the
// broker (the real agents are tested in test/multihost): what the repository agent's plan makes
// of the source task, the chain steps' results reaching the catalog, health-check sessions as a
// task on the repository agent, and excluded disks getting no task.
import { describe, expect, it } from 'vitest';
import { vmSliceId, type RestorePointInfo } from '../../repository/index.js';
import type { AgentTask, PollReply, TaskEvent } from '../../transport/agent-tasks.js';
import type { JobDefinition, LogLevel, TaskContext, TaskSpec } from '../jobs/ports.js';
import { AgentTaskBroker } from './broker.js';
import { RemoteDataPathExecutor, type RemoteDataPathOptions } from './remote-executor.js';

const never = new Promise<void>(() => undefined);
const wirePoint = (id: string, kind: string) => ({
  id, job: 'j', vm: 'web1', chainId: 'c1', method: 'reverse', kind, time: '2026-11-25T20:00:00.000Z', file: `/repo/j/web1/${id}.vbk`, fileBytes: 10, base: null,
  disks: [{ name: 'vda', size: 4096 }], blockSize: 262144, compression: 'zstd', encrypted: false,
});

function setup(settings: Record<string, unknown>, repositoryAgent = 'repo1', extra: Partial<RemoteDataPathOptions> = {}) {
  const broker = new AgentTaskBroker({ pollWaitMs: 5000 });
  const synced: RestorePointInfo[][] = [];
  const recorded: string[] = [];
  const skipped: string[] = [];
  const executor = new RemoteDataPathExecutor({
    broker,
    local: {
      execute: () => Promise.reject(new Error('not local')),
      resolveDisks: () => Promise.reject(new Error('not local')),
      taskSkipped: (task, reason) => void skipped.push(`${task.vm}/${task.disk.name}: ${reason}`),
    },
    hosts: async () => [{ name: 'kvm-a', agent: 'src1', connection: { kind: 'qemu', qmpGlob: '/run/*.qmp' } }],
    repository: async () => ({ name: 'remote-repo', path: '/repo', agent: repositoryAgent }),
    onRestorePoint: async (_job, _task, summary) => void recorded.push(summary.pointId),
    onVmPoints: async (_job, _task, points) => void synced.push([...points]),
    now: () => new Date('2026-11-25T21:00:00Z'),
    ...extra,
  });
  const job: JobDefinition = { id: 'j-id', name: 'j', vms: ['web1'], repository: 'remote-repo', retry: { count: 0, waitSeconds: 0 }, settings };
  const task: TaskSpec = { sessionId: 's1', taskId: 't1', job, vm: 'web1', disk: { name: 'vda', location: { agent: 'src1' } }, full: false, attempt: 1 };
  const lines: string[] = [];
  const context: TaskContext = { signal: new AbortController().signal, progress: () => undefined, log: (level: LogLevel, m: string) => lines.push(`${level}: ${m}`) };
  /** The next task the agent is given. */
  const next = async (agent: string): Promise<AgentTask> => {
    const reply: PollReply = await broker.poll(agent, { bootId: `boot-${agent}`, running: [] }, never);
    expect(reply.tasks).toHaveLength(1);
    return reply.tasks[0]!;
  };
  const send = (agent: string, taskId: string, ...events: TaskEvent[]) => broker.events(agent, taskId, events);
  return { broker, executor, task, context, lines, synced, recorded, skipped, next, send };
}

describe('RemoteDataPathExecutor with chain steps on the repository agent', () => {
  it('hands the repository agent settings and time, the source agent its plan; the catalog follows the points it reports', async () => {
    const t = setup({ method: 'reverse', retention: { points: 2 }, excludeDisks: ['vdb'] });
    try {
      const outcome = t.executor.execute(t.task, t.context);
      const target = await t.next('repo1');
      expect(target).toMatchObject({ kind: 'backup-target', job: 'j', vm: 'web1', fullRequested: false, now: '2026-11-25T21:00:00.000Z', settings: { method: 'reverse', retention: { points: 2 } } });
      t.send('repo1', target.taskId, { type: 'log', level: 'info', message: 'this run: reverse (reverse injection)' }, {
        type: 'ready', port: 9393, host: '10.0.0.3', previous: null,
        plan: { kind: 'reverse', reason: 'reverse injection', chainMethod: 'reverse', parent: 'p1', repair: [{ disk: 'vda', blocks: [3, 7] }] },
      });
      const source = await t.next('src1');
      expect(source).toMatchObject({ kind: 'backup-source', full: false, chainMethod: 'reverse', repair: [{ disk: 'vda', blocks: [3, 7] }], excludeDisks: ['vdb'], target: { host: '10.0.0.3', port: 9393 } });
      expect(source).not.toHaveProperty('fullReason');
      const summary = { pointId: 'p2', point: wirePoint('p2', 'incremental'), kind: 'incremental', warnings: [], consistency: 'application', disks: [{ name: 'vda', bytesRead: 10, bytesStored: 5 }] };
      t.send('src1', source.taskId, { type: 'result', ok: true, value: summary });
      t.send('repo1', target.taskId, { type: 'log', level: 'info', message: 'retention: deleted reverse point p0: outside retention' }, {
        type: 'result', ok: true,
        value: { point: wirePoint('p2', 'full'), disks: [{ name: 'vda', storedBytes: 4, storedBlocks: 1, unchangedBlocks: 0 }], points: [wirePoint('p1', 'reverse'), wirePoint('p2', 'full')], warnings: ['compact full failed: disk full (the new restore point p2 is kept)'] },
      });
      await expect(outcome).resolves.toEqual({ state: 'warning', messages: ['compact full failed: disk full (the new restore point p2 is kept)'] });
      expect(t.recorded).toEqual(['p2']);
      expect(t.synced.map((ps) => ps.map((p) => `${p.id}:${p.kind}`))).toEqual([['p1:reverse', 'p2:full']]);
      expect(t.lines.join('\n')).toMatch(/this run: reverse[\s\S]*retention: deleted reverse point p0/);
    } finally {
      t.broker.close();
    }
  });

  it('a source agent whose summary has another shape fails the task naming the agent, the VM and the field', async () => {
    const t = setup({ method: 'forever-forward', retention: { points: 3 } });
    try {
      const outcome = t.executor.execute(t.task, t.context);
      const target = await t.next('repo1');
      t.send('repo1', target.taskId, { type: 'ready', port: 9393, host: '10.0.0.3', previous: null, plan: { kind: 'full', reason: 'first', chainMethod: 'forward', parent: null, repair: [] } });
      const source = await t.next('src1');
      // An older agent: no warnings list.
      t.send('src1', source.taskId, { type: 'result', ok: true, value: { pointId: 'p2', point: wirePoint('p2', 'full'), disks: [{ name: 'vda', bytesRead: 10, bytesStored: 5 }] } });
      t.send('repo1', target.taskId, { type: 'result', ok: true, value: { point: wirePoint('p2', 'full'), disks: [] } });
      await expect(outcome).rejects.toThrow(/agent src1 reported the backup of VM web1 without a valid warnings/);
      expect(t.recorded).toEqual([]);
    } finally {
      t.broker.close();
    }
  });

  it('sends over 5 parallel streams, or 1 when the job turns multithreaded transfer off', async () => {
    for (const [settings, streams] of [[{}, 5], [{ multithreadedTransfer: true }, 5], [{ multithreadedTransfer: false }, 1]] as const) {
      const t = setup({ method: 'forever-forward', retention: { points: 3 }, ...settings });
      try {
        const outcome = t.executor.execute(t.task, t.context);
        const target = await t.next('repo1');
        t.send('repo1', target.taskId, {
          type: 'ready', port: 9393, host: '10.0.0.3', previous: null,
          plan: { kind: 'full', reason: 'first backup', chainMethod: 'forward', parent: null, repair: [] },
        });
        const source = await t.next('src1');
        // A planned full tells the source why (its disks' full-read lines say it).
        expect(source, JSON.stringify(settings)).toMatchObject({ kind: 'backup-source', streams, full: true, fullReason: 'first backup' });
        t.broker.close();
        await outcome.catch(() => undefined);
      } finally {
        t.broker.close();
      }
    }
  });

  it('a throttling rule covers a repository agent that advertises its data listener by name (--data-advertise)', async () => {
    const rules = [
      { name: 'wan', source: '127.0.0.1', target: '127.0.0.1, ::1', mbps: 8 },
      { name: 'elsewhere', source: '127.0.0.1', target: '10.9.0.0/16', mbps: 1 },
    ];
    const t = setup({ method: 'forever-forward', retention: { points: 3 } }, 'repo1', { throttling: async () => ({ rules, timeZone: 'UTC' }) });
    try {
      const outcome = t.executor.execute(t.task, t.context);
      const target = await t.next('repo1');
      t.send('repo1', target.taskId, { type: 'ready', port: 9393, host: 'localhost', previous: null });
      const source = await t.next('src1');
      expect(source).toMatchObject({ kind: 'backup-source', target: { host: 'localhost' }, limits: [{ name: 'rule:wan', bytesPerSecond: 1e6 }] });
      t.broker.close();
      await outcome.catch(() => undefined);
    } finally {
      t.broker.close();
    }
  });

  it('a throttling rule holds in total when several agents send under it: each agent gets the rule\'s rate in proportion to its transfers', async () => {
    const rules = [{ name: 'wan', source: '127.0.0.1', target: '10.0.0.3', mbps: 8 }];
    const t = setup({ method: 'forever-forward', retention: { points: 3 } }, 'repo1', { throttling: async () => ({ rules, timeZone: 'UTC' }) });
    const settle = () => new Promise((r) => setTimeout(r, 20));
    const limitsOf = (agent: string, taskId: string) => t.send(agent, taskId, { type: 'progress', progress: {} }).limits;
    try {
      const a = t.executor.execute(t.task, t.context);
      a.catch(() => undefined);
      const ta = await t.next('repo1');
      t.send('repo1', ta.taskId, { type: 'ready', port: 9393, host: '10.0.0.3', previous: null });
      const sa = await t.next('src1');
      expect(sa).toMatchObject({ kind: 'backup-source', limits: [{ name: 'rule:wan', bytesPerSecond: 1e6 }] });
      // Another job's VM on a host of agent src2, into the same repository agent: the same rule covers it.
      const other: TaskSpec = { ...t.task, sessionId: 's2', taskId: 't9', vm: 'db1', disk: { name: 'vda', location: { agent: 'src2' } } };
      const b = t.executor.execute(other, t.context);
      const tb = await t.next('repo1');
      t.send('repo1', tb.taskId, { type: 'ready', port: 9393, host: '10.0.0.3', previous: null });
      const sb = await t.next('src2');
      expect(sb).toMatchObject({ kind: 'backup-source', vm: 'db1', limits: [{ name: 'rule:wan', bytesPerSecond: 0.5e6 }] });
      await settle();
      expect(limitsOf('src1', sa.taskId)).toEqual([{ name: 'rule:wan', bytesPerSecond: 0.5e6 }]);
      // src2's transfer ends: src1 has the whole rule again.
      t.send('src2', sb.taskId, { type: 'result', ok: false, error: { kind: 'internal', message: 'disk vda: NBD export gone' } });
      await expect(b).rejects.toThrow(/NBD export gone/);
      await settle();
      expect(limitsOf('src1', sa.taskId)).toEqual([{ name: 'rule:wan', bytesPerSecond: 1e6 }]);
    } finally {
      t.broker.close();
    }
  });

  it('a health-check session is one health-check task on the repository agent', async () => {
    const t = setup({ operation: 'health-check', wholeChain: true });
    try {
      const outcome = t.executor.execute(t.task, t.context);
      const check = await t.next('repo1');
      expect(check).toMatchObject({ kind: 'health-check', repositoryPath: '/repo', job: 'j', vm: 'web1', settings: { operation: 'health-check', wholeChain: true } });
      t.send('repo1', check.taskId, { type: 'log', level: 'error', message: 'health check: damaged block 3 of disk vda' }, {
        type: 'result', ok: true, value: { warnings: ['health check of VM web1 found 1 damaged block(s)'], disks: ['vda'], points: [wirePoint('p1', 'full')] },
      });
      await expect(outcome).resolves.toEqual({ state: 'warning', messages: ['health check of VM web1 found 1 damaged block(s)'] });
      expect(t.lines.join('\n')).toMatch(/checking VM web1 in repository remote-repo on its agent repo1[\s\S]*error: health check: damaged block 3 of disk vda/);
      expect(t.synced).toHaveLength(1);
    } finally {
      t.broker.close();
    }
  });

  it('a skipped task reaches the in-process path only when the task would run there', async () => {
    const remote = setup({});
    const local = setup({}, 'local');
    try {
      remote.executor.taskSkipped(remote.task, 'stopped');
      // A health check of the server's own repository runs in process whatever the VM's host.
      const check = { ...local.task, job: { ...local.task.job, settings: { operation: 'health-check' } } };
      local.executor.taskSkipped(check, 'no slot');
      await new Promise((r) => setTimeout(r, 10));
      expect(remote.skipped).toEqual([]);
      expect(local.skipped).toEqual(['web1/vda: no slot']);
    } finally {
      remote.broker.close();
      local.broker.close();
    }
  });

  it('one task per disk: each disk goes when its task runs, a disk done early ends its task, the last one reports the point; a skipped disk fails the run', async () => {
    const t = setup({ method: 'forever-forward', retention: { points: 3 } });
    try {
      const vda = { ...t.task, vmDisks: ['vda', 'vdb'] };
      const vdb = { ...vda, taskId: 't2', disk: { name: 'vdb', location: { agent: 'src1' } } };
      const lines2: string[] = [];
      const ctx2: TaskContext = { ...t.context, log: (level: LogLevel, m: string) => lines2.push(`${level}: ${m}`) };
      const first = t.executor.execute(vda, t.context);
      const target = await t.next('repo1');
      t.send('repo1', target.taskId, { type: 'ready', port: 9393, host: '10.0.0.3', previous: null });
      const source = await t.next('src1');
      expect(source).toMatchObject({ kind: 'backup-source', diskTasks: ['vda', 'vdb'] });
      // Only vda's task runs so far: the source agent hears that vda may go.
      expect(t.send('src1', source.taskId, { type: 'log', level: 'info', message: 'view taken' }).disks).toEqual(['vda']);
      const second = t.executor.execute(vdb, ctx2);
      await new Promise((r) => setTimeout(r, 10));
      expect(t.send('src1', source.taskId, { type: 'progress', progress: {} }).disks).toEqual(['vda', 'vdb']);
      const disk = (done: boolean, read: number) => ({ bytesProcessed: read, bytesRead: read, bytesStored: read / 2, size: 100, done });
      t.send('src1', source.taskId, { type: 'progress', progress: { disks: { vda: disk(true, 100), vdb: disk(false, 10) }, bytesProcessed: 110, bytesRead: 110, bytesStored: 55, size: 200, rate: 1 } });
      await expect(first).resolves.toEqual({ state: 'success' });
      expect(t.lines.join('\n')).toContain("disk vda is written; the VM's restore point is committed when its other disks are done");
      const summary = { pointId: 'p9', point: wirePoint('p9', 'full'), kind: 'full', warnings: [], consistency: 'application', disks: [{ name: 'vda', bytesRead: 100, bytesStored: 50 }, { name: 'vdb', bytesRead: 100, bytesStored: 50 }] };
      t.send('src1', source.taskId, { type: 'progress', progress: { disks: { vda: disk(true, 100), vdb: disk(true, 100) }, bytesProcessed: 200, bytesRead: 200, bytesStored: 100, size: 200, rate: 1 } });
      t.send('src1', source.taskId, { type: 'log', level: 'info', message: 'transfer: sent 200 bytes' }, { type: 'result', ok: true, value: summary });
      t.send('repo1', target.taskId, { type: 'result', ok: true, value: { point: wirePoint('p9', 'full'), disks: [] } });
      await expect(second).resolves.toEqual({ state: 'success' });
      expect(t.recorded).toEqual(['p9']);
      // The VM-wide lines go to the task still running (vda's ended).
      expect(lines2.join('\n')).toContain('transfer: sent 200 bytes');

      // Next attempt: vdb gets no slot; the run is cancelled and vda's task fails with the reason.
      const again = t.executor.execute({ ...vda, attempt: 2 }, t.context);
      const target2 = await t.next('repo1');
      t.send('repo1', target2.taskId, { type: 'ready', port: 9393, host: '10.0.0.3', previous: null });
      const source2 = await t.next('src1');
      t.executor.taskSkipped({ ...vdb, attempt: 2 }, 'no task slot: proxy src1 is offline');
      await new Promise((r) => setTimeout(r, 10));
      expect(t.send('src1', source2.taskId, { type: 'progress', progress: {} }).cancel).toBe(true);
      t.send('src1', source2.taskId, { type: 'result', ok: false, error: { kind: 'internal', message: 'stopped by the server' } });
      t.send('repo1', target2.taskId, { type: 'result', ok: false, error: { kind: 'internal', message: 'aborted' } });
      await expect(again).rejects.toThrow(/stopped by the server|aborted/);
      await expect(t.executor.execute({ ...vdb, attempt: 2 }, ctx2)).rejects.toThrow("disk vdb of VM web1 did not run (no task slot: proxy src1 is offline), so the VM's restore point cannot be complete");
    } finally {
      t.broker.close();
    }
  });

  it('the VM\'s one transfer gets the repository rate shares of its disk tasks holding a slot, summed, as they come, change and go', async () => {
    const t = setup({ method: 'forever-forward', retention: { points: 3 } });
    /** A disk task's slot: its share of the repository rate (the scheduler's lease), changed by the test. */
    const slot = (share: number) => {
      const watchers = new Set<(rate: number | undefined) => void>();
      const s = {
        share,
        set(rate: number) {
          s.share = rate;
          for (const w of watchers) w(rate);
        },
        context: (base: TaskContext): TaskContext => ({
          ...base,
          rateLimit: () => s.share,
          watchRate: (l) => {
            watchers.add(l);
            return () => watchers.delete(l);
          },
        }),
      };
      return s;
    };
    const settle = () => new Promise((r) => setTimeout(r, 20));
    try {
      const vda = { ...t.task, vmDisks: ['vda', 'vdb'] };
      const vdb = { ...vda, taskId: 't2', disk: { name: 'vdb', location: { agent: 'src1' } } };
      // A 200 MB/s repository with one other task on it: vda's task alone holds a slot of this VM.
      const a = slot(100e6);
      const b = slot(66e6);
      const first = t.executor.execute(vda, a.context(t.context));
      const target = await t.next('repo1');
      t.send('repo1', target.taskId, { type: 'ready', port: 9393, host: '10.0.0.3', previous: null });
      const source = await t.next('src1');
      expect(source).toMatchObject({ kind: 'backup-source', limits: [{ name: 'task:t1', bytesPerSecond: 100e6 }] });
      // vdb's task gets its slot: three tasks share the repository, two of them this VM's.
      a.set(66e6);
      const second = t.executor.execute(vdb, b.context(t.context));
      await settle();
      const limitsNow = () => t.send('src1', source.taskId, { type: 'progress', progress: {} }).limits;
      expect(limitsNow()).toEqual([{ name: 'task:t1', bytesPerSecond: 132e6 }]);
      // vda is written and its task ends (its slot is freed): vdb's task alone, whose share grows.
      const disk = (done: boolean) => ({ bytesProcessed: 100, bytesRead: 100, bytesStored: 50, size: 100, done });
      t.send('src1', source.taskId, { type: 'progress', progress: { disks: { vda: disk(true), vdb: disk(false) }, bytesProcessed: 200, bytesRead: 200, bytesStored: 100, size: 200, rate: 1 } });
      await expect(first).resolves.toEqual({ state: 'success' });
      await settle();
      expect(limitsNow()).toEqual([{ name: 'task:t1', bytesPerSecond: 66e6 }]);
      b.set(100e6);
      await settle();
      expect(limitsNow()).toEqual([{ name: 'task:t1', bytesPerSecond: 100e6 }]);
      const summary = { pointId: 'p9', point: wirePoint('p9', 'full'), kind: 'full', warnings: [], consistency: 'application', disks: [{ name: 'vda', bytesRead: 100, bytesStored: 50 }, { name: 'vdb', bytesRead: 100, bytesStored: 50 }] };
      t.send('src1', source.taskId, { type: 'result', ok: true, value: summary });
      t.send('repo1', target.taskId, { type: 'result', ok: true, value: { point: wirePoint('p9', 'full'), disks: [] } });
      await expect(second).resolves.toEqual({ state: 'success' });
    } finally {
      t.broker.close();
    }
  });

  it('the VM\'s stage times are counted once: a disk task that takes over from one that ended reports only what accrued since', async () => {
    const t = setup({ method: 'forever-forward', retention: { points: 3 } });
    const busy = (source: number, network: number) => ({ source, proxy: 0, network, target: 0, throttling: 0 });
    try {
      const vda = { ...t.task, vmDisks: ['vda', 'vdb'] };
      const vdb = { ...vda, taskId: 't2', disk: { name: 'vdb', location: { agent: 'src1' } } };
      const seen: Record<string, ReturnType<typeof busy>> = {};
      const ctx = (id: string): TaskContext => ({ ...t.context, stageTimes: (b) => void (seen[id] = { ...b }) });
      const first = t.executor.execute(vda, ctx('vda'));
      const target = await t.next('repo1');
      t.send('repo1', target.taskId, { type: 'ready', port: 9393, host: '10.0.0.3', previous: null });
      const source = await t.next('src1');
      const second = t.executor.execute(vdb, ctx('vdb'));
      await new Promise((r) => setTimeout(r, 10));
      const disk = (done: boolean) => ({ bytesProcessed: 100, bytesRead: 100, bytesStored: 50, size: 100, done });
      const progress = (vdbDone: boolean) => ({ disks: { vda: disk(true), vdb: disk(vdbDone) }, bytesProcessed: 200, bytesRead: 200, bytesStored: 100, size: 200, rate: 1 });
      t.send('src1', source.taskId, { type: 'progress', progress: { disks: { vda: disk(false), vdb: disk(false) }, bytesProcessed: 0, bytesRead: 0, bytesStored: 0, size: 200, rate: 1 }, stageTimes: busy(100, 10) });
      t.send('src1', source.taskId, { type: 'progress', progress: progress(false), stageTimes: busy(120, 20) });
      await expect(first).resolves.toEqual({ state: 'success' });
      t.send('src1', source.taskId, { type: 'progress', progress: progress(true), stageTimes: busy(300, 40) });
      const summary = { pointId: 'p9', point: wirePoint('p9', 'full'), kind: 'full', warnings: [], consistency: 'application', stageTimes: busy(350, 50), disks: [{ name: 'vda', bytesRead: 100, bytesStored: 50 }, { name: 'vdb', bytesRead: 100, bytesStored: 50 }] };
      t.send('src1', source.taskId, { type: 'result', ok: true, value: summary });
      t.send('repo1', target.taskId, { type: 'result', ok: true, value: { point: wirePoint('p9', 'full'), disks: [] } });
      await expect(second).resolves.toEqual({ state: 'success' });
      expect(seen.vda).toEqual(busy(120, 20));
      expect(seen.vdb).toEqual(busy(230, 30));
      // Together exactly the VM's transfer: nothing counted twice in the session.
      expect(seen.vda!.source + seen.vdb!.source).toBe(350);
    } finally {
      t.broker.close();
    }
  });

  it('per-job storage: one per-job target for the job (every VM), one source per VM on its transfer; each VM\'s slice is recorded; a failure names the VM where it began', async () => {
    const t = setup({ storage: 'per-job', method: 'forever-forward', retention: { points: 2 } });
    const job = { ...t.task.job, vms: ['web1', 'db1'] };
    const task = { ...t.task, job };
    /** The next `n` tasks the agent is given (one poll may hand over several). */
    const tasks = async (agent: string, n: number): Promise<AgentTask[]> => {
      const out: AgentTask[] = [];
      while (out.length < n) out.push(...(await t.broker.poll(agent, { bootId: `boot-${agent}`, running: out.map((x) => x.taskId) }, never)).tasks);
      return out;
    };
    const allPoint = (id: string) => ({ ...wirePoint(id, 'incremental'), vm: '_all', disks: [{ name: 'web1/vda', size: 4096 }, { name: 'db1/vda', size: 4096 }] });
    let stages: Record<string, number> | undefined;
    const context: TaskContext = { ...t.context, stageTimes: (b) => void (stages = { ...b }) };
    const run = async (attempt: number): Promise<{ outcome: Promise<unknown>; target: AgentTask; web1: AgentTask; db1: AgentTask }> => {
      const outcome = t.executor.execute({ ...task, attempt }, context);
      outcome.catch(() => undefined);
      // db1 is looked up on the hosts' agents; web1 is the task's own VM.
      const resolve = await t.next('src1');
      expect(resolve).toMatchObject({ kind: 'resolve-disks', vm: 'db1' });
      t.send('src1', resolve.taskId, { type: 'result', ok: true, value: [{ name: 'vda', sizeBytes: 4096, location: { hypervisor: 'qemu', vm: 'db1', agent: 'src1' } }] });
      const target = await t.next('repo1');
      expect(target).toMatchObject({ kind: 'backup-target', vm: '_all', vms: [{ vm: 'web1', sourceAgent: 'src1' }, { vm: 'db1', sourceAgent: 'src1' }] });
      const previous = { point: allPoint('p1'), checkpoint: { chainId: 'c-web1', name: 'cp1' } };
      t.send('repo1', target.taskId, {
        type: 'ready', port: 9393, host: '10.0.0.3', previous: null, blockSize: 262144, vms: { web1: previous, db1: null },
        plan: { kind: 'incremental', reason: 'incremental', chainMethod: 'forward', parent: 'p1', repair: [{ disk: 'db1/vda', blocks: [4] }] },
      });
      const sources = await tasks('src1', 2);
      const web1 = sources.find((x) => x.kind === 'backup-source' && x.vm === 'web1')!;
      const db1 = sources.find((x) => x.kind === 'backup-source' && x.vm === 'db1')!;
      expect(web1).toMatchObject({ transferId: `${target.taskId}/web1`, full: false, intoIncrement: true, blockSize: 262144, previous });
      expect(web1).not.toHaveProperty('repair');
      expect(db1).toMatchObject({ transferId: `${target.taskId}/db1`, full: false, intoIncrement: true, previous: null, repair: [{ disk: 'vda', blocks: [4] }] });
      return { outcome, target, web1, db1 };
    };
    try {
      const ok = await run(1);
      const busy = (source: number) => ({ source, proxy: 1, network: 2, target: 3, throttling: 0 });
      const progress = { disks: { vda: { bytesProcessed: 10, bytesRead: 10, bytesStored: 5, size: 10, done: false } }, bytesProcessed: 10, bytesRead: 10, bytesStored: 5, size: 10, rate: 1 };
      // Each VM's transfer reports its own stage times: the job's task shows their sum.
      t.send('src1', ok.web1.taskId, { type: 'progress', progress, stageTimes: busy(100) });
      t.send('src1', ok.db1.taskId, { type: 'progress', progress, stageTimes: busy(40) });
      expect(stages).toEqual({ source: 140, proxy: 2, network: 4, target: 6, throttling: 0 });
      const summary = (vm: string) => ({ pointId: 'p2', point: allPoint('p2'), kind: 'incremental', warnings: [], consistency: 'application', vm, stageTimes: busy(vm === 'web1' ? 110 : 50), disks: [{ name: 'vda', bytesRead: 10, bytesStored: 5 }] });
      t.send('src1', ok.web1.taskId, { type: 'result', ok: true, value: summary('web1') });
      t.send('src1', ok.db1.taskId, { type: 'result', ok: true, value: summary('db1') });
      t.send('repo1', ok.target.taskId, {
        type: 'result', ok: true,
        value: { point: allPoint('p2'), disks: [{ name: 'web1/vda', storedBytes: 4, storedBlocks: 1, unchangedBlocks: 0 }, { name: 'db1/vda', storedBytes: 3, storedBlocks: 1, unchangedBlocks: 0 }], points: [allPoint('p1'), allPoint('p2')], warnings: [] },
      });
      await expect(ok.outcome).resolves.toEqual({ state: 'success' });
      expect(stages).toEqual({ source: 160, proxy: 2, network: 4, target: 6, throttling: 0 });
      expect(t.recorded).toEqual([vmSliceId('p2', 'web1'), vmSliceId('p2', 'db1')]);
      expect(t.synced.map((ps) => ps.map((p) => `${p.vm}:${p.id}`))).toEqual([
        [`web1:${vmSliceId('p1', 'web1')}`, `web1:${vmSliceId('p2', 'web1')}`],
        [`db1:${vmSliceId('p1', 'db1')}`, `db1:${vmSliceId('p2', 'db1')}`],
      ]);
      // db1's disk task reports from the same run.
      await expect(t.executor.execute({ ...task, vm: 'db1', taskId: 't2' }, t.context)).resolves.toEqual({ state: 'success' });

      // db1's transfer ends first (the target says so); web1 fails because of it: the task names db1 and its cause.
      const bad = await run(2);
      t.send('src1', bad.web1.taskId, { type: 'result', ok: false, error: { kind: 'internal', message: "disk vda: target agent failed to store the task's data: aborted" } });
      t.send('repo1', bad.target.taskId, { type: 'progress', progress: { failedVm: 'db1' } }, { type: 'result', ok: false, error: { kind: 'unavailable', message: 'job j\'s restore point (all its VMs in one) is not written: VM db1 (agent src1): source agent aborted the task' } });
      t.send('src1', bad.db1.taskId, { type: 'result', ok: false, error: { kind: 'internal', message: 'disk vda: NBD export gone' } });
      await expect(bad.outcome).rejects.toThrow(/^job j's restore point \(all its VMs in one\) is not written: VM db1 \(agent src1\): disk vda: NBD export gone/);
      expect(t.recorded).toHaveLength(2);
    } finally {
      t.broker.close();
    }
  });

  it('disks the job excludes get no task on a remote host', async () => {
    const t = setup({ excludeDisks: ['web1:vdb'] });
    try {
      const disks = t.executor.resolveDisks(t.task.job, 'web1', new AbortController().signal);
      const resolve = await t.next('src1');
      const location = { hypervisor: 'qemu', vm: 'web1', image: '/img', format: 'qcow2', agent: 'src1' };
      t.send('src1', resolve.taskId, { type: 'result', ok: true, value: [{ name: 'vda', sizeBytes: 1, location }, { name: 'vdb', sizeBytes: 1, location }] });
      expect((await disks).map((d) => d.name)).toEqual(['vda']);
    } finally {
      t.broker.close();
    }
  });
});
