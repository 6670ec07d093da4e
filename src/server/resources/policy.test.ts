import { describe, expect, it } from 'vitest';
import { bottleneckVerdict, parseStageBusy, sessionStageStats, sumStageBusy } from './bottleneck.js';
import { defaultMaxTasks, selectProxy, type ProxyCandidate, type ProxyNeed } from './proxy-selection.js';
import { splitRepositoryRates } from './rate-split.js';
import { planTaskSlots, type ProxyConfig, type RepositoryLimits, type TaskRequirements } from './task-slots.js';

const px = (name: string, host: string, running = 0, maxTasks = 2, extra: Partial<ProxyCandidate> = {}): ProxyCandidate => ({
  name,
  host,
  online: true,
  maxTasks,
  running,
  reaches: [],
  ...extra,
});
const need = (vmHost: string, extra: Partial<ProxyNeed> = {}): ProxyNeed => ({ vm: 'web1', disk: 'vda', vmHost, ...extra });

describe('selectProxy', () => {
  it.each<[string, ProxyNeed, ProxyCandidate[], ReturnType<typeof selectProxy>]>([
    ['on-host agent first, even when another is idler', need('h1'), [px('a2', 'h2', 0, 8, { reaches: ['nfs'] }), px('a1', 'h1', 1)], { kind: 'selected', proxy: 'a1', via: 'on-host' }],
    ['among on-host agents, the one that found the disk first, even when busier', need('h1', { foundBy: 'a2' }), [px('a1', 'h1', 0), px('a2', 'h1', 1)], { kind: 'selected', proxy: 'a2', via: 'on-host' }],
    ['the agent that found the disk, when full, yields to another on-host agent', need('h1', { foundBy: 'a2' }), [px('a1', 'h1', 0), px('a2', 'h1', 2)], { kind: 'selected', proxy: 'a1', via: 'on-host' }],
    ['off-host when the on-host agent is full', need('h1', { storage: 'nfs' }), [px('a1', 'h1', 2), px('a2', 'h2', 1, 4, { reaches: ['nfs'] })], { kind: 'selected', proxy: 'a2', via: 'off-host' }],
    ['least busy (share of slots) among off-host agents', need('h9', { storage: 'nfs' }), [px('a', 'h1', 1, 2, { reaches: ['nfs'] }), px('b', 'h2', 1, 4, { reaches: ['nfs'] }), px('c', 'h3', 0, 1, { reaches: ['san'] })], { kind: 'selected', proxy: 'b', via: 'off-host' }],
    ['ties go by fewer tasks, then name', need('h9', { storage: 'nfs' }), [px('z', 'h1', 0, 2, { reaches: ['nfs'] }), px('y', 'h2', 0, 2, { reaches: ['nfs'] })], { kind: 'selected', proxy: 'y', via: 'off-host' }],
    ['wait when every capable agent is full', need('h1'), [px('a1', 'h1', 2), px('a2', 'h2', 0)], { kind: 'wait', reasons: ['proxy a1 is at its task limit (2 of 2)'] }],
    ['offline agents are skipped', need('h1'), [px('a1', 'h1', 0, 2, { online: false })], { kind: 'none', reasons: ['proxy a1 is offline'] }],
    ['none can reach the disk', need('h1', { storage: 'local' }), [px('a2', 'h2')], { kind: 'none', reasons: ['proxy a2 is not on host h1 and cannot reach the storage of disk vda of VM web1'] }],
    ['no agents at all', need('h1'), [], { kind: 'none', reasons: ['no agents are registered'] }],
    ['pinned proxy wins over the on-host one', need('h1', { storage: 'nfs', pinned: 'a2' }), [px('a1', 'h1'), px('a2', 'h2', 0, 2, { reaches: ['nfs'] })], { kind: 'selected', proxy: 'a2', via: 'pinned' }],
    ['pinned proxy that is full: wait', need('h1', { pinned: 'a1' }), [px('a1', 'h1', 2)], { kind: 'wait', reasons: ['proxy a1 is at its task limit (2 of 2)'] }],
    ['pinned proxy missing', need('h1', { pinned: 'ghost' }), [px('a1', 'h1')], { kind: 'none', reasons: ['proxy ghost pinned by the job does not exist'] }],
    ['pinned proxy that cannot reach', need('h1', { pinned: 'a2' }), [px('a2', 'h2')], { kind: 'none', reasons: ['proxy a2 pinned by the job is not on host h1 and cannot reach the storage of disk vda of VM web1'] }],
  ])('%s', (_name, n, candidates, expected) => {
    expect(selectProxy(n, candidates)).toEqual(expected);
  });

  it('default task limit is one per CPU core, at least one', () => {
    expect([defaultMaxTasks(8), defaultMaxTasks(1), defaultMaxTasks(0), defaultMaxTasks(2.5)]).toEqual([8, 1, 1, 2]);
  });
});

