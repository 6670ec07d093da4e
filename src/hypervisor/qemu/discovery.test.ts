import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { promisify } from 'node:util';
import { gunzipSync } from 'node:zlib';
import { domainFirmware } from '../libvirt/firmware.js';
import type { VmInfo } from '../types.js';
import { disksFromQueryBlock, MAX_NVRAM_BYTES, readNvram, withSavedNvram, type QueryBlockEntry } from './discovery.js';
import { globFiles, processInfo, socketOwnerPid } from './discovery.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-discovery-'));
  for (const vm of ['vm1', 'vm2', 'other']) {
    await mkdir(path.join(dir, vm));
    await writeFile(path.join(dir, vm, vm === 'other' ? 'monitor' : 'qmp.sock'), '');
  }
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('globFiles', () => {
  it('matches * and ? inside segments, sorted, existing files only', async () => {
    expect(await globFiles(path.join(dir, '*', 'qmp.sock'))).toEqual([path.join(dir, 'vm1', 'qmp.sock'), path.join(dir, 'vm2', 'qmp.sock')]);
    expect(await globFiles(path.join(dir, 'vm?', '*.sock'))).toHaveLength(2);
    expect(await globFiles(path.join(dir, 'vm3', 'qmp.sock'))).toEqual([]);
    expect(await globFiles(path.join(dir, 'vm1', 'qmp.sock'))).toEqual([path.join(dir, 'vm1', 'qmp.sock')]);
  });
});

describe('socketOwnerPid / processInfo', () => {
  it('finds the process listening on a unix socket, and its command line and identity', async () => {
    const sock = path.join(dir, 'listen.sock');
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      expect(await socketOwnerPid(sock)).toBe(process.pid);
      const info = await processInfo(process.pid);
      expect(info.commandLine[0]).toContain('node');
      expect(info.instance).toMatch(new RegExp(`^${process.pid}@[0-9]+$`));
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
    expect(await socketOwnerPid(sock)).toBeUndefined();
  });
});

// query-block of QEMU 7.2 (trimmed to the fields read) for an OVMF VM started with
// `-drive if=pflash,unit=0,readonly=on,file=OVMF_CODE.fd -drive if=pflash,unit=1,file=vars.fd`
// and a virtio disk `-device virtio-blk-pci,drive=vda-fmt,id=vda`.
const image = (filename: string, format: string, size: number) => ({ filename, format, 'virtual-size': size });
const driveStyle: QueryBlockEntry[] = [
  { device: 'pflash0', qdev: '/machine/system.flash0', inserted: { 'node-name': '#block343', file: '/usr/share/OVMF/OVMF_CODE.fd', drv: 'raw', ro: true, image: image('/usr/share/OVMF/OVMF_CODE.fd', 'raw', 1966080) } },
  { device: 'pflash1', qdev: '/machine/system.flash1', inserted: { 'node-name': '#block557', file: '/vms/web1/vars.fd', drv: 'raw', ro: false, image: image('/vms/web1/vars.fd', 'raw', 131072) } },
  { device: '', qdev: '/machine/peripheral/vda/virtio-backend', inserted: { 'node-name': 'vda-fmt', file: '/vms/web1/vda.qcow2', drv: 'qcow2', ro: false, image: image('/vms/web1/vda.qcow2', 'qcow2', 134217728) } },
];

describe('flash devices are firmware, not disks (query-block)', () => {
  it('-drive if=pflash: code recorded by path, the variable store as NVRAM, only vda is a disk', () => {
    const r = disksFromQueryBlock(driveStyle);
    expect(r.disks.map((d) => d.name)).toEqual(['vda']);
    expect(r.disks[0]).toMatchObject({ imagePath: '/vms/web1/vda.qcow2', format: 'qcow2', nodeName: 'vda-fmt', virtualSize: 134217728 });
    expect(r.firmware).toEqual({ code: '/usr/share/OVMF/OVMF_CODE.fd', codeFormat: 'raw', nvram: { path: '/vms/web1/vars.fd', format: 'raw' } });
    expect(r.warnings).toEqual([]);
  });
  it('-machine pflash0=NODE,pflash1=NODE (no device name, libvirt style): the same', () => {
    const blocks = driveStyle.map((b) => (b.device.startsWith('pflash') ? { ...b, device: '' } : b));
    const r = disksFromQueryBlock(blocks);
    expect(r.disks.map((d) => d.name)).toEqual(['vda']);
    expect(r.firmware?.nvram?.path).toBe('/vms/web1/vars.fd');
  });
  it('a BIOS VM has no firmware; one writable flash (code and variables in one image) is not saved, with a warning', () => {
    expect(disksFromQueryBlock(driveStyle.slice(2)).firmware).toBeUndefined();
    const combined = [{ ...driveStyle[0]!, inserted: { ...driveStyle[0]!.inserted!, ro: false } }, driveStyle[2]!];
    const r = disksFromQueryBlock(combined);
    expect(r.firmware).toEqual({ code: '/usr/share/OVMF/OVMF_CODE.fd', codeFormat: 'raw' });
    expect(r.disks.map((d) => d.name)).toEqual(['vda']);
    expect(r.warnings[0]).toMatch(/OVMF_CODE.fd is one writable flash.*not saved/);
  });
});

