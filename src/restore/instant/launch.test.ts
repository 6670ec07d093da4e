import { describe, expect, it } from 'vitest';
import { launchFromConfiguration } from './instant-recovery.js';

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
});
