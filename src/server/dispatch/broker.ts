// Hands tasks to agents over the agent link (docs/formats/agent-link.md, "Tasks"). Agents connect
// out to the server (they may sit behind NAT) and long-poll for work; the broker queues each
// agent's tasks and cancellations until its next poll, routes the events the agent posts back to
// whoever runs the task, and fails a task cleanly when its agent goes away: a restart (new boot
// id) at once, silence (no poll open and nothing heard) after `agentLostMs`.
import { randomUUID } from 'node:crypto';
import { deferred } from '../../common/deferred.js';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { AgentTask, EventsReply, PollReply, TaskEvent } from '../../transport/agent-tasks.js';
import type { NamedLimit } from '../../transport/throttle.js';

const log = logger('dispatch');

type TaskBody = AgentTask extends infer T ? (T extends AgentTask ? Omit<T, 'taskId'> : never) : never;

export interface AgentTaskHandle {
  readonly taskId: string;
  readonly agent: string;
  /** The result value the agent reported; rejects with its error, or when the agent was lost. */
  readonly result: Promise<unknown>;
  /** Asks the agent to stop the task (its result then reports how it ended). */
  cancel(reason: string): void;
  /** New rate limits for a backup-source task; the agent gets them in its next event reply. */
  setLimits(limits: readonly NamedLimit[]): void;
  /** The disks a backup-source task with `diskTasks` may back up now; the agent gets them in its next event reply. */
  setDisks(disks: readonly string[]): void;
}

interface Running {
  readonly taskId: string;
  readonly agent: string;
  readonly task: AgentTask;
  readonly onEvent: (e: TaskEvent) => void;
  readonly resolve: (v: unknown) => void;
  readonly reject: (e: Error) => void;
  /** The boot id of the agent process that took the task; undefined while queued. */
  bootId: string | undefined;
  /** The poll (agent's poll counter) whose reply handed the task over. */
  pickedInPoll: number | undefined;
  queuedAt: number;
  cancelRequested: boolean;
  limits: readonly NamedLimit[] | undefined;
  disks: readonly string[] | undefined;
  /** Taken over after a server restart (adopt()), not handed out by this broker. */
  readonly adopted: boolean;
}

interface AgentState {
  readonly name: string;
  bootId: string | undefined;
  /** Address the agent's last request came from (throttling rules, the target host). */
  address: string | undefined;
  lastContact: number;
  /** Polls open now, and polls started so far. */
  polls: number;
  pollSeq: number;
  queue: AgentTask[];
  cancels: Array<{ taskId: string; reason: string }>;
  wake: (() => void) | undefined;
}

export interface AgentTaskBrokerOptions {
  /** An agent with running tasks, no open poll and nothing heard for this long is lost (default 60 s). */
  readonly agentLostMs?: number;
  /** A task no agent picked up within this time fails (default: agentLostMs). */
  readonly pickupTimeoutMs?: number;
  /** Longest a poll is held open without news (default 20 s). */
  readonly pollWaitMs?: number;
  readonly now?: () => number;
  /**
   * For this long after an agent's first poll (and before it), events of a task this broker never
   * knew are answered `cancel: false` instead of `true` (default 30 s): a restarted server re-adopts
   * the tasks agents still hold (adopt(), from onAgentSeen) before they would be stopped
   * (docs/formats/agent-link.md, "Mount tasks").
   */
  readonly adoptWindowMs?: number;
}

export class AgentTaskBroker {
  readonly #agents = new Map<string, AgentState>();
  readonly #tasks = new Map<string, Running>();
  readonly #agentLostMs: number;
  readonly #pickupTimeoutMs: number;
  readonly #pollWaitMs: number;
  readonly #now: () => number;
  readonly #timer: NodeJS.Timeout;
  readonly #adoptWindowMs: number;
  /** When each agent first polled this broker. */
  readonly #firstPoll = new Map<string, number>();
  readonly #seen: Array<(agent: string) => void | Promise<unknown>> = [];
  /** Per agent, how many onAgentSeen callbacks are still asking it what it holds. */
  readonly #asking = new Map<string, number>();
  /** Tasks this broker finished lately (a finished task is stopped, not waited for adoption). */
  readonly #ended = new Set<string>();

