// Resource scheduling through the real server: startServer with its database, job engine and
// ResourceScheduler (DatabaseTaskSlots), the real local agent enrolled over the agent link, limits
// set with the console (`agent edit`, `repo edit`, `settings set`) over the unix socket. The
// executor does real work per disk task (reads a disk image, hashes it, writes a copy into the
// repository folder, reports its stage times). How many tasks ran at once is read back from the
// task start and end times the server recorded; no timings are asserted.
//
// The executor holds each task at a rendezvous until `gate` tasks run at once (or until fewer are
// left): if the scheduler granted fewer slots than the limit, the rendezvous cannot be met and the
// task fails with the count it saw.
import { createHash } from 'node:crypto';
import { randomFillSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inProcessConsole } from '../fixtures/console.js';
import type { DiskRef, DiskResolver, JobDefinition, TaskContext, TaskExecutor, TaskOutcome, TaskSpec } from '../../src/server/jobs/ports.js';
import { startServer, type RunningServer } from '../../src/server/main.js';
import { registerAgent } from '../../src/server/services/infrastructure.js';
import { StageTimes } from '../../src/transport/stage-times.js';
import { call } from './http.js';

const tmp = mkdtempSync(join(tmpdir(), 'bulwark-scheduling-'));
const DISK_BYTES = 4 << 20;

/** VMs and their disk images: `vm4` has 4 disks, `a` and `b` 2 each. */
const vms: Record<string, string[]> = { vm4: ['vda', 'vdb', 'vdc', 'vdd'], a: ['vda', 'vdb'], b: ['vda', 'vdb'], far: ['vda'], found: ['vda'] };

/** Every VM runs on host h1, except `far` on h2 (served by agent p2) and `found`, found by agent p2 (host name unknown). */
class Disks implements DiskResolver {
  async resolveDisks(_job: JobDefinition, vm: string): Promise<DiskRef[]> {
    const where: Record<string, string> = vm === 'found' ? { agent: 'p2' } : { host: vm === 'far' ? 'h2' : 'h1' };
    return (vms[vm] ?? []).map((name) => ({ name, sizeBytes: DISK_BYTES, location: { ...where, image: join(tmp, 'images', `${vm}-${name}.img`) } }));
  }
}

interface Seen {
  task: string;
  rate: number | undefined;
  sha256: string;
}

/** Copies each disk image into the repository folder, measuring read (Source), hash (Proxy), write (Target). */
class CopyExecutor implements TaskExecutor {
  gate = 1;
  total = 0;
  #running = 0;
  #completed = 0;
  readonly seen: Seen[] = [];
  /** Runs in every task right after the rendezvous, while it holds its slot. */
  onGate: (() => Promise<void>) | undefined;

  expect(gate: number, total: number): void {
    this.gate = gate;
    this.total = total;
    this.#completed = 0;
    this.seen.length = 0;
  }

  async execute(task: TaskSpec, context: TaskContext): Promise<TaskOutcome> {
    this.#running++;
    try {
      await this.#rendezvous(context.signal);
      await this.onGate?.();
      const rate = context.rateLimit?.();
      const stages = new StageTimes();
      const image = task.disk.location?.image ?? '';
      const data = await stages.measure('source', () => readFile(image));
      const sha256 = await stages.measure('proxy', async () => createHash('sha256').update(data).digest('hex'));
      const out = join(tmp, 'data', 'repository', `${task.sessionId}-${task.vm}-${task.disk.name}.copy`);
      await stages.measure('target', () => writeFile(out, data, { flush: true }));
      context.stageTimes?.(stages.snapshot());
      context.progress({ bytesRead: data.length, bytesTransferred: data.length, bytesStored: data.length, total: data.length });
      this.seen.push({ task: `${task.vm}/${task.disk.name}`, rate, sha256 });
      return { state: 'success' };
    } finally {
      this.#running--;
      this.#completed++;
    }
  }

