// One task per VM disk, really (docs/resource-scheduling.md, "Parallel disks of one VM"): a VM with
// three disks (a QEMU with no guest, `-machine none`, three qcow2 drives) backed up by the job
// engine through LocalDataPathExecutor, with the real ResourceScheduler granting a proxy of 2
// tasks and a repository rate limit shared by the running tasks. Read back from the recorded task
// start and end times and the session log: 2 disks at a time, each disk task doing its own disk's
// work (its reads logged within its own run time, two disks' reads overlapping), the stage times
// of each task present (Source, Throttling, Target) and within its run time. Full and
// incremental are restored bit-exact, every disk, against nbdcopy's copy of the same view; one
// disk failing (its NBD export removed) leaves no restore point, every other disk task of the VM
// fails with that reason (also one that had finished its disk: the point it wrote into was never
// committed), and the next run succeeds — also through a retry round, which re-runs every disk task
// of the VM.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalDataPathExecutor } from '../../src/agent/backup/executor.js';
import type { HypervisorConnection } from '../../src/hypervisor/index.js';
import { QmpClient } from '../../src/hypervisor/qmp/client.js';
import type { BackupView } from '../../src/hypervisor/types.js';
import { openRepository, type Repository } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/restore-disk.js';
import { JobEngine } from '../../src/server/jobs/engine.js';
import { InMemoryJobEngineStore } from '../../src/server/jobs/memory-store.js';
import type { TaskRecord } from '../../src/server/jobs/ports.js';
import { ResourceScheduler, SchedulerTaskSlots } from '../../src/server/resources/scheduler.js';
import { nbdcopyReference } from '../fixtures/guest.js';

const run = promisify(execFile);
const VM = 'pd-vm';
const JOB = 'pd';
const MiB = 1 << 20;
/** Unaligned sizes (not multiples of the 1 MiB block), random data in the middle, zeroes elsewhere. */
const DISKS = [
  { name: 'vda', size: 24 * MiB + 64 * 1024, data: [2 * MiB, 7 * MiB] },
  { name: 'vdb', size: 20 * MiB + 4096, data: [0, 6 * MiB] },
  { name: 'vdc', size: 18 * MiB + 512, data: [9 * MiB, 6 * MiB] },
] as const;
/** The repository's rate for all its tasks together: two tasks share it, so each disk takes a while (and Throttling shows). */
const REPO_RATE = 16 * MiB;

let work: string;
let vmDir: string;
let repo: Repository;
let connection: HypervisorConnection;
let executor: LocalDataPathExecutor;
/** What a test does when the view exists (e.g. remove an export); null: nothing. */
let onView: ((view: BackupView, attempt: number) => Promise<void>) | null = null;
/** nbdcopy's copy of each disk's view in the latest run: the reference for a bit-exact restore. */
let refs: Record<string, string> = {};

async function qmp<T>(command: string, args?: Record<string, unknown>): Promise<T> {
  const c = await QmpClient.connect({ endpoint: { socketPath: path.join(vmDir, 'control.sock') }, label: `${VM} (test monitor)` });
  try {
    return await c.execute<T>(command, args);
  } finally {
    await c.close();
  }
}

/** A guest write, simulated: qemu-io on the disk's node inside QEMU (counted by the dirty bitmaps). */
async function write(disk: string, offset: number, length: number, pattern: number): Promise<void> {
  expect(await qmp('human-monitor-command', { 'command-line': `qemu-io ${disk}0 "write -P ${pattern} ${offset} ${length}"` })).toBe('');
}

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-parallel-disks-'));
  vmDir = path.join(work, 'vm');
  await run('mkdir', ['-p', vmDir]);
  const drives: string[] = [];
  for (const d of DISKS) {
    const raw = Buffer.alloc(d.size);
    randomBytes(d.data[1]).copy(raw, d.data[0]);
    raw.fill(0x5a, d.size - 4096); // data in the short last block
    await writeFile(path.join(vmDir, `${d.name}.raw`), raw);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(vmDir, `${d.name}.raw`), path.join(vmDir, `${d.name}.qcow2`)]);
    await rm(path.join(vmDir, `${d.name}.raw`));
    drives.push('-drive', `if=none,id=${d.name},node-name=${d.name}0,format=qcow2,file=${path.join(vmDir, `${d.name}.qcow2`)}`);
  }
  await run('qemu-system-x86_64', [
    '-machine', 'none', '-nodefaults', '-display', 'none', '-name', VM, ...drives,
    '-qmp', `unix:${path.join(vmDir, 'qmp.sock')},server=on,wait=off`,
    '-qmp', `unix:${path.join(vmDir, 'control.sock')},server=on,wait=off`,
    '-pidfile', path.join(vmDir, 'qemu.pid'), '-daemonize',
  ]);
  connection = { kind: 'qemu', qmpGlob: path.join(vmDir, 'qmp.sock'), workDir: path.join(work, 'adapter') };
  repo = await openRepository(path.join(work, 'repo'), { create: true });
  executor = new LocalDataPathExecutor({
    hosts: async () => [connection],
    repositoryPath: async () => repo.root,
    onView: async (task, view) => {
      refs = {};
      for (const d of view.disks) {
        refs[d.disk.name] = path.join(work, `ref-${task.sessionId}-${d.disk.name}.raw`);
        await nbdcopyReference(d, refs[d.disk.name]!);
      }
      await onView?.(view, task.attempt);
    },
  });
}, 60_000);

