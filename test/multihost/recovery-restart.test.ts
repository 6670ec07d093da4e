// Instant recovery across a server restart, in network namespaces this test creates (and always
// deletes): the backup server, src1 next to the test guest (TCG), the repository agent repo1 and
// dst1, the agent of host kvm-b. The guest (with a 16 MiB file of random bytes written before the
// backup) is backed up into repo1's repository and stopped; then `instant-recovery start --host
// kvm-b` runs it on dst1, reading the point through repo1's restore-serve task. Once its guest
// agent answers, the server is killed (SIGKILL) and started again, and dst1 cannot reach it (its
// connections refused) until repo1's adoption window (6 s from its first poll, netns/server.ts)
// and the serve task's next report (every 10 s, src/agent/remote/restore-tasks.ts) have passed:
// by then a serve task the new server had not taken back is stopped, and the VM's reads through
// it fail (before the server kept its sessions in <data>/instant-recoveries.json, they did).
// Then, past dst1's adoption window too:
// - the session is listed (from the state file at once, confirmed by dst1 once it is back) with
//   its agent, host and state; the same QEMU still runs;
// - the guest agent answers and the guest reads data it never read before the restart (the test
//   files and the big file, from repo1 through the adopted serve task: a stopped serve task fails
//   its readers), matching the backed-up digests;
// - `migrate` and `stop` work through the new server; after migrate the VM runs on its own disk
//   (the page cache dropped, the big file read again with the backup side closed) as a VM of
//   kvm-b: its sockets and logs moved to kvm-b's VM folder (b-vms/rr-ir/, where the host's QMP
//   glob finds it, the QEMU behind it the same process), nothing left in the session folder;
// - the migrated VM is a VM of kvm-b: a backup job (rr-prod) backs it up;
// - the migrated VM outlives its processes: dst1 stopped (SIGTERM: its sessions that run from a
//   backup are stopped) while the server is SIGKILLed, both started again, then dst1 SIGKILLed
//   and started again: the same QEMU runs on, its guest agent answers, and it is listed as
//   migrated (not from backup) from dst1's file of migrated VMs; `stop` is refused for it,
//   `stop --shutdown-vm` quits it;
// - the repository is unchanged (every file's digest) and verifies clean.
// One guest boot of the original and one of the recovered VM.
import { execFileSync, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QemuHypervisor } from '../../src/hypervisor/qemu/adapter.js';
import { globFiles } from '../../src/hypervisor/qemu/discovery.js';
import { verifyRepository } from '../../src/repository/index.js';
import { ensureTestGuest, startTestGuest, type TestGuest } from '../fixtures/guest.js';
import { guestSh, hashTree, waitForGuestAgent } from '../fixtures/guest-agent.js';
import { MultiHost, multiHostSkipReason as skipReason, logText, run, type SessionJson } from './netns/hosts.js';

const VM = 'rr-g';
/** netns/server.ts: adoptWindowMs; src/agent/remote/restore-tasks.ts: SERVE_PROGRESS_MS. */
const ADOPT_WINDOW_MS = 6000;
const SERVE_REPORT_MS = 10_000;
const repoRoot = path.resolve(import.meta.dirname, '../..');

let h: MultiHost;
let guest: TestGuest | undefined;
let dst: Awaited<ReturnType<MultiHost['addAgent']>>;
let pointId = '';
let bigSum = '';
let irPid = 0;
const started = Date.now();

interface Instant {
  id: string;
  name: string;
  agent?: string;
  host?: string;
  state: string;
  runningFromBackup: boolean;
  pid: number | null;
  dir: string;
  qmpSocket: string;
  agentSocket: string;
  consoleLog: string;
  disks: Array<{ name: string; target: string | null }>;
}

let serverChild: ChildProcess;

async function exited(c: ChildProcess): Promise<void> {
  await new Promise<void>((r) => (c.exitCode !== null || c.signalCode !== null ? r() : c.once('exit', () => r())));
}

/**
 * Starts the server again on its data folder; resolves with the time it answered. A task it takes
 * back at start (repo1's serve task, from its state file) waits for its agent's first poll up to
 * the adoption window plus the agent-lost time: the production default here (the harness's 3 s
 * failed it whenever repo1's reconnect backoff passed 9 s, about one run in two under load).
 */