describe('planTaskSlots', () => {
  const proxies: ProxyConfig[] = [
    { name: 'p1', host: 'h1', online: true, maxTasks: 2, reaches: [] },
    { name: 'p2', host: 'h2', online: true, maxTasks: 1, reaches: [] },
  ];
  const repos: RepositoryLimits[] = [{ name: 'r1', maxTasks: 3 }];
  const task = (id: string, jobId: string, host = 'h1', repository = 'r1'): TaskRequirements => ({ taskId: id, jobId, repository, need: { vm: `vm-${id}`, disk: 'vda', vmHost: host } });

  it('a proxy limited to 2 starts 2 of 4 queued tasks, FIFO', () => {
    const plan = planTaskSlots({ queue: ['a', 'b', 'c', 'd'].map((id) => task(id, 'j1')), running: [], proxies, repositories: repos, mode: 'parallel' });
    expect(plan.start.map((s) => s.taskId)).toEqual(['a', 'b']);
    expect(plan.waiting.map((w) => w.taskId)).toEqual(['c', 'd']);
    expect(plan.waiting[0]!.reasons).toEqual(['proxy p1 is at its task limit (2 of 2)']);
  });

  it('counts running tasks against proxy and repository limits', () => {
    const plan = planTaskSlots({
      queue: [task('c', 'j1'), task('d', 'j2', 'h2')],
      running: [{ taskId: 'a', jobId: 'j1', repository: 'r1', proxy: 'p1' }, { taskId: 'b', jobId: 'j3', repository: 'r1', proxy: 'p1' }],
      proxies,
      repositories: repos,
      mode: 'parallel',
    });
    expect(plan.start).toEqual([{ taskId: 'd', proxy: 'p2', repository: 'r1', via: 'on-host' }]);
    expect(plan.waiting).toEqual([{ taskId: 'c', reasons: ['proxy p1 is at its task limit (2 of 2)'] }]);
  });

  it('a full repository holds tasks back whatever the proxies', () => {
    const plan = planTaskSlots({ queue: [task('a', 'j1'), task('b', 'j2', 'h2')], running: [], proxies, repositories: [{ name: 'r1', maxTasks: 1 }], mode: 'parallel' });
    expect(plan.start.map((s) => s.taskId)).toEqual(['a']);
    expect(plan.waiting).toEqual([{ taskId: 'b', reasons: ['repository r1 is at its task limit (1 of 1)'] }]);
  });

  it('a later task overtakes one whose proxy is full', () => {
    const plan = planTaskSlots({ queue: [task('a', 'j1', 'h2'), task('b', 'j1', 'h2'), task('c', 'j2', 'h1')], running: [], proxies, repositories: repos, mode: 'parallel' });
    expect(plan.start.map((s) => s.taskId)).toEqual(['a', 'c']);
  });

  it('sequential: one disk at a time per job, jobs still in parallel, order kept within a job', () => {
    const queue = [task('a1', 'A'), task('a2', 'A'), task('b1', 'B', 'h2'), task('b2', 'B', 'h2')];
    const plan = planTaskSlots({ queue, running: [], proxies, repositories: repos, mode: 'sequential' });
    expect(plan.start.map((s) => s.taskId)).toEqual(['a1', 'b1']);
    const later = planTaskSlots({ queue: [task('a2', 'A'), task('b2', 'B', 'h2')], running: [{ taskId: 'b1', jobId: 'B', repository: 'r1', proxy: 'p2' }], proxies, repositories: repos, mode: 'sequential' });
    expect(later.start.map((s) => s.taskId)).toEqual(['a2']);
    expect(later.waiting).toEqual([{ taskId: 'b2', reasons: ['sequential processing: the job processes one disk at a time'] }]);
  });

  it('sequential: a waiting first task of a job keeps its place ahead of the job\'s next', () => {
    const plan = planTaskSlots({
      queue: [task('a1', 'A', 'h2'), task('a2', 'A', 'h1')],
      running: [{ taskId: 'x', jobId: 'X', repository: 'r1', proxy: 'p2' }],
      proxies,
      repositories: repos,
      mode: 'sequential',
    });
    expect(plan.start).toEqual([]);
    expect(plan.waiting.map((w) => w.taskId)).toEqual(['a1', 'a2']);
  });

  it('unknown repository and unreachable disks are impossible, with reasons', () => {
    const plan = planTaskSlots({ queue: [task('a', 'j1', 'h1', 'nope'), task('b', 'j1', 'h7')], running: [], proxies, repositories: repos, mode: 'parallel' });
    expect(plan.impossible).toEqual([
      { taskId: 'a', reasons: ['repository nope does not exist'] },
      { taskId: 'b', reasons: ['proxy p1 is not on host h7 and cannot reach the storage of disk vda of VM vm-b', 'proxy p2 is not on host h7 and cannot reach the storage of disk vda of VM vm-b'] },
    ]);
  });
});

