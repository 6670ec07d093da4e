// Restore onto another agent's host, in network namespaces this test creates (and always deletes):
// the backup server, the source agent src1 next to the test guest (TCG), the repository agent
// repo1, and dst1, the agent of host kvm-b where VMs are restored. The guest is backed up into
// repo1's repository; then
// (a) `restore vm --host kvm-b --name NEW --power-on`: dst1 reads the point from repo1 over the
//     data-mover protocol, writes the disk, writes the start script and starts the VM, which boots,
//     whose guest agent answers and whose test files match their checksums; its log lines and
//     progress are in the VM restore record; refusals keep their reasons (original running, kind);
// (b) instant recovery on kvm-b: dst1 serves the point to its QEMU from repo1's reads, the VM boots
//     with its test files, its writes stay in the overlay, migrate moves it to its own disk (the
//     repository agent stops serving), stop cleans up; the repository is verified unchanged;
// (c) a host whose agent is gone: the restore fails with the agent named.
// Also: a restore onto the repository agent's own host (it reads its folder directly).
// Two guest boots besides the original (the restored VM, the instant recovery).
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { verifyRepository } from '../../src/repository/index.js';
import { startTestGuest, type TestGuest } from '../fixtures/guest.js';
import { MultiHost, multiHostSkipReason as skipReason, logText, type SessionJson } from './netns/hosts.js';
import { guestSh, hashTree, waitForGuestAgent } from '../fixtures/guest-agent.js';

const VM = 'rst-g';
let h: MultiHost;
let guest: TestGuest | undefined;
let dst: Awaited<ReturnType<MultiHost['addAgent']>>;
let pointId = '';
let bVms = '';
const pids: number[] = [];

interface VmRestore {
  id: string;
  state: string;
  agent?: string;
  vm: string;
  error: { kind: string; message: string } | null;
  progress: { percent: number; bytesDone: number; total: number };
  log?: Array<{ level: string; message: string }>;
  result: { vmDir?: string; qmpSocket?: string; poweredOn: boolean; disks: Array<{ name: string; path: string; format: string; sha256: string }> } | null;
}

interface Instant {
  id: string;
  name: string;
  agent?: string;
  host?: string;
  state: string;
  runningFromBackup: boolean;
  pid: number | null;
  dir: string;
  agentSocket: string;
  consoleLog: string;
  disks: Array<{ name: string; target: string | null }>;
}

const api = <T>(method: string, route: string, body?: unknown): Promise<T> => h.api<T>(method, route, body);

async function expectTestData(agentSocket: string): Promise<void> {
  const m = guest!.image.manifest;
  for (const [file, sum] of Object.entries(m.testdata)) {
    expect((await guestSh(agentSocket, `sha256sum '${m.testdataDir}/${file}'`)).split(' ')[0], file).toBe(sum);
  }
}

async function waitRestore(id: string): Promise<VmRestore> {
  for (let i = 0; i < 1200; i++) {
    const t = await api<VmRestore>('GET', `/vm-restores/${id}`);
    if (t.state !== 'running') return t;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`VM restore ${id} did not end`);
}

/** The error reply of a request that must fail (status and body). */
async function refused(method: string, route: string, body: unknown): Promise<string> {
  try {
    await api(method, route, body);
  } catch (err) {
    return (err as Error).message;
  }
  throw new Error(`${method} ${route} was not refused`);
}

function kill(pid: number | null | undefined): void {
  if (!pid) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone
  }
}

