// Full VM restore on a libvirt host, through the product: a real `bulwark server`, libvirt
// (started once for the run, see test/fixtures/libvirt.ts), the test guest as a transient TCG domain
// added as host `lv`, one backup with `job run --wait`; then
// (a) `restore vm VM@latest --name NEW --power-on`: a persistent domain defined from the saved XML
//     with a new UUID and disk path, that boots, whose guest agent answers and whose test files
//     match their checksums (a file written after the backup is absent);
// (b) over the original: refused while it runs; once it is destroyed (a transient domain is then
//     gone) the saved XML is defined again over the restored disk and the VM boots the backed-up files.
// (c) instant recovery of the libvirt VM: booted under plain QEMU from the saved XML's kernel.
// Four boots (original, new, original restored, instant recovery). `virsh define` in (a) and (b)
// took 35-63 s each until the fixture gave /dev/kvm Debian's owner and mode (libvirtd had thrown
// its QEMU capabilities away on every lookup); now about 1 s.
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QgaClient } from '../../src/hypervisor/qga/client.js';
import { testDataReport } from '../fixtures/guest-agent.js';
import { ensureTestGuest, type TestGuestImage } from '../fixtures/guest.js';
import { ensureLibvirtd, startTestDomain, TestDomain, virsh, type LibvirtDaemon } from '../fixtures/libvirt.js';
import { bulwark, ensureBuilt, startServerProcess, type ServerProcess } from './program.js';

let tmp: string;
let daemon: LibvirtDaemon | undefined;
let dom: TestDomain | undefined;
let server: ServerProcess | undefined;
let env: Record<string, string>;
let image: TestGuestImage;
const VM = `e2e-lv-${process.pid}`;
const COPY = `e2e-lv-copy-${process.pid}`;
const copyDir = `/var/lib/libvirt/images/${COPY}`;

/** The test files match the build's checksums and the file written after the backup is absent. */
async function expectTestData(d: TestDomain): Promise<void> {
  expect(await testDataReport((c) => d.sh(c), image.manifest)).toEqual({ sums: image.manifest.testdata, afterBackup: 'absent', firmware: 'bios' });
}

async function removeDomain(name: string): Promise<void> {
  await virsh(['destroy', name]).catch(() => undefined);
  await virsh(['undefine', name]).catch(() => undefined);
}

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'bulwark-e2e-rec-lv-'));
  image = await ensureTestGuest();
  await ensureBuilt();
  daemon = await ensureLibvirtd();
  dom = await startTestDomain({ name: VM });
  await dom.waitForAgent(180_000);
  server = await startServerProcess(join(tmp, 'data'), { simulate: false });
  env = { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: join(tmp, 'config'), HOME: tmp };
  expect((await bulwark(['host', 'add', 'lv', '--libvirt', 'qemu:///system'], env)).code).toBe(0);
  expect((await bulwark(['job', 'create', 'lvjob', '--vm', VM, '--repo', 'default'], env)).code).toBe(0);
  const run = await bulwark(['job', 'run', 'lvjob', '--wait'], env);
  expect(run.code, run.stdout + run.stderr).toBe(0);
  await dom.sh('echo after-backup > /srv/after-backup.txt && sync');
}, 600_000);