async function restartServer(): Promise<number> {
  const again = await h.startInNs('server', h.ns.server, 'server.ts', [path.join(h.tmp, 'server'), `${h.ip.server}:9392`], { BULWARK_TEST_AGENT_LOST_MS: '60000', BULWARK_LOG_LEVEL: 'info' });
  serverChild = again.child;
  h.socketPath = again.info.socket as string;
  return Date.now();
}

/** Starts dst1 again (already enrolled); resolves with the time it started. */
async function restartDst(): Promise<number> {
  const t = Date.now();
  const { child } = await h.startInNs('agent dst1', dst.ns, 'agent.ts', [dst.dataDir, `https://${h.ip.server}:9392`, '-', 'dst1', `${dst.ip}:9393`]);
  dst = { ...dst, child };
  return t;
}

interface IrSession {
  id: string;
  kind: string;
  ref?: string;
  vm?: string;
  state: string;
  status?: string;
  runningFromBackup?: boolean;
}

/** The session (kind instant-recovery) recording instant recovery `ref`. */
async function irSession(ref: string): Promise<IrSession> {
  const items = (await h.api<{ items: IrSession[] }>('GET', '/sessions?kind=instant-recovery')).items.filter((x) => x.ref === ref);
  expect(items).toHaveLength(1);
  return items[0]!;
}

