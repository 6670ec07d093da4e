// Full VM restore and instant recovery through the product, as a user runs them: a real
// `bulwark server`, the test guest (TCG) on a plain-QEMU host whose QMP glob is
// `<tmp>/vms/*/qmp.sock`, one backup with `job run --wait`; then
// (a) `restore vm VM@latest --name NEW --power-on`: a new VM in `<tmp>/vms/NEW/` that boots, whose
//     guest agent answers and whose test files match their checksums (a file written after the
//     backup is absent);
// (b) `restore vm` over the original: refused while it runs; after it is off, its disk is
//     overwritten and it boots with the backed-up files;
// (c) `instant-recovery start|list|migrate|stop`: boots from the backup, guest writes leave the
//     repository unchanged (file hashes, `repo verify`), migrate moves it to its own disk and closes
//     the backup side while it keeps running, stop cleans up;
// (d) a server killed with a session running: the next start sweeps the leftover (QEMU, folder).
// Four guest boots in all (original, new VM, original restored, instant recovery).
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../../src/hypervisor/qmp/client.js';
import { startTestGuest, type TestGuest } from '../fixtures/guest.js';
import { bulwark, ensureBuilt, startServerProcess, type ServerProcess } from './program.js';
import { guestSh, hashTree, waitForGuestAgent } from '../fixtures/guest-agent.js';

let tmp: string;
let vms: string;
let server: ServerProcess;
let guest: TestGuest;
let env: Record<string, string>;
const VM = 'e2e-rec';
const pidFiles: string[] = [];

/** The test files inside a running guest match the checksums the guest build recorded. */
async function expectTestData(agentSocket: string): Promise<void> {
  const m = guest.image.manifest;
  for (const [file, sum] of Object.entries(m.testdata)) {
    expect((await guestSh(agentSocket, `sha256sum '${m.testdataDir}/${file}'`)).split(' ')[0], file).toBe(sum);
  }
}

function killPidFile(file: string): void {
  if (!existsSync(file)) return;
  const pid = Number(readFileSync(file, 'utf8').trim());
  try {
    if (pid > 0) process.kill(pid, 'SIGKILL');
  } catch {
    // gone
  }
}

/** Whether the process runs (a zombie waiting for a late reaper counts as ended). */
const alive = (pid: number): boolean => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
};

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'bulwark-e2e-rec-'));
  vms = join(tmp, 'vms');
  mkdirSync(join(vms, VM), { recursive: true });
  await ensureBuilt();
  guest = await startTestGuest({ name: VM, dir: join(vms, VM) });
  await guest.waitForAgent();
  server = await startServerProcess(join(tmp, 'data'), { simulate: false });
  env = { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: join(tmp, 'config'), HOME: tmp };
  expect((await bulwark(['host', 'add', 'kvm1', '--qemu', join(vms, '*', 'qmp.sock')], env)).code).toBe(0);
  expect((await bulwark(['job', 'create', 'guests', '--vm', VM, '--repo', 'default'], env)).code).toBe(0);
  const run = await bulwark(['job', 'run', 'guests', '--wait'], env);
  expect(run.code, run.stdout + run.stderr).toBe(0);
  // Written after the backup: a restored VM must not have it.
  await guest.sh('echo after-backup > /srv/after-backup.txt && sync');
}, 600_000);

afterAll(async () => {
  for (const f of pidFiles) killPidFile(f);
  if (server) await server.stop();
  await guest?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('full VM restore (plain QEMU host)', () => {
  it('(a) restores the VM as a new VM that boots with the backed-up files', async () => {
    const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--name', 'e2e-copy', '--format', 'raw', '--power-on', '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    const dir = join(vms, 'e2e-copy');
    pidFiles.push(join(dir, 'qemu.pid'));
    const task = JSON.parse(r.stdout) as { state: string; vm: string; toOriginal: boolean; result: { vmDir: string; qmpSocket: string; startScript: string; poweredOn: boolean; disks: { name: string; path: string; format: string }[] } };
    expect(task).toMatchObject({ state: 'success', vm: 'e2e-copy', toOriginal: false });
    expect(task.result).toMatchObject({ vmDir: dir, qmpSocket: join(dir, 'qmp.sock'), startScript: join(dir, 'start-vm.sh'), poweredOn: true });
    expect(task.result.disks).toEqual([expect.objectContaining({ name: 'vda', path: join(dir, 'vda.raw'), format: 'raw' })]);
    // Its own name, sockets and disk; nothing of the original's folder.
    const script = readFileSync(task.result.startScript, 'utf8');
    expect(script).not.toContain(join(vms, VM) + '/');
    const qmp = await QmpClient.connect({ endpoint: { socketPath: task.result.qmpSocket }, label: 'e2e-copy' });
    try {
      expect(await qmp.execute('query-name')).toEqual({ name: 'e2e-copy' });
    } finally {
      await qmp.close();
    }
    await waitForGuestAgent(join(dir, 'qga.sock'), join(dir, 'console.log'));
    await expectTestData(join(dir, 'qga.sock'));
    expect(await guestSh(join(dir, 'qga.sock'), 'test -e /srv/after-backup.txt && echo present || echo absent')).toBe('absent\n');
    // The original runs on, untouched.
    expect((await guest.sh('cat /srv/after-backup.txt')).trim()).toBe('after-backup');
    killPidFile(join(dir, 'qemu.pid'));
    // A second restore under the same name is refused before any data moves.
    const again = await bulwark(['restore', 'vm', `${VM}@latest`, '--name', 'e2e-copy'], env);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/already exists|answers/);
  });

  it('(b) restores over the original VM only when it is off, and it boots with the backed-up files', async () => {
    const refused = await bulwark(['restore', 'vm', `${VM}@latest`], env);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/e2e-rec is running.*shut it down/);

    await guest.kill();
    pidFiles.push(join(guest.dir, 'qemu.pid'));
    await rm(guest.consoleLog, { force: true });
    const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--power-on', '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    const task = JSON.parse(r.stdout) as { vm: string; toOriginal: boolean; result: { disks: { path: string; format: string }[]; poweredOn: boolean } };
    expect(task).toMatchObject({ vm: VM, toOriginal: true, result: { poweredOn: true } });
    expect(task.result.disks).toEqual([expect.objectContaining({ path: guest.disks[0]!.path, format: 'qcow2' })]);
    await waitForGuestAgent(guest.agentSocket, guest.consoleLog);
    await expectTestData(guest.agentSocket);
    expect(await guestSh(guest.agentSocket, 'test -e /srv/after-backup.txt && echo present || echo absent')).toBe('absent\n');
  });
});

