// Per-job storage (single-file mode) through the job engine and the one-host data path: a job of
// two VMs (QEMU with no guest, `-machine none`, qcow2 drives; writes by qemu-io inside QEMU, so
// the dirty bitmaps count them) run several times a (simulated) day apart: each run writes ONE
// restore point for both VMs in the job's `_all` folder (one .vbk/.vib per run, none per VM), the
// catalog hears one record per VM (its slice id), retention works on the job's chain, and every
// kept point of every VM restores bit-exact against nbdcopy's copy of the same view. A run where
// one VM fails writes nothing (docs/decisions/0007-per-job-storage.md) and leaves the previous
// points and the change tracking as they were: the next run is an incremental and bit-exact; a
// retry round re-runs the failed tasks only, and its first task backs up every other VM too.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BackupVmSummary } from '../../src/agent/backup/disk-backup.js';
import { LocalDataPathExecutor } from '../../src/agent/backup/executor.js';
import { QmpClient } from '../../src/hypervisor/qmp/client.js';
import type { BackupView } from '../../src/hypervisor/types.js';
import { ALL_VMS, catalogPoints, openRepository, vmSliceId, type Repository, type RestorePointInfo } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/restore-disk.js';
import { JobEngine } from '../../src/server/jobs/engine.js';
import { InMemoryJobEngineStore } from '../../src/server/jobs/memory-store.js';
import type { JobDefinition, TaskRecord } from '../../src/server/jobs/ports.js';
import { RECORD_HEADER_SIZE } from '../../src/format/record.js';
import { nbdcopyReference } from '../fixtures/guest.js';

const run = promisify(execFile);
const MiB = 1 << 20;
const DAY = 86_400_000;
/** Two VMs, sizes not multiples of the 256 KiB block, random data in part of each disk. */
const VMS = [
  { name: 'pj-web', disks: [{ name: 'vda', size: 12 * MiB + 4096 }, { name: 'vdb', size: 6 * MiB + 512 }] },
  { name: 'pj-db', disks: [{ name: 'vda', size: 10 * MiB }] },
] as const;

let work: string;
let repo: Repository;
let executor: LocalDataPathExecutor;
let now = new Date(Math.floor(Date.now() / DAY) * DAY + 12 * 3600 * 1000);
const day0 = now;
/** SHA-256 of each VM disk's view (`vm/disk`) by the time of the run that took it. */
const references = new Map<number, Map<string, string>>();
/** What a test does when a VM's view exists (e.g. remove an export), by VM name and attempt. */
let onView: ((vm: string, view: BackupView, attempt: number) => Promise<void>) | null = null;
/** The catalog's side: what onRestorePoint and onVmPoints heard. */
const recorded: Array<{ vm: string; summary: BackupVmSummary }> = [];
const synced = new Map<string, readonly RestorePointInfo[]>();

const vmDir = (vm: string) => path.join(work, 'vms', vm);

async function qmp<T>(vm: string, command: string, args?: Record<string, unknown>): Promise<T> {
  const c = await QmpClient.connect({ endpoint: { socketPath: path.join(vmDir(vm), 'control.sock') }, label: `${vm} (test monitor)` });
  try {
    return await c.execute<T>(command, args);
  } finally {
    await c.close();
  }
}

