import { describe, expect, it } from 'vitest';
import { randomMac, recordedDisks, rewriteQemuCommandLine, setOpt, shellQuote, splitOpts } from './qemu-config.js';

// The test guest's command line (test/fixtures/guest.ts), as /proc/PID/cmdline records it.
const dir = '/tmp/vms/web1';
const argv = [
  'qemu-system-x86_64', '-name', 'web1', '-accel', 'tcg', '-m', '256',
  '-kernel', '/cache/vmlinux', '-initrd', '/cache/initrd.img', '-append', 'console=ttyS0 quiet',
  '-serial', `file:${dir}/console.log`,
  '-blockdev', `driver=file,node-name=vda-file,filename=${dir}/vda.qcow2`,
  '-blockdev', 'driver=qcow2,node-name=vda-fmt,file=vda-file',
  '-device', 'virtio-blk-pci,drive=vda-fmt,id=vda',
  '-blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'vdb-fmt', file: { driver: 'file', filename: '/data/web1-b.img' } }),
  '-device', 'virtio-blk-pci,drive=vdb-fmt,id=vdb',
  '-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:11:22:33',
  '-chardev', `socket,id=qga0,path=${dir}/qga.sock,server=on,wait=off`,
  '-chardev', `socket,id=qmp0,path=${dir}/qmp.sock,server=on,wait=off`, '-mon', 'chardev=qmp0,mode=control',
];
const graph = [
  { 'node-name': 'vda-fmt', drv: 'qcow2', file: `${dir}/vda.qcow2`, image: { filename: `${dir}/vda.qcow2`, format: 'qcow2' } },
  { 'node-name': 'vda-file', drv: 'file', file: `${dir}/vda.qcow2`, image: { filename: `${dir}/vda.qcow2`, format: 'file' } },
];

describe('QemuOpts', () => {
  it('splits with escaped commas and sets keys', () => {
    expect(splitOpts('file=a,,b,format=raw')).toEqual(['file=a,b', 'format=raw']);
    expect(setOpt('virtio-net-pci,netdev=n0', 'mac', 'x')).toBe('virtio-net-pci,netdev=n0,mac=x');
    expect(setOpt('file=a,,b,format=raw', 'format', 'qcow2')).toBe('file=a,,b,format=qcow2');
  });
});