describe('instant recovery through the console', () => {
  it('(c) boots from the backup, never writes it, migrates to its own disk while running, and stop cleans up', async () => {
    const repoDir = join(server.dataDir, 'repository');
    const before = await hashTree(repoDir);
    const started = await bulwark(['instant-recovery', 'start', `${VM}@latest`, '--name', 'e2e-ir', '--json'], env);
    expect(started.code, started.stderr).toBe(0);
    const s = JSON.parse(started.stdout) as { id: string; dir: string; agentSocket: string; consoleLog: string; pid: number; runningFromBackup: boolean };
    expect(s.runningFromBackup).toBe(true);
    await waitForGuestAgent(s.agentSocket, s.consoleLog);
    await expectTestData(s.agentSocket);
    const written = (await guestSh(s.agentSocket, 'dd if=/dev/urandom of=/srv/ir-written.bin bs=1k count=2048 2>/dev/null && sync && sha256sum /srv/ir-written.bin')).split(' ')[0]!;

    const list = await bulwark(['instant-recovery', 'list'], env);
    expect(list.code).toBe(0);
    expect(list.stdout).toMatch(new RegExp(`${s.id}\\s+e2e-ir\\s+${VM}\\s+\\S+\\s+running-from-backup\\s+yes`));
    expect(await hashTree(repoDir)).toEqual(before);
    const verify = await bulwark(['repo', 'verify', 'default'], env);
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);

    const storage = join(tmp, 'prod', 'e2e-ir');
    const migrated = await bulwark(['instant-recovery', 'migrate', s.id, '--storage', storage, '--json'], env);
    expect(migrated.code, migrated.stderr).toBe(0);
    const m = JSON.parse(migrated.stdout) as { agentSocket: string; dir: string };
    expect(m).toMatchObject({ state: 'migrated', runningFromBackup: false, disks: [{ name: 'vda', target: join(storage, 'vda.qcow2') }] });
    // A VM of its own now: its sockets moved out of the session folder (docs/instant-recovery.md, "After migrate").
    expect(existsSync(s.dir)).toBe(false);
    // The VM runs on its own disk: the written file is there, data never read before comes from the new disk.
    expect((await guestSh(m.agentSocket, 'sync && echo 3 > /proc/sys/vm/drop_caches && sha256sum /srv/ir-written.bin')).split(' ')[0]).toBe(written);
    await expectTestData(m.agentSocket);
    expect(await hashTree(repoDir)).toEqual(before);

    // Migrated: a VM of its own, shut down only when asked.
    const stopped = await bulwark(['instant-recovery', 'stop', s.id, '--shutdown-vm'], env);
    expect(stopped.code, stopped.stderr).toBe(0);
    expect(JSON.parse((await bulwark(['instant-recovery', 'list', '--json'], env)).stdout)).toEqual([]);
    expect(existsSync(s.dir)).toBe(false);
    expect(alive(s.pid)).toBe(false);
    expect(existsSync(join(storage, 'vda.qcow2'))).toBe(true);
  });

  it('(d) a server that dies with a session running leaves nothing after its next start', async () => {
    const started = await bulwark(['instant-recovery', 'start', `${VM}@latest`, '--name', 'e2e-leftover', '--json'], env);
    expect(started.code, started.stderr).toBe(0);
    const s = JSON.parse(started.stdout) as { dir: string; pid: number };
    expect(alive(s.pid)).toBe(true);
    server.child.kill('SIGKILL');
    await server.stop();
    expect(existsSync(s.dir)).toBe(true);
    server = await startServerProcess(server.dataDir, { restart: true, simulate: false });
    // The dead server's socket file is still there: the new one answers once it has swept.
    for (let i = 0; i < 600 && (await bulwark(['instant-recovery', 'list', '--json'], env)).code !== 0; i++) await new Promise((r) => setTimeout(r, 100));
    expect(existsSync(s.dir)).toBe(false);
    for (let i = 0; i < 50 && alive(s.pid); i++) await new Promise((r) => setTimeout(r, 100));
    expect(alive(s.pid)).toBe(false);
    expect(JSON.parse((await bulwark(['instant-recovery', 'list', '--json'], env)).stdout)).toEqual([]);
  });
});
