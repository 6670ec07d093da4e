// The record of migrated instant recovery VMs (docs/formats/instant-recoveries.md, "Migrated
// instant recovery VMs") read by a new process: listed as migrated with their pid only while that
// very process runs; a damaged file ignored; stop of one whose VM is gone forgets it; its name is
// taken. And how QEMU is started under a systemd service (vm-process.ts).
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { InstantRecoverySessions, processStart } from './sessions.js';
import { systemdService, vmProcessArgv, vmScopeUnit } from './vm-process.js';

let dir = '';
beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bw-irvms-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

function record(id: string, name: string, pid: number, start: string | null): Record<string, unknown> {
  const vmDir = path.join(dir, 'vms', name);
  return {
    id, name, vm: 'web1', pointId: 'p1', startedAt: '2026-11-26T10:00:00.000Z', migratedAt: '2026-11-26T10:01:00.000Z',
    pid, processStart: start, dir: vmDir, qmpSocket: path.join(vmDir, 'qmp.sock'), agentSocket: path.join(vmDir, 'qga.sock'),
    consoleLog: path.join(vmDir, 'console.log'), qemuLog: path.join(vmDir, 'qemu.log'),
    disks: [{ name: 'vda', size: 1024, overlay: path.join(dir, 'ir', name, 'vda.overlay.qcow2'), target: path.join(vmDir, 'vda.qcow2') }],
    host: 'kvm-b',
  };
}

describe('migrated instant recovery VMs across a restart', () => {
  it('lists recorded VMs as migrated, with the pid only while that very process runs', async () => {
    const file = path.join(dir, 'instant-recovery-vms.json');
    const me = processStart(process.pid)!;
    expect(me).toMatch(new RegExp(`^${process.pid}@\\d+$`));
    // This test process stands for a running QEMU; the second record's pid was reused by another process.
    await writeFile(file, JSON.stringify({ format: 'bulwark instant recovery vms v1', vms: [record('ir-00000001', 'a-ir', process.pid, me), record('ir-00000002', 'b-ir', process.pid, `${process.pid}@1`)] }));
    const sessions = new InstantRecoverySessions({ stateFile: file });
    expect(await sessions.load()).toBe(2);
    const list = sessions.list();
    expect(list).toMatchObject([
      { id: 'ir-00000001', name: 'a-ir', state: 'migrated', runningFromBackup: false, pid: process.pid, dir: path.join(dir, 'vms', 'a-ir'), host: 'kvm-b', disks: [{ name: 'vda', target: path.join(dir, 'vms', 'a-ir', 'vda.qcow2') }] },
      { id: 'ir-00000002', name: 'b-ir', state: 'migrated', runningFromBackup: false, pid: undefined },
    ]);
    // A migrated VM is not a session of this process any more.
    expect(() => sessions.get('ir-00000001')).toThrow(/was migrated: VM a-ir runs on its own disks/);
    // Its name is taken: a new instant recovery of that name is refused before anything starts.
    await expect(sessions.start({ workDir: path.join(dir, 'ir'), name: 'a-ir', pointId: 'p1' })).rejects.toThrow(/a VM named a-ir exists: instant recovery ir-00000001/);

    // stop of the one whose VM is gone forgets it (nothing to quit) and rewrites the file.
    await sessions.stop('ir-00000002');
    expect(sessions.list().map((s) => s.id)).toEqual(['ir-00000001']);
    const saved = JSON.parse(await readFile(file, 'utf8')) as { format: string; vms: Array<{ id: string }> };
    expect(saved.format).toBe('bulwark instant recovery vms v1');
    expect(saved.vms.map((v) => v.id)).toEqual(['ir-00000001']);
    // A process stop leaves migrated VMs alone (this process's own pid stands for one: it would be killed).
    await sessions.stopAll();
    expect(sessions.list().map((s) => s.id)).toEqual(['ir-00000001']);
    // forget: it leaves the list and the file, and runs on (this process is still here).
    await sessions.forget('ir-00000001');
    expect(sessions.list()).toEqual([]);
    expect((JSON.parse(await readFile(file, 'utf8')) as { vms: unknown[] }).vms).toEqual([]);
    await expect(sessions.forget('ir-00000001')).rejects.toThrow(/no instant recovery session ir-00000001/);
  });

  it('ignores a missing or damaged file (logged), lists nothing from it', async () => {
    const file = path.join(dir, 'instant-recovery-vms.json');
    expect(await new InstantRecoverySessions({ stateFile: file }).load()).toBe(0);
    await writeFile(file, '{"format":"bulwark instant recovery vms v1","vms":[{"id":1}]}');
    const s = new InstantRecoverySessions({ stateFile: file });
    expect(await s.load()).toBe(0);
    expect(s.list()).toEqual([]);
    await writeFile(file, 'not json');
    expect(await new InstantRecoverySessions({ stateFile: file }).load()).toBe(0);
  });

  it('processStart is undefined for a pid no process has', () => {
    expect(processStart(2 ** 22 + 1)).toBeUndefined();
  });
});

describe('QEMU of an instant recovery under a systemd service', () => {
  it('runs in a transient scope of its own when this process is a service; as is otherwise', () => {
    const qemu = ['qemu-system-x86_64', '-name', 'web1-ir'];
    const unit = vmScopeUnit('web1-ir', 'a1b2c3');
    expect(unit).toBe('bulwark-ir-web1-ir-a1b2c3.scope');
    expect(vmProcessArgv(qemu, unit, false)).toEqual(qemu);
    const scoped = vmProcessArgv(qemu, unit, true);
    expect(scoped.slice(0, 3)).toEqual(['systemd-run', '--scope', '--quiet']);
    expect(scoped).toContain(`--unit=${unit}`);
    expect(scoped.slice(scoped.indexOf('--') + 1)).toEqual(qemu);
    // Not a service (no INVOCATION_ID), or forced either way.
    expect(systemdService({})).toBe(false);
    expect(systemdService({ BULWARK_VM_SCOPE: 'on' })).toBe(true);
    expect(systemdService({ BULWARK_VM_SCOPE: 'off', INVOCATION_ID: 'x' })).toBe(false);
  });
});
