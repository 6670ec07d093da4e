// A UEFI VM through the product: the test guest booted by OVMF (firmware code read-only as
// pflash0, its own variable store as pflash1; the kernel through OVMF's fw_cfg loader) on a
// plain-QEMU host, backed up with `job run --wait`; then
// (a) the point holds the VM's disk only: no flash device is a disk; its configuration records the
//     firmware code by path and carries the variable store, byte-exact;
// (b) `restore vm` as a new VM is refused, naming the firmware file and what to install, while the
//     host lacks the firmware code, before anything is written;
// (c) `restore vm --name NEW`: the NVRAM is written next to the restored disk byte-exact, the start
//     script boots the same firmware with that copy, the guest runs under UEFI, its agent answers
//     and its test files match;
// (d) `instant-recovery start`: the same firmware on a scratch copy of the NVRAM in the session
//     folder, boots under UEFI from the backup, the repository is unchanged; `stop` cleans up;
// (e) `restore vm` over the original (off): its own NVRAM file is written back byte-exact.
// Three OVMF boots (about 35-130 s each under TCG): the original, then the restored VM and the
// recovered one side by side.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { copyFile, mkdtemp, readdir, readFile, readlink, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodePointMetadata } from '../../src/agent/backup/point-metadata.js';
import { QmpClient } from '../../src/hypervisor/qmp/client.js';
import { openRepository } from '../../src/repository/index.js';
import { guestSh, hashTree, waitForGuestAgent } from '../fixtures/guest-agent.js';
import { startTestGuest, type TestGuest } from '../fixtures/guest.js';
import { bulwark, ensureBuilt, startServerProcess, type ServerProcess } from './program.js';

const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE.fd';
const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS.fd';
const VM = 'e2e-uefi';
const BOOT_MS = 300_000;

let tmp: string;
let vms: string;
let firmwareCode: string;
let server: ServerProcess | undefined;
let guest: TestGuest | undefined;
let env: Record<string, string>;
/** The original's variable store as it was when the backup ran (OVMF wrote it while booting). */
let nvramAtBackup: Buffer;
const pidFiles: string[] = [];
interface InstantSession {
  id: string;
  dir: string;
  agentSocket: string;
  consoleLog: string;
  pid: number;
}
/** Started in (c), checked in (d). */
let ir: InstantSession | undefined;
let repoBefore: Record<string, string>;

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

function killPidFile(file: string): void {
  if (!existsSync(file)) return;
  const pid = Number(readFileSync(file, 'utf8').trim());
  try {
    if (pid > 0) process.kill(pid, 'SIGKILL');
  } catch {
    // gone
  }
}

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'bulwark-e2e-uefi-'));
  vms = join(tmp, 'vms');
  mkdirSync(join(vms, VM), { recursive: true });
  // The VM boots a copy of the host's OVMF code, so (b) can take the firmware away from the host.
  mkdirSync(join(tmp, 'fw'));
  firmwareCode = join(tmp, 'fw', 'OVMF_CODE.fd');
  await copyFile(OVMF_CODE, firmwareCode);
  await ensureBuilt();
  guest = await startTestGuest({ name: VM, dir: join(vms, VM), firmware: { code: firmwareCode, varsTemplate: OVMF_VARS } });
  await guest.waitForAgent(BOOT_MS);
  expect((await guest.sh('test -d /sys/firmware/efi && echo uefi')).trim()).toBe('uefi');
  server = await startServerProcess(join(tmp, 'data'), { simulate: false });
  env = { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: join(tmp, 'config'), HOME: tmp };
  expect((await bulwark(['host', 'add', 'kvm1', '--qemu', join(vms, '*', 'qmp.sock')], env)).code).toBe(0);
  expect((await bulwark(['job', 'create', 'uefi', '--vm', VM, '--repo', 'default'], env)).code).toBe(0);
  const run = await bulwark(['job', 'run', 'uefi', '--wait'], env);
  expect(run.code, run.stdout + run.stderr).toBe(0);
  nvramAtBackup = await readFile(guest.nvram!);
  // Written after the backup: the restored VM must not have it.
  await guest.sh('echo after-backup > /srv/after-backup.txt && sync');
  // The original is no longer needed: give its CPU to the restored VM's boot.
  await guest.kill();
}, 900_000);

