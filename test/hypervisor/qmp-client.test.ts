// The QMP client against qemu-storage-daemon and `qemu-system-x86_64 -machine none -accel tcg`:
// commands, errors with class and description, events (listener, iterator, waitForEvent), and
// what happens when QEMU stops answering or dies.
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient, QmpError, type QmpEvent } from '../../src/hypervisor/qmp/client.js';
import { QsdFixture, createTestImage, processGone } from '../fixtures/qsd.js';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-qmp-test-'));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('QMP client against qemu-storage-daemon', () => {
  it('runs commands, reports errors with class, description and command, and sees bitmaps', async () => {
    const image = await createTestImage(dir, 'qsd.qcow2', 16 * MiB, [{ offset: 0, length: MiB, fill: 0x11 }]);
    const qsd = await QsdFixture.start({ image });
    try {
      const qmp = qsd.qmp;
      expect(qmp.greeting.version.qemu.major).toBeGreaterThanOrEqual(7);
      await qmp.execute('block-dirty-bitmap-add', { node: qsd.nodeName, name: 'bm0', persistent: true, granularity: 65536 });
      const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string; granularity: number; recording: boolean }> }>>(
        'query-named-block-nodes',
        { flat: true },
      );
      const disk = nodes.find((n) => n['node-name'] === qsd.nodeName);
      expect(disk?.['dirty-bitmaps']).toEqual([expect.objectContaining({ name: 'bm0', granularity: 65536, recording: true })]);

      const dup = (await qmp.execute('block-dirty-bitmap-add', { node: qsd.nodeName, name: 'bm0' }).catch((e: unknown) => e)) as QmpError;
      expect(dup).toBeInstanceOf(QmpError);
      expect(dup.reason).toBe('command');
      expect(dup.errorClass).toBe('GenericError');
      expect(dup.command).toBe('block-dirty-bitmap-add');
      expect(dup.desc).toContain('bm0');
      expect(dup.message).toContain('block-dirty-bitmap-add');

      const unknown = (await qmp.execute('no-such-command').catch((e: unknown) => e)) as QmpError;
      expect(unknown.errorClass).toBe('CommandNotFound');
      expect(unknown.kind).toBe('not-found');

      // Commands in parallel get their own answers.
      const [a, b] = await Promise.all([qmp.execute<{ qemu: { major: number } }>('query-version'), qmp.execute<unknown[]>('query-block-exports')]);
      expect(a.qemu.major).toBe(qmp.greeting.version.qemu.major);
      expect(Array.isArray(b)).toBe(true);
    } finally {
      await qsd.stop();
    }
    expect(processGone(qsd.pid)).toBe(true);
  });

  it('waits for BLOCK_EXPORT_DELETED and delivers events to listeners', async () => {
    const image = await createTestImage(dir, 'qsd2.qcow2', 8 * MiB);
    const qsd = await QsdFixture.start({ image });
    try {
      const seen: string[] = [];
      const off = qsd.qmp.on('*', (e) => seen.push(e.event));
      await qsd.addExport('e1');
      const deleted = qsd.qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === 'e1', 5000);
      await qsd.qmp.execute('block-export-del', { id: 'e1' });
      expect((await deleted).data).toEqual({ id: 'e1' });
      off();
      expect(seen).toContain('BLOCK_EXPORT_DELETED');
      const never = (await qsd.qmp.waitForEvent('SHUTDOWN', undefined, 100).catch((e: unknown) => e)) as QmpError;
      expect(never.reason).toBe('timeout');
      expect(never.message).toContain('SHUTDOWN');
    } finally {
      await qsd.stop();
    }
  });
});

