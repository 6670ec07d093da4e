// A changed job password (docs/encryption.md): a chain keeps the password it was created with.
// Through the job engine and the one-host data path, on a VM with no guest (QEMU `-machine none`,
// one qcow2 drive, writes by qemu-io inside QEMU): a job encrypted with password A takes a full;
// its password changes to B (the server still knows A: `passwords(job)` = [B, A]); the next run
// is an incremental of A's chain (not "wrong password", no full); `--full` starts a chain with B;
// every point restores bit-exact with its chain's password, and the other password is refused as
// wrong. The same for a per-job (single-file) chain. A chain whose password the server forgot
// fails its increment as "wrong password" and the session says what to do.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalDataPathExecutor } from '../../src/agent/backup/executor.js';
import { QmpClient } from '../../src/hypervisor/qmp/client.js';
import { ALL_VMS, catalogPoints, openRepository, type Repository, type RestorePointInfo } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/restore-disk.js';
import { JobEngine } from '../../src/server/jobs/engine.js';
import { InMemoryJobEngineStore } from '../../src/server/jobs/memory-store.js';
import type { JobDefinition } from '../../src/server/jobs/ports.js';
import { nbdcopyReference } from '../fixtures/guest.js';

const run = promisify(execFile);
const MiB = 1 << 20;
const DAY = 86_400_000;
const VM = 'pw-vm';
const SIZE = 8 * MiB + 4096;
const A = 'first-password-Aa1';
const B = 'second-password-Bb2';

let work: string;
let repo: Repository;
let executor: LocalDataPathExecutor;
const day0 = new Date(Math.floor(Date.now() / DAY) * DAY + 12 * 3600 * 1000);
let now = day0;
/** The server's side: the job's active password, and every password it knows for the job. */
let active: string | undefined;
let known: string[] = [];
/** SHA-256 of vda's view by the time of the run that took it. */
const references = new Map<number, string>();

async function qmpWrite(offset: number, length: number, pattern: number): Promise<void> {
  const c = await QmpClient.connect({ endpoint: { socketPath: path.join(work, 'vm', 'control.sock') }, label: `${VM} (test monitor)` });
  try {
    expect(await c.execute('human-monitor-command', { 'command-line': `qemu-io vda0 "write -P ${pattern} ${offset} ${length}"` })).toBe('');
  } finally {
    await c.close();
  }
}

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-per-job-password-'));
  const dir = path.join(work, 'vm');
  await mkdir(dir, { recursive: true });
  const raw = Buffer.alloc(SIZE);
  randomBytes(2 * MiB).copy(raw, MiB);
  await writeFile(path.join(dir, 'vda.raw'), raw);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(dir, 'vda.raw'), path.join(dir, 'vda.qcow2')]);
  await rm(path.join(dir, 'vda.raw'));
  await run('qemu-system-x86_64', [
    '-machine', 'none', '-nodefaults', '-display', 'none', '-name', VM,
    '-drive', `if=none,id=vda,node-name=vda0,format=qcow2,file=${path.join(dir, 'vda.qcow2')}`,
    '-qmp', `unix:${path.join(dir, 'qmp.sock')},server=on,wait=off`,
    '-qmp', `unix:${path.join(dir, 'control.sock')},server=on,wait=off`,
    '-pidfile', path.join(dir, 'qemu.pid'), '-daemonize',
  ]);
  repo = await openRepository(path.join(work, 'repo'), { create: true });
  executor = new LocalDataPathExecutor({
    hosts: async () => [{ kind: 'qemu', qmpGlob: path.join(dir, 'qmp.sock'), workDir: path.join(work, 'adapter') }],
    repositoryPath: async () => repo.root,
    password: async () => active,
    passwords: async () => known,
    passwordHint: async () => (active === A ? 'the first' : 'the second'),
    now: () => now,
    onView: async (_task, view) => {
      const file = path.join(work, 'ref.raw');
      await nbdcopyReference(view.disks[0]!, file);
      const h = createHash('sha256');
      for await (const c of createReadStream(file)) h.update(c as Buffer);
      references.set(now.getTime(), h.digest('hex'));
      await rm(file);
    },
  });
}, 60_000);

afterAll(async () => {
  await executor?.close();
  try {
    const pid = Number(await readFile(path.join(work, 'vm', 'qemu.pid'), 'utf8'));
    if (pid > 0) process.kill(pid, 'SIGKILL');
  } catch {
    // not started
  }
  if (work) await rm(work, { recursive: true, force: true });
});

