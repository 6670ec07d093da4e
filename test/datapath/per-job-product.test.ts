// Per-job storage and a changed job password through the product: a real server in this process
// (real database, catalog, encryption keys, data path) and the console as a user types it, on two
// VMs with no guest (QEMU `-machine none`, one qcow2 drive each; writes by qemu-io inside QEMU
// into a model of each disk). `job create --storage per-job --encrypt`: one run writes one point
// for both VMs, `restore-point list` shows one record per VM; `job edit --encrypt` with a new
// password: the next run is an incremental of the chain (its own password), the session says so;
// every VM's every point restores bit-exact with no password typed.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inProcessConsole } from '../fixtures/console.js';
import { QmpClient } from '../../src/hypervisor/qmp/client.js';
import { startServer, type RunningServer } from '../../src/server/main.js';

const run = promisify(execFile);
const MiB = 1 << 20;
const SIZE = 6 * MiB + 4096;
const VMS = ['pp-a', 'pp-b'] as const;
let tmp: string;
let server: RunningServer;
/** What each VM's disk holds now (the writes applied). */
const model = new Map<string, Buffer>();

const vmDir = (vm: string) => path.join(tmp, 'vms', vm);
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function write(vm: string, offset: number, length: number, pattern: number): Promise<void> {
  const c = await QmpClient.connect({ endpoint: { socketPath: path.join(vmDir(vm), 'control.sock') }, label: `${vm} (test monitor)` });
  try {
    expect(await c.execute('human-monitor-command', { 'command-line': `qemu-io vda0 "write -P ${pattern} ${offset} ${length}"` })).toBe('');
  } finally {
    await c.close();
  }
  model.get(vm)!.fill(pattern, offset, offset + length);
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'bulwark-per-job-product-'));
  for (const vm of VMS) {
    await mkdir(vmDir(vm), { recursive: true });
    const raw = Buffer.alloc(SIZE);
    randomBytes(MiB).copy(raw, MiB);
    model.set(vm, raw);
    await writeFile(path.join(vmDir(vm), 'vda.raw'), raw);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(vmDir(vm), 'vda.raw'), path.join(vmDir(vm), 'vda.qcow2')]);
    await rm(path.join(vmDir(vm), 'vda.raw'));
    await run('qemu-system-x86_64', [
      '-machine', 'none', '-nodefaults', '-display', 'none', '-name', vm,
      '-drive', `if=none,id=vda,node-name=vda0,format=qcow2,file=${path.join(vmDir(vm), 'vda.qcow2')}`,
      '-qmp', `unix:${path.join(vmDir(vm), 'qmp.sock')},server=on,wait=off`,
      '-qmp', `unix:${path.join(vmDir(vm), 'control.sock')},server=on,wait=off`,
      '-pidfile', path.join(vmDir(vm), 'qemu.pid'), '-daemonize',
    ]);
  }
  server = await startServer({ dataDir: path.join(tmp, 'data'), listen: 'none', print: () => undefined, configBackupAt: false, simulate: false });
}, 120_000);

afterAll(async () => {
  await server?.close();
  for (const vm of VMS) {
    try {
      const pid = Number(await readFile(path.join(vmDir(vm), 'qemu.pid'), 'utf8'));
      if (pid > 0) process.kill(pid, 'SIGKILL');
    } catch {
      // not started
    }
  }
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

const cli = inProcessConsole(() => ({ env: { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: path.join(tmp, 'cli') } }));
const bw = cli.run;
const bwJson = cli.json;

interface SessionJson {
  state: string;
  log: Array<{ level: string; message: string }>;
}
interface PointJson {
  id: string;
  vm: string;
  type: string;
  time: string;
}
const logText = (s: SessionJson): string => s.log.map((l) => `${l.level}: ${l.message}`).join('\n');

describe('per-job storage and a changed password through the console', () => {
  /** SHA-256 each VM's disk must restore to, by point id. */
  const want = new Map<string, string>();

  async function runJob(): Promise<SessionJson> {
    const s = await bwJson<SessionJson>('job', 'run', 'pj', '--wait');
    expect(s.state === 'success' || s.state === 'warning', logText(s)).toBe(true);
    const points = await bwJson<PointJson[]>('restore-point', 'list');
    for (const vm of VMS) {
      const latest = points.filter((p) => p.vm === vm).sort((a, b) => a.time.localeCompare(b.time)).at(-1)!;
      if (!want.has(latest.id)) want.set(latest.id, sha(model.get(vm)!));
    }
    return s;
  }

  it('one point per run for both VMs, one record per VM; after a password change the increment keeps the chain; every point restores bit-exact', async () => {
    expect((await bw('host', 'add', 'kvm1', '--qemu', path.join(tmp, 'vms', '*', 'qmp.sock'))).code).toBe(0);
    await writeFile(path.join(tmp, 'pw1'), 'first-password-1\n');
    await writeFile(path.join(tmp, 'pw2'), 'second-password-2\n');
    const created = await bw('job', 'create', 'pj', '--vm', ...VMS, '--repo', 'default', '--keep', '5', '--retries', '0', '--block-size', '256K',
      '--storage', 'per-job', '--encrypt', '--password-hint', 'one', '--password-file', path.join(tmp, 'pw1'));
    expect(created.code, created.err).toBe(0);
    expect((await bw('job', 'show', 'pj')).out).toMatch(/one file set per job/);

    const first = await runJob();
    expect(logText(first)).toMatch(/this run: full/);
    let points = await bwJson<PointJson[]>('restore-point', 'list');
    expect(points.map((p) => [p.vm, p.type]).sort()).toEqual([['pp-a', 'full'], ['pp-b', 'full']]);
    const repoRoot = (await bwJson<Array<{ name: string; path: string }>>('repo', 'list')).find((r) => r.name === 'default')!.path;
    expect(await readdir(path.join(repoRoot, 'pj'))).toEqual(['_all']);

    await write('pp-a', 2 * MiB, 100_000, 0x61);
    await write('pp-b', 5 * MiB, 4096, 0x62);
    const edited = await bw('job', 'edit', 'pj', '--encrypt', '--password-hint', 'two', '--password-file', path.join(tmp, 'pw2'));
    expect(edited.code, edited.err).toBe(0);
    const second = await runJob();
    expect(logText(second)).toMatch(/this run: incremental/);
    expect(logText(second)).toMatch(/encrypted with the job's earlier password: its increments keep that/);
    points = await bwJson<PointJson[]>('restore-point', 'list');
    expect(points.map((p) => [p.vm, p.type]).sort()).toEqual([['pp-a', 'full'], ['pp-a', 'incremental'], ['pp-b', 'full'], ['pp-b', 'incremental']]);
    const backupFiles = (await readdir(path.join(repoRoot, 'pj', '_all'))).filter((f) => /\.(vbk|vib)$/.test(f)).map((f) => f.slice(-3)).sort();
    expect(backupFiles).toEqual(['vbk', 'vib']);

    for (const p of points) {
      const to = path.join(tmp, `restored-${p.id}.raw`);
      const r = await bwJson<{ sha256: string }>('restore', 'disk', p.id, '--disk', 'vda', '--to', to, '--digest');
      await rm(to);
      expect(r.sha256, `${p.vm} ${p.type} ${p.id}`).toBe(want.get(p.id));
    }
  });
});