/** A guest write, simulated by qemu-io on the disk's node inside QEMU (the dirty bitmaps count it). */
async function write(vm: string, disk: string, offset: number, length: number, pattern: number): Promise<void> {
  expect(await qmp(vm, 'human-monitor-command', { 'command-line': `qemu-io ${disk}0 "write -P ${pattern} ${offset} ${length}"` })).toBe('');
}

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-per-job-'));
  for (const vm of VMS) {
    await mkdir(vmDir(vm.name), { recursive: true });
    const drives: string[] = [];
    for (const d of vm.disks) {
      const raw = Buffer.alloc(d.size);
      randomBytes(3 * MiB).copy(raw, MiB);
      raw.fill(0x5a, d.size - 4096); // data in the short last block
      const base = path.join(vmDir(vm.name), d.name);
      await writeFile(`${base}.raw`, raw);
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', `${base}.raw`, `${base}.qcow2`]);
      await rm(`${base}.raw`);
      drives.push('-drive', `if=none,id=${d.name},node-name=${d.name}0,format=qcow2,file=${base}.qcow2`);
    }
    await run('qemu-system-x86_64', [
      '-machine', 'none', '-nodefaults', '-display', 'none', '-name', vm.name, ...drives,
      '-qmp', `unix:${path.join(vmDir(vm.name), 'qmp.sock')},server=on,wait=off`,
      '-qmp', `unix:${path.join(vmDir(vm.name), 'control.sock')},server=on,wait=off`,
      '-pidfile', path.join(vmDir(vm.name), 'qemu.pid'), '-daemonize',
    ]);
  }
  repo = await openRepository(path.join(work, 'repo'), { create: true });
  executor = new LocalDataPathExecutor({
    hosts: async () => [{ kind: 'qemu', qmpGlob: path.join(work, 'vms', '*', 'qmp.sock'), workDir: path.join(work, 'adapter') }],
    repositoryPath: async () => repo.root,
    now: () => now,
    onView: async (task, view) => {
      const refs = references.get(now.getTime()) ?? new Map<string, string>();
      references.set(now.getTime(), refs);
      for (const d of view.disks) {
        const file = path.join(work, `ref-${view.vm.name}-${d.disk.name}.raw`);
        await nbdcopyReference(d, file);
        refs.set(`${view.vm.name}/${d.disk.name}`, await sha256File(file));
        await rm(file);
      }
      await onView?.(view.vm.name, view, task.attempt);
    },
    onRestorePoint: async (_job, task, summary) => {
      recorded.push({ vm: task.vm, summary });
    },
    onVmPoints: async (_job, task, points) => {
      synced.set(task.vm, points);
    },
  });
}, 60_000);

afterAll(async () => {
  await executor?.close();
  for (const vm of VMS) {
    try {
      const pid = Number(await readFile(path.join(vmDir(vm.name), 'qemu.pid'), 'utf8'));
      if (pid > 0) process.kill(pid, 'SIGKILL');
    } catch {
      // not started
    }
  }
  if (work) await rm(work, { recursive: true, force: true });
});

interface Session {
  state: string;
  tasks: TaskRecord[];
  log: string;
}

/** One session of `job`; `sequential`: one task at a time, in the job's VM and disk order. */
async function runJob(job: JobDefinition, opts: { full?: boolean; sequential?: boolean } = {}): Promise<Session> {
  const store = new InMemoryJobEngineStore();
  store.putJob(job);
  const engine = new JobEngine({ store, executor, disks: executor, progressIntervalMs: 0, sequential: () => opts.sequential === true });
  try {
    const { sessionId } = await engine.runNow(job.id, { full: opts.full ?? false });
    const state = await engine.waitForEnd(sessionId);
    const log = (store.logs.get(sessionId) ?? []).map((l) => `${l.level}: ${l.message}`).join('\n');
    return { state, tasks: await store.listTasks(sessionId), log };
  } finally {
    await engine.shutdown();
  }
}

function perJob(name: string, settings: Record<string, unknown>, retries = 0): JobDefinition {
  return {
    id: `id-${name}`,
    name,
    vms: VMS.map((v) => v.name),
    repository: 'r',
    retry: { count: retries, waitSeconds: 0 },
    settings: { storage: 'per-job', blockSize: 256 * 1024, ...settings },
  };
}

/** Every file under the job's folder, relative to it. */
async function jobFiles(job: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true })) {
      if (e.isDirectory()) await walk(path.join(dir, e.name));
      else out.push(path.relative(path.join(repo.root, job), path.join(dir, e.name)));
    }
  };
  await walk(path.join(repo.root, job));
  return out.sort();
}

