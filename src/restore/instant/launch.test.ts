import { describe, expect, it } from 'vitest';
import { instantQemuArgs, launchFromConfig, launchFromConfiguration } from './instant-recovery.js';

describe('boot settings from a stored VM configuration', () => {
  it('takes kernel, initrd, append and memory from a QEMU command line', () => {
    const commandLine = ['qemu-system-x86_64', '-m', '512', '-kernel', '/k', '-initrd', '/i', '-append', 'console=ttyS0 quiet'];
    expect(launchFromConfiguration({ kind: 'qemu', commandLine, blockGraph: [] })).toEqual({ kernel: '/k', initrd: '/i', append: 'console=ttyS0 quiet', memoryMiB: 512 });
    expect(launchFromConfiguration({ kind: 'qemu', commandLine: [...commandLine, '-machine', 'q35,accel=tcg'], blockGraph: [] })).toMatchObject({ kernel: '/k', machine: 'q35' });
  });
  it('takes them from a libvirt domain with direct kernel boot', () => {
    const domainXml = `<domain type='qemu'><name>a</name><memory unit='KiB'>262144</memory><vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/var/lib/x/vmlinux</kernel><initrd>/var/lib/x/initrd.img</initrd><cmdline>console=ttyS0 a&amp;b</cmdline></os></domain>`;
    expect(launchFromConfiguration({ kind: 'libvirt', domainXml })).toEqual({
      machine: 'pc', kernel: '/var/lib/x/vmlinux', initrd: '/var/lib/x/initrd.img', append: 'console=ttyS0 a&b', memoryMiB: 256, cpus: 2,
    });
    expect(launchFromConfiguration({ kind: 'libvirt', domainXml: "<domain><os><loader>/ovmf</loader></os></domain>" })).toBeNull();
  });
  it('boots a UEFI VM with its recorded firmware (and the kernel through it, when it had one)', () => {
    const firmware = { code: '/usr/share/OVMF/OVMF_CODE.fd', codeFormat: 'raw', nvram: { path: '/vms/a/vars.fd', format: 'raw' } };
    const commandLine = ['qemu-system-x86_64', '-m', '256', '-drive', 'if=pflash,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd', '-kernel', '/k'];
    expect(launchFromConfiguration({ kind: 'qemu', commandLine, blockGraph: [], firmware })).toEqual({ kernel: '/k', firmware: { code: firmware.code }, memoryMiB: 256 });
    expect(launchFromConfiguration({ kind: 'qemu', commandLine: ['qemu', '-m', '512'], blockGraph: [], firmware })).toEqual({ firmware: { code: firmware.code }, memoryMiB: 512 });
    const domainXml = `<domain><memory unit='KiB'>524288</memory><os><loader readonly='yes' type='pflash'>/fw/CODE_4M.fd</loader><nvram template='/fw/VARS_4M.fd'>/n/a_VARS.fd</nvram></os></domain>`;
    expect(launchFromConfiguration({ kind: 'libvirt', domainXml, firmware: { code: '/fw/CODE_4M.fd', codeFormat: 'raw', nvramTemplate: '/fw/VARS_4M.fd' } })).toEqual({
      firmware: { code: '/fw/CODE_4M.fd', varsTemplate: '/fw/VARS_4M.fd' }, memoryMiB: 512,
    });
  });
  it('reads "no configuration" as null but fails on damaged point metadata instead of hiding it', () => {
    expect(launchFromConfig(Buffer.alloc(0))).toBeNull();
    expect(() => launchFromConfig(Buffer.from(JSON.stringify({ format: 'bulwark-vm-point/1', configuration: { kind: 'qemu', commandLine: ['q', '-kernel', '/k'] } })))).toThrow(/no valid checkpoint/);
  });
  it('boots a BIOS VM (no kernel, no firmware) from its disk with the recorded machine, memory and CPUs', () => {
    const commandLine = ['qemu-system-x86_64', '-machine', 'q35,accel=tcg', '-m', '1G', '-smp', 'cpus=2,sockets=1', '-blockdev', '{"driver":"file"}'];
    expect(launchFromConfiguration({ kind: 'qemu', commandLine, blockGraph: [] })).toEqual({ machine: 'q35', memoryMiB: 1024, cpus: 2 });
    expect(launchFromConfiguration({ kind: 'qemu', commandLine: ['qemu', '-M', 'type=pc', '-m', 'size=512M', '-smp', '3'], blockGraph: [] })).toEqual({ machine: 'pc', memoryMiB: 512, cpus: 3 });
    expect(launchFromConfiguration({ kind: 'qemu', commandLine: ['qemu'], blockGraph: [] })).toEqual({});
    // A firmware image the point did not save is not SeaBIOS: refused (null), not booted as BIOS.
    expect(launchFromConfiguration({ kind: 'qemu', commandLine: ['qemu', '-bios', '/x/bios.bin'], blockGraph: [] })).toBeNull();
    expect(launchFromConfiguration({ kind: 'qemu', commandLine: ['qemu', '-drive', 'if=pflash,format=raw,file=/x/flash.fd'], blockGraph: [] })).toBeNull();
    const domainXml = `<domain type='qemu'><name>b</name><memory unit='MiB'>384</memory><vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-8.2'>hvm</type><boot dev='hd'/></os></domain>`;
    expect(launchFromConfiguration({ kind: 'libvirt', domainXml })).toEqual({ machine: 'pc-i440fx-8.2', memoryMiB: 384, cpus: 2 });
    expect(launchFromConfiguration({ kind: 'libvirt', domainXml: "<domain><os firmware='efi'><type>hvm</type></os></domain>" })).toBeNull();
  });
  it('launch arguments of a BIOS VM: no -kernel and no flash, the overlays bootable in disk order over their NBD exports', () => {
    const t = {
      name: 'b1', nbdSocket: '/s/nbd.sock', agentSocket: '/s/qga.sock', qmpSocket: '/s/qmp.sock', consoleLog: '/s/console.log',
      disks: [{ name: 'vda', exportName: 'vda', overlay: '/s/vda.overlay.qcow2' }, { name: 'vdb', exportName: 'vdb', overlay: '/s/vdb.overlay.qcow2' }],
    };
    const a = instantQemuArgs(t, { machine: 'q35', memoryMiB: 1024, cpus: 2 });
    expect(a).not.toContain('-kernel');
    expect(a.join(' ')).not.toMatch(/pflash/);
    const after = (flag: string): string | undefined => a[a.indexOf(flag) + 1];
    expect([after('-machine'), after('-m'), after('-smp'), after('-serial')]).toEqual(['q35', '1024', '2', 'file:/s/console.log']);
    expect(a.filter((x, i) => a[i - 1] === '-device' && x.startsWith('virtio-blk-pci'))).toEqual([
      'virtio-blk-pci,drive=vda-overlay,id=vda,bootindex=1',
      'virtio-blk-pci,drive=vdb-overlay,id=vdb,bootindex=2',
    ]);
    const nodes = a.filter((x, i) => a[i - 1] === '-blockdev').map((x) => JSON.parse(x) as Record<string, unknown>);
    expect(nodes[0]).toEqual({ driver: 'nbd', 'node-name': 'vda-backup', 'read-only': true, server: { type: 'unix', path: '/s/nbd.sock' }, export: 'vda' });
    expect(nodes[1]).toEqual({ driver: 'qcow2', 'node-name': 'vda-overlay', file: { driver: 'file', filename: '/s/vda.overlay.qcow2' }, backing: 'vda-backup' });
    // Direct kernel and UEFI launches: no bootindex; the recorded machine type stays.
    const k = instantQemuArgs(t, { kernel: '/k', machine: 'q35' });
    expect(k).toContain('-kernel');
    expect(k[k.indexOf('-machine') + 1]).toBe('q35');
    expect(k.join(' ')).not.toMatch(/bootindex/);
    expect(instantQemuArgs({ ...t, nvram: '/s/nvram.fd' }, { firmware: { code: '/fw/CODE.fd' } }).join(' ')).not.toMatch(/bootindex/);
  });
  it('launch arguments with the recorded hardware: controllers first, each overlay on its recorded device and bus, NICs unconnected, CPU under TCG', () => {
    const t = {
      name: 'h1', nbdSocket: '/s/nbd.sock', agentSocket: '/s/qga.sock', qmpSocket: '/s/qmp.sock', consoleLog: '/s/console.log',
      disks: [{ name: 'sda', exportName: 'sda', overlay: '/s/sda.overlay.qcow2' }, { name: 'vdb', exportName: 'vdb', overlay: '/s/vdb.overlay.qcow2' }],
      hardware: {
        controllers: [{ driver: 'ich9-ahci', id: 'ahci0' }],
        disks: [
          { name: 'sda', bus: 'sata' as const, driver: 'ide-hd', props: [['bus', 'ahci0.0']] as const, bootindex: 2 },
          { name: 'vdb', bus: 'virtio-blk' as const, driver: 'virtio-blk-pci', props: [['serial', 'a,b']] as const },
        ],
        nics: [{ driver: 'e1000', mac: '52:54:00:00:00:01', bootindex: 1, props: [] }],
        cpu: { model: 'host', flags: [] },
        bootOrderRecorded: true,
        notes: [],
      },
    };
    const a = instantQemuArgs(t, { machine: 'pc' });
    const devices = a.filter((x, i) => a[i - 1] === '-device');
    expect(devices.slice(0, 4)).toEqual([
      'ich9-ahci,id=ahci0',
      'ide-hd,drive=sda-overlay,id=sda,bus=ahci0.0,bootindex=2',
      'virtio-blk-pci,drive=vdb-overlay,id=vdb,serial=a,,b',
      'e1000,id=net0,mac=52:54:00:00:00:01,bootindex=1',
    ]);
    expect(a[a.indexOf('-cpu') + 1]).toBe('max');
    // No network backend (the session sets the NIC's link down once the monitor answers).
    expect(a.join(' ')).not.toMatch(/netdev|-net |-nic /);
    // Without a recorded boot order a BIOS VM's disks boot in order.
    const plain = instantQemuArgs({ ...t, hardware: { ...t.hardware, nics: [], cpu: { model: 'Haswell', flags: ['hle=off'] }, bootOrderRecorded: false } }, {});
    expect(plain.filter((x, i) => plain[i - 1] === '-device' && /drive=/.test(x))).toEqual([
      'ide-hd,drive=sda-overlay,id=sda,bus=ahci0.0,bootindex=1',
      'virtio-blk-pci,drive=vdb-overlay,id=vdb,serial=a,,b,bootindex=2',
    ]);
    expect(plain[plain.indexOf('-cpu') + 1]).toBe('Haswell,hle=off');
  });
});
