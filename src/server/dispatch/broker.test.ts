import { describe, expect, it } from 'vitest';
import type { TaskEvent } from '../../transport/agent-tasks.js';
import { AgentTaskBroker } from './broker.js';

const never = new Promise<void>(() => undefined);
const resolveDisks = { kind: 'resolve-disks' as const, hosts: [], vm: 'web1' };

describe('AgentTaskBroker', () => {
  it('hands a queued task to the agent\'s poll and settles it with the result event', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 50 });
    try {
      const events: TaskEvent[] = [];
      const h = broker.run('a1', resolveDisks, (e) => events.push(e));
      const reply = await broker.poll('a1', { bootId: 'boot-0001', running: [], address: '10.0.0.2' }, never);
      expect(reply.tasks).toEqual([{ ...resolveDisks, taskId: h.taskId }]);
      expect(broker.addressOf('a1')).toBe('10.0.0.2');
      expect(broker.events('a1', h.taskId, [{ type: 'log', level: 'info', message: 'hello' }, { type: 'result', ok: true, value: [1, 2] }])).toEqual({ cancel: false });
      await expect(h.result).resolves.toEqual([1, 2]);
      expect(events).toEqual([{ type: 'log', level: 'info', message: 'hello' }]);
      // A finished or unknown task: the agent is told to stop it.
      expect(broker.events('a1', h.taskId, [])).toEqual({ cancel: true });
    } finally {
      broker.close();
    }
  });

  it('a waiting poll returns as soon as a task is queued; a failed result rejects with its kind', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 10_000 });
    try {
      const poll = broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      const h = broker.run('a1', resolveDisks);
      const reply = await poll;
      expect(reply.tasks.map((t) => t.taskId)).toEqual([h.taskId]);
      broker.events('a1', h.taskId, [{ type: 'result', ok: false, error: { kind: 'not-found', message: 'VM web1 was not found' } }]);
      await expect(h.result).rejects.toMatchObject({ kind: 'not-found', message: 'VM web1 was not found' });
    } finally {
      broker.close();
    }
  });

  it('cancel reaches the agent on its next poll and in its event replies; a queued task is dropped at once', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 20 });
    try {
      const running = broker.run('a1', resolveDisks);
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      running.cancel('the job was stopped');
      expect(broker.events('a1', running.taskId, [])).toEqual({ cancel: true });
      const reply = await broker.poll('a1', { bootId: 'boot-0001', running: [running.taskId] }, never);
      expect(reply.cancel).toEqual([{ taskId: running.taskId, reason: 'the job was stopped' }]);
      broker.events('a1', running.taskId, [{ type: 'result', ok: false, error: { kind: 'internal', message: 'stopped by the server' } }]);
      await expect(running.result).rejects.toThrow(/stopped/);

      const queued = broker.run('a2', resolveDisks);
      queued.cancel('the job was stopped');
      await expect(queued.result).rejects.toThrow(/before agent a2 took it/);
      expect((await broker.poll('a2', { bootId: 'boot-0002', running: [] }, never)).tasks).toEqual([]);
    } finally {
      broker.close();
    }
  });

  it('new rate limits reach the agent in its next event reply', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 20 });
    try {
      const h = broker.run('a1', resolveDisks);
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      expect(broker.events('a1', h.taskId, [])).toEqual({ cancel: false });
      h.setLimits([{ name: 'rule:wan', bytesPerSecond: 1_000_000 }]);
      expect(broker.events('a1', h.taskId, [])).toEqual({ cancel: false, limits: [{ name: 'rule:wan', bytesPerSecond: 1_000_000 }] });
      h.setLimits([]);
      expect(broker.events('a1', h.taskId, [])).toEqual({ cancel: false, limits: [] });
    } finally {
      broker.close();
    }
  });

  it('an agent that restarts (new boot id) fails the tasks its old process had taken', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 20 });
    try {
      const h = broker.run('a1', resolveDisks);
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      await broker.poll('a1', { bootId: 'boot-0002', running: [] }, never);
      await expect(h.result).rejects.toThrow(/agent a1 restarted/);
    } finally {
      broker.close();
    }
  });

  it('a task the agent stopped reporting as running (without a result) fails', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 20 });
    try {
      const h = broker.run('a1', resolveDisks);
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      await broker.poll('a1', { bootId: 'boot-0001', running: [h.taskId] }, never);
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      await expect(h.result).rejects.toThrow(/no longer runs the task/);
    } finally {
      broker.close();
    }
  });

  it('an agent silent for agentLostMs fails its tasks; one that never picks up fails after pickupTimeoutMs', async () => {
    let now = 0;
    const broker = new AgentTaskBroker({ pollWaitMs: 10, agentLostMs: 400, now: () => now });
    try {
      const taken = broker.run('a1', resolveDisks);
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      const orphan = broker.run('nobody', resolveDisks);
      expect(broker.isConnected('a1')).toBe(true);
      now = 1000;
      expect(broker.isConnected('a1')).toBe(false);
      await expect(taken.result).rejects.toThrow(/lost agent a1: not heard from for 1 s/);
      await expect(orphan.result).rejects.toThrow(/agent nobody did not pick up the task/);
    } finally {
      broker.close();
    }
  });

  it('an open poll keeps the agent present however long it waits', async () => {
    let now = 0;
    const broker = new AgentTaskBroker({ pollWaitMs: 10_000, agentLostMs: 100, now: () => now });
    let close!: () => void;
    const closed = new Promise<void>((r) => (close = r));
    try {
      const h = broker.run('a1', resolveDisks);
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      const open = broker.poll('a1', { bootId: 'boot-0001', running: [h.taskId] }, closed);
      now = 10_000;
      await new Promise((r) => setTimeout(r, 150));
      expect(broker.isConnected('a1')).toBe(true);
      broker.events('a1', h.taskId, [{ type: 'result', ok: true, value: 'done' }]);
      await expect(h.result).resolves.toBe('done');
      close();
      await open;
    } finally {
      broker.close();
    }
  });
});