describe('splitRepositoryRates', () => {
  it.each<[string, Array<[string, string]>, Array<[string, number | undefined]>, Record<string, number | undefined>]>([
    ['one task gets the whole limit', [['t1', 'r']], [['r', 400]], { t1: 400 }],
    ['four tasks share equally', [['t1', 'r'], ['t2', 'r'], ['t3', 'r'], ['t4', 'r']], [['r', 400]], { t1: 100, t2: 100, t3: 100, t4: 100 }],
    ['per repository', [['t1', 'r'], ['t2', 's'], ['t3', 's']], [['r', 300], ['s', 300]], { t1: 300, t2: 150, t3: 150 }],
    ['no limit stays unlimited', [['t1', 'r']], [['r', undefined]], { t1: undefined }],
    ['unknown repository is unlimited', [['t1', 'x']], [], { t1: undefined }],
  ])('%s', (_name, users, limits, expected) => {
    const shares = splitRepositoryRates(users.map(([taskId, repository]) => ({ taskId, repository })), new Map(limits));
    expect(Object.fromEntries(shares)).toEqual(expected);
  });
});

describe('bottleneckVerdict', () => {
  it.each<[string, [number, number, number, number, number], number, string | undefined, string]>([
    ['target was busiest', [300, 100, 200, 900, 0], 1000, 'target', 'Source 30% > Proxy 10% > Network 20% > Target 90%; bottleneck: Target'],
    ['throttling held data back', [100, 50, 300, 100, 700], 1000, 'throttling', 'Source 10% > Proxy 5% > Network 30% > Target 10%, Throttling 70%; bottleneck: Throttling'],
    ['shares are capped at 100%', [5000, 0, 0, 0, 0], 1000, 'source', 'Source 100% > Proxy 0% > Network 0% > Target 0%; bottleneck: Source'],
    ['a tie goes to the earlier stage', [500, 500, 0, 0, 0], 1000, 'source', 'Source 50% > Proxy 50% > Network 0% > Target 0%; bottleneck: Source'],
    ['nothing measured', [0, 0, 0, 0, 0], 1000, undefined, 'Source 0% > Proxy 0% > Network 0% > Target 0%; bottleneck: none'],
    ['no elapsed time', [10, 0, 0, 0, 0], 0, undefined, 'Source 0% > Proxy 0% > Network 0% > Target 0%; bottleneck: none'],
  ])('%s', (_name, [source, proxy, network, target, throttling], elapsed, expected, summary) => {
    const v = bottleneckVerdict({ source, proxy, network, target, throttling }, elapsed);
    expect(v.bottleneck).toBe(expected);
    expect(v.summary).toBe(summary);
  });

  it('session busy time is the sum of its tasks', () => {
    expect(sumStageBusy([{ source: 1, proxy: 2, network: 3, target: 4, throttling: 5 }, { source: 10, proxy: 0, network: 0, target: 0, throttling: 1 }])).toEqual({ source: 11, proxy: 2, network: 3, target: 4, throttling: 6 });
  });
});

describe('session and stored stage statistics', () => {
  const busy = (source: number, target: number) => ({ source, proxy: 0, network: 0, target, throttling: 0 });
  it('a session of parallel tasks is judged over its tasks\' running time, not its wall time', () => {
    // Two tasks of 1000 ms side by side: Target busy 900 + 700 of 2000 task-ms = 80%.
    const s = sessionStageStats([
      { busy: busy(100, 900), elapsedMs: 1000 },
      { busy: busy(300, 700), elapsedMs: 1000 },
      { busy: undefined, elapsedMs: 5000 }, // not measured: left out
    ]);
    expect(s).toMatchObject({ bottleneck: 'target', shares: { source: 0.2, target: 0.8 }, busyMs: { source: 400, target: 1600 } });
    expect(s?.summary).toBe('Source 20% > Proxy 0% > Network 0% > Target 80%; bottleneck: Target');
  });
  it('nothing measured: no statistics', () => {
    expect(sessionStageStats([{ busy: undefined, elapsedMs: 10 }])).toBeUndefined();
  });
  it.each<[string | null, ReturnType<typeof parseStageBusy>]>([
    [null, undefined],
    ['not json', undefined],
    ['{"source":5,"target":"x"}', { source: 5, proxy: 0, network: 0, target: 0, throttling: 0 }],
  ])('parseStageBusy(%s)', (text, expected) => {
    expect(parseStageBusy(text)).toEqual(expected);
  });
});
