// A UEFI VM on a libvirt host, through the product: a real `bulwark server`, libvirt (started once
// for the run, test/fixtures/libvirt.ts), the test guest as a persistent TCG domain booting OVMF
// (`<loader type='pflash'>` read-only code, `<nvram template=…/>` whose path libvirt chooses; the
// kernel through OVMF's fw_cfg loader), added as host `lv` and backed up with `job run --wait`; then
// (a) the point holds the VM's disk only; its configuration records the loader by path, the
//     template, and carries the variable store libvirt keeps for the domain, byte-exact;
// (b) `restore vm --name NEW`: a new persistent domain (new name, UUID, MAC, disk path) with its own
//     NVRAM file next to its disk, byte-exact to the saved store, booting the same loader; started,
//     it runs under UEFI, its agent answers and its test files match (the file written after the
//     backup is absent);
// (c) `instant-recovery start` of the libvirt point: the same firmware on a scratch copy of the
//     NVRAM in the session folder, boots under UEFI from the backup, the repository is unchanged;
// (d) `restore vm` over the original (off, still defined): the NVRAM file of its definition gets
//     the saved store back, byte-exact, and its disk is written in place; started again, it boots
//     under UEFI with the backed-up files;
// (e) the job backs it up again: the restore dropped the checkpoint metadata of the replaced disk
//     (libvirt could neither use nor delete it), so the chain goes on with a full read.
// Four OVMF boots under TCG: the original, the restored domain and the recovered VM side by side
// (as test/e2e/uefi.test.ts does for plain QEMU), the original again.
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, readdir, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodePointMetadata } from '../../src/agent/backup/point-metadata.js';
import { domainNvramPath } from '../../src/restore/vm/libvirt-config.js';
import { openRepository } from '../../src/repository/index.js';
import { guestSh, hashTree, testDataReport, waitForGuestAgent } from '../fixtures/guest-agent.js';
import { ensureTestGuest, type TestGuestImage } from '../fixtures/guest.js';
import { ensureLibvirtd, startTestDomain, TestDomain, virsh, type LibvirtDaemon } from '../fixtures/libvirt.js';
import { bulwark, ensureBuilt, startServerProcess, type ServerProcess } from './program.js';

const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE.fd';
const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS.fd';
const VM = `e2e-uefi-lv-${process.pid}`;
const COPY = `e2e-uefi-lv-copy-${process.pid}`;
const IR = `e2e-uefi-lv-ir-${process.pid}`;
const copyDir = `/var/lib/libvirt/images/${COPY}`;
const ORIGINAL_MAC = '52:54:00:b1:0e:f1';
const BOOT_MS = 300_000;

let tmp: string;
let daemon: LibvirtDaemon | undefined;
let dom: TestDomain | undefined;
let server: ServerProcess | undefined;
let env: Record<string, string>;
let image: TestGuestImage;
/** The original's variable store (the path libvirt chose) and its contents when the backup ran. */
let nvramPath: string;
let nvramAtBackup: Buffer;
interface InstantSession {
  id: string;
  dir: string;
  agentSocket: string;
  consoleLog: string;
  pid: number;
}
/** Started in (b), checked in (c). */
let ir: InstantSession | undefined;
let repoBefore: Record<string, string>;

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/**
 * Destroys and undefines a domain with its NVRAM file and checkpoint metadata (the backup made
 * one; libvirt refuses to undefine a domain that has any). Quiet when there is no such domain;
 * fails when one is left.
 */
async function removeDomain(name: string): Promise<void> {
  if (!(await virsh(['dominfo', name]).then(() => true, () => false))) return;
  await virsh(['destroy', name]).catch(() => undefined);
  await virsh(['undefine', '--nvram', '--checkpoints-metadata', name]);
}

/** The test files match the build's checksums, the file written after the backup is absent, the guest runs under UEFI. */
async function expectTestData(sh: (command: string) => Promise<string>): Promise<void> {
  expect(await testDataReport(sh, image.manifest)).toEqual({ sums: image.manifest.testdata, afterBackup: 'absent', firmware: 'uefi' });
}

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'bulwark-e2e-uefi-lv-'));
  image = await ensureTestGuest();
  await ensureBuilt();
  daemon = await ensureLibvirtd();
  dom = await startTestDomain({ name: VM, persistent: true, firmware: { code: OVMF_CODE, varsTemplate: OVMF_VARS }, mac: ORIGINAL_MAC });
  const t0 = Date.now();
  await dom.waitForAgent(BOOT_MS);
  console.log(`original UEFI domain: start → agent ${Date.now() - t0} ms`);
  expect((await dom.sh('test -d /sys/firmware/efi && echo uefi')).trim()).toBe('uefi');
  // libvirt chose the store's path when the domain was defined, and created it from the template.
  const path = domainNvramPath(await virsh(['dumpxml', '--inactive', VM]));
  expect(path).toBeDefined();
  nvramPath = path!;
  server = await startServerProcess(join(tmp, 'data'), { simulate: false });
  env = { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: join(tmp, 'config'), HOME: tmp };
  expect((await bulwark(['host', 'add', 'lv', '--libvirt', 'qemu:///system'], env)).code).toBe(0);
  expect((await bulwark(['job', 'create', 'uefilv', '--vm', VM, '--repo', 'default'], env)).code).toBe(0);
  const backup = await bulwark(['job', 'run', 'uefilv', '--wait'], env);
  expect(backup.code, backup.stdout + backup.stderr).toBe(0);
  nvramAtBackup = await readFile(nvramPath);
  // Written after the backup: the restored VM must not have it.
  await dom.sh('echo after-backup > /srv/after-backup.txt && sync');
  // The original is no longer needed running: give its CPU to the next boots. It stays defined.
  await virsh(['destroy', VM]);
}, 900_000);

