// Re-adopting tasks agents still run after a server restart (docs/formats/agent-link.md, "Mount
// tasks"): a broker that never knew a task does not stop it during the agent's adoption window,
// tells the server when an agent first polls, and routes an adopted task like its own.
import { describe, expect, it } from 'vitest';
import type { TaskEvent } from '../../transport/agent-tasks.js';
import { AgentTaskBroker } from './broker.js';

const never = new Promise<void>(() => undefined);

describe('AgentTaskBroker adoption after a restart', () => {
  it('does not stop unknown tasks before and within the agent\'s window from its first poll; stops them after it', async () => {
    let now = 1_000_000;
    const broker = new AgentTaskBroker({ pollWaitMs: 1, adoptWindowMs: 5000, now: () => now });
    try {
      const seen: string[] = [];
      broker.onAgentSeen((a) => {
        seen.push(a);
      });
      // Events arrive before the agent's first poll (its outbox is retried first): not stopped.
      now += 60_000;
      expect(broker.events('a1', 'old-serve', [{ type: 'progress', progress: {} }])).toEqual({ cancel: false });
      await broker.poll('a1', { bootId: 'boot-0001', running: ['old-serve', 'old-mount'] }, never);
      await broker.poll('a1', { bootId: 'boot-0001', running: ['old-serve', 'old-mount'] }, never);
      await new Promise((r) => setImmediate(r));
      expect(seen).toEqual(['a1']);
      now += 4000;
      expect(broker.events('a1', 'old-serve', [])).toEqual({ cancel: false });
      now += 2000;
      expect(broker.events('a1', 'old-serve', [])).toEqual({ cancel: true });
      expect(broker.adoptableUntil('a1')).toBe(1_000_000 + 60_000 + 5000);
    } finally {
      broker.close();
    }
  });

  it('routes an adopted task\'s events and cancels it like its own; a finished task is stopped at once', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 1, adoptWindowMs: 60_000 });
    try {
      await broker.poll('a1', { bootId: 'boot-0001', running: ['old-mount'] }, never);
      const events: TaskEvent[] = [];
      const h = broker.adopt('a1', 'old-mount', 'mount', (e) => events.push(e));
      expect(broker.events('a1', 'old-mount', [{ type: 'progress', progress: { mountId: 'm1' } }])).toEqual({ cancel: false });
      expect(events).toEqual([{ type: 'progress', progress: { mountId: 'm1' } }]);
      h.cancel('unmounted');
      expect((await broker.poll('a1', { bootId: 'boot-0001', running: ['old-mount'] }, never)).cancel).toEqual([{ taskId: 'old-mount', reason: 'unmounted' }]);
      expect(broker.events('a1', 'old-mount', [{ type: 'result', ok: true, value: { unmounted: 'm1' } }])).toEqual({ cancel: true });
      await expect(h.result).resolves.toEqual({ unmounted: 'm1' });
      // Finished here: told to stop, even inside the window.
      expect(broker.events('a1', 'old-mount', [])).toEqual({ cancel: true });
    } finally {
      broker.close();
    }
  });

  it('an adopted task the agent no longer lists ends', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 1 });
    try {
      await broker.poll('a1', { bootId: 'boot-0001', running: ['old-serve'] }, never);
      const h = broker.adopt('a1', 'old-serve', 'restore-serve');
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      await broker.poll('a1', { bootId: 'boot-0001', running: [] }, never);
      await expect(h.result).rejects.toThrow(/no longer runs the task/);
    } finally {
      broker.close();
    }
  });

  it('a task adopted before its own agent polled (another agent named it) waits for that agent, then follows its running list', async () => {
    let now = 1_000_000;
    const broker = new AgentTaskBroker({ pollWaitMs: 1, agentLostMs: 400, adoptWindowMs: 5000, now: () => now });
    const settled = (p: Promise<unknown>): { done: boolean } => {
      const s = { done: false };
      void p.then(
        () => (s.done = true),
        () => (s.done = true),
      );
      return s;
    };
    try {
      // dst1 answered its mount list first; the mount reads through repo1's serve task.
      const serve = broker.adopt('repo1', 'old-serve', 'restore-serve');
      const gone = broker.adopt('repo2', 'other-serve', 'restore-serve');
      const servePending = settled(serve.result);
      now += 2000; // past the pickup time (agentLostMs) of a queued task
      await new Promise((r) => setTimeout(r, 300));
      expect(servePending.done).toBe(false);
      await broker.poll('repo1', { bootId: 'boot-r1', running: ['old-serve'] }, never);
      await broker.poll('repo1', { bootId: 'boot-r1', running: ['old-serve'] }, never);
      expect(servePending.done).toBe(false);
      expect(broker.events('repo1', 'old-serve', [{ type: 'progress', progress: {} }])).toEqual({ cancel: false });
      await broker.poll('repo1', { bootId: 'boot-r1', running: [] }, never);
      await expect(serve.result).rejects.toThrow(/no longer runs the task/);
      // repo2 never comes back: the task ends once the window and the lost time have passed.
      now += 5000 + 400;
      await new Promise((r) => setTimeout(r, 300));
      await expect(gone.result).rejects.toThrow(/lost agent repo2: it has not come back/);
    } finally {
      broker.close();
    }
  });

  it('a task adopted before its agent polled ends at that first poll when the agent does not run it', async () => {
    const broker = new AgentTaskBroker({ pollWaitMs: 1 });
    try {
      const h = broker.adopt('repo1', 'old-serve', 'restore-serve');
      await broker.poll('repo1', { bootId: 'boot-r1', running: ['something-else'] }, never);
      await expect(h.result).rejects.toThrow(/no longer runs the task/);
    } finally {
      broker.close();
    }
  });

  it('while the server is still asking an agent what it holds, its unknown tasks are not stopped, even past the window', async () => {
    let now = 1_000_000;
    const broker = new AgentTaskBroker({ pollWaitMs: 1, adoptWindowMs: 5000, now: () => now });
    try {
      let answer!: () => void;
      broker.onAgentSeen(() => new Promise<void>((resolve) => (answer = resolve)));
      await broker.poll('a1', { bootId: 'boot-0001', running: ['old-mount'] }, never);
      await new Promise((r) => setImmediate(r));
      now += 6000; // past the window: the list the server asked for is not answered yet
      expect(broker.events('a1', 'old-mount', [])).toEqual({ cancel: false });
      answer();
      await new Promise((r) => setImmediate(r));
      await new Promise((r) => setImmediate(r));
      expect(broker.events('a1', 'old-mount', [])).toEqual({ cancel: true });
    } finally {
      broker.close();
    }
  });
});