describe('recordedDisks', () => {
  it('names disks by device id, with image file and format from the graph or the command line', () => {
    expect(recordedDisks(argv, graph)).toEqual([
      { name: 'vda', imagePath: `${dir}/vda.qcow2`, format: 'qcow2', node: 'vda-fmt' },
      { name: 'vdb', imagePath: '/data/web1-b.img', format: 'raw', node: 'vdb-fmt' },
    ]);
  });
  it('reads -drive disks', () => {
    const a = ['qemu', '-drive', 'file=/v/a,,b.img,format=raw,if=none,id=disk0', '-device', 'virtio-blk-pci,drive=disk0'];
    expect(recordedDisks(a, [])).toEqual([{ name: 'disk0', imagePath: '/v/a,b.img', format: 'raw', node: 'disk0' }]);
  });
  it('takes the point\'s name for a device the backup named by its node (an IDE or SCSI device with an id)', () => {
    const a = ['qemu', '-blockdev', 'driver=file,node-name=f0,filename=/v/d0.qcow2', '-blockdev', 'driver=qcow2,node-name=disk0,file=f0', '-device', 'ide-hd,drive=disk0,bus=ide.0,id=hda'];
    expect(recordedDisks(a, [])).toEqual([{ name: 'hda', imagePath: '/v/d0.qcow2', format: 'qcow2', node: 'disk0' }]);
    expect(recordedDisks(a, [], ['disk0'])).toEqual([{ name: 'disk0', imagePath: '/v/d0.qcow2', format: 'qcow2', node: 'disk0' }]);
    expect(recordedDisks(a, [], ['hda'])).toEqual([{ name: 'hda', imagePath: '/v/d0.qcow2', format: 'qcow2', node: 'disk0' }]);
  });
  it('reads drives QEMU attaches by itself (-hda, -drive if=virtio|ide), named as QEMU names them; CD-ROMs are not disks', () => {
    const a = ['qemu', '-hda', '/v/a.qcow2', '-cdrom', '/iso/x.iso', '-drive', 'file=/v/b.img,if=virtio,format=raw', '-drive', 'file=/v/c.img,if=ide,id=data'];
    const g = [{ 'node-name': '#block1', drv: 'file', file: '/v/a.qcow2' }, { 'node-name': '#block2', drv: 'qcow2', file: '/v/a.qcow2' }];
    expect(recordedDisks(a, g)).toEqual([
      { name: 'ide0-hd0', imagePath: '/v/a.qcow2', format: 'qcow2', node: 'ide0-hd0' },
      { name: 'virtio0', imagePath: '/v/b.img', format: 'raw', node: 'virtio0' },
      { name: 'data', imagePath: '/v/c.img', format: 'raw', node: 'data' },
    ]);
    const out = rewriteQemuCommandLine(a, recordedDisks(a, g), {
      name: 'n', uuid: 'u', fromDir: '/v', toDir: '/w', newMac: () => 'm',
      disks: new Map([['ide0-hd0', { path: '/w/ide0-hd0.qcow2', format: 'qcow2' }], ['virtio0', { path: '/w/virtio0.raw', format: 'raw' }], ['data', { path: '/w/data.raw', format: 'raw' }]]),
    });
    expect(out.slice(1, 9)).toEqual(['-hda', '/w/ide0-hd0.qcow2', '-cdrom', '/iso/x.iso', '-drive', 'file=/w/virtio0.raw,if=virtio,format=raw', '-drive', 'file=/w/data.raw,if=ide,id=data']);
  });
});

describe('rewriteQemuCommandLine', () => {
  const disks = new Map([
    ['vda', { path: '/new/copy/vda.raw', format: 'raw' }],
    ['vdb', { path: '/new/copy/vdb.qcow2', format: 'qcow2' }],
  ]);
  const out = rewriteQemuCommandLine(argv, recordedDisks(argv, graph), {
    name: 'copy', disks, fromDir: dir, toDir: '/tmp/vms/copy', qmpSocket: { from: `${dir}/qmp.sock`, to: '/tmp/vms/copy/qmp.sock' },
    uuid: '11111111-2222-3333-4444-555555555555', newMac: () => '52:54:00:aa:bb:cc',
  });
  const after = (opt: string, n = 0) => out.filter((_, i) => out[i - 1] === opt)[n];
  it('renames the VM, adds a pid file in the new folder', () => {
    expect(after('-name')).toBe('copy');
    expect(out.slice(-2)).toEqual(['-pidfile', '/tmp/vms/copy/qemu.pid']);
  });
  it('points disks at the new images in the new formats', () => {
    expect(after('-blockdev', 0)).toBe('driver=file,node-name=vda-file,filename=/new/copy/vda.raw');
    expect(after('-blockdev', 1)).toBe('driver=raw,node-name=vda-fmt,file=vda-file');
    expect(JSON.parse(after('-blockdev', 2)!)).toEqual({ driver: 'qcow2', 'node-name': 'vdb-fmt', file: { driver: 'file', filename: '/new/copy/vdb.qcow2' } });
  });
  it('moves sockets and logs into the new folder, keeps the kernel, and gives NICs a new MAC', () => {
    expect(after('-serial')).toBe('file:/tmp/vms/copy/console.log');
    expect(after('-chardev', 0)).toBe('socket,id=qga0,path=/tmp/vms/copy/qga.sock,server=on,wait=off');
    expect(after('-chardev', 1)).toBe('socket,id=qmp0,path=/tmp/vms/copy/qmp.sock,server=on,wait=off');
    expect(after('-kernel')).toBe('/cache/vmlinux');
    expect(after('-device', 2)).toBe('virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc');
    expect(out.join(' ')).not.toContain(dir + '/');
  });
  it('refuses a format change it cannot express', () => {
    const a = ['qemu', '-device', 'virtio-blk-pci,drive=d0,id=vda'];
    expect(() =>
      rewriteQemuCommandLine(a, [{ name: 'vda', imagePath: '/x.img', format: 'raw', node: 'd0' }], {
        name: 'n', disks: new Map([['vda', { path: '/y.qcow2', format: 'qcow2' }]]), fromDir: '/a', toDir: '/b', uuid: 'u', newMac: () => 'm',
      }),
    ).toThrow(/format/);
  });
});