const backupExts = (files: string[]) => files.filter((f) => /\.(vbk|vib|vrb)$/.test(f)).map((f) => `${path.dirname(f)}:${f.slice(-3)}`).sort();

/** Every VM's part of every kept point of the job restores to exactly the view it was taken from. */
async function everyVmPointBitExact(job: string): Promise<number> {
  const slices = catalogPoints(await repo.listRestorePoints({ job, vm: ALL_VMS }));
  for (const p of slices) {
    const refs = references.get(p.time.getTime());
    const vm = VMS.find((v) => v.name === p.vm)!;
    expect(p.disks.map((d) => d.name)).toEqual(vm.disks.map((d) => d.name));
    for (const d of vm.disks) {
      const want = refs?.get(`${vm.name}/${d.name}`);
      expect(want, `reference of ${vm.name}/${d.name} at ${p.time.toISOString()}`).toBeDefined();
      const to = path.join(work, `restored-${p.id}-${d.name}.raw`);
      const r = await restoreDisk({ repository: repo, pointId: p.id, disk: d.name, to, imageDigest: true });
      await rm(to);
      expect(r.size).toBe(d.size);
      expect(r.sha256, `${vm.name}/${d.name} of point ${p.id} (${p.kind}, ${p.time.toISOString()})`).toBe(want);
    }
  }
  return slices.length;
}

/** Writes to every disk of both VMs (a different place and pattern each run). */
async function writeAll(k: number): Promise<void> {
  await write('pj-web', 'vda', (k % 8) * MiB + 4096, 70_000, 0x10 + k);
  await write('pj-web', 'vdb', 6 * MiB - 8192, 8192, 0x20 + k); // the short last block
  await write('pj-db', 'vda', (k % 5) * 2 * MiB, 300_000, 0x30 + k);
}