describe('QMP client against qemu-system-x86_64 -machine none', () => {
  let qemuPid: number;
  let qmp: QmpClient;
  const sock = (): string => path.join(dir, 'vm-qmp.sock');

  beforeAll(async () => {
    const image = await createTestImage(dir, 'vm.qcow2', 32 * MiB, [{ offset: 4 * MiB, length: MiB, fill: 0x22 }]);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'fleece.qcow2'), String(32 * MiB)]);
    await exec('qemu-system-x86_64', [
      '-machine', 'none', '-accel', 'tcg', '-nodefaults', '-display', 'none', '-no-user-config',
      '-blockdev', `driver=file,node-name=file0,filename=${image}`,
      '-blockdev', 'driver=qcow2,node-name=disk0,file=file0',
      '-qmp', `unix:${sock()},server=on,wait=off`,
      '-pidfile', path.join(dir, 'vm.pid'), '-daemonize',
    ]);
    qemuPid = Number((await readFile(path.join(dir, 'vm.pid'), 'utf8')).trim());
    qmp = await QmpClient.connect({ endpoint: { socketPath: sock() }, label: 'test-vm' });
  });

  afterAll(async () => {
    await qmp?.close();
    if (qemuPid && !processGone(qemuPid)) {
      process.kill(qemuPid, 'SIGKILL');
      while (!processGone(qemuPid)) await new Promise((r) => setTimeout(r, 20));
    }
  });

  it('runs a fleecing backup job and sees BLOCK_JOB_CANCELLED after block-job-cancel', async () => {
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: { driver: 'file', filename: path.join(dir, 'fleece.qcow2') }, backing: 'disk0' });
    const iter = qmp.events(['JOB_STATUS_CHANGE']);
    await qmp.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'bm0', persistent: true } },
        { type: 'blockdev-backup', data: { 'job-id': 'fleece-job', device: 'disk0', target: 'fleece', sync: 'none' } },
      ],
    });
    // A guest write while the job runs: HMP qemu-io through the copy-before-write filter the
    // backup job put on top of disk0 (writing to disk0 itself is a permission conflict now).
    const graph = await qmp.execute<Array<{ 'node-name': string; drv: string }>>('query-named-block-nodes', { flat: true });
    const cbw = graph.find((n) => n.drv === 'copy-before-write')?.['node-name'];
    expect(cbw).toBeDefined();
    expect(await qmp.execute('human-monitor-command', { 'command-line': `qemu-io ${cbw} "write -P 0xaa 1M 64k"` })).toBe('');
    const jobs = await qmp.execute<Array<{ id: string; type: string; status: string }>>('query-block-jobs');
    expect(jobs).toEqual([expect.objectContaining({ device: 'fleece-job', type: 'backup' })]);

    const cancelled = qmp.waitForEvent('BLOCK_JOB_CANCELLED', (e) => e.data.device === 'fleece-job', 10_000);
    await qmp.execute('block-job-cancel', { device: 'fleece-job' });
    const ev = await cancelled;
    expect(ev.data).toMatchObject({ device: 'fleece-job', type: 'backup' });
    expect(ev.timestamp.seconds).toBeGreaterThan(0);

    const statuses: string[] = [];
    for await (const e of iter as AsyncIterable<QmpEvent>) {
      statuses.push(String(e.data.status));
      if (e.data.status === 'null') break;
    }
    expect(statuses).toContain('running');
    expect(statuses[statuses.length - 1]).toBe('null');
    expect(await qmp.execute('query-block-jobs')).toEqual([]);
    await qmp.execute('blockdev-del', { 'node-name': 'fleece' });
    const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string; count: number }> }>>('query-named-block-nodes', { flat: true });
    expect(nodes.find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps']).toEqual([expect.objectContaining({ name: 'bm0', count: 65536 })]);
  });

  it('times out a command QEMU does not answer, naming it, and goes on afterwards', async () => {
    process.kill(qemuPid, 'SIGSTOP');
    try {
      const err = (await qmp.execute('query-status', {}, { timeoutMs: 200 }).catch((e: unknown) => e)) as QmpError;
      expect(err).toBeInstanceOf(QmpError);
      expect(err.reason).toBe('timeout');
      expect(err.command).toBe('query-status');
      expect(err.message).toContain('test-vm');
    } finally {
      process.kill(qemuPid, 'SIGCONT');
    }
    // The late answer is dropped; the next command gets its own.
    expect(await qmp.execute<{ status: string }>('query-status')).toMatchObject({ status: expect.any(String) });
  });

  it('fails pending commands and waiters when QEMU dies', async () => {
    process.kill(qemuPid, 'SIGSTOP');
    const pending = qmp.execute('query-status', {}, { timeoutMs: 0 }).catch((e: unknown) => e);
    const waiting = qmp.waitForEvent('SHUTDOWN', undefined, 0).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 100));
    process.kill(qemuPid, 'SIGKILL');
    const err = (await pending) as QmpError;
    expect(err).toBeInstanceOf(QmpError);
    expect(err.reason).toBe('closed');
    expect(err.command).toBe('query-status');
    expect(((await waiting) as QmpError).reason).toBe('closed');
    expect(qmp.isClosed).toBe(true);
    await expect(qmp.execute('query-status')).rejects.toMatchObject({ reason: 'closed' });
  });

  it('says which monitor could not be reached', async () => {
    const err = (await QmpClient.connect({ endpoint: { socketPath: path.join(dir, 'nothing.sock') } }).catch((e: unknown) => e)) as QmpError;
    expect(err.reason).toBe('connect');
    expect(err.message).toContain('nothing.sock');
  });
});