  async #rendezvous(signal: AbortSignal): Promise<void> {
    const deadline = Date.now() + 60_000;
    for (;;) {
      if (this.#running >= Math.min(this.gate, this.total - this.#completed)) return;
      signal.throwIfAborted();
      if (Date.now() > deadline) throw new Error(`only ${this.#running} task(s) ran at once; expected ${this.gate}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}

const executor = new CopyExecutor();
let server: RunningServer;

const bulwark = inProcessConsole(() => ({ env: { BULWARK_CONFIG: join(tmp, 'cli-config') }, prefix: ['--server', `unix:${server.socketPath}`] })).run;

async function ok(...argv: string[]): Promise<string> {
  const r = await bulwark(...argv);
  expect(r.err, `bulwark ${argv.join(' ')}`).toBe('');
  expect(r.code, `bulwark ${argv.join(' ')}`).toBe(0);
  return r.out;
}

interface TaskView {
  vm: string;
  disk: string;
  state: string;
  startedAt: string;
  endedAt: string;
  proxy?: string;
  message?: string;
  stages?: { busyMs: Record<string, number>; shares: Record<string, number>; bottleneck: string | null; summary: string };
}
interface SessionView {
  id: string;
  jobName: string;
  state: string;
  tasks: TaskView[];
  stages?: TaskView['stages'];
}

async function runJobs(...jobs: string[]): Promise<SessionView[]> {
  const ids: string[] = [];
  for (const job of jobs) {
    const r = await call({ socketPath: server.socketPath }, 'POST', `/api/v1/jobs/${job}/run`, {});
    expect(r.status, r.body).toBe(202);
    ids.push(r.json<{ sessionId: string }>().sessionId);
  }
  const sessions: SessionView[] = [];
  const deadline = Date.now() + 60_000;
  for (const id of ids) {
    for (;;) {
      const s = (await call({ socketPath: server.socketPath }, 'GET', `/api/v1/sessions/${id}`)).json<SessionView & { log: unknown[] }>();
      if (!['queued', 'running'].includes(s.state)) {
        sessions.push(s);
        break;
      }
      if (Date.now() > deadline) throw new Error(`session ${id} did not end: ${JSON.stringify(s)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return sessions;
}

/** Most tasks running at one instant, from recorded [start, end) intervals. */
function maxOverlap(tasks: readonly TaskView[]): number {
  const events = tasks.flatMap((t) => [
    { at: Date.parse(t.startedAt), d: +1 },
    { at: Date.parse(t.endedAt), d: -1 },
  ]);
  // An end and a start at the same millisecond: the slot was handed over, not shared.
  events.sort((x, y) => x.at - y.at || x.d - y.d);
  let now = 0;
  let max = 0;
  for (const e of events) max = Math.max(max, (now += e.d));
  return max;
}

beforeAll(async () => {
  mkdirSync(join(tmp, 'images'));
  for (const [vm, disks] of Object.entries(vms)) {
    for (const d of disks) writeFileSync(join(tmp, 'images', `${vm}-${d}.img`), randomFillSync(Buffer.alloc(DISK_BYTES)));
  }
  server = await startServer({ dataDir: join(tmp, 'data'), listen: '127.0.0.1:0', print: () => undefined, configBackupAt: false, executor, disks: new Disks() });
  await ok('host', 'add', 'h1', '--qemu', join(tmp, 'qmp', '*.qmp'));
  // A second agent, as enrollment records it, serving host h2.
  await registerAgent(server.context, { name: 'p2', hostname: 'p2.example', agentVersion: '0', cores: 8, certFingerprint: null });
  await ok('host', 'add', 'h2', '--qemu', join(tmp, 'qmp2', '*.qmp'), '--agent', 'p2');
  for (const [job, vm] of [['four', 'vm4'], ['ja', 'a'], ['jb', 'b'], ['remote', 'far'], ['found', 'found']] as const) {
    expect((await call({ socketPath: server.socketPath }, 'POST', '/api/v1/jobs', { name: job, vms: [vm], repository: 'default', retries: { count: 0, waitMinutes: 0 } })).status).toBe(201);
  }
});

afterAll(async () => {
  await server?.close();
  rmSync(tmp, { recursive: true, force: true });
});

describe('task limits through the real server', () => {
  it('4 disks on a proxy limited to 2 tasks run 2 at a time; each gets half the repository rate', async () => {
    await ok('agent', 'edit', 'local', '--max-tasks', '2');
    await ok('repo', 'edit', 'default', '--max-tasks', '8', '--rate-limit', '200MB/s');
    expect(await ok('agent', 'show', 'local')).toMatch(/max tasks:\s+2\n/);
    executor.expect(2, 4);
    // What the scheduler holds while the first two run: both slots of local in use, two tasks queued.
    const status: Array<{ proxies: Array<{ name: string; running: number; maxTasks: number }>; queued: string[] }> = [];
    executor.onGate = async () => {
      if (status.length > 0) return;
      // The other two tasks reach the queue once their own configuration read is done.
      for (let tries = 0; tries < 600 && status.length === 0; tries++) {
        const now = (await call({ socketPath: server.socketPath }, 'GET', '/api/v1/scheduler')).json<(typeof status)[number]>();
        if (now.queued.length === 2 || tries === 599) status.push(now);
        else await new Promise((r) => setTimeout(r, 50));
      }
    };
    const [s] = await runJobs('four');
    executor.onGate = undefined;
    expect(status[0]!.proxies.find((p) => p.name === 'local')).toMatchObject({ running: 2, maxTasks: 2 });
    expect(status[0]!.queued).toHaveLength(2);
    expect(s!.state, JSON.stringify(s!.tasks.map((t) => t.message))).toBe('success');
    expect(s!.tasks).toHaveLength(4);
    expect(maxOverlap(s!.tasks)).toBe(2);
    expect(s!.tasks.every((t) => t.proxy === 'local')).toBe(true);
    // Tasks beyond the limit waited in the queue, and the session log says why.
    expect(JSON.stringify(s)).toContain('waiting for a task slot: proxy local is at its task limit (2 of 2)');
    // The first two ran side by side on a 200 MB/s repository: 100 MB/s each.
    expect(executor.seen.slice(0, 2).map((x) => x.rate)).toEqual([100e6, 100e6]);
    // Real work: every copy equals its image.
    for (const x of executor.seen) {
      const [vm, disk] = x.task.split('/');
      expect(x.sha256).toBe(createHash('sha256').update(await readFile(join(tmp, 'images', `${vm}-${disk}.img`))).digest('hex'));
    }
  });

  it('a repository limited to 2 tasks runs 2 at a time while the proxy could run 4', async () => {
    await ok('agent', 'edit', 'local', '--max-tasks', '4');
    await ok('repo', 'edit', 'default', '--max-tasks', '2', '--rate-limit', 'none');
    executor.expect(2, 4);
    const [s] = await runJobs('four');
    expect(s!.state).toBe('success');
    expect(maxOverlap(s!.tasks)).toBe(2);
    expect(executor.seen.map((x) => x.rate)).toEqual([undefined, undefined, undefined, undefined]);
  });

  it('sequential processing: one disk at a time within a job, two jobs still side by side', async () => {
    await ok('repo', 'edit', 'default', '--max-tasks', '8');
    await ok('settings', 'set', 'processing', 'sequential');
    const shown = await ok('settings', 'show');
    expect(shown).toMatch(/processing:\s+sequential/);
    expect(shown).toMatch(/proxy\s+local\s+0 of 4/);
    expect(shown).toMatch(/repository\s+default\s+0 of 8/);
    executor.expect(2, 4);
    const sessions = await runJobs('ja', 'jb');
    for (const s of sessions) {
      expect(s.state).toBe('success');
      expect(maxOverlap(s.tasks)).toBe(1);
    }
    expect(maxOverlap(sessions.flatMap((s) => s.tasks))).toBe(2);
    await ok('settings', 'set', 'processing', 'parallel');
  });

  it('the session shows each stage\'s share and names the bottleneck', async () => {
    executor.expect(1, 4);
    const [s] = await runJobs('four');
    const stages = s!.stages!;
    expect(stages.bottleneck).not.toBeNull();
    const busiest = Object.entries(stages.busyMs).sort((x, y) => y[1] - x[1])[0]![0];
    expect(stages.bottleneck).toBe(busiest);
    for (const t of s!.tasks) expect(t.stages?.busyMs.source).toBeGreaterThan(0);
    const out = await ok('session', 'show', s!.id);
    expect(out).toMatch(/stages:\s+Source \d+% > Proxy \d+% > Network \d+% > Target \d+%; bottleneck: (Source|Proxy|Target)\n/);
  });

  it('settings and limits refuse bad values, naming the field', async () => {
    const bad = await bulwark('agent', 'edit', 'local', '--max-tasks', 'many');
    expect(bad.code).toBe(2);
    const r = await call({ socketPath: server.socketPath }, 'PATCH', '/api/v1/settings', { version: 1, processing: 'sideways' });
    expect(r.status).toBe(400);
    expect(r.json<{ error: { field?: string } }>().error.field).toMatch(/processing/);
    await ok('agent', 'edit', 'local', '--max-tasks', 'default');
    expect(await ok('agent', 'show', 'local')).toMatch(/max tasks:\s+\d+ \(its CPU cores\)/);
  });

  it('restore folders: set (normalized, deduplicated), shown, cleared; relative ones refused', async () => {
    expect(await ok('settings', 'show')).toMatch(/restore folders:\s+none \(only administrators may restore to a path\)/);
    expect(await ok('settings', 'set', 'restore-folders', '/srv/restore/,/srv/pool/../restore,/var/lib/libvirt/images')).toContain('restore folders: /srv/restore, /var/lib/libvirt/images');
    expect(await ok('settings', 'show')).toMatch(/restore folders:\s+\/srv\/restore, \/var\/lib\/libvirt\/images \(where users/);
    const relative = await bulwark('settings', 'set', 'restore-folders', 'restores');
    expect(relative.code).toBe(2);
    expect(relative.err).toContain('restore folder "restores" is not an absolute path');
    const api = await call({ socketPath: server.socketPath }, 'PATCH', '/api/v1/settings', { version: 99, restoreFolders: ['restores'] });
    expect(api.status).toBe(400);
    expect(await ok('settings', 'set', 'restore-folders', 'none')).toContain('restore folders: none');
  });

  it('a VM on another host goes to the agent on that host; when that agent goes silent its task fails with the reasons', async () => {
    executor.expect(1, 1);
    const [s] = await runJobs('remote');
    expect(s!.state).toBe('success');
    expect(s!.tasks.map((t) => t.proxy)).toEqual(['p2']);
    // A disk an agent found, whose host name the resolver does not give, stays on that agent.
    executor.expect(1, 1);
    const [found] = await runJobs('found');
    expect(found!.tasks.map((t) => t.proxy)).toEqual(['p2']);
    // Pinned by the job: an agent that is not on the VM's host and cannot reach its disk fails the task with the reason.
    await ok('job', 'edit', 'ja', '--proxy', 'p2');
    expect(await ok('job', 'show', 'ja')).toMatch(/proxy:\s+p2\n/);
    executor.expect(1, 2);
    const [pinned] = await runJobs('ja');
    expect(pinned!.state).toBe('failed');
    expect(pinned!.tasks[0]!.message).toContain('proxy p2 pinned by the job is not on host h1');
    await ok('job', 'edit', 'ja', '--proxy', 'local');
    executor.expect(1, 2);
    const [onLocal] = await runJobs('ja');
    expect(onLocal!.state).toBe('success');
    expect(onLocal!.tasks.map((t) => t.proxy)).toEqual(['local', 'local']);
    const unknown = await bulwark('job', 'edit', 'ja', '--proxy', 'nobody');
    expect(unknown.code).toBe(1);
    expect(unknown.err).toContain('proxy: agent "nobody" not found');
    await ok('job', 'edit', 'ja', '--proxy', 'auto');
    expect(await ok('job', 'show', 'ja')).toMatch(/proxy:\s+automatic\n/);
    // Three missed heartbeats: p2 shows offline, and no other agent is on h2.
    await server.context.db.updateTable('agents').set({ last_seen_at: new Date(Date.now() - 10 * 60_000).toISOString() }).where('name', '=', 'p2').execute();
    expect(await ok('agent', 'show', 'p2')).toMatch(/state:\s+offline/);
    const [failed] = await runJobs('remote');
    expect(failed!.state).toBe('failed');
    expect(failed!.tasks[0]!.message).toContain('proxy p2 is offline');
    expect(failed!.tasks[0]!.message).toContain('proxy local is not on host h2');
  });
});