describe('per-job storage: one restore point for all VMs of a job', () => {
  const job = perJob('pj', { method: 'forever-forward', retention: { points: 2 } }, 1);

  it('runs 4 times a day apart: one .vbk/.vib per run for the job, one catalog record per VM, retention on the job chain, bit-exact', async () => {
    for (let k = 0; k < 4; k++) {
      now = new Date(day0.getTime() + k * DAY);
      if (k > 0) await writeAll(k);
      recorded.length = 0;
      const s = await runJob(job);
      expect(s.state === 'warning' || s.state === 'success', s.log).toBe(true);
      expect(s.tasks.map((t) => `${t.vm}/${t.disk}:${t.state === 'warning' ? 'success' : t.state}`).sort()).toEqual(['pj-db/vda:success', 'pj-web/vda:success', 'pj-web/vdb:success']);
      expect(s.log).toMatch(k === 0 ? /this run: full/ : /this run: incremental/);
      // One point for the job; the catalog heard each VM's part under its slice id.
      const points = await repo.listRestorePoints({ job: 'pj', vm: ALL_VMS });
      const latest = points.at(-1)!;
      expect(latest.time.getTime()).toBe(now.getTime());
      expect(recorded.map((r) => [r.vm, r.summary.pointId]).sort()).toEqual(VMS.map((v) => [v.name, vmSliceId(latest.id, v.name)]).sort());
      for (const r of recorded) {
        expect(r.summary.point.vm).toBe(r.vm);
        expect(r.summary.point.disks.map((d) => d.name)).toEqual(VMS.find((v) => v.name === r.vm)!.disks.map((d) => d.name));
      }
      if (k > 0) expect(s.log).toMatch(/vda: changes from dirty bitmap/);
    }
    expect(backupExts(await jobFiles('pj'))).toEqual(['_all:vbk', '_all:vib']);
    expect((await readdir(path.join(repo.root, 'pj'))).sort()).toEqual([ALL_VMS]);
    const points = await repo.listRestorePoints({ job: 'pj', vm: ALL_VMS });
    expect(points.map((p) => (p.time.getTime() - day0.getTime()) / DAY)).toEqual([2, 3]);
    // The catalog follows retention per VM: two records each, the merged ones gone.
    for (const v of VMS) expect(synced.get(v.name)?.map((p) => p.id)).toEqual(points.map((p) => vmSliceId(p.id, v.name)));
    expect(await everyVmPointBitExact('pj')).toBe(4);
  });

  // One task at a time (deterministic): pj-web's disk tasks end before pj-db's fails.
  it('a VM failing fails the job point: nothing written, previous points kept; the next run (a retry round) succeeds incrementally, bit-exact', async () => {
    now = new Date(day0.getTime() + 4 * DAY);
    await writeAll(4);
    const before = await jobFiles('pj');
    const pointsBefore = await repo.listRestorePoints({ job: 'pj', vm: ALL_VMS });
    onView = async (vm, view) => {
      if (vm === 'pj-db') await qmp(vm, 'block-export-del', { id: view.disks[0]!.nbd.exportName, mode: 'hard' });
    };
    try {
      const failed = await runJob({ ...job, retry: { count: 0, waitSeconds: 0 } }, { sequential: true });
      expect(failed.state, failed.log).toBe('failed');
      const dbTask = failed.tasks.find((t) => t.vm === 'pj-db')!;
      expect(dbTask.state, failed.log).toBe('failed');
      expect(dbTask.message, failed.log).toMatch(/VM pj-db: disk vda: .*not present/);
      expect(failed.log).toMatch(/job pj's restore point .*is not written/);
      expect(await repo.listRestorePoints({ job: 'pj', vm: ALL_VMS })).toEqual(pointsBefore);
      expect(await jobFiles('pj')).toEqual(before);

      // Next run: pj-db fails in the first round again; the retry round (its task alone) backs up
      // every VM into one point. The bitmaps were kept: an incremental.
      now = new Date(day0.getTime() + 5 * DAY);
      onView = async (vm, view, attempt) => {
        if (vm === 'pj-db' && attempt === 1) await qmp(vm, 'block-export-del', { id: view.disks[0]!.nbd.exportName, mode: 'hard' });
      };
      const retried = await runJob(job, { sequential: true });
      expect(retried.state === 'warning' || retried.state === 'success', retried.log).toBe(true);
      expect(retried.tasks.find((t) => t.vm === 'pj-db')!.attempt, retried.log).toBe(2);
      expect(retried.log).toMatch(/this run: incremental/);
      // The retry round's first task backs up every disk with no task of its own in the round (tasks
      // that ended well in the first round, unless the engine failed them with the point) and, the
      // round being a retry, the other VMs' disks: the point again holds every VM.
      const round = retried.tasks.filter((t) => t.attempt === 2).map((t) => `${t.vm}/${t.disk}`);
      const first = round[0]!;
      const vmOf = (d: string) => d.slice(0, d.indexOf('/'));
      const others = ['pj-web/vda', 'pj-web/vdb', 'pj-db/vda'].filter((d) => d !== first && (vmOf(d) !== vmOf(first) || !round.includes(d)));
      expect(retried.log).toMatch(new RegExp(`${first}: this task also backs up disk\\(s\\) ${others.join(', ')}`));
      expect(retried.tasks.every((t) => t.state === 'success' || t.state === 'warning'), retried.log).toBe(true);
      const points = await repo.listRestorePoints({ job: 'pj', vm: ALL_VMS });
      expect(points.map((p) => (p.time.getTime() - day0.getTime()) / DAY)).toEqual([3, 5]);
      expect(backupExts(await jobFiles('pj'))).toEqual(['_all:vbk', '_all:vib']);
      expect(await everyVmPointBitExact('pj')).toBe(4);
    } finally {
      onView = null;
    }
  });

  it('health check of the job chain names a flipped byte as VM/DISK; the next run re-reads that block from that VM and its point restores bit-exact', async () => {
    // Flip one byte inside the record of a block the latest point stored for pj-web/vda (written by writeAll(4)).
    const latest = (await repo.listRestorePoints({ job: 'pj', vm: ALL_VMS })).at(-1)!;
    const opened = await repo.openRestorePoint(latest.id);
    const block = Math.floor((4 * MiB + 4096) / (256 * 1024));
    const resolved = await opened.resolve('pj-web/vda', block);
    await opened.close();
    expect(resolved.kind === 'stored' && resolved.file.path === latest.file, `block ${block} of pj-web/vda is in ${latest.file}`).toBe(true);
    const entry = (resolved as Extract<typeof resolved, { kind: 'stored' }>).entry;
    const { open } = await import('node:fs/promises');
    const h = await open(latest.file, 'r+');
    const at = entry.recordOffset + RECORD_HEADER_SIZE + Math.floor(entry.storedLength / 2);
    const b = Buffer.alloc(1);
    await h.read(b, 0, 1, at);
    b[0] = b[0]! ^ 0x5a;
    await h.write(b, 0, 1, at);
    await h.close();

    const store = new InMemoryJobEngineStore();
    store.putJob(job);
    const engine = new JobEngine({ store, executor, disks: executor, progressIntervalMs: 0 });
    let checkLog: string;
    try {
      const check = await engine.runNow(job.id, { settings: { operation: 'health-check' }, noRetries: true });
      const state = await engine.waitForEnd(check.sessionId);
      checkLog = (store.logs.get(check.sessionId) ?? []).map((l) => l.message).join('\n');
      expect(state, checkLog).toBe('warning');
    } finally {
      await engine.shutdown();
    }
    const named = /damaged block (\d+) of disk (pj-web|pj-db)\/(vda|vdb) \(disk offset \d+\) in (\S+), read by point/.exec(checkLog);
    expect(named, checkLog).not.toBeNull();
    expect(named!.slice(1)).toEqual([String(block), 'pj-web', 'vda', latest.file]);

    now = new Date(day0.getTime() + 6 * DAY);
    await writeAll(6);
    const repaired = await runJob(job);
    expect(repaired.state === 'warning' || repaired.state === 'success', repaired.log).toBe(true);
    expect(repaired.log).toMatch(new RegExp(`repair: re-reading ${named![2]}/${named![3]} blocks [0-9, ]*\\b${named![1]}\\b`));
    expect(repaired.log).toMatch(new RegExp(`${named![3]}: re-reading \\d+ block\\(s\\) a health check found damaged`));
    // The new point of every VM restores bit-exact (the damaged increment before it stays damaged).
    const point = (await repo.listRestorePoints({ job: 'pj', vm: ALL_VMS })).at(-1)!;
    expect(point.time.getTime()).toBe(now.getTime());
    for (const slice of catalogPoints([point])) {
      for (const d of VMS.find((v) => v.name === slice.vm)!.disks) {
        const to = path.join(work, `repaired-${slice.vm}-${d.name}.raw`);
        const r = await restoreDisk({ repository: repo, pointId: slice.id, disk: d.name, to, imageDigest: true });
        await rm(to);
        expect(r.sha256, `${slice.vm}/${d.name}`).toBe(references.get(point.time.getTime())?.get(`${slice.vm}/${d.name}`));
      }
    }
  });

  it('reverse incremental per job: the newest point is the full holding both VMs, reverse increments behind it, bit-exact', async () => {
    const rev = perJob('pjr', { method: 'reverse', retention: { points: 2 } });
    for (let k = 0; k < 3; k++) {
      now = new Date(day0.getTime() + (10 + k) * DAY);
      await writeAll(10 + k);
      const s = await runJob(rev);
      expect(s.state === 'warning' || s.state === 'success', s.log).toBe(true);
      if (k > 0) expect(s.log).toMatch(/this run: reverse/);
    }
    expect(backupExts(await jobFiles('pjr'))).toEqual(['_all:vbk', '_all:vrb']);
    const points = await repo.listRestorePoints({ job: 'pjr', vm: ALL_VMS });
    expect(points.map((p) => p.kind)).toEqual(['reverse', 'full']);
    expect(await everyVmPointBitExact('pjr')).toBe(4);
  });
});