describe('readNvram / withSavedNvram', () => {
  const run = promisify(execFile);
  const vars = Buffer.alloc(131072);
  for (let i = 0; i < vars.length; i += 4096) vars.write(`var-${i}`, i);
  const sha = createHash('sha256').update(vars).digest('hex');

  it('reads a raw store and a qcow2 store as raw bytes with their SHA-256', async () => {
    const raw = path.join(dir, 'web1_VARS.fd');
    await writeFile(raw, vars);
    const r0 = await readNvram({ path: raw, format: 'raw' }, 'web1');
    expect(r0).toMatchObject({ path: raw, format: 'raw', contents: { sha256: sha, size: vars.length } });
    expect(gunzipSync(Buffer.from(r0.contents!.gzip, 'base64')).equals(vars)).toBe(true);
    expect(r0.contents!.gzip.length).toBeLessThan(vars.length / 4);
    const q = path.join(dir, 'web1_VARS.qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, q]);
    const r = await readNvram({ path: q, format: 'qcow2' }, 'web1');
    expect(r.contents?.sha256).toBe(sha);
    expect(gunzipSync(Buffer.from(r.contents!.gzip, 'base64')).equals(vars)).toBe(true);
  });
  it('refuses a missing or oversized store, naming the VM and the file', async () => {
    await expect(readNvram({ path: path.join(dir, 'gone.fd'), format: 'raw' }, 'web1')).rejects.toThrow(/cannot read the UEFI variable store .*gone\.fd of VM web1/);
    const big = path.join(dir, 'big.fd');
    await writeFile(big, Buffer.alloc(MAX_NVRAM_BYTES + 1));
    await expect(readNvram({ path: big, format: 'raw' }, 'web1')).rejects.toThrow(/big\.fd of VM web1 is 4194305 bytes, more than/);
    const random = path.join(dir, 'random.fd');
    await writeFile(random, (await import('node:crypto')).randomBytes(512 * 1024));
    await expect(readNvram({ path: random, format: 'raw' }, 'web1')).rejects.toThrow(/random\.fd of VM web1 compresses to \d+ bytes, more than the 262144/);
  });
  it('puts the store into a UEFI VM\'s configuration and leaves a BIOS VM as it is', async () => {
    const raw = path.join(dir, 'web1_VARS.fd');
    const base = { id: '/vms/web1/qmp.sock', name: 'web1', state: 'running', disks: [] } as const;
    const bios: VmInfo = { ...base, configuration: { kind: 'qemu', commandLine: ['qemu'], blockGraph: [] } };
    expect(await withSavedNvram(bios)).toBe(bios);
    const uefi: VmInfo = { ...base, configuration: { kind: 'qemu', commandLine: ['qemu'], blockGraph: [], firmware: { code: '/c.fd', codeFormat: 'raw', nvram: { path: raw, format: 'raw' } } } };
    const saved = await withSavedNvram(uefi);
    expect(saved.configuration.firmware).toMatchObject({ code: '/c.fd', codeFormat: 'raw', nvram: { path: raw, format: 'raw', contents: { sha256: sha, size: vars.length } } });
    expect(uefi.configuration.firmware?.nvram?.contents).toBeUndefined();
  });
});

describe('libvirt domain firmware (domainFirmware)', () => {
  it('reads <loader type=pflash> and <nvram> of libvirt 9 (path as text)', () => {
    const xml = `<domain type='qemu'><name>web1</name><os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os><devices/></domain>`;
    expect(domainFirmware(xml)).toEqual({
      code: '/usr/share/OVMF/OVMF_CODE_4M.fd',
      codeFormat: 'raw',
      nvram: { path: '/var/lib/libvirt/qemu/nvram/web1_VARS.fd', format: 'raw' },
      nvramTemplate: '/usr/share/OVMF/OVMF_VARS_4M.fd',
    });
  });
  it('reads <nvram type=file format=qcow2><source file=…/> of newer libvirt', () => {
    const xml = `<domain><os><loader readonly="yes" type="pflash" format="raw">/fw/CODE.fd</loader><nvram type="file" format="qcow2"><source file="/n/a.qcow2"/></nvram></os></domain>`;
    expect(domainFirmware(xml)).toEqual({ code: '/fw/CODE.fd', codeFormat: 'raw', nvram: { path: '/n/a.qcow2', format: 'qcow2' } });
  });
  it('has none for a BIOS domain or a ROM loader', () => {
    expect(domainFirmware(`<domain><os><type>hvm</type><kernel>/k</kernel></os></domain>`)).toBeUndefined();
    expect(domainFirmware(`<domain><os><loader type='rom'>/fw/bios.bin</loader></os></domain>`)).toBeUndefined();
  });
});