afterAll(async () => {
  for (const f of pidFiles) killPidFile(f);
  if (server) await server.stop();
  await guest?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('UEFI VM (OVMF) on a plain-QEMU host', () => {
  it('(a) the point holds only the VM disk; the firmware is recorded by path and the NVRAM saved byte-exact', async () => {
    const repository = await openRepository(join(server!.dataDir, 'repository'));
    const [info] = await repository.listRestorePoints({ vm: VM });
    expect(info).toBeDefined();
    const point = await repository.openRestorePoint(info!.id);
    try {
      expect(point.disks.map((d) => d.name)).toEqual(['vda']);
      const meta = decodePointMetadata(point.vmConfig)!;
      const fw = meta.configuration.firmware!;
      expect(fw).toMatchObject({ code: firmwareCode, codeFormat: 'raw', nvram: { path: guest!.nvram, format: 'raw' } });
      const saved = gunzipSync(Buffer.from(fw.nvram!.contents!.gzip, 'base64'));
      expect(fw.nvram!.contents).toMatchObject({ size: saved.length, sha256: sha256(saved) });
      // OVMF wrote its variables while booting: the store differs from the template it started as.
      expect(saved.equals(await readFile(OVMF_VARS))).toBe(false);
      expect(sha256(saved)).toBe(sha256(nvramAtBackup));
    } finally {
      await point.close();
    }
  });

  it('(b) a restore is refused, naming the firmware and what to install, when the host lacks it', async () => {
    await rename(firmwareCode, `${firmwareCode}.away`);
    try {
      const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--name', 'uefi-refused'], env);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`boots the UEFI firmware ${firmwareCode}, which this host does not have`);
      expect(r.stderr).toMatch(/apt-get install ovmf/);
      expect(existsSync(join(vms, 'uefi-refused')) ? await readdir(join(vms, 'uefi-refused')) : []).toEqual([]);
    } finally {
      await rename(`${firmwareCode}.away`, firmwareCode);
    }
  });

  it('(c) restored as a new VM: its NVRAM byte-exact next to its disk, it boots the same firmware, agent and files match', async () => {
    const name = 'uefi-copy';
    const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--name', name, '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    const dir = join(vms, name);
    const task = JSON.parse(r.stdout) as { state: string; result: { vmDir: string; startScript: string; qmpSocket: string; disks: { name: string; path: string }[]; firmware?: unknown } };
    expect(task.state).toBe('success');
    expect(task.result.disks.map((d) => d.name)).toEqual(['vda']);
    const nvram = join(dir, `${name}_VARS.fd`);
    expect(task.result.firmware).toEqual({ code: firmwareCode, nvram });
    expect((await readFile(nvram)).equals(nvramAtBackup)).toBe(true);
    const script = readFileSync(task.result.startScript, 'utf8');
    expect(script).toContain(`if=pflash,format=raw,unit=0,readonly=on,file=${firmwareCode}`);
    expect(script).toContain(`if=pflash,format=raw,unit=1,file=${nvram}`);
    expect(script).not.toContain(join(vms, VM) + '/');

    // Started as the product documents it: its start script (what --power-on runs).
    pidFiles.push(join(dir, 'qemu.pid'));
    const child = spawn('/bin/sh', [task.result.startScript], { detached: true, stdio: 'ignore' });
    child.unref();
    // (d)'s instant recovery boots side by side with this VM: on a loaded machine two guests get
    // twice the CPU share of one, so the file takes about one boot's time less.
    repoBefore = await hashTree(join(server!.dataDir, 'repository'));
    const started = await bulwark(['instant-recovery', 'start', `${VM}@latest`, '--name', 'uefi-ir', '--json'], env);
    expect(started.code, started.stderr).toBe(0);
    ir = JSON.parse(started.stdout) as InstantSession;
    pidFiles.push(join(ir.dir, 'qemu.pid'));
    const qmpSocket = task.result.qmpSocket;
    let qmp: QmpClient | undefined;
    for (let i = 0; !qmp; i++) {
      qmp = await QmpClient.connect({ endpoint: { socketPath: qmpSocket }, label: name }).catch((err: unknown) => {
        if (i > 300) throw err;
        return undefined;
      });
      if (!qmp) await new Promise((res) => setTimeout(res, 100));
    }
    try {
      const blocks = await qmp.execute<Array<{ device: string; inserted?: { file: string; ro: boolean } }>>('query-block');
      expect(blocks.find((b) => b.device === 'pflash0')?.inserted).toMatchObject({ file: firmwareCode, ro: true });
      expect(blocks.find((b) => b.device === 'pflash1')?.inserted).toMatchObject({ file: nvram, ro: false });
    } finally {
      await qmp.close();
    }
    const agent = join(dir, 'qga.sock');
    await waitForGuestAgent(agent, join(dir, 'console.log'), BOOT_MS);
    expect((await guestSh(agent, 'test -d /sys/firmware/efi && echo uefi')).trim()).toBe('uefi');
    const m = guest!.image.manifest;
    for (const [file, sum] of Object.entries(m.testdata)) {
      expect((await guestSh(agent, `sha256sum '${m.testdataDir}/${file}'`)).split(' ')[0], file).toBe(sum);
    }
    expect(await guestSh(agent, 'test -e /srv/after-backup.txt && echo present || echo absent')).toBe('absent\n');
    killPidFile(join(dir, 'qemu.pid'));
  });

  it('(d) instant recovery (started in c) boots the same firmware on a scratch copy of the NVRAM; the repository is never written', async () => {
    const repoDir = join(server!.dataDir, 'repository');
    const s = ir!;
    // The session holds the VM's QMP monitor: its QEMU's command line and open files show the flash.
    const scratch = join(s.dir, 'nvram.fd');
    const argv = readFileSync(`/proc/${s.pid}/cmdline`, 'utf8').split('\0');
    expect(argv).toContain(`if=pflash,format=raw,unit=0,readonly=on,file=${firmwareCode}`);
    expect(argv).toContain(`if=pflash,format=raw,unit=1,file=${scratch}`);
    const open = await Promise.all((await readdir(`/proc/${s.pid}/fd`)).map((fd) => readlink(`/proc/${s.pid}/fd/${fd}`).catch(() => '')));
    expect(open).toContain(scratch);
    await waitForGuestAgent(s.agentSocket, s.consoleLog, BOOT_MS);
    expect((await guestSh(s.agentSocket, 'test -d /sys/firmware/efi && echo uefi')).trim()).toBe('uefi');
    const m = guest!.image.manifest;
    for (const [file, sum] of Object.entries(m.testdata)) {
      expect((await guestSh(s.agentSocket, `sha256sum '${m.testdataDir}/${file}'`)).split(' ')[0], file).toBe(sum);
    }
    // Written inside the recovered VM: lands in its overlay, never in the repository.
    await guestSh(s.agentSocket, 'dd if=/dev/urandom of=/srv/ir-written.bin bs=1k count=1024 2>/dev/null && sync');
    expect(await hashTree(repoDir)).toEqual(repoBefore);
    const stopped = await bulwark(['instant-recovery', 'stop', s.id], env);
    expect(stopped.code, stopped.stderr).toBe(0);
    expect(existsSync(s.dir)).toBe(false);
  });

  it('(e) restored over the original (off): its own NVRAM file gets the saved store back, byte-exact', async () => {
    // The original is off (killed after the backup); its store is damaged meanwhile.
    await writeFile(guest!.nvram!, Buffer.alloc(nvramAtBackup.length, 0x5a));
    const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    const task = JSON.parse(r.stdout) as { toOriginal: boolean; result: { disks: { path: string }[]; firmware?: unknown } };
    expect(task.toOriginal).toBe(true);
    expect(task.result.disks.map((d) => d.path)).toEqual([guest!.disks[0]!.path]);
    expect(task.result.firmware).toEqual({ code: firmwareCode, nvram: guest!.nvram });
    expect((await readFile(guest!.nvram!)).equals(nvramAtBackup)).toBe(true);
  });
});
