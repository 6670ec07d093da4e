// Instant recovery brings a BIOS VM back on the hardware it was backed up with (real QEMU, TCG).
// (a-c) A VM whose only disk is on IDE (pc's PIIX), on SATA (an ich9-ahci controller) or on SCSI (a
// virtio-scsi controller) runs: SeaBIOS boots the disk's sector 0, a boot sector that prints a
// marker on COM1 (test/fixtures/boot-sector.ts); it is backed up with backupVm (the adapter records
// its command line); instant recovery boots the point: the marker on the session's console shows
// SeaBIOS found the disk on that bus, and QMP shows the device type and its controller (qom-get),
// with the overlay node on it (query-block). The SATA case also migrates the disk (block mirror by
// node name) and checks the device then runs on the migrated disk. (The backup names these disks
// `disk0`, their format node: query-block gives an IDE or SCSI device's id as `qdev`, not a
// /machine/peripheral path, so the adapter falls back to the node name; the device id is then disk0.)
// (d) A point recorded with `-cpu host`, a NIC and its disk on q35's own AHCI: the VM gets `max`
// under TCG, the NIC with its recorded model and MAC and no network backend, the disk on the board's AHCI.
// (e) A point whose disk is a usb-storage device is refused before anything starts, naming the VM
// and the device. (g) A libvirt point (domain XML as dumpxml writes it: SCSI disk on a virtio-scsi
// controller, virtio NIC with its ROM off, host-passthrough CPU, a topology) recovered likewise;
// (h) one whose SCSI controller has no model (libvirt's x86 default, LSI).
// (f) What the refusal's hint says works: `restore vm` of that point as a new VM
// boots it from its USB disk, and `restore vm` of the IDE VM's point (whose disk the backup names
// by its node) boots it from IDE. The repository never changes.
import { spawn, type ChildProcess } from 'node:child_process';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupVm } from '../../src/agent/backup/disk-backup.js';
import { encodePointMetadata, POINT_METADATA_FORMAT } from '../../src/agent/backup/point-metadata.js';
import type { DiskBlock } from '../../src/disk/types.js';
import { QemuHypervisor } from '../../src/hypervisor/qemu/adapter.js';
import { QmpClient } from '../../src/hypervisor/qmp/client.js';
import { socketAnswers } from '../../src/hypervisor/socket.js';
import { openRepository, verifyRepository, type Repository } from '../../src/repository/index.js';
import { startInstantRecovery, type InstantRecoverySession } from '../../src/restore/instant/index.js';
import { restoreVm } from '../../src/restore/vm/index.js';
import { bootSector } from '../fixtures/boot-sector.js';
import { hashTree } from '../fixtures/guest-agent.js';

const run = promisify(execFile);
const DISK = 1024 * 1024;
let work: string;
let repo: Repository;
const sources = new Set<ChildProcess>();
const sessions = new Set<InstantRecoverySession>();