afterAll(async () => {
  await executor?.close();
  try {
    const pid = Number(await readFile(path.join(vmDir, 'qemu.pid'), 'utf8'));
    if (pid > 0) process.kill(pid, 'SIGKILL');
  } catch {
    // not started
  }
  if (work) await rm(work, { recursive: true, force: true });
});

interface Session {
  id: string;
  state: string;
  tasks: TaskRecord[];
  log: Array<{ time: Date; level: string; message: string; taskId?: string | undefined }>;
}

/** Runs the job once: a proxy of 2 tasks, the repository's rate shared by its running tasks. */
async function runJob(retries = 0): Promise<Session> {
  const store = new InMemoryJobEngineStore();
  store.putJob({ id: 'j1', name: JOB, vms: [VM], repository: 'repo', retry: { count: retries, waitSeconds: 0 }, settings: {} });
  const scheduler = new ResourceScheduler({
    proxies: [{ name: 'local', host: '', online: true, maxTasks: 2, reaches: [] }],
    repositories: [{ name: 'repo', maxTasks: 8, rateLimit: REPO_RATE }],
  });
  const engine = new JobEngine({ store, executor, disks: executor, slots: new SchedulerTaskSlots(scheduler), progressIntervalMs: 0 });
  try {
    const { sessionId } = await engine.runNow(JOB);
    const state = await engine.waitForEnd(sessionId);
    return { id: sessionId, state, tasks: await store.listTasks(sessionId), log: store.logs.get(sessionId) ?? [] };
  } finally {
    await engine.shutdown();
  }
}

function logText(s: Session): string {
  return s.log.map((l) => `${l.time.toISOString()} ${l.level}: ${l.message}`).join('\n');
}

/** The most tasks running at one instant, from their start and end times. */
function maxConcurrent(tasks: readonly TaskRecord[]): number {
  const edges = tasks.flatMap((t) => [
    { at: t.startedAt!.getTime(), d: 1 },
    { at: t.endedAt!.getTime(), d: -1 },
  ]);
  edges.sort((a, b) => a.at - b.at || a.d - b.d); // an end before a start at the same instant
  let now = 0;
  let max = 0;
  for (const e of edges) max = Math.max(max, (now += e.d));
  return max;
}

/** Checks how the disk tasks ran: 2 at a time, each its own disk within its own run time, stage times. */
function checkParallel(s: Session, throttled: boolean): void {
  const text = logText(s);
  // No guest agent: crash-consistent, a warning on the task that committed the point.
  expect(s.tasks.map((t) => [t.disk, t.state === 'warning' ? 'success' : t.state]).sort(), text).toEqual(DISKS.map((d) => [d.name, 'success']));
  expect(s.tasks.filter((t) => t.state === 'warning').map((t) => t.message).join('\n'), text).toMatch(/crash-consistent/);
  expect(maxConcurrent(s.tasks), text).toBe(2);
  const byDisk = Object.fromEntries(s.tasks.map((t) => [t.disk, t]));
  const order = [...s.tasks].sort((a, b) => a.startedAt!.getTime() - b.startedAt!.getTime());
  // The third disk got its slot when one of the first two ended.
  expect(order[2]!.startedAt!.getTime()).toBeGreaterThanOrEqual(Math.min(order[0]!.endedAt!.getTime(), order[1]!.endedAt!.getTime()));
  const lineOf = (disk: string, re: RegExp) => s.log.find((l) => l.message.startsWith(`${VM}/${disk}: `) && re.test(l.message));
  const work: Record<string, { from: number; to: number }> = {};
  for (const d of DISKS) {
    const t = byDisk[d.name]!;
    // The disk's work is logged by its own task, while that task ran.
    const begin = lineOf(d.name, new RegExp(`: ${d.name}: (full read|changes from dirty bitmap)`));
    const end = lineOf(d.name, new RegExp(`: ${d.name}: read \\d+ bytes`));
    expect(begin?.taskId, `${d.name} begin\n${text}`).toBe(t.id);
    expect(end?.taskId, `${d.name} end\n${text}`).toBe(t.id);
    for (const l of [begin!, end!]) {
      expect(l.time.getTime()).toBeGreaterThanOrEqual(t.startedAt!.getTime());
      expect(l.time.getTime()).toBeLessThanOrEqual(t.endedAt!.getTime());
    }
    work[d.name] = { from: begin!.time.getTime(), to: end!.time.getTime() };
    expect(t.progress.bytesRead, d.name).toBeGreaterThan(0);
    // Stage times: present, and none longer than the task ran (no timing thresholds).
    const busy = t.stageBusy!;
    expect(busy, d.name).toBeDefined();
    expect(busy.source + busy.throttling, `${d.name} ${JSON.stringify(busy)}`).toBeGreaterThan(0);
    const ran = t.endedAt!.getTime() - t.startedAt!.getTime() + 50;
    for (const v of Object.values(busy)) expect(v).toBeLessThanOrEqual(ran);
    expect(busy.source + busy.proxy + busy.target + busy.throttling).toBeLessThanOrEqual(ran * 2);
  }
  // Two disks' reads overlapped: the work ran side by side, not one disk after the other.
  const [a, b] = [work[order[0]!.disk]!, work[order[1]!.disk]!];
  expect(a.from < b.to && b.from < a.to, JSON.stringify(work)).toBe(true);
  // The repository rate held data back (a full: more than a burst per disk), and the VM's last
  // task committed (its commit counts to Target).
  if (throttled) expect(s.tasks.some((t) => t.stageBusy!.throttling > 0)).toBe(true);
  expect(s.tasks.some((t) => t.stageBusy!.target > 0)).toBe(true);
  expect(s.log.filter((l) => /point in time taken/.test(l.message))).toHaveLength(1);
}