  constructor(options: AgentTaskBrokerOptions = {}) {
    this.#agentLostMs = options.agentLostMs ?? 60_000;
    this.#pickupTimeoutMs = options.pickupTimeoutMs ?? this.#agentLostMs;
    this.#pollWaitMs = options.pollWaitMs ?? 20_000;
    this.#now = options.now ?? (() => Date.now());
    this.#adoptWindowMs = options.adoptWindowMs ?? 30_000;
    this.#timer = setInterval(() => this.#sweep(), Math.min(1000, Math.max(100, this.#agentLostMs / 4)));
    this.#timer.unref();
  }

  #agent(name: string): AgentState {
    let a = this.#agents.get(name);
    if (!a) {
      a = { name, bootId: undefined, address: undefined, lastContact: 0, polls: 0, pollSeq: 0, queue: [], cancels: [], wake: undefined };
      this.#agents.set(name, a);
    }
    return a;
  }

  /** Whether the agent is polling now or was heard from within agentLostMs. */
  isConnected(agent: string): boolean {
    const a = this.#agents.get(agent);
    return a !== undefined && (a.polls > 0 || this.#now() - a.lastContact <= this.#agentLostMs);
  }

  /** The IP address the agent's link requests come from (undefined before its first poll). */
  addressOf(agent: string): string | undefined {
    return this.#agents.get(agent)?.address;
  }

  /** Until when (this broker's clock, ms) tasks of `agent` it never knew are not stopped: the time to adopt them. */
  adoptableUntil(agent: string): number {
    return (this.#firstPoll.get(agent) ?? this.#now()) + this.#adoptWindowMs;
  }

  /**
   * Calls `fn` when an agent polls this broker for the first time (then its tasks may be adopted).
   * While the promise `fn` returns is pending (the server is still asking the agent what it holds),
   * that agent's unknown tasks are not stopped even past its adoption window.
   */
  onAgentSeen(fn: (agent: string) => void | Promise<unknown>): void {
    this.#seen.push(fn);
  }

  #ask(agent: string, fn: (agent: string) => void | Promise<unknown>): void {
    let asking: void | Promise<unknown>;
    try {
      asking = fn(agent);
    } catch (err) {
      log.warn({ agent, err: describeError(err) }, 'an agent-seen handler failed');
      return;
    }
    if (!asking) return;
    this.#asking.set(agent, (this.#asking.get(agent) ?? 0) + 1);
    void asking
      .catch((err: unknown) => log.warn({ agent, err: describeError(err) }, 'asking an agent what it holds failed'))
      .finally(() => this.#asking.set(agent, (this.#asking.get(agent) ?? 1) - 1));
  }

  /** Whether a task of `agent` this broker never knew may still be adopted (see adoptableUntil and onAgentSeen). */
  #adoptable(agent: string): boolean {
    return (this.#asking.get(agent) ?? 0) > 0 || this.#now() <= this.adoptableUntil(agent);
  }

  /** Agents polling now or heard from within agentLostMs. */
  connectedAgents(): string[] {
    return [...this.#agents.keys()].filter((a) => this.isConnected(a));
  }

  /**
   * Takes over a task an agent runs that this broker did not hand out (the server restarted; the
   * agent's list named it): its events are routed to `onEvent` and it can be cancelled as usual.
   */
  adopt(agent: string, taskId: string, kind: AgentTask['kind'], onEvent: (e: TaskEvent) => void = () => undefined): AgentTaskHandle {
    const a = this.#agent(agent);
    const { promise: result, resolve, reject } = deferred<unknown>();
    if (!this.#tasks.has(taskId)) {
      const task = { kind, taskId } as AgentTask;
      // An agent that has not polled yet (another agent's list named the task first) gets its boot
      // id and running list checked at its first poll (poll()), not a pickup deadline.
      this.#tasks.set(taskId, { taskId, agent, task, onEvent, resolve, reject, bootId: a.bootId, pickedInPoll: a.bootId === undefined ? undefined : a.pollSeq, queuedAt: this.#now(), cancelRequested: false, limits: undefined, disks: undefined, adopted: true });
      log.info({ agent, task: taskId, kind }, 'task an agent still runs adopted');
    }
    return {
      taskId,
      agent,
      result,
      cancel: (reason) => this.#cancel(taskId, reason),
      setLimits: () => undefined,
      setDisks: () => undefined,
    };
  }

  /** Queues a task for an agent; `onEvent` gets its progress, log lines and (backup-target) readiness. */
  run(agent: string, body: TaskBody, onEvent: (e: TaskEvent) => void = () => undefined): AgentTaskHandle {
    const taskId = randomUUID();
    const task = { ...body, taskId } as AgentTask;
    const { promise: result, resolve, reject } = deferred<unknown>();
    const r: Running = { taskId, agent, task, onEvent, resolve, reject, bootId: undefined, pickedInPoll: undefined, queuedAt: this.#now(), cancelRequested: false, limits: undefined, disks: undefined, adopted: false };
    this.#tasks.set(taskId, r);
    const a = this.#agent(agent);
    a.queue.push(task);
    a.wake?.();
    log.info({ agent, task: taskId, kind: task.kind }, 'task queued for agent');
    return {
      taskId,
      agent,
      result,
      cancel: (reason) => this.#cancel(taskId, reason),
      setLimits: (limits) => {
        const t = this.#tasks.get(taskId);
        if (t) t.limits = limits;
      },
      setDisks: (disks) => {
        const t = this.#tasks.get(taskId);
        if (t) t.disks = [...disks];
      },
    };
  }

  #cancel(taskId: string, reason: string): void {
    const r = this.#tasks.get(taskId);
    if (!r || r.cancelRequested) return;
    r.cancelRequested = true;
    const a = this.#agent(r.agent);
    const queued = a.queue.findIndex((t) => t.taskId === taskId);
    if (queued >= 0) {
      a.queue.splice(queued, 1);
      this.#finish(r, new BulwarkError(`task stopped before agent ${r.agent} took it: ${reason}`, { kind: 'unavailable', context: { agent: r.agent } }));
      return;
    }
    a.cancels.push({ taskId, reason });
    a.wake?.();
  }

  #finish(r: Running, outcome: Error | { value: unknown }): void {
    if (!this.#tasks.delete(r.taskId)) return;
    this.#ended.add(r.taskId);
    if (this.#ended.size > 10_000) this.#ended.delete(this.#ended.values().next().value!);
    if (outcome instanceof Error) r.reject(outcome);
    else r.resolve(outcome.value);
  }

  /**
   * An agent's long poll: returns at once when tasks or cancellations wait, else after
   * `pollWaitMs` (or when `closed` resolves: the connection went away).
   */
  async poll(agent: string, req: { bootId: string; running: readonly string[]; address?: string | undefined }, closed: Promise<void>): Promise<PollReply> {
    const a = this.#agent(agent);
    a.lastContact = this.#now();
    if (req.address) a.address = req.address;
    if (a.bootId !== undefined && a.bootId !== req.bootId) {
      // The agent process restarted: whatever the old one was running is gone.
      for (const r of [...this.#tasks.values()]) {
        if (r.agent === agent && r.bootId === a.bootId) {
          this.#finish(r, new BulwarkError(`agent ${agent} restarted while running the task`, { kind: 'unavailable', context: { agent } }));
        }
      }
    }
    a.bootId = req.bootId;
    if (!this.#firstPoll.has(agent)) {
      this.#firstPoll.set(agent, this.#now());
      for (const fn of this.#seen) setImmediate(() => this.#ask(agent, fn));
    }
    // Tasks adopted before this agent's first poll belong to the process polling now: its running
    // list (below) says at once whether they still run.
    for (const r of this.#tasks.values()) {
      if (r.agent === agent && r.adopted && r.bootId === undefined) {
        r.bootId = req.bootId;
        r.pickedInPoll = a.pollSeq - 1;
      }
    }
    // Tasks the server gave this process that it no longer runs (and never reported) ended without a word.
    const running = new Set(req.running);
    for (const r of [...this.#tasks.values()]) {
      if (r.agent === agent && r.bootId === req.bootId && !running.has(r.taskId) && r.pickedInPoll !== undefined && r.pickedInPoll < a.pollSeq) {
        this.#finish(r, new BulwarkError(`agent ${agent} no longer runs the task`, { kind: 'unavailable', context: { agent } }));
      }
    }
    a.pollSeq++;
    a.polls++;
    try {
      if (a.queue.length === 0 && a.cancels.length === 0) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, this.#pollWaitMs);
          a.wake = () => {
            clearTimeout(timer);
            resolve();
          };
          void closed.then(() => {
            clearTimeout(timer);
            resolve();
          });
        });
        a.wake = undefined;
      }
      const tasks = a.queue.splice(0);
      for (const t of tasks) {
        const r = this.#tasks.get(t.taskId);
        if (r) {
          r.bootId = req.bootId;
          r.pickedInPoll = a.pollSeq;
        }
      }
      const cancel = a.cancels.splice(0);
      return { tasks, cancel };
    } finally {
      a.polls--;
      a.lastContact = this.#now();
    }
  }

  /** Events an agent posts for a task; returns whether the server wants the task stopped. */
  events(agent: string, taskId: string, events: readonly TaskEvent[]): EventsReply {
    const a = this.#agent(agent);
    a.lastContact = this.#now();
    const r = this.#tasks.get(taskId);
    // A task this broker never knew, soon after it started: the server may adopt it yet.
    if (!r) return { cancel: this.#ended.has(taskId) || !this.#adoptable(agent) };
    if (r.agent !== agent) return { cancel: true };
    for (const e of events) {
      if (e.type === 'result') {
        if (e.ok) this.#finish(r, { value: e.value });
        else this.#finish(r, new BulwarkError(e.error.message, { kind: errorKind(e.error.kind), context: { agent }, ...(e.error.hint ? { hint: e.error.hint } : {}) }));
        if (e.ok && e.stageTimes) r.onEvent({ type: 'progress', progress: {}, stageTimes: e.stageTimes });
        continue;
      }
      try {
        r.onEvent(e);
      } catch (err) {
        log.warn({ task: taskId, err: String(err) }, 'task event handler failed');
      }
    }
    return { cancel: r.cancelRequested, ...(r.limits ? { limits: r.limits } : {}), ...(r.disks ? { disks: r.disks } : {}) };
  }

  #sweep(): void {
    const now = this.#now();
    for (const r of [...this.#tasks.values()]) {
      const a = this.#agent(r.agent);
      if (r.bootId === undefined && r.adopted) {
        // Named by another agent after the restart; its own agent has not polled since.
        if (now - r.queuedAt > this.#adoptWindowMs + this.#agentLostMs) {
          this.#finish(r, new BulwarkError(`lost agent ${r.agent}: it has not come back since the server started, and it ran the task`, {
            kind: 'unavailable',
            context: { agent: r.agent },
            hint: 'the agent process or its host stopped, or the network to it is down',
          }));
        }
        continue;
      }
      if (r.bootId === undefined) {
        if (now - r.queuedAt > this.#pickupTimeoutMs) {
          a.queue = a.queue.filter((t) => t.taskId !== r.taskId);
          this.#finish(r, new BulwarkError(`agent ${r.agent} did not pick up the task within ${Math.round(this.#pickupTimeoutMs / 1000)} s (is it running and connected?)`, {
            kind: 'unavailable',
            context: { agent: r.agent },
            hint: 'check `bulwark agent list` and the agent host',
          }));
        }
        continue;
      }
      if (a.polls === 0 && now - a.lastContact > this.#agentLostMs) {
        this.#finish(r, new BulwarkError(`lost agent ${r.agent}: not heard from for ${Math.round((now - a.lastContact) / 1000)} s while it ran the task`, {
          kind: 'unavailable',
          context: { agent: r.agent },
          hint: 'the agent process or its host stopped, or the network to it is down',
        }));
      }
    }
  }

  /** Fails every task still running (server shutdown). */
  close(): void {
    clearInterval(this.#timer);
    for (const r of [...this.#tasks.values()]) this.#finish(r, new BulwarkError('the server is shutting down', { kind: 'unavailable' }));
    for (const a of this.#agents.values()) a.wake?.();
  }
}

function errorKind(kind: string): BulwarkError['kind'] {
  const kinds: readonly string[] = ['invalid', 'unauthorized', 'forbidden', 'not-found', 'conflict', 'unavailable', 'corrupt', 'internal'];
  return (kinds.includes(kind) ? kind : 'internal') as BulwarkError['kind'];
}