afterAll(async () => {
  const failures: unknown[] = [];
  if (ir) {
    await bulwark(['instant-recovery', 'stop', ir.id], env).catch(() => undefined);
    try {
      process.kill(ir.pid, 'SIGKILL');
    } catch {
      // stopped
    }
  }
  for (const name of [COPY, VM]) await removeDomain(name).catch((err: unknown) => failures.push(err));
  await rm(copyDir, { recursive: true, force: true });
  await server?.stop();
  await dom?.stop();
  await daemon?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
  if (failures.length > 0) throw new AggregateError(failures, 'cleanup left libvirt domains defined');
});

describe('UEFI VM (OVMF) on a libvirt host', () => {
  it('(a) the point holds only the VM disk; the loader and template are recorded by path, the NVRAM saved byte-exact', async () => {
    const repository = await openRepository(join(server!.dataDir, 'repository'));
    const [info] = await repository.listRestorePoints({ vm: VM });
    expect(info).toBeDefined();
    const point = await repository.openRestorePoint(info!.id);
    try {
      expect(point.disks.map((d) => d.name)).toEqual(['vda']);
      const meta = decodePointMetadata(point.vmConfig)!;
      expect(meta.configuration.kind).toBe('libvirt');
      const fw = meta.configuration.firmware!;
      expect(fw).toMatchObject({ code: OVMF_CODE, codeFormat: 'raw', nvramTemplate: OVMF_VARS, nvram: { path: nvramPath, format: 'raw' } });
      const saved = gunzipSync(Buffer.from(fw.nvram!.contents!.gzip, 'base64'));
      expect(fw.nvram!.contents).toMatchObject({ size: saved.length, sha256: sha256(saved) });
      // OVMF wrote its variables while booting: the store differs from the template it started as.
      expect(saved.equals(await readFile(OVMF_VARS))).toBe(false);
      expect(sha256(saved)).toBe(sha256(nvramAtBackup));
    } finally {
      await point.close();
    }
  });

  it('(b) restored as a new domain with its own NVRAM byte-exact next to its disk; it boots under UEFI, agent and files match', async () => {
    const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--name', COPY, '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    const task = JSON.parse(r.stdout) as { vm: string; toOriginal: boolean; result: { uuid: string; poweredOn: boolean; disks: { name: string; path: string; format: string }[]; firmware?: unknown } };
    expect(task).toMatchObject({ vm: COPY, toOriginal: false, result: { poweredOn: false } });
    const nvram = join(copyDir, `${COPY}_VARS.fd`);
    expect(task.result.disks).toEqual([expect.objectContaining({ name: 'vda', path: join(copyDir, 'vda.qcow2'), format: 'qcow2' })]);
    expect(task.result.firmware).toEqual({ code: OVMF_CODE, nvram });
    // Before the first start (OVMF writes its store while booting): the saved store, byte-exact.
    expect((await readFile(nvram)).equals(nvramAtBackup)).toBe(true);
    const xml = await virsh(['dumpxml', '--inactive', COPY]);
    const original = await virsh(['dumpxml', '--inactive', VM]);
    expect(xml).toContain(`<uuid>${task.result.uuid}</uuid>`);
    expect(original).not.toContain(task.result.uuid);
    expect(xml).toMatch(new RegExp(`<loader readonly='yes' type='pflash'>${OVMF_CODE}</loader>`));
    expect(domainNvramPath(xml)).toBe(nvram);
    expect(xml).toContain(`<source file='${join(copyDir, 'vda.qcow2')}'`);
    expect(original).toContain(`<mac address='${ORIGINAL_MAC}'/>`);
    const mac = xml.match(/<mac address='([^']+)'\/>/)?.[1];
    expect(mac).toMatch(/^52:54:00(:[0-9a-f]{2}){3}$/);
    expect(mac).not.toBe(ORIGINAL_MAC);
    expect(xml).not.toContain(dom!.dir);
    expect(xml).not.toContain(nvramPath);

    const t0 = Date.now();
    await virsh(['start', COPY]);
    // (c)'s instant recovery boots side by side with this domain (two guests share the CPU).
    repoBefore = await hashTree(join(server!.dataDir, 'repository'));
    const started = await bulwark(['instant-recovery', 'start', `${VM}@latest`, '--name', IR, '--json'], env);
    expect(started.code, started.stderr).toBe(0);
    ir = JSON.parse(started.stdout) as InstantSession;
    const copy = new TestDomain(COPY, copyDir);
    await copy.waitForAgent(BOOT_MS);
    console.log(`restored UEFI domain: start → agent ${Date.now() - t0} ms (instant recovery booting beside it)`);
    await expectTestData((c) => copy.sh(c));
    // The running domain's QEMU has the restored store as its second flash.
    const pid = Number(readFileSync(`/run/libvirt/qemu/${COPY}.pid`, 'utf8').trim());
    const open = await Promise.all((await readdir(`/proc/${pid}/fd`)).map((fd) => readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
    expect(open).toContain(nvram);
    expect(open).toContain(OVMF_CODE);
    await removeDomain(COPY);
    expect(existsSync(nvram)).toBe(false);
  });

  it('(c) instant recovery (started in b) boots the same firmware on a scratch copy of the NVRAM; the repository is never written', async () => {
    const s = ir!;
    const scratch = join(s.dir, 'nvram.fd');
    const argv = readFileSync(`/proc/${s.pid}/cmdline`, 'utf8').split('\0');
    expect(argv).toContain(`if=pflash,format=raw,unit=0,readonly=on,file=${OVMF_CODE}`);
    expect(argv).toContain(`if=pflash,format=raw,unit=1,file=${scratch}`);
    expect(argv.some((a) => a.includes(nvramPath))).toBe(false);
    const t0 = Date.now();
    await waitForGuestAgent(s.agentSocket, s.consoleLog, BOOT_MS);
    console.log(`instant recovery of the UEFI libvirt point: agent ${Date.now() - t0} ms after the restored domain's`);
    await expectTestData((c) => guestSh(s.agentSocket, c));
    // Written inside the recovered VM: lands in its overlay, never in the repository.
    await guestSh(s.agentSocket, 'dd if=/dev/urandom of=/srv/ir-written.bin bs=1k count=1024 2>/dev/null && sync');
    expect(await hashTree(join(server!.dataDir, 'repository'))).toEqual(repoBefore);
    const stopped = await bulwark(['instant-recovery', 'stop', s.id], env);
    expect(stopped.code, stopped.stderr).toBe(0);
    ir = undefined;
    expect(existsSync(s.dir)).toBe(false);
  });

  it('(d) restored over the original (off, defined): its NVRAM file gets the saved store back, byte-exact; it boots the backed-up files', async () => {
    expect((await virsh(['domstate', VM])).trim()).toBe('shut off');
    // Damage the store meanwhile: the restore must put it back.
    await writeFile(nvramPath, Buffer.alloc(nvramAtBackup.length, 0x5a));
    const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    const task = JSON.parse(r.stdout) as { toOriginal: boolean; result: { disks: { path: string }[]; firmware?: unknown } };
    expect(task.toOriginal).toBe(true);
    expect(task.result.disks.map((d) => d.path)).toEqual([dom!.diskPath]);
    expect(task.result.firmware).toEqual({ code: OVMF_CODE, nvram: nvramPath });
    expect((await readFile(nvramPath)).equals(nvramAtBackup)).toBe(true);
    // Still the same definition (UUID, MAC, store path).
    const xml = await virsh(['dumpxml', '--inactive', VM]);
    expect(domainNvramPath(xml)).toBe(nvramPath);
    expect(xml).toContain(`<mac address='${ORIGINAL_MAC}'/>`);
    // The backup's checkpoint named a bitmap in the replaced disk: its metadata is gone with it.
    expect((await virsh(['checkpoint-list', VM, '--name'])).trim()).toBe('');
    // It starts and boots the backed-up files under UEFI.
    const t0 = Date.now();
    await virsh(['start', VM]);
    await dom!.waitForAgent(BOOT_MS);
    console.log(`original restored over: start → agent ${Date.now() - t0} ms`);
    await expectTestData((c) => dom!.sh(c));
  });

  it('(e) the job backs the restored original up again: the chain goes on (a full read compared with the previous point) and leaves one checkpoint', async () => {
    const run2 = await bulwark(['job', 'run', 'uefilv', '--wait'], env);
    expect(run2.code, run2.stdout + run2.stderr).toBe(0);
    expect(run2.stdout).toContain('vda: full read with digest comparison');
    const points = JSON.parse((await bulwark(['restore-point', 'list', '--vm', VM, '--json'], env)).stdout) as unknown[];
    expect(points).toHaveLength(2);
    expect((await virsh(['checkpoint-list', VM, '--name'])).split('\n').filter(Boolean)).toHaveLength(1);
  });
});