async function waitForConsole(file: string, text: string, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const out = existsSync(file) ? await readFile(file, 'latin1') : '';
    if (out.includes(text)) return out;
    if (Date.now() > deadline) throw new Error(`"${text}" not on ${file} within ${timeoutMs} ms (it shows ${JSON.stringify(out.slice(-200))})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A qcow2 disk whose sector 0 prints `marker` on COM1. */
async function bootDisk(file: string, marker: string): Promise<void> {
  const raw = `${file}.raw`;
  const img = Buffer.alloc(DISK);
  bootSector(marker).copy(img, 0);
  await writeFile(raw, img);
  await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, file]);
  await rm(raw);
}

/**
 * Runs a BIOS VM (SeaBIOS, no kernel) on `disk` with `devices`, until its boot sector's marker is
 * on its console; backs it up; quits it. Returns the point.
 */
async function backUpSourceVm(name: string, machine: string, devices: string[], marker: string): Promise<string> {
  const dir = path.join(work, 'vms', name);
  await mkdir(dir, { recursive: true });
  const disk = path.join(dir, 'disk0.qcow2');
  await bootDisk(disk, marker);
  const qmpSocket = path.join(dir, 'qmp.sock');
  const consoleLog = path.join(dir, 'console.log');
  const args = [
    '-name', name, '-machine', machine, '-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', '-no-user-config',
    '-serial', `file:${consoleLog}`,
    '-blockdev', `driver=file,node-name=disk0-file,filename=${disk}`, '-blockdev', 'driver=qcow2,node-name=disk0,file=disk0-file',
    ...devices.flatMap((d) => ['-device', d]),
    '-qmp', `unix:${qmpSocket},server=on,wait=off`,
  ];
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  sources.add(child);
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => (stderr += b.toString()));
  try {
    const deadline = Date.now() + 30_000;
    while (!(await socketAnswers(qmpSocket))) {
      if (child.exitCode !== null) throw new Error(`source VM ${name} exited: ${stderr}`);
      if (Date.now() > deadline) throw new Error(`source VM ${name} did not open its monitor`);
      await new Promise((r) => setTimeout(r, 20));
    }
    await waitForConsole(consoleLog, marker);
    const hv = new QemuHypervisor({ qmpGlob: qmpSocket, workDir: path.join(work, 'adapter') });
    try {
      return (await backupVm({ hypervisor: hv, repository: repo, job: 'hw', vm: name, threads: 1 })).pointId;
    } finally {
      await hv.close();
    }
  } finally {
    const qmp = await QmpClient.connect({ endpoint: { socketPath: qmpSocket }, label: name }).catch(() => undefined);
    await qmp?.execute('quit').catch(() => undefined);
    await qmp?.close().catch(() => undefined);
    if (child.exitCode === null) await new Promise((r) => child.once('exit', r));
    sources.delete(child);
  }
}

/** A point written straight into the repository with a recorded command line (nothing ran it). */
async function recordedPoint(vm: string, commandLine: string[] | { domainXml: string }, marker: string): Promise<string> {
  const BS = 256 * 1024;
  const vmConfig = encodePointMetadata({
    format: POINT_METADATA_FORMAT,
    hypervisor: Array.isArray(commandLine) ? 'qemu' : 'libvirt',
    vm: { name: vm, id: path.join(work, 'vms', vm, 'qmp.sock') },
    configuration: Array.isArray(commandLine) ? { kind: 'qemu', commandLine, blockGraph: [] } : { kind: 'libvirt', domainXml: commandLine.domainXml },
    checkpoint: { chainId: `c-${vm}`, name: `c-${vm}-0`, time: new Date().toISOString(), disks: { sda: DISK } } as never,
    consistency: 'crash',
    freezeWindowMs: null,
    warnings: [],
  });
  const first = Buffer.alloc(BS);
  bootSector(marker).copy(first, 0);
  async function* blocks(): AsyncGenerator<DiskBlock> {
    yield { index: 0, data: first };
    for (let i = 1; i < DISK / BS; i++) yield { index: i, data: null };
  }
  const w = await repo.startRestorePoint({ job: 'hw', vm, kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'sda', size: DISK }], vmConfig });
  await w.writeDisk('sda', blocks());
  return (await w.commit()).id;
}

/** The QOM type of a device and of the device owning the bus it sits on. */
async function deviceAndController(s: InstantRecoverySession, id: string): Promise<{ type: string; controller: string }> {
  const dev = `/machine/peripheral/${id}`;
  const type = await s.monitor<string>('qom-get', { path: dev, property: 'type' });
  const bus = await s.monitor<string>('qom-get', { path: dev, property: 'parent_bus' });
  const controller = await s.monitor<string>('qom-get', { path: path.posix.dirname(bus), property: 'type' });
  return { type, controller };
}

/** The node on a device (query-block, by its qdev path). */
async function nodeOn(s: InstantRecoverySession, id: string): Promise<string | undefined> {
  const blocks = await s.monitor<{ qdev?: string; inserted?: { 'node-name'?: string } }[]>('query-block');
  // qdev: the device's id, or its QOM path when the block backend is a child of it (virtio).
  return blocks.find((b) => b.qdev === id || b.qdev === `/machine/peripheral/${id}/virtio-backend`)?.inserted?.['node-name'];
}

let repoHashes: Record<string, string>;
const points: Record<string, string> = {};

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-irhw-'));
  repo = await openRepository(path.join(work, 'repo'), { create: true });
  points.ide = await backUpSourceVm('hw-ide', 'pc', ['ide-hd,drive=disk0,bus=ide.0,unit=0,id=hda,bootindex=1'], 'BULWARK-HW-IDE');
  points.sata = await backUpSourceVm('hw-sata', 'pc', ['ich9-ahci,id=ahci0', 'ide-hd,drive=disk0,bus=ahci0.0,id=sda'], 'BULWARK-HW-SATA');
  points.scsi = await backUpSourceVm('hw-scsi', 'pc', ['virtio-scsi-pci,id=scsi0', 'scsi-hd,drive=disk0,bus=scsi0.0,scsi-id=0,lun=0,id=sda,bootindex=1'], 'BULWARK-HW-SCSI');
  const fmt = (node: string): string[] => ['-blockdev', JSON.stringify({ driver: 'raw', 'node-name': node, file: { driver: 'file', filename: `/gone/${node}.img` } })];
  points.q35 = await recordedPoint('hw-q35', [
    'qemu-system-x86_64', '-name', 'hw-q35', '-machine', 'q35,accel=kvm', '-cpu', 'host', '-m', '64', '-nodefaults',
    ...fmt('sda-fmt'), '-device', 'ide-hd,drive=sda-fmt,bus=ide.1,id=sda',
    '-netdev', 'tap,id=n0,ifname=tap9,script=no', '-device', 'e1000,netdev=n0,mac=52:54:00:12:34:99,id=nic0',
  ], 'BULWARK-HW-Q35');
  const usbDir = path.join(work, 'vms', 'hw-usb');
  points.usb = await recordedPoint('hw-usb', [
    'qemu-system-x86_64', '-name', 'hw-usb', '-machine', 'pc', '-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', '-device', 'qemu-xhci,id=xhci',
    '-blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'sda-fmt', file: { driver: 'file', filename: path.join(usbDir, 'sda.img') } }),
    '-device', 'usb-storage,drive=sda-fmt,id=sda,bootindex=1',
    '-serial', `file:${path.join(usbDir, 'console.log')}`, '-qmp', `unix:${path.join(usbDir, 'qmp.sock')},server=on,wait=off`,
  ], 'BULWARK-HW-USB');
  points.net = await recordedPoint('hw-net', [
    'qemu-system-x86_64', '-name', 'hw-net', '-machine', 'pc', '-m', '64', '-nodefaults',
    ...fmt('sda-fmt'), '-device', 'ide-hd,drive=sda-fmt,id=sda',
    '-netdev', 'user,id=n0,restrict=on', '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:12:34:aa,id=nic0',
  ], 'BULWARK-HW-NET');
  // A libvirt domain as `virsh dumpxml --inactive` writes one (libvirt's addresses and aliases).
  points.libvirt = await recordedPoint('hw-lv', { domainXml: `<domain type='qemu'>
  <name>hw-lv</name>
  <memory unit='KiB'>65536</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
  <cpu mode='host-passthrough' check='none' migratable='on'><topology sockets='1' dies='1' cores='2' threads='1'/></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/hw-lv/sda.img'/>
      <target dev='sda' bus='scsi'/>
      <serial>LV-SDA</serial>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='usb' index='0' model='piix3-uhci'><address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/></controller>
    <controller type='pci' index='0' model='pci-root'/>
    <controller type='scsi' index='0' model='virtio-scsi'><address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/></controller>
    <interface type='network'>
      <mac address='52:54:00:6c:76:01'/>
      <source network='default'/>
      <model type='virtio'/>
      <rom enabled='no'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <memballoon model='none'/>
  </devices>
</domain>
` }, 'BULWARK-HW-LIBVIRT');
  // libvirt's SCSI controller without a model: lsilogic on x86 (QEMU's lsi53c895a).
  points.lsi = await recordedPoint('hw-lsi', { domainXml: `<domain type='qemu'><name>hw-lsi</name><memory unit='KiB'>65536</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/v/sda.img'/><target dev='sda' bus='scsi'/><boot order='1'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/></disk>
    <controller type='scsi' index='0'/>
  </devices>
</domain>
` }, 'BULWARK-HW-LSI');
  repoHashes = await hashTree(repo.root);
}, 180_000);

afterAll(async () => {
  for (const s of sessions) await s.stop().catch(() => undefined);
  for (const c of sources) c.kill('SIGKILL');
  if (work) await rm(work, { recursive: true, force: true });
});

async function recover(key: string, network?: 'recorded'): Promise<InstantRecoverySession> {
  const s = await startInstantRecovery({ repository: repo, pointId: points[key]!, workDir: path.join(work, 'ir'), name: `ir-${key}`, ...(network ? { network } : {}) });
  sessions.add(s);
  return s;
}

async function finish(s: InstantRecoverySession): Promise<void> {
  await s.stop();
  sessions.delete(s);
}

describe('instant recovery recreates the recorded hardware of a BIOS VM', () => {
  it('(a) IDE: SeaBIOS boots the disk on the PIIX IDE bus of the recovered VM', async () => {
    const s = await recover('ide');
    await waitForConsole(s.consoleLog, 'BULWARK-HW-IDE\r\n');
    expect(s.hardware?.disks).toEqual([{ name: 'disk0', bus: 'ide', driver: 'ide-hd', props: [['bus', 'ide.0'], ['unit', '0']], bootindex: 1 }]);
    expect(await deviceAndController(s, 'disk0')).toEqual({ type: 'ide-hd', controller: 'piix3-ide' });
    expect(await nodeOn(s, 'disk0')).toBe('disk0-overlay');
    await finish(s);
  });

  it('(b) SATA: the ich9-ahci controller is recreated, SeaBIOS boots the disk on it; migrate pivots the device onto its own disk', async () => {
    const s = await recover('sata');
    await waitForConsole(s.consoleLog, 'BULWARK-HW-SATA\r\n');
    expect(s.hardware?.controllers).toEqual([{ driver: 'ich9-ahci', id: 'ahci0' }]);
    expect(await deviceAndController(s, 'disk0')).toEqual({ type: 'ide-hd', controller: 'ich9-ahci' });
    expect(await nodeOn(s, 'disk0')).toBe('disk0-overlay');
    // The session folder (overlays with the guest's writes, monitor and agent sockets) is this user's only.
    const mode = async (p: string): Promise<number> => (await stat(p)).mode & 0o777;
    expect([await mode(s.dir), await mode(s.disks[0]!.overlay)]).toEqual([0o700, 0o600]);
    const target = path.join(work, 'migrated-sata');
    const disks = await s.migrate(target);
    expect([await mode(target), await mode(disks.disk0!)]).toEqual([0o750, 0o600]);
    expect(disks).toEqual({ disk0: path.join(target, 'disk0.qcow2') });
    expect(s.state).toBe('migrated');
    expect(s.servingBackup).toBe(false);
    expect(await nodeOn(s, 'disk0')).toBe('disk0-target');
    expect(await deviceAndController(s, 'disk0')).toEqual({ type: 'ide-hd', controller: 'ich9-ahci' });
    await finish(s);
    // The migrated disk (kept by stop) holds the backed-up boot sector.
    const raw = path.join(work, 'sata-migrated.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', disks.disk0!, raw]);
    expect((await readFile(raw)).subarray(0, 512)).toEqual(bootSector('BULWARK-HW-SATA'));
  });

  it('(c) virtio-scsi: scsi-hd on a recreated virtio-scsi-pci; SeaBIOS boots it', async () => {
    const s = await recover('scsi');
    await waitForConsole(s.consoleLog, 'BULWARK-HW-SCSI\r\n');
    expect(s.hardware?.disks[0]).toMatchObject({ name: 'disk0', bus: 'virtio-scsi', driver: 'scsi-hd', bootindex: 1 });
    const d = await deviceAndController(s, 'disk0');
    expect(d.type).toBe('scsi-hd');
    expect(d.controller).toMatch(/^virtio-scsi/);
    expect(await s.monitor<string>('qom-get', { path: '/machine/peripheral/scsi0', property: 'type' })).toBe('virtio-scsi-pci');
    expect(await nodeOn(s, 'disk0')).toBe('disk0-overlay');
    await finish(s);
  });

  it("(d) q35 with -cpu host and a NIC: 'max' under TCG, the NIC's model and MAC without a network, the disk on the board's AHCI", async () => {
    const s = await recover('q35');
    await waitForConsole(s.consoleLog, 'BULWARK-HW-Q35\r\n');
    expect(await deviceAndController(s, 'sda')).toEqual({ type: 'ide-hd', controller: 'ich9-ahci' });
    const cpus = await s.monitor<{ 'qom-path': string }[]>('query-cpus-fast');
    expect(await s.monitor<string>('qom-get', { path: cpus[0]!['qom-path'], property: 'type' })).toBe('max-x86_64-cpu');
    expect(await s.monitor<string>('qom-get', { path: '/machine/peripheral/net0', property: 'type' })).toBe('e1000');
    expect(await s.monitor<string>('qom-get', { path: '/machine/peripheral/net0', property: 'mac' })).toBe('52:54:00:12:34:99');
    // No backend: the NIC is listed without a peer (a connected one has a ' \\ <netdev>' line).
    const network = await s.monitor<string>('human-monitor-command', { 'command-line': 'info network' });
    expect(network).toMatch(/^net0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:99\r?$/m);
    expect(network).not.toMatch(/\\|tap/);
    await finish(s);
  });

  it("(g) a libvirt domain: its SCSI disk on the domain's virtio-scsi controller (serial kept), its virtio NIC without ROM and network, host-passthrough as max, its CPU topology", async () => {
    const s = await recover('libvirt');
    await waitForConsole(s.consoleLog, 'BULWARK-HW-LIBVIRT\r\n');
    expect(s.hardware?.controllers).toEqual([{ driver: 'virtio-scsi-pci', id: 'scsi0' }]);
    expect(await deviceAndController(s, 'sda')).toEqual({ type: 'scsi-hd', controller: 'virtio-scsi-device' });
    expect(await s.monitor<string>('qom-get', { path: '/machine/peripheral/sda', property: 'serial' })).toBe('LV-SDA');
    expect(await s.monitor<string>('qom-get', { path: '/machine/peripheral/net0', property: 'type' })).toBe('virtio-net-pci');
    expect(await s.monitor<string>('qom-get', { path: '/machine/peripheral/net0', property: 'romfile' })).toBe('');
    const network = await s.monitor<string>('human-monitor-command', { 'command-line': 'info network' });
    expect(network).toMatch(/^net0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:6c:76:01\r?$/m);
    // Two vCPUs as one socket of two cores (the domain's <topology>).
    const cpus = await s.monitor<{ 'qom-path': string; props: { 'socket-id'?: number; 'core-id'?: number; 'thread-id'?: number } }[]>('query-cpus-fast');
    expect(cpus.map((c) => [c.props['socket-id'], c.props['core-id'], c.props['thread-id']])).toEqual([[0, 0, 0], [0, 1, 0]]);
    expect(await s.monitor<string>('qom-get', { path: cpus[0]!['qom-path'], property: 'type' })).toBe('max-x86_64-cpu');
    await finish(s);
  });

  it("(h) a libvirt domain's SCSI disk on its default controller (lsilogic): lsi53c895a recreated, SeaBIOS boots it", async () => {
    const s = await recover('lsi');
    await waitForConsole(s.consoleLog, 'BULWARK-HW-LSI\r\n');
    expect(s.hardware?.disks).toEqual([{ name: 'sda', bus: 'lsi-scsi', driver: 'scsi-hd', props: [['bus', 'scsi0.0'], ['scsi-id', '0']], bootindex: 1 }]);
    expect(await deviceAndController(s, 'sda')).toEqual({ type: 'scsi-hd', controller: 'lsi53c895a' });
    await finish(s);
  });

  it('(i) asked for, the NIC is connected to its recorded network (the recorded -netdev); a libvirt network is refused, naming the NIC', async () => {
    const s = await recover('net', 'recorded');
    await waitForConsole(s.consoleLog, 'BULWARK-HW-NET\r\n');
    const network = await s.monitor<string>('human-monitor-command', { 'command-line': 'info network' });
    expect(network).toMatch(/^net0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:aa\r?\n \\ net0-net: index=0,type=user,/m);
    await finish(s);
    const err = await recover('libvirt', 'recorded').then(() => undefined, (e: unknown) => e as Error & { hint?: string });
    expect(err?.message).toBe(`VM hw-lv (restore point ${points.libvirt!}): NIC virtio-net-pci 52:54:00:6c:76:01 cannot be connected to its recorded network: interface type network (libvirt network default) is libvirt's to connect`);
    expect(err?.hint).toMatch(/without its network/);
  });

  it('(e) a disk on USB is refused before anything starts, naming the VM, the device and what to do', async () => {
    const err = await startInstantRecovery({ repository: repo, pointId: points.usb!, workDir: path.join(work, 'ir'), name: 'ir-usb' }).then(() => undefined, (e: unknown) => e as Error & { hint?: string });
    expect(err?.message).toBe(`VM hw-usb (restore point ${points.usb!}): disk sda is attached as usb-storage, which instant recovery cannot recreate`);
    expect(err?.hint).toMatch(new RegExp(`bulwark restore vm ${points.usb!} --name NEW`));
    const ir = path.join(work, 'ir');
    expect(existsSync(ir) ? await readdir(ir) : []).not.toContain('ir-usb');
  });

  it('(f) restore vm keeps the recorded hardware: the USB VM instant recovery refuses, and the IDE VM, boot as new VMs', async () => {
    const host = { kind: 'qemu' as const, qmpGlob: path.join(work, 'restored', '*', 'qmp.sock') };
    for (const [key, marker] of [['usb', 'BULWARK-HW-USB'], ['ide', 'BULWARK-HW-IDE']] as const) {
      const r = await restoreVm({ repository: repo, pointId: points[key]!, host, name: `${key}-r`, powerOn: true, defaultVmRoot: path.join(work, 'vm-root') });
      const pidFile = path.join(r.vmDir!, 'qemu.pid');
      try {
        expect(r.poweredOn).toBe(true);
        await waitForConsole(path.join(r.vmDir!, 'console.log'), `${marker}\r\n`);
        const script = await readFile(r.startScript!, 'utf8');
        expect(script).toContain(key === 'usb' ? 'usb-storage,drive=sda-fmt,id=sda,bootindex=1' : 'ide-hd,drive=disk0,bus=ide.0,unit=0,id=hda,bootindex=1');
      } finally {
        const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
        if (pid > 0) process.kill(pid, 'SIGKILL');
      }
    }
  });

  it('the repository is unchanged and verifies clean', async () => {
    expect(await hashTree(repo.root)).toEqual(repoHashes);
    const report = await verifyRepository(repo.root);
    expect(report.damage).toEqual([]);
    expect(report.ok).toBe(true);
  });
});