const since = (t: number): string => `${((Date.now() - t) / 1000).toFixed(1)} s`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The console against the current server (its unix socket); stdout, or the failure with stderr. */
function cli(...args: string[]): string {
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], {
    cwd: repoRoot,
    env: { ...process.env, BULWARK_SERVER: `unix:${h.socketPath}` },
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`bulwark ${args.join(' ')} exited ${String(r.status)}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return !readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.startsWith('Z');
  } catch {
    return false;
  }
}

describe.skipIf(skipReason !== '')(`instant recovery across a server restart${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  beforeAll(async () => {
    h = await MultiHost.start({ vm: 'rr-none', disk: Buffer.alloc(1024 * 1024) });
    serverChild = h.children[0]!;
    dst = await h.addAgent('dst1', 'd');
    const bVms = path.join(h.tmp, 'b-vms');
    mkdirSync(bVms, { recursive: true });
    const gDir = path.join(h.tmp, 'guests', VM);
    mkdirSync(gDir, { recursive: true });
    guest = await startTestGuest({ name: VM, dir: gDir, netns: h.ns.source });
    await guest.waitForAgent();
    // Blocks the recovered VM reads only after the restart.
    bigSum = (await guest.sh('dd if=/dev/urandom of=/srv/big.bin bs=1M count=16 2>/dev/null && sync && sha256sum /srv/big.bin')).split(' ')[0]!;
    expect(bigSum).toMatch(/^[0-9a-f]{64}$/);
    await h.api('POST', '/hosts', { name: 'kvm-g', kind: 'qemu', uri: path.join(h.tmp, 'guests', '*', 'qmp.sock'), agent: 'src1' });
    await h.api('POST', '/hosts', { name: 'kvm-b', kind: 'qemu', uri: path.join(bVms, '*', 'qmp.sock'), agent: 'dst1' });
    await h.api('POST', '/jobs', { name: 'rr', vms: [VM], repository: 'remote-repo', retries: { count: 0, waitMinutes: 0 } });
    // A real guest under TCG on a shared machine: give the backup more than waitSession's 45 s.
    const { sessionId } = await h.api<{ sessionId: string }>('POST', '/jobs/rr/run', {});
    let s = await h.api<SessionJson>('GET', `/sessions/${sessionId}`);
    for (let i = 0; i < 1800 && ['queued', 'running'].includes(s.state); i++) {
      await sleep(100);
      s = await h.api<SessionJson>('GET', `/sessions/${sessionId}`);
    }
    expect(s.state, logText(s)).toMatch(/success|warning/);
    pointId = (await h.api<{ items: Array<{ id: string; vm: string }> }>('GET', `/restore-points?vm=${VM}`)).items.find((p) => p.vm === VM)!.id;
    // The original is not needed any more: its CPU goes to the recovered VM.
    await guest.stop();
    guest = undefined;
    console.log(`recovery-restart: set-up (namespaces, agents, guest, backup) ${since(started)}`);
  }, 600_000);

  afterAll(async () => {
    if (irPid && alive(irPid)) process.kill(irPid, 'SIGKILL');
    await guest?.stop();
    if (h) expect(h.close()).toBe('');
    console.log(`recovery-restart: whole file ${since(started)}`);
  });

  it('a VM running from repo1\'s backup on kvm-b keeps running over a server restart; listed, read, migrated and stopped through the new server', async () => {
    const repoBefore = await hashTree(h.repoDir);
    const t0 = Date.now();
    const s = JSON.parse(cli('instant-recovery', 'start', pointId, '--name', 'rr-ir', '--host', 'kvm-b', '--json')) as Instant;
    irPid = s.pid ?? 0;
    expect(s).toMatchObject({ agent: 'dst1', host: 'kvm-b', state: 'running-from-backup', runningFromBackup: true });
    expect(irPid).toBeGreaterThan(0);
    expect(s.dir.startsWith(path.join(dst.dataDir, 'ir'))).toBe(true);
    expect(readFileSync(`/proc/${irPid}/cmdline`, 'utf8')).toContain('rr-ir');
    await waitForGuestAgent(s.agentSocket, s.consoleLog);
    // The sessions show which VMs run from backup: an instant-recovery session beside the job runs.
    expect(await irSession(s.id)).toMatchObject({ kind: 'instant-recovery', vm: 'rr-ir', point: pointId, agent: 'dst1', state: 'running', status: 'running-from-backup', runningFromBackup: true });
    expect(cli('session', 'list', '--kind', 'instant-recovery')).toMatch(/instant-recovery\s+rr-ir\s+running from backup\s+dst1/);
    console.log(`recovery-restart: recovered VM's guest agent answered ${since(t0)} after start`);

    // The server dies without a word and comes back; dst1's link to it stays down (connections
    // refused) until repo1's adoption window and its serve task's next report have passed: the
    // serve task the VM reads through must not depend on dst1 coming back in time.
    // (The server's host answers dst1's connections with a reset: dst1 retries as after any failed poll.)
    const nft = (...args: string[]): string => run('ip', ['netns', 'exec', h.ns.server, 'nft', ...args]);
    nft('add', 'table', 'inet', 'bwtest');
    nft('add', 'chain', 'inet', 'bwtest', 'in', '{ type filter hook input priority 0; }');
    nft('add', 'rule', 'inet', 'bwtest', 'in', 'ip', 'saddr', dst.ip, 'tcp', 'dport', '9392', 'reject', 'with', 'tcp', 'reset');
    serverChild.kill('SIGKILL');
    await exited(serverChild);
    const restarted = await restartServer();
    // Listed at once, dst1 still unreachable: the new server read its state file.
    const early = (await h.api<{ items: Instant[] }>('GET', '/instant-recoveries')).items.find((i) => i.id === s.id);
    expect(early).toMatchObject({ agent: 'dst1', host: 'kvm-b', state: 'running-from-backup', pid: irPid });
    console.log(`recovery-restart: session listed ${since(restarted)} after the restart (dst1 unreachable)`);
    type Agents = { items: Array<{ name: string; state: string; lastSeenAt?: string | null }> };
    const back = async (names: string[], since = restarted): Promise<boolean> => {
      const agents = (await h.api<Agents>('GET', '/agents')).items;
      return names.every((n) => agents.some((a) => a.name === n && a.state === 'online' && a.lastSeenAt && Date.parse(a.lastSeenAt) >= since - 1000));
    };
    for (let i = 0; i < 600 && !(await back(['repo1'])); i++) await sleep(100);
    expect(await back(['repo1']), 'repo1 polled the new server').toBe(true);
    await sleep(ADOPT_WINDOW_MS + SERVE_REPORT_MS + 3000);
    expect(await back(['dst1']), 'dst1 could not reach the new server').toBe(false);
    nft('delete', 'table', 'inet', 'bwtest');
    const linked = Date.now();

    // Past dst1's adoption window too.
    for (let i = 0; i < 600 && !(await back(['dst1', 'repo1'])); i++) await sleep(100);
    expect(await back(['dst1', 'repo1']), 'dst1 polled the new server').toBe(true);
    console.log(`recovery-restart: dst1 back ${since(linked)} after its link came back`);
    await sleep(ADOPT_WINDOW_MS + 1000);

    const out = cli('instant-recovery', 'list', '--json');
    const after = (JSON.parse(out) as Instant[]).find((i) => i.id === s.id);
    expect(after, out).toMatchObject({ agent: 'dst1', host: 'kvm-b', state: 'running-from-backup', runningFromBackup: true, pid: irPid, dir: s.dir });
    expect(alive(irPid)).toBe(true);
    expect(readFileSync(`/proc/${irPid}/cmdline`, 'utf8')).toContain('rr-ir');
    expect(await guestSh(s.agentSocket, 'echo still-here')).toBe('still-here\n');
    // Data the recovered VM never read before the restart: from repo1, through the adopted serve task.
    const manifest = (await ensureTestGuest()).manifest;
    const t1 = Date.now();
    const sums = await guestSh(s.agentSocket, `cd '${manifest.testdataDir}' && sha256sum ${Object.keys(manifest.testdata).map((f) => `'${f}'`).join(' ')} /srv/big.bin`);
    for (const [file, sum] of Object.entries(manifest.testdata)) expect(sums, file).toContain(`${sum}  ${file}`);
    expect(sums).toContain(`${bigSum}  /srv/big.bin`);
    console.log(`recovery-restart: test files and 16 MiB read through repo1 after the restart in ${since(t1)}`);
    await guestSh(s.agentSocket, 'echo written-after-restart > /srv/after.txt && sync');

    // migrate through the new server: the VM's own disk on kvm-b, the backup side closed.
    const storage = path.join(h.tmp, 'prod', 'rr-ir');
    const t2 = Date.now();
    const migrated = JSON.parse(cli('instant-recovery', 'migrate', s.id, '--storage', storage, '--json')) as Instant;
    console.log(`recovery-restart: migrate ${since(t2)}`);
    expect(await irSession(s.id)).toMatchObject({ state: 'success', status: 'migrated', runningFromBackup: false });
    // A VM of kvm-b now: its folder where kvm-b's QMP glob (b-vms/*/qmp.sock) finds it; nothing left in the session folder.
    const vmDir = path.join(h.tmp, 'b-vms', 'rr-ir');
    expect(migrated).toMatchObject({
      agent: 'dst1', host: 'kvm-b', state: 'migrated', runningFromBackup: false, pid: irPid,
      dir: vmDir, qmpSocket: path.join(vmDir, 'qmp.sock'), agentSocket: path.join(vmDir, 'qga.sock'), consoleLog: path.join(vmDir, 'console.log'),
    });
    expect(existsSync(s.dir), 'the session folder is gone').toBe(false);
    expect(await globFiles(path.join(h.tmp, 'b-vms', '*', 'qmp.sock'))).toEqual([migrated.qmpSocket]);
    // The host's discovery (the qemu adapter over kvm-b's glob) finds it, the same QEMU behind the
    // socket (its command line recorded: the socket was bound under its old name, which
    // /proc/net/unix still shows; the pid comes from QEMU's vCPU thread).
    const found = await new QemuHypervisor({ qmpGlob: path.join(h.tmp, 'b-vms', '*', 'qmp.sock') }).getVm('rr-ir');
    expect(found).toMatchObject({ id: migrated.qmpSocket, name: 'rr-ir' });
    expect(found.configuration.kind === 'qemu' ? found.configuration.commandLine : []).toEqual(readFileSync(`/proc/${irPid}/cmdline`, 'utf8').split('\0').slice(0, -1));
    const target = path.join(storage, 'vda.qcow2');
    expect(migrated.disks).toEqual([expect.objectContaining({ name: 'vda', target })]);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', target], { encoding: 'utf8' })) as { format: string; 'backing-filename'?: string };
    expect(info.format).toBe('qcow2');
    expect(info['backing-filename']).toBeUndefined();
    // Reads go to the VM's own disk now (the page cache dropped; the backup side is closed).
    expect(alive(irPid)).toBe(true);
    const own = await guestSh(migrated.agentSocket, 'sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum /srv/big.bin; cat /srv/after.txt');
    expect(own).toBe(`${bigSum}  /srv/big.bin\nwritten-after-restart\n`);

    // The migrated VM outlives dst1 and the server: dst1 stopped cleanly (it stops what runs from a
    // backup) while the server is killed; both started again.
    const dstChild = dst.child;
    dstChild.kill('SIGTERM');
    await exited(dstChild);
    expect(dstChild.exitCode, 'dst1 stopped cleanly').toBe(0);
    expect(alive(irPid), 'the migrated VM outlives a stop of its agent').toBe(true);
    serverChild.kill('SIGKILL');
    await exited(serverChild);
    await restartServer();
    // The server's sweep of <data>/ir/ after its kill left it; dst1's stop did too.
    expect(alive(irPid), 'the migrated VM outlives a server restart').toBe(true);
    // The listing asks dst1 once it is back: a session dst1 no longer runs would leave the list.
    const listedAfter = async (what: string, since: number): Promise<void> => {
      for (let i = 0; i < 600 && !(await back(['dst1'], since)); i++) await sleep(100);
      expect(await back(['dst1'], since), `dst1 polled again (${what})`).toBe(true);
      const item = (await h.api<{ items: Instant[] }>('GET', '/instant-recoveries')).items.find((x) => x.id === s.id);
      expect(item, what).toMatchObject({ agent: 'dst1', host: 'kvm-b', state: 'migrated', runningFromBackup: false, pid: irPid, dir: vmDir, qmpSocket: migrated.qmpSocket });
      expect(alive(irPid), what).toBe(true);
      expect(await guestSh(migrated.agentSocket, 'echo still-mine'), what).toBe('still-mine\n');
    };
    await listedAfter('after dst1 stopped and the server was killed', await restartDst());
    // dst1 killed: the same.
    dst.child.kill('SIGKILL');
    await exited(dst.child);
    expect(alive(irPid), 'the migrated VM outlives a kill of its agent').toBe(true);
    await listedAfter('after dst1 was killed', await restartDst());
    console.log(`recovery-restart: migrated VM survived agent stop/kill and a server kill (${since(t2)} since migrate)`);
    // A normal VM of kvm-b: a backup job protects it (dst1 finds it behind kvm-b's glob).
    await h.api('POST', '/jobs', { name: 'rr-prod', vms: ['rr-ir'], repository: 'remote-repo', retries: { count: 0, waitMinutes: 0 } });
    const t3 = Date.now();
    const { sessionId: prodRun } = await h.api<{ sessionId: string }>('POST', '/jobs/rr-prod/run', {});
    let run2 = await h.api<SessionJson>('GET', `/sessions/${prodRun}`);
    for (let i = 0; i < 1800 && ['queued', 'running'].includes(run2.state); i++) {
      await sleep(100);
      run2 = await h.api<SessionJson>('GET', `/sessions/${prodRun}`);
    }
    expect(run2.state, logText(run2)).toMatch(/success|warning/);
    expect((await h.api<{ items: Array<{ vm: string }> }>('GET', '/restore-points?vm=rr-ir')).items).toHaveLength(1);
    console.log(`recovery-restart: backup of the migrated VM ${since(t3)}`);

    // A production VM now: a plain stop is refused, naming it; --shutdown-vm shuts it down.
    expect(() => cli('instant-recovery', 'stop', s.id)).toThrow(/was migrated: VM rr-ir runs on its own disks[\s\S]*--shutdown-vm/);
    expect(alive(irPid)).toBe(true);
    cli('instant-recovery', 'stop', s.id, '--shutdown-vm');
    for (let i = 0; i < 300 && alive(irPid); i++) await sleep(100);
    expect(alive(irPid)).toBe(false);
    expect((await h.api<{ items: Instant[] }>('GET', '/instant-recoveries')).items.some((i) => i.id === s.id)).toBe(false);
    expect(existsSync(migrated.qmpSocket)).toBe(false);
    const ended = await irSession(s.id);
    expect(ended).toMatchObject({ state: 'success', status: 'stopped', runningFromBackup: false });
    expect((await h.api<{ log: Array<{ message: string }> }>('GET', `/sessions/${ended.id}`)).log.map((l) => l.message).join('\n')).toMatch(/runs from restore point[\s\S]*migrated: it runs on its own disks[\s\S]*VM rr-ir \(migrated\) shut down by instant-recovery stop/);
    // The migrated disk stays; the server's and dst1's state files hold no session.
    expect(existsSync(target)).toBe(true);
    expect(JSON.parse(readFileSync(path.join(h.tmp, 'server', 'instant-recoveries.json'), 'utf8'))).toEqual({ format: 'bulwark instant recoveries v1', sessions: [] });
    expect(JSON.parse(readFileSync(path.join(dst.dataDir, 'instant-recovery-vms.json'), 'utf8'))).toEqual({ format: 'bulwark instant recovery vms v1', vms: [] });

    // The instant recovery never wrote the backup (the migrated VM's own backup is job rr-prod's folder).
    const repoAfter = await hashTree(h.repoDir);
    expect(Object.fromEntries(Object.entries(repoAfter).filter(([f]) => !f.startsWith('rr-prod/')))).toEqual(repoBefore);
    expect((await verifyRepository(h.repoDir)).damage).toEqual([]);
  }, 420_000);
});
