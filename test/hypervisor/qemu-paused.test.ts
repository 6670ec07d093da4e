// Guest processing of a VM whose vCPUs are stopped, on a real QEMU (TCG, started with -S, no
// kernel: a paused guest needs no boot). The adapter checks the run state (query-status) first:
// it never asks the guest agent to freeze (the agent's socket sees no connection; a paused guest
// cannot answer, asking would only wait out the freeze timeout), the view is crash-consistent
// with a warning that says the VM is paused, and a backup that requires guest processing fails
// naming the VM and its state, leaving nothing behind. The view reads the disk as written.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readBackupDisk } from '../../src/hypervisor/cbt/reader.js';
import { QemuHypervisor } from '../../src/hypervisor/qemu/adapter.js';
import { QmpClient } from '../../src/hypervisor/qmp/client.js';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
const VM = 'paused-vm';

let dir: string;
let qemu: ChildProcess | undefined;
let hv: QemuHypervisor;
/** Stands in for the guest agent: counts connections and never answers. */
let agent: net.Server;
const agentConnections: net.Socket[] = [];

const control = async <T>(fn: (qmp: QmpClient) => Promise<T>): Promise<T> => {
  const qmp = await QmpClient.connect({ endpoint: { socketPath: path.join(dir, 'control.sock') }, label: 'test control' });
  try {
    return await fn(qmp);
  } finally {
    await qmp.close();
  }
};
const status = () => control((qmp) => qmp.execute<{ status: string; running: boolean }>('query-status'));

async function canConnect(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
}

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-qemu-paused-'));
  const image = path.join(dir, 'vda.qcow2');
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(16 * MiB)]);
  await exec('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a ${MiB} ${2 * MiB}`, image]);
  const silent = path.join(dir, 'silent-qga.sock');
  agent = net.createServer((s) => {
    agentConnections.push(s);
    s.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => agent.listen(silent, resolve));
  // prelaunch: -S, the vCPU never ran; no kernel, so nothing would boot anyway.
  qemu = spawn(
    'qemu-system-x86_64',
    [
      '-name', VM, '-S', '-accel', 'tcg', '-m', '64', '-smp', '1', '-nodefaults', '-display', 'none', '-no-user-config',
      '-blockdev', `driver=file,node-name=vda-file,filename=${image}`,
      '-blockdev', 'driver=qcow2,node-name=vda-fmt,file=vda-file',
      '-device', 'virtio-blk-pci,drive=vda-fmt,id=vda',
      '-device', 'virtio-serial-pci',
      '-chardev', `socket,id=qga0,path=${path.join(dir, 'qga.sock')},server=on,wait=off`,
      '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
      '-chardev', `socket,id=qmp0,path=${path.join(dir, 'qmp.sock')},server=on,wait=off`, '-mon', 'chardev=qmp0,mode=control',
      '-chardev', `socket,id=qmp1,path=${path.join(dir, 'control.sock')},server=on,wait=off`, '-mon', 'chardev=qmp1,mode=control',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  qemu.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  for (let i = 0; !((await canConnect(path.join(dir, 'qmp.sock'))) && (await canConnect(path.join(dir, 'control.sock')))); i++) {
    if (qemu.exitCode !== null || i > 1500) throw new Error(`QEMU did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  hv = new QemuHypervisor({ qmpGlob: path.join(dir, 'qmp.sock'), workDir: path.join(dir, 'adapter'), agentSocketFor: () => silent });
}, 60_000);

afterAll(async () => {
  for (const s of agentConnections) s.destroy();
  await new Promise<void>((resolve) => (agent ? agent.close(() => resolve()) : resolve()));
  if (qemu && qemu.exitCode === null) {
    const exited = new Promise((r) => qemu!.once('exit', r));
    qemu.kill('SIGKILL');
    await exited;
  }
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function expectNoLeftovers(): Promise<void> {
  await control(async (qmp) => {
    expect(await qmp.execute('query-block-exports')).toEqual([]);
    expect(await qmp.execute('query-block-jobs')).toEqual([]);
    const nodes = await qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
    expect(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('bulwark-'))).toEqual([]);
  });
}

describe('backup of a paused VM', () => {
  it('required guest processing fails at once, naming the VM and that it is paused; the agent is not asked', async () => {
    expect((await status()).status).toBe('prelaunch');
    const begun = hv.beginBackup(VM, { mode: 'online', requireGuestProcessing: true, chainId: 'paused-1', previous: null, freezeTimeoutMs: 1500 });
    await expect(begun).rejects.toThrow(/VM paused-vm is paused \(run state prelaunch\): its file systems cannot be frozen.*requires guest processing/);
    await expect(begun).rejects.toMatchObject({ kind: 'conflict', hint: expect.stringMatching(/resume the VM/) });
    expect(agentConnections).toHaveLength(0);
    await expectNoLeftovers();
  });

  it('otherwise crash-consistent with the reason said, no freeze tried; the disk reads as written and the VM stays paused', async () => {
    // A VM that ran and was paused (QMP stop): run state "paused".
    await control(async (qmp) => {
      await qmp.execute('cont');
      await qmp.execute('stop');
    });
    expect(await status()).toMatchObject({ status: 'paused', running: false });
    const view = await hv.beginBackup(VM, { mode: 'online', requireGuestProcessing: false, chainId: 'paused-1', previous: null, freezeTimeoutMs: 1500 });
    try {
      expect(view.consistency).toBe('crash');
      expect(view.freezeWindowMs).toBeNull();
      expect(view.warnings.join('\n')).toMatch(/VM paused-vm is paused: file systems not frozen \(a paused guest's agent cannot answer\); the backup is crash-consistent with no guest writes in flight/);
      expect(view.warnings.join('\n')).not.toMatch(/could not be frozen|qemu-guest-agent/);
      expect(agentConnections).toHaveLength(0);
      // The view holds the disk: 2 MiB of 0x5a at 1 MiB, nothing else with data.
      const blocks: Array<{ index: number; data: Buffer | null }> = [];
      for await (const b of readBackupDisk(view.disks[0]!, { blockSize: MiB })) blocks.push({ index: b.index, data: b.data ? Buffer.from(b.data) : null });
      expect(blocks.map((b) => b.index)).toEqual([1, 2]);
      for (const b of blocks) expect(b.data!.equals(Buffer.alloc(MiB, 0x5a))).toBe(true);
      await view.commit();
    } catch (err) {
      await view.abort(err);
      throw err;
    }
    expect((await status()).status).toBe('paused');
    await expectNoLeftovers();
  });
});
