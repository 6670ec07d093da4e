import { describe, expect, it } from 'vitest';
import { launchFromConfig, launchFromConfiguration } from './instant-recovery.js';

describe('boot settings from a stored VM configuration', () => {
  it('takes kernel, initrd, append and memory from a QEMU command line', () => {
    const commandLine = ['qemu-system-x86_64', '-m', '512', '-kernel', '/k', '-initrd', '/i', '-append', 'console=ttyS0 quiet'];
    expect(launchFromConfiguration({ kind: 'qemu', commandLine, blockGraph: [] })).toEqual({ kernel: '/k', initrd: '/i', append: 'console=ttyS0 quiet', memoryMiB: 512 });
    expect(launchFromConfiguration({ kind: 'qemu', commandLine: ['qemu', '-m', '1G'], blockGraph: [] })).toBeNull();
  });
  it('takes them from a libvirt domain with direct kernel boot', () => {
    const domainXml = `<domain type='qemu'><name>a</name><memory unit='KiB'>262144</memory><vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/var/lib/x/vmlinux</kernel><initrd>/var/lib/x/initrd.img</initrd><cmdline>console=ttyS0 a&amp;b</cmdline></os></domain>`;
    expect(launchFromConfiguration({ kind: 'libvirt', domainXml })).toEqual({
      kernel: '/var/lib/x/vmlinux', initrd: '/var/lib/x/initrd.img', append: 'console=ttyS0 a&b', memoryMiB: 256, cpus: 2,
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
});
