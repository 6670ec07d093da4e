import { describe, expect, it } from 'vitest';
import { domainDisks, domainName, domainNvramPath, rewriteDomainXml, setDomainNvram } from './libvirt-config.js';
import { domainFirmware } from '../../hypervisor/libvirt/firmware.js';

const xml = `<domain type='qemu'>
  <name>web1</name>
  <uuid>0b9d5b0e-0000-4000-8000-000000000001</uuid>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/var/lib/libvirt/images/web1/vmlinux</kernel>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1/vda.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/x.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='/var/lib/libvirt/images/web1/console.log'/>
    </serial>
  </devices>
</domain>`;

describe('libvirt domain XML', () => {
  it('lists file disks by target dev', () => {
    expect(domainDisks(xml)).toEqual([{ name: 'vda', imagePath: '/var/lib/libvirt/images/web1/vda.qcow2', format: 'qcow2' }]);
    expect(domainName(xml)).toBe('web1');
  });
  it('rewrites name, uuid, disks, MACs, channels and paths for a new domain', () => {
    const out = rewriteDomainXml(xml, {
      name: 'web1-copy',
      uuid: '11111111-2222-3333-4444-555555555555',
      disks: new Map([['vda', { path: '/srv/vms/web1-copy/vda.raw', format: 'raw' }]]),
      fromDir: '/var/lib/libvirt/images/web1',
      toDir: '/srv/vms/web1-copy',
      newMac: () => '52:54:00:aa:bb:cc',
    });
    expect(domainName(out)).toBe('web1-copy');
    expect(out).toContain('<uuid>11111111-2222-3333-4444-555555555555</uuid>');
    expect(domainDisks(out)).toEqual([{ name: 'vda', imagePath: '/srv/vms/web1-copy/vda.raw', format: 'raw' }]);
    expect(out).not.toContain('<backingStore');
    expect(out).toContain("<mac address='52:54:00:aa:bb:cc'/>");
    expect(out).not.toContain('domain-3-web1');
    expect(out).toContain("<source path='/srv/vms/web1-copy/console.log'/>");
    expect(out).toContain('<kernel>/srv/vms/web1-copy/vmlinux</kernel>');
    expect(out).toContain("<source file='/iso/x.iso'/>");
  });
});

describe('UEFI domains: <loader> and <nvram>', () => {
  const uefi = xml.replace(
    '<kernel>/var/lib/libvirt/images/web1/vmlinux</kernel>',
    `<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>`,
  );
  const rewrite = (x: string) =>
    rewriteDomainXml(x, {
      name: 'web1-copy', uuid: 'u', disks: new Map([['vda', { path: '/srv/vms/web1-copy/vda.qcow2', format: 'qcow2' }]]),
      fromDir: '/var/lib/libvirt/images/web1', toDir: '/srv/vms/web1-copy', newMac: () => '52:54:00:aa:bb:cc', nvram: '/srv/vms/web1-copy/web1-copy_VARS.fd',
    });
  it('a new domain boots the same firmware with its own copy of the variable store (template kept)', () => {
    const out = rewrite(uefi);
    expect(domainFirmware(out)).toEqual({
      code: '/usr/share/OVMF/OVMF_CODE_4M.fd', codeFormat: 'raw',
      nvram: { path: '/srv/vms/web1-copy/web1-copy_VARS.fd', format: 'raw' }, nvramTemplate: '/usr/share/OVMF/OVMF_VARS_4M.fd',
    });
    expect(out).not.toContain('/var/lib/libvirt/qemu/nvram/web1_VARS.fd');
  });
  it('adds <nvram> after <loader> when the stored XML has none, and handles <source file> and self-closed forms', () => {
    const noNvram = uefi.replace(/\s*<nvram[^>]*>[^<]*<\/nvram>/, '');
    expect(domainNvramPath(noNvram)).toBeUndefined();
    const out = rewrite(noNvram);
    expect(out).toMatch(/<\/loader>\s*<nvram>\/srv\/vms\/web1-copy\/web1-copy_VARS\.fd<\/nvram>/);
    const src = `<domain><os><loader type="pflash">/c.fd</loader><nvram type="file" format="qcow2"><source file="/old/v.qcow2"/></nvram></os></domain>`;
    expect(domainNvramPath(setDomainNvram(src, '/new/v.qcow2'))).toBe('/new/v.qcow2');
    expect(setDomainNvram(src, '/new/v.qcow2')).toContain('format="qcow2"');
    expect(domainNvramPath(setDomainNvram(`<domain><os><loader type='pflash'>/c.fd</loader><nvram template='/t.fd'/></os></domain>`, "/n/it's.fd"))).toBe("/n/it's.fd");
    expect(() => setDomainNvram('<domain/>', '/x')).toThrow(/no <os>/);
  });
});