describe('helpers', () => {
  it('makes locally administered MACs and shell-quotes', () => {
    expect(randomMac(() => Buffer.from([1, 0xab, 0xff]))).toBe('52:54:00:01:ab:ff');
    expect(shellQuote(['qemu', '-append', "console=ttyS0 it's", 'a,b=c'])).toBe(`qemu -append 'console=ttyS0 it'\\''s' a,b=c`);
  });
});

describe('UEFI VMs: the pflash drives', () => {
  const code = '/usr/share/OVMF/OVMF_CODE.fd';
  const opts = (nvram?: { from: string; to: string }) => ({
    name: 'copy', disks: new Map([['vda', { path: '/new/copy/vda.qcow2', format: 'qcow2' }]]), fromDir: dir, toDir: '/tmp/vms/copy',
    uuid: 'u', newMac: () => 'm', ...(nvram ? { nvram } : {}),
  });
  it('-drive if=pflash: the variable store names the restored copy, the firmware code stays; neither is a disk', () => {
    const a = ['qemu', '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${code}`, '-drive', '/data/nv/web1_VARS.fd'.replace(/^/, 'if=pflash,format=raw,unit=1,file='),
      '-blockdev', `driver=file,node-name=vda-file,filename=${dir}/vda.qcow2`, '-blockdev', 'driver=qcow2,node-name=vda-fmt,file=vda-file', '-device', 'virtio-blk-pci,drive=vda-fmt,id=vda'];
    const rec = recordedDisks(a, []);
    expect(rec.map((d) => d.name)).toEqual(['vda']);
    const out = rewriteQemuCommandLine(a, rec, opts({ from: '/data/nv/web1_VARS.fd', to: '/new/copy/copy_VARS.fd' }));
    expect(out[2]).toBe(`if=pflash,format=raw,unit=0,readonly=on,file=${code}`);
    expect(out[4]).toBe('if=pflash,format=raw,unit=1,file=/new/copy/copy_VARS.fd');
    expect(out[6]).toBe('driver=file,node-name=vda-file,filename=/new/copy/vda.qcow2');
  });
  it('-blockdev + -machine pflash1=NODE (libvirt style, JSON or key=value), also when the store sat in the VM folder', () => {
    const a = ['qemu', '-blockdev', JSON.stringify({ driver: 'file', filename: code, 'node-name': 'fw-code', 'read-only': true }),
      '-blockdev', `driver=file,node-name=fw-vars,filename=${dir}/vars.fd`, '-machine', 'pc,pflash0=fw-code,pflash1=fw-vars'];
    const out = rewriteQemuCommandLine(a, [], { ...opts({ from: `${dir}/vars.fd`, to: '/store/copy_VARS.fd' }), disks: new Map() });
    expect(JSON.parse(out[2]!)).toMatchObject({ filename: code });
    expect(out[4]).toBe('driver=file,node-name=fw-vars,filename=/store/copy_VARS.fd');
    expect(out[6]).toBe('pc,pflash0=fw-code,pflash1=fw-vars');
  });
  it('refuses when the recorded command line does not name the recorded store', () => {
    const a = ['qemu', '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${code}`];
    expect(() => rewriteQemuCommandLine(a, [], { ...opts({ from: '/elsewhere/vars.fd', to: '/new/copy/copy_VARS.fd' }), disks: new Map() })).toThrow(/does not name the UEFI variable store \/elsewhere\/vars.fd/);
  });
});