async function runJob(job: JobDefinition, day: number, full = false): Promise<{ state: string; log: string }> {
  now = new Date(day0.getTime() + day * DAY);
  await qmpWrite((day % 6) * MiB + 512, 100_000, 0x40 + day);
  const store = new InMemoryJobEngineStore();
  store.putJob(job);
  const engine = new JobEngine({ store, executor, disks: executor, progressIntervalMs: 0 });
  try {
    const { sessionId } = await engine.runNow(job.id, { full });
    const state = await engine.waitForEnd(sessionId);
    return { state, log: (store.logs.get(sessionId) ?? []).map((l) => `${l.level}: ${l.message}`).join('\n') };
  } finally {
    await engine.shutdown();
  }
}

function job(name: string, settings: Record<string, unknown> = {}): JobDefinition {
  return { id: `id-${name}`, name, vms: [VM], repository: 'r', retry: { count: 0, waitSeconds: 0 }, settings: { blockSize: 256 * 1024, retention: { points: 10 }, ...settings } };
}

/** The point restores bit-exact with `password`, and `wrong` is refused as a wrong password (never as damage). */
async function restoresWith(p: RestorePointInfo, password: string, wrong: string): Promise<void> {
  const to = path.join(work, `restored-${p.id}.raw`);
  const r = await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, password, imageDigest: true });
  await rm(to);
  expect(r.sha256, `point ${p.id} (${p.kind}, ${p.time.toISOString()})`).toBe(references.get(p.time.getTime()));
  await expect(repo.openRestorePoint(p.id, { password: wrong })).rejects.toMatchObject({ kind: 'unauthorized', message: expect.stringMatching(/wrong password/) });
}

const ok = (s: { state: string; log: string }) => expect(s.state === 'success' || s.state === 'warning', s.log).toBe(true);

describe('a changed job password: increments keep the chain\'s password, the next full takes the new one', () => {
  it('per VM: A full, change to B, incremental of A\'s chain, --full starts B\'s chain; every point restores with its password', async () => {
    const j = job('pw');
    active = A;
    known = [A];
    ok(await runJob(j, 0));
    active = B;
    known = [B, A];
    const incr = await runJob(j, 1);
    ok(incr);
    expect(incr.log).toMatch(/this run: incremental/);
    expect(incr.log).toMatch(/encrypted with the job's earlier password: its increments keep that/);
    const full = await runJob(j, 2, true);
    ok(full);
    expect(full.log).toMatch(/this run: full/);
    const incr2 = await runJob(j, 3);
    ok(incr2);
    expect(incr2.log).not.toMatch(/earlier password/);

    const chains = await repo.listChains({ job: 'pw', vm: VM });
    expect(chains.map((c) => [c.encrypted, c.passwordHint, c.points.map((p) => p.kind)])).toEqual([
      [true, 'the first', ['full', 'incremental']],
      [true, 'the second', ['full', 'incremental']],
    ]);
    for (const p of chains[0]!.points) await restoresWith(p, A, B);
    for (const p of chains[1]!.points) await restoresWith(p, B, A);
  });

  it('per job: the same on the job\'s _all chain (each VM\'s part restores with the chain\'s password)', async () => {
    const j = job('pwj', { storage: 'per-job' });
    active = A;
    known = [A];
    ok(await runJob(j, 10));
    active = B;
    known = [B, A];
    const incr = await runJob(j, 11);
    ok(incr);
    expect(incr.log).toMatch(/this run: incremental/);
    const chains = await repo.listChains({ job: 'pwj', vm: ALL_VMS });
    expect(chains.map((c) => [c.passwordHint, c.points.map((p) => p.kind)])).toEqual([['the first', ['full', 'incremental']]]);
    for (const p of catalogPoints(chains[0]!.points)) await restoresWith(p, A, B);
  });

  it('a chain whose password the server no longer knows: the increment fails as a wrong password, and the session says what to do', async () => {
    active = B;
    known = [B];
    const s = await runJob(job('pwj', { storage: 'per-job' }), 12);
    expect(s.state, s.log).toBe('failed');
    expect(s.log).toMatch(/encrypted with a password this server does not know.*job run pwj --full/);
    expect(s.log).toMatch(/wrong password/);
    expect(s.log).not.toMatch(/corrupt|damaged/);
    expect((await repo.listRestorePoints({ job: 'pwj', vm: ALL_VMS })).length).toBe(2);
  });
});