describe.skipIf(skipReason !== '')(`restore onto another agent's host${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  beforeAll(async () => {
    h = await MultiHost.start({ vm: 'rst-none', disk: Buffer.alloc(1024 * 1024) });
    dst = await h.addAgent('dst1', 'd');
    bVms = path.join(h.tmp, 'b-vms');
    mkdirSync(bVms, { recursive: true });
    const gDir = path.join(h.tmp, 'guests', VM);
    mkdirSync(gDir, { recursive: true });
    // The guest runs on host A: in src1's namespace (the qemu adapter finds its QEMU through /proc/net/unix there).
    guest = await startTestGuest({ name: VM, dir: gDir, netns: h.ns.source });
    await guest.waitForAgent();
    await api('POST', '/hosts', { name: 'kvm-g', kind: 'qemu', uri: path.join(h.tmp, 'guests', '*', 'qmp.sock'), agent: 'src1' });
    await api('POST', '/hosts', { name: 'kvm-b', kind: 'qemu', uri: path.join(bVms, '*', 'qmp.sock'), agent: 'dst1' });
    await api('POST', '/jobs', { name: 'rst', vms: [VM], repository: 'remote-repo', retries: { count: 0, waitMinutes: 0 } });
    // A real guest under TCG on a shared machine: give the backup more than waitSession's 45 s.
    const { sessionId } = await api<{ sessionId: string }>('POST', '/jobs/rst/run', {});
    let s = await api<SessionJson>('GET', `/sessions/${sessionId}`);
    for (let i = 0; i < 1800 && ['queued', 'running'].includes(s.state); i++) {
      await new Promise((r) => setTimeout(r, 100));
      s = await api<SessionJson>('GET', `/sessions/${sessionId}`);
    }
    expect(s.state, logText(s)).toMatch(/success|warning/);
    const points = await api<{ items: Array<{ id: string; vm: string }> }>('GET', `/restore-points?vm=${VM}`);
    pointId = points.items.find((p) => p.vm === VM)!.id;
    // Written after the backup: a restored VM must not have it.
    await guest.sh('echo after-backup > /srv/after-backup.txt && sync');
  }, 600_000);

  afterAll(async () => {
    for (const p of pids) kill(p);
    await guest?.stop();
    if (h) expect(h.close()).toBe('');
  });

  it('(a) restores the VM as a new VM on kvm-b through its agent; it boots with the backed-up files', async () => {
    const before = await hashTree(h.repoDir);
    const started = await api<VmRestore>('POST', `/restore-points/${pointId}/restore-vm`, { name: 'rst-copy', host: 'kvm-b', format: 'raw', powerOn: true, digest: true });
    expect(started.agent).toBe('dst1');
    const t = await waitRestore(started.id);
    const dir = path.join(bVms, 'rst-copy');
    if (existsSync(path.join(dir, 'qemu.pid'))) pids.push(Number(readFileSync(path.join(dir, 'qemu.pid'), 'utf8')));
    expect(t.state, JSON.stringify(t)).toBe('success');
    expect(t.result).toMatchObject({ vmDir: dir, qmpSocket: path.join(dir, 'qmp.sock'), poweredOn: true });
    expect(t.result!.disks).toEqual([expect.objectContaining({ name: 'vda', path: path.join(dir, 'vda.raw'), format: 'raw' })]);
    expect(createHash('sha256').update(readFileSync(path.join(dir, 'vda.raw'))).digest('hex')).toBe(t.result!.disks[0]!.sha256);
    expect(t.progress.percent).toBe(100);
    const lines = (t.log ?? []).map((l) => l.message).join('\n');
    expect(lines).toMatch(/reading restore point .* from repository agent repo1/);
    expect(lines).toMatch(/disk vda restored to/);
    // The VM runs in dst1's namespace (its QEMU was started by that agent).
    const pid = Number(readFileSync(path.join(dir, 'qemu.pid'), 'utf8'));
    expect(readFileSync(`/proc/${pid}/cmdline`, 'utf8')).toContain('rst-copy');
    const ns = (await import('node:child_process')).spawnSync('ip', ['netns', 'identify', String(pid)], { encoding: 'utf8' }).stdout.trim();
    expect(ns).toBe(dst.ns);
    await waitForGuestAgent(path.join(dir, 'qga.sock'), path.join(dir, 'console.log'));
    await expectTestData(path.join(dir, 'qga.sock'));
    expect(await guestSh(path.join(dir, 'qga.sock'), 'test -e /srv/after-backup.txt && echo present || echo absent')).toBe('absent\n');
    kill(pid);

    // Refusals keep their reasons: the original runs on kvm-g (src1 reads through repo1 too) ...
    expect(await refused('POST', `/restore-points/${pointId}/restore-vm`, { host: 'kvm-g' })).toMatch(/409.*rst-g is running.*shut it down/);
    // ... a libvirt host for a plain-QEMU point ...
    await api('POST', '/hosts', { name: 'lv-b', kind: 'libvirt', uri: 'qemu:///system', agent: 'dst1' });
    expect(await refused('POST', `/restore-points/${pointId}/restore-vm`, { name: 'rst-lv', host: 'lv-b' })).toMatch(/400.*holds a qemu VM; host is libvirt/);
    // ... and the same name again.
    expect(await refused('POST', `/restore-points/${pointId}/restore-vm`, { name: 'rst-copy', host: 'kvm-b' })).toMatch(/409.*(already exists|answers)/);

    // Onto the repository agent's own host: repo1 reads its folder directly (no serve task), same disk.
    await api('POST', '/hosts', { name: 'kvm-r', kind: 'qemu', uri: path.join(h.tmp, 'r-vms', '*', 'qmp.sock'), agent: 'repo1' });
    const local = await waitRestore((await api<VmRestore>('POST', `/restore-points/${pointId}/restore-vm`, { name: 'rst-local', host: 'kvm-r', format: 'raw', digest: true })).id);
    expect(local.state, JSON.stringify(local)).toBe('success');
    expect(local.agent).toBe('repo1');
    expect(local.result!.disks[0]!.sha256).toBe(t.result!.disks[0]!.sha256);
    expect((local.log ?? []).map((l) => l.message).join('\n')).not.toMatch(/from repository agent/);
    expect(await hashTree(h.repoDir)).toEqual(before);
  }, 300_000);

  it('(b) instant recovery on kvm-b: boots from repo1\'s point, never writes it, migrates and stops', async () => {
    const before = await hashTree(h.repoDir);
    const s = await api<Instant>('POST', '/instant-recoveries', { point: pointId, name: 'rst-ir', host: 'kvm-b' });
    pids.push(s.pid ?? 0);
    expect(s).toMatchObject({ agent: 'dst1', host: 'kvm-b', runningFromBackup: true, state: 'running-from-backup' });
    expect(s.dir.startsWith(path.join(dst.dataDir, 'ir'))).toBe(true);
    await waitForGuestAgent(s.agentSocket, s.consoleLog);
    await expectTestData(s.agentSocket);
    await guestSh(s.agentSocket, 'dd if=/dev/urandom of=/srv/ir-written.bin bs=1k count=1024 2>/dev/null && sync');
    const listed = await api<{ items: Instant[] }>('GET', '/instant-recoveries');
    expect(listed.items.find((i) => i.id === s.id)).toMatchObject({ agent: 'dst1', runningFromBackup: true });
    expect(await hashTree(h.repoDir)).toEqual(before);

    const storage = path.join(h.tmp, 'prod', 'rst-ir');
    const m = await api<Instant>('POST', `/instant-recoveries/${s.id}/migrate`, { storage });
    expect(m).toMatchObject({ state: 'migrated', runningFromBackup: false });
    expect(m.disks).toEqual([expect.objectContaining({ name: 'vda', target: path.join(storage, 'vda.qcow2') })]);
    // It runs on its own disk now, the guest's writes with it; a VM of its own, its sockets out of
    // the session folder (docs/instant-recovery.md "After migrate").
    expect(m.agentSocket.startsWith(s.dir)).toBe(false);
    expect(await guestSh(m.agentSocket, 'test -e /srv/ir-written.bin && echo present')).toBe('present\n');
    // A migrated VM is production: a plain stop is refused; --shutdown-vm ends it.
    await expect(api('POST', `/instant-recoveries/${s.id}/stop`, {})).rejects.toThrow(/409/);
    await api('POST', `/instant-recoveries/${s.id}/stop`, { shutdownVm: true });
    expect((await api<{ items: Instant[] }>('GET', '/instant-recoveries')).items.some((i) => i.id === s.id)).toBe(false);
    expect(existsSync(s.dir)).toBe(false);

    expect(await hashTree(h.repoDir)).toEqual(before);
    const report = await verifyRepository(h.repoDir);
    expect(report.damage).toEqual([]);
  }, 300_000);

  it('(c) a host whose agent is gone: the restore fails and names the agent', async () => {
    dst.child.kill('SIGKILL');
    await new Promise<void>((r) => (dst.child.exitCode !== null ? r() : dst.child.once('exit', () => r())));
    const msg = await refused('POST', `/restore-points/${pointId}/restore-vm`, { name: 'rst-gone', host: 'kvm-b' });
    expect(msg).toMatch(/dst1/);
    expect(msg).toMatch(/did not pick up|lost agent|not heard|not connected/);
  }, 60_000);
});