afterAll(async () => {
  await removeDomain(COPY);
  await rm(copyDir, { recursive: true, force: true });
  await removeDomain(VM);
  await server?.stop();
  await dom?.stop();
  await daemon?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('full VM restore (libvirt host)', () => {
  it('(a) restores the domain as a new persistent domain that boots with the backed-up files', async () => {
    const t0 = Date.now();
    const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--name', COPY, '--power-on', '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    const task = JSON.parse(r.stdout) as { vm: string; toOriginal: boolean; result: { uuid: string; poweredOn: boolean; durationMs: number; disks: { path: string; format: string }[] } };
    console.log(`restore vm --name: ${Date.now() - t0} ms in the console, ${task.result.durationMs} ms in the server`);
    expect(task).toMatchObject({ vm: COPY, toOriginal: false, result: { poweredOn: true } });
    expect(task.result.disks).toEqual([expect.objectContaining({ path: join(copyDir, 'vda.qcow2'), format: 'qcow2' })]);
    const xml = await virsh(['dumpxml', COPY]);
    expect(xml).toContain(`<uuid>${task.result.uuid}</uuid>`);
    expect(xml).toContain(join(copyDir, 'vda.qcow2'));
    expect(xml).not.toContain(dom!.dir);
    expect((await virsh(['dominfo', COPY])).match(/Persistent:\s+(\w+)/)?.[1]).toBe('yes');
    const copy = new TestDomain(COPY, copyDir);
    const t1 = Date.now();
    await copy.waitForAgent(180_000);
    console.log(`new domain: start → agent ${Date.now() - t1} ms`);
    await expectTestData(copy);
    // The original runs on with its own data.
    expect((await dom!.sh('cat /srv/after-backup.txt')).trim()).toBe('after-backup');
    await removeDomain(COPY);
  });

  it('(a2) restore files --to-guest writes into the running domain through libvirt: fail, overwrite, keep-both; paused is refused', async () => {
    // (added by GUEST; (b) restores the whole disk afterwards, so these changes do not leak)
    const td = image.manifest.testdataDir;
    await dom!.sh(`rm -rf '${td}/dir with spaces' && echo changed > ${td}/alpha.txt && echo changed > ${td}/random-1m.bin`);
    const conflict = await bulwark(['restore', 'files', `${VM}@latest`, '--path', `${td}/alpha.txt`, '--to-guest'], env);
    expect(conflict.code).toBe(1);
    expect(conflict.stderr).toMatch(/alpha\.txt exists in the guest/);

    // random-1m.bin (1 MiB + 123 bytes) goes in several writes: one virsh argument carries 90 KiB.
    const t0 = Date.now();
    const over = await bulwark(['restore', 'files', `${VM}@latest`, '--path', `${td}/alpha.txt`, '--path', `${td}/random-1m.bin`, '--path', `${td}/dir with spaces`, '--to-guest', '--conflict', 'overwrite', '--json'], env);
    expect(over.code, over.stderr).toBe(0);
    const written = JSON.parse(over.stdout) as { files: number; directories: number; bytes: number };
    console.info(`restore files --to-guest through libvirt: ${written.bytes} bytes, ${written.files} files in ${Date.now() - t0} ms (console to answer)`);
    expect([written.files, written.directories]).toEqual([3, 1]);
    expect(written.bytes).toBeGreaterThan(1024 * 1024 + 123);
    expect(await dom!.sh(`cd ${td} && sha256sum -c SHA256SUMS 2>&1`)).not.toMatch(/FAILED/);

    const [point] = JSON.parse((await bulwark(['restore-point', 'list', '--vm', VM, '--json'], env)).stdout) as Array<{ time: string }>;
    const stamp = new Date(point!.time).toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
    await dom!.sh(`echo newer > ${td}/alpha.txt`);
    const kept = await bulwark(['restore', 'files', `${VM}@latest`, '--path', `${td}/alpha.txt`, '--to-guest', '--conflict', 'keep-both', '--json'], env);
    expect(kept.code, kept.stderr).toBe(0);
    expect((JSON.parse(kept.stdout) as { items: Array<{ to: string }> }).items.map((i) => i.to)).toEqual([`${td}/alpha.txt.restored-${stamp}`]);
    const sums = await dom!.sh(`cat ${td}/alpha.txt && sha256sum '${td}/alpha.txt.restored-${stamp}'`);
    expect(sums.split('\n')[0]).toBe('newer');
    expect(sums.split('\n')[1]!.split(' ')[0]).toBe(image.manifest.testdata['alpha.txt']);

    await virsh(['suspend', VM]);
    try {
      const paused = await bulwark(['restore', 'files', `${VM}@latest`, '--path', `${td}/alpha.txt`, '--to-guest', '--conflict', 'overwrite'], env);
      expect(paused.code).toBe(1);
      expect(paused.stderr).toMatch(new RegExp(`VM ${VM} on host lv \\(qemu:///system\\) is paused, not running`));
      expect(paused.stderr).toContain(`virsh resume ${VM}`);
    } finally {
      await virsh(['resume', VM]);
    }
  });

  it('(b) restores over the original only when it is off, defining it again from the saved XML', async () => {
    const refused = await bulwark(['restore', 'vm', `${VM}@latest`], env);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(new RegExp(`${VM} is running: shut it down`));

    await virsh(['destroy', VM]);
    expect(existsSync(dom!.diskPath)).toBe(true);
    const r = await bulwark(['restore', 'vm', `${VM}@latest`, '--power-on', '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ vm: VM, toOriginal: true, result: { poweredOn: true, disks: [{ path: dom!.diskPath }] } });
    await dom!.waitForAgent(180_000);
    await expectTestData(dom!);
  });

  it('(c) boots the libvirt VM by instant recovery from its saved XML (direct kernel boot under plain QEMU)', async () => {
    const started = await bulwark(['instant-recovery', 'start', `${VM}@latest`, '--name', 'e2e-lv-ir', '--json'], env);
    expect(started.code, started.stderr).toBe(0);
    const s = JSON.parse(started.stdout) as { id: string; dir: string; agentSocket: string; runningFromBackup: boolean };
    expect(s.runningFromBackup).toBe(true);
    try {
      const deadline = Date.now() + 180_000;
      for (;;) {
        try {
          const qga = await QgaClient.connect({ socketPath: s.agentSocket, timeoutMs: 3000 });
          try {
            await qga.ping();
            const m = image.manifest;
            for (const [file, sum] of Object.entries(m.testdata)) {
              const r = await qga.exec('sha256sum', [`${m.testdataDir}/${file}`]);
              expect(r.stdout.toString().split(' ')[0], file).toBe(sum);
            }
            break;
          } finally {
            await qga.close();
          }
        } catch (err) {
          if (Date.now() > deadline) throw err;
          await new Promise((r) => setTimeout(r, 500));
        }
      }
    } finally {
      expect((await bulwark(['instant-recovery', 'stop', s.id], env)).code).toBe(0);
    }
    expect(existsSync(s.dir)).toBe(false);
  });
});