async function checkRestore(pointId: string): Promise<void> {
  const point = (await repo.listRestorePoints({ job: JOB, vm: VM })).find((p) => p.id === pointId)!;
  expect(point.disks.map((d) => d.name)).toEqual(DISKS.map((d) => d.name));
  for (const d of DISKS) {
    const to = path.join(work, `restored-${pointId}-${d.name}.raw`);
    const r = await restoreDisk({ repository: repo, pointId, disk: d.name, to });
    const ref = refs[d.name]!;
    await run('cmp', [to, ref]);
    expect(r.size).toBe(d.size);
    await rm(to);
  }
}

async function repoFiles(): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true })) {
      if (e.isDirectory()) await walk(path.join(dir, e.name));
      else out.push(path.relative(repo.root, path.join(dir, e.name)));
    }
  };
  await walk(repo.root);
  return out.sort();
}

describe('one task per VM disk on a proxy of 2 tasks', () => {
  const points: string[] = [];

  it('full: 2 disks at a time, each task its own disk, one restore point, every disk bit-exact', async () => {
    const s = await runJob();
    expect(s.state, logText(s)).toBe('warning');
    checkParallel(s, true);
    const all = await repo.listRestorePoints({ job: JOB, vm: VM });
    expect(all.map((p) => p.kind)).toEqual(['full']);
    points.push(all[0]!.id);
    await checkRestore(all[0]!.id);
  });

  it('incremental after writes to every disk: read from the bitmaps, 2 at a time, bit-exact', async () => {
    await write('vda', 3 * MiB + 4096, 70_000, 0x11);
    await write('vdb', 20 * MiB - 8192, 8192, 0x22); // the short last block
    await write('vdc', 0, 2 * MiB, 0x33);
    const s = await runJob();
    expect(s.state, logText(s)).toBe('warning');
    checkParallel(s, false);
    expect(logText(s)).toMatch(/vdc: changes from dirty bitmap/);
    const all = await repo.listRestorePoints({ job: JOB, vm: VM });
    expect(all.map((p) => p.kind)).toEqual(['full', 'incremental']);
    points.push(all[1]!.id);
    await checkRestore(all[1]!.id);
  });

  it('one disk failing (its export removed) leaves no restore point; the next run succeeds, also through a retry of that disk alone', async () => {
    const before = await repoFiles();
    await write('vdb', 5 * MiB, 1 * MiB, 0x44);
    onView = async (view) => {
      await qmp('block-export-del', { id: view.disks.find((d) => d.disk.name === 'vdc')!.nbd.exportName, mode: 'hard' });
    };
    try {
      const failed = await runJob();
      const text = logText(failed);
      expect(failed.state, text).toBe('failed');
      const vdc = failed.tasks.find((t) => t.disk === 'vdc')!;
      expect(vdc.state, text).toBe('failed');
      // Every other disk task fails with vdc's reason: one still running when vdc failed, and one
      // that had finished its disk (the point was never committed), not "success".
      for (const t of failed.tasks.filter((x) => x.disk !== 'vdc')) {
        expect(t.state, text).toBe('failed');
        expect(t.message, text).toMatch(/vdc/);
      }
      expect((await repo.listRestorePoints({ job: JOB, vm: VM })).map((p) => p.id)).toEqual(points);
      expect(await repoFiles()).toEqual(before);

      // The next run: vdc fails again in the first round (failing the VM's other disk tasks); the
      // retry round runs every disk task of the VM again.
      onView = async (view, attempt) => {
        if (attempt === 1) await qmp('block-export-del', { id: view.disks.find((d) => d.disk.name === 'vdc')!.nbd.exportName, mode: 'hard' });
      };
      const retried = await runJob(1);
      const rtext = logText(retried);
      expect(retried.state, rtext).toBe('warning');
      expect(retried.tasks.map((t) => `${t.disk}#${t.attempt}`).sort(), rtext).toEqual(['vda#2', 'vdb#2', 'vdc#2']);
      const all = await repo.listRestorePoints({ job: JOB, vm: VM });
      expect(all.map((p) => p.kind)).toEqual(['full', 'incremental', 'incremental']);
      await checkRestore(all[2]!.id);
    } finally {
      onView = null;
    }
  });
});
