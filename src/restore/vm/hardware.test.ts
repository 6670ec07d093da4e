import { describe, expect, it } from 'vitest';
import { boardOf, cpuArgument, deviceArgument, recordedHardware, type VmHardware } from './hardware.js';

const ctx = { vm: 'web1', point: 'p-1' };
const qemu = (...args: string[]): { kind: 'qemu'; commandLine: string[]; blockGraph: unknown[] } => ({ kind: 'qemu', commandLine: ['qemu-system-x86_64', ...args], blockGraph: [] });
const blockdev = (node: string): string[] => ['-blockdev', JSON.stringify({ driver: 'raw', 'node-name': node, file: { driver: 'file', filename: `/vms/${node}.img` } })];
/** The disks' (driver, bus, props, bootindex) and the controllers, compactly. */
const disksOf = (h: VmHardware): unknown[] => h.disks.map((d) => [d.name, d.bus, deviceArgument(d.driver, d.props), d.bootindex]);

describe('recorded QEMU command line → devices', () => {
  const cases: { title: string; args: string[]; disks: string[]; want: unknown[]; controllers?: unknown[] }[] = [
    {
      title: 'virtio-blk with id, bootindex and serial kept, PCI address dropped',
      args: [...blockdev('vda-fmt'), '-device', 'virtio-blk-pci,drive=vda-fmt,id=vda,bootindex=1,serial=S1,addr=0x5'],
      disks: ['vda'],
      want: [['vda', 'virtio-blk', 'virtio-blk-pci,serial=S1', 1]],
    },
    {
      title: 'a disk named by its node (device without id)',
      args: [...blockdev('disk0'), '-device', 'virtio-blk-pci-non-transitional,drive=disk0'],
      disks: ['disk0'],
      want: [['disk0', 'virtio-blk', 'virtio-blk-pci-non-transitional', undefined]],
    },
    {
      title: 'IDE on the pc board (PIIX), bus and unit kept',
      args: ['-machine', 'pc', ...blockdev('hd0'), '-device', 'ide-hd,drive=hd0,bus=ide.1,unit=0,id=hda,bootindex=2,model=OLDDISK'],
      disks: ['hda'],
      want: [['hda', 'ide', 'ide-hd,bus=ide.1,unit=0,model=OLDDISK', 2]],
    },
    {
      title: 'IDE device on q35 is the board AHCI (SATA)',
      args: ['-M', 'q35', ...blockdev('s0'), '-device', 'ide-hd,drive=s0,bus=ide.2,id=sda'],
      disks: ['sda'],
      want: [['sda', 'sata', 'ide-hd,bus=ide.2', undefined]],
    },
    {
      title: 'SATA on an added ich9-ahci (pc)',
      args: ['-machine', 'pc-i440fx-7.2', '-device', 'ich9-ahci,id=ahci0,addr=0x7', ...blockdev('s0'), '-device', '{"driver":"ide-hd","drive":"s0","bus":"ahci0.0","id":"sda","bootindex":1}'],
      disks: ['sda'],
      want: [['sda', 'sata', 'ide-hd,bus=ahci0.0', 1]],
      controllers: [{ driver: 'ich9-ahci', id: 'ahci0' }],
    },
    {
      title: 'virtio-scsi: scsi-hd on its controller with its address',
      args: ['-device', 'virtio-scsi-pci,id=scsi0', ...blockdev('d0'), '-device', 'scsi-hd,drive=d0,bus=scsi0.0,channel=0,scsi-id=0,lun=3,id=sda,bootindex=1'],
      disks: ['sda'],
      want: [['sda', 'virtio-scsi', 'scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=3', 1]],
      controllers: [{ driver: 'virtio-scsi-pci', id: 'scsi0' }],
    },
    {
      title: 'LSI: scsi-hd without a bus goes to the first SCSI controller',
      args: ['-device', 'lsi53c895a', ...blockdev('d0'), '-device', 'scsi-hd,drive=d0,id=sda'],
      disks: ['sda'],
      want: [['sda', 'lsi-scsi', 'scsi-hd', undefined]],
      controllers: [{ driver: 'lsi53c895a' }],
    },
    {
      title: 'legacy -hda and -drive if=virtio, named as QEMU names them',
      args: ['-hda', '/vms/a.img', '-drive', 'file=/vms/b.img,if=virtio', '-drive', 'file=/vms/c.img,if=ide,index=3'],
      disks: ['ide0-hd0', 'virtio0', 'ide1-hd1'],
      want: [
        ['ide0-hd0', 'ide', 'ide-hd,bus=ide.0,unit=0', undefined],
        ['virtio0', 'virtio-blk', 'virtio-blk-pci', undefined],
        ['ide1-hd1', 'ide', 'ide-hd,bus=ide.1,unit=1', undefined],
      ],
    },
    {
      title: 'legacy -drive if=ide on q35 is an AHCI port',
      args: ['-machine', 'q35', '-drive', 'file=/vms/a.img,id=root'],
      disks: ['root'],
      want: [['root', 'sata', 'ide-hd,bus=ide.0', undefined]],
    },
    {
      title: 'a disk with no recorded device stays virtio-blk (noted)',
      args: [],
      disks: ['vda'],
      want: [['vda', 'virtio-blk', 'virtio-blk-pci', undefined]],
    },
  ];
  for (const c of cases) {
    it(c.title, () => {
      const h = recordedHardware(qemu(...c.args), c.disks, ctx);
      expect(disksOf(h)).toEqual(c.want);
      expect(h.controllers).toEqual(c.controllers ?? []);
    });
  }

  const refused: { title: string; args: string[]; disk: string; message: RegExp }[] = [
    { title: 'usb-storage', args: [...blockdev('u0'), '-device', 'usb-storage,drive=u0,id=usb0'], disk: 'usb0', message: /disk usb0 is attached as usb-storage/ },
    { title: 'megasas controller', args: ['-device', 'megasas,id=m0', ...blockdev('d0'), '-device', 'scsi-hd,drive=d0,bus=m0.0,id=sda'], disk: 'sda', message: /disk sda is a SCSI disk on a megasas controller \(m0\)/ },
    { title: 'SCSI disk without controller', args: [...blockdev('d0'), '-device', 'scsi-hd,drive=d0,bus=x0.0,id=sda'], disk: 'sda', message: /controller is not on the recorded command line/ },
    { title: 'SCSI pass-through', args: ['-device', 'virtio-scsi-pci,id=s', '-drive', 'file=/dev/sg0,if=none,id=g', '-device', 'scsi-block,drive=g,id=sg'], disk: 'sg', message: /SCSI pass-through device \(scsi-block\)/ },
    { title: 'IDE on an unknown board', args: ['-machine', 'isapc', ...blockdev('d0'), '-device', 'ide-hd,drive=d0,id=hda'], disk: 'hda', message: /IDE disk on machine isapc/ },
    { title: 'nvme', args: [...blockdev('n0'), '-device', 'nvme,drive=n0,serial=x,id=nvme0'], disk: 'nvme0', message: /attached as nvme/ },
  ];
  for (const r of refused) {
    it(`refuses ${r.title}, naming VM, point, disk and what to do`, () => {
      let err: unknown;
      try {
        recordedHardware(qemu(...r.args), [r.disk], ctx);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(Error);
      const e = err as Error & { hint?: string; kind?: string };
      expect(e.message).toMatch(r.message);
      expect(e.message).toMatch(/^VM web1 \(restore point p-1\)/);
      expect(e.kind).toBe('invalid');
      expect(e.hint).toMatch(/bulwark restore vm p-1 --name NEW/);
    });
  }

  it('NICs: -device, -nic, -net nic and QEMU\'s default NIC; the CPU model; notes', () => {
    const h = recordedHardware(
      qemu('-nodefaults', '-cpu', 'Skylake-Client,-hle,check=off', '-netdev', 'tap,id=n0', '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:01,bootindex=3,romfile=',
        '-nic', 'user,model=virtio,mac=52:54:00:aa:bb:02', '-net', 'nic,model=rtl8139,macaddr=52:54:00:aa:bb:03', '-device', 'usb-net,id=u', '-boot', 'order=nc'),
      [], ctx,
    );
    expect(h.nics).toEqual([
      { driver: 'virtio-net-pci', mac: '52:54:00:aa:bb:01', bootindex: 3, props: [['romfile', '']], backend: 'tap' },
      { driver: 'virtio-net-pci', mac: '52:54:00:aa:bb:02', props: [], backend: 'user' },
      { driver: 'rtl8139', mac: '52:54:00:aa:bb:03', props: [], backendMissing: 'it is on a -net hub (legacy -net nic)' },
    ]);
    // The recorded backend, for a connection to the recorded network when asked: options kept, id dropped.
    expect(recordedHardware(qemu('-nodefaults', '-netdev', 'tap,id=n1,ifname=vnet7,script=no,downscript=no', '-device', 'e1000,netdev=n1'), [], ctx).nics[0]?.backend).toBe('tap,ifname=vnet7,script=no,downscript=no');
    expect(recordedHardware(qemu('-nodefaults', '-device', 'e1000,netdev=gone'), [], ctx).nics[0]?.backendMissing).toBe('its -netdev gone is not on the recorded command line in key=value form');
    expect(h.notes.join('\n')).toMatch(/NIC usb-net not recreated/);
    expect(h.cpu).toEqual({ model: 'Skylake-Client', flags: ['-hle', 'check=off'] });
    expect(h.bootOrderRecorded).toBe(true);
    // No network option and no -nodefaults: QEMU's own e1000 (e1000e on q35).
    expect(recordedHardware(qemu('-m', '256'), [], ctx).nics).toEqual([{ driver: 'e1000', props: [], backend: 'user' }]);
    expect(recordedHardware(qemu('-machine', 'q35'), [], ctx).nics).toEqual([{ driver: 'e1000e', props: [], backend: 'user' }]);
    expect(recordedHardware(qemu('-nic', 'none'), [], ctx).nics).toEqual([]);
    const noted = recordedHardware(qemu('-nodefaults', '-boot', 'order=dc', '-device', 'virtio-blk-pci,drive=x,id=vda,addr=0x9,bus=pci.1'), ['vda'], ctx);
    expect(noted.notes).toEqual([
      'disk vda: PCI bus pci.1 not kept (the device sits on the root bus)',
      'disk vda: addr=0x9 not kept (the session places its devices itself)',
      "-boot order=dc: only the disks are recreated; they boot in the point's order",
    ]);
  });
});

describe('recorded libvirt domain → devices', () => {
  const domain = (machine: string, devices: string, extra = ''): { kind: 'libvirt'; domainXml: string } => ({
    kind: 'libvirt',
    domainXml: `<domain type='qemu'><name>web1</name>${extra}<os><type arch='x86_64' machine='${machine}'>hvm</type><boot dev='hd'/></os><devices>${devices}</devices></domain>`,
  });
  const disk = (dev: string, bus: string, inner = ''): string =>
    `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/${dev}.qcow2'/><target dev='${dev}' bus='${bus}'/>${inner}</disk>`;
  const cases: { title: string; xml: { kind: 'libvirt'; domainXml: string }; disks: string[]; want: unknown[]; controllers?: unknown[] }[] = [
    {
      title: 'virtio with boot order and serial',
      xml: domain('pc-i440fx-7.2', disk('vda', 'virtio', "<serial>ABC</serial><boot order='1'/><address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>")),
      disks: ['vda'],
      want: [['vda', 'virtio-blk', 'virtio-blk-pci,serial=ABC', 1]],
    },
    {
      title: 'IDE with its drive address',
      xml: domain('pc', disk('hdc', 'ide', "<address type='drive' controller='0' bus='1' target='0' unit='0'/>") + "<controller type='ide' index='0'/>"),
      disks: ['hdc'],
      want: [['hdc', 'ide', 'ide-hd,bus=ide.1,unit=0', undefined]],
    },
    {
      title: 'IDE address derived from the dev name',
      xml: domain('pc', disk('hdb', 'ide')),
      disks: ['hdb'],
      want: [['hdb', 'ide', 'ide-hd,bus=ide.0,unit=1', undefined]],
    },
    {
      title: 'SATA on q35: the board AHCI',
      xml: domain('pc-q35-7.2', disk('sda', 'sata', "<address type='drive' controller='0' bus='0' target='0' unit='2'/>") + "<controller type='sata' index='0'/>"),
      disks: ['sda'],
      want: [['sda', 'sata', 'ide-hd,bus=ide.2', undefined]],
    },
    {
      title: 'SATA on pc: an ich9-ahci controller sata0',
      xml: domain('pc', "<controller type='sata' index='0'/>" + disk('sda', 'sata', "<boot order='1'/><address type='drive' controller='0' bus='0' target='0' unit='0'/>")),
      disks: ['sda'],
      want: [['sda', 'sata', 'ide-hd,bus=sata0.0', 1]],
      controllers: [{ driver: 'ich9-ahci', id: 'sata0' }],
    },
    {
      title: 'SCSI on virtio-scsi',
      xml: domain('pc', "<controller type='scsi' index='0' model='virtio-scsi'/>" + disk('sda', 'scsi', "<address type='drive' controller='0' bus='0' target='0' unit='1'/>")),
      disks: ['sda'],
      want: [['sda', 'virtio-scsi', 'scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=1', undefined]],
      controllers: [{ driver: 'virtio-scsi-pci', id: 'scsi0' }],
    },
    {
      title: 'controllers read from start tags, self-closing or with children (q35: SATA controller 0 is the board\'s)',
      xml: domain('pc-q35-7.2', "<controller type='sata' index='0'/><controller type='scsi' index='1' model='virtio-scsi'><driver queues='2'/><address type='pci'/></controller>"
        + "<controller type='usb' index='0' model='qemu-xhci'><address type='pci'/></controller>" + disk('sdb', 'scsi', "<address type='drive' controller='1' bus='0' target='2' unit='0'/>")),
      disks: ['sdb'],
      want: [['sdb', 'virtio-scsi', 'scsi-hd,bus=scsi1.0,channel=0,scsi-id=2,lun=0', undefined]],
      controllers: [{ driver: 'virtio-scsi-pci', id: 'scsi1' }],
    },
    {
      title: "SCSI without a model: libvirt's x86 default, LSI",
      xml: domain('pc', "<controller type='scsi' index='0'/>" + disk('sdb', 'scsi', "<address type='drive' controller='0' bus='0' target='0' unit='1'/>")),
      disks: ['sdb'],
      want: [['sdb', 'lsi-scsi', 'scsi-hd,bus=scsi0.0,scsi-id=1', undefined]],
      controllers: [{ driver: 'lsi53c895a', id: 'scsi0' }],
    },
  ];
  for (const c of cases) {
    it(c.title, () => {
      const h = recordedHardware(c.xml, c.disks, ctx);
      expect(disksOf(h)).toEqual(c.want);
      expect(h.controllers).toEqual(c.controllers ?? []);
    });
  }

  it('refuses a USB disk, IDE on q35 and a SCSI controller model it does not recreate', () => {
    expect(() => recordedHardware(domain('pc', disk('sdz', 'usb')), ['sdz'], ctx)).toThrow(/^VM web1 \(restore point p-1\): disk sdz is on a usb bus/);
    expect(() => recordedHardware(domain('pc-q35-7.2', disk('hda', 'ide')), ['hda'], ctx)).toThrow(/disk hda is an IDE disk on machine pc-q35-7.2/);
    expect(() => recordedHardware(domain('pc', "<controller type='scsi' index='0' model='vmpvscsi'/>" + disk('sda', 'scsi')), ['sda'], ctx)).toThrow(/disk sda is a SCSI disk on a vmpvscsi controller/);
  });

  it('NICs keep model, MAC and boot order (rom off kept); the CPU model; non-disk boot noted', () => {
    const nics = "<interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/><model type='e1000'/><boot order='2'/></interface>"
      + "<interface type='bridge'><mac address='52:54:00:00:00:02'/><source bridge='br0'/><rom enabled='no'/></interface>"
      + "<interface type='hostdev'><mac address='52:54:00:00:00:03'/></interface>";
    const h = recordedHardware(domain('pc', disk('vda', 'virtio', "<boot order='1'/>") + nics, "<cpu mode='custom' match='exact'><model fallback='allow'>Haswell-noTSX</model><feature policy='require' name='vmx'/><feature policy='disable' name='hle'/></cpu>"), ['vda'], ctx);
    expect(h.nics).toEqual([
      { driver: 'e1000', mac: '52:54:00:00:00:01', bootindex: 2, props: [], backendMissing: "interface type network (libvirt network default) is libvirt's to connect" },
      { driver: 'rtl8139', mac: '52:54:00:00:00:02', props: [['romfile', '']], backend: 'bridge,br=br0' },
    ]);
    expect(h.notes).toContain('NIC 52:54:00:00:00:03 (interface type hostdev) not recreated');
    expect(h.cpu).toEqual({ model: 'Haswell-noTSX', flags: ['vmx=on', 'hle=off'] });
    expect(recordedHardware(domain('pc', '', "<cpu mode='host-passthrough'/>"), [], ctx).cpu).toEqual({ model: 'host', flags: [] });
    expect(recordedHardware(domain('pc', '', "<cpu mode='host-model'><model fallback='allow'/></cpu>"), [], ctx).cpu).toEqual({ model: 'host', flags: [] });
    expect(recordedHardware(domain('pc', ''), [], ctx).cpu).toBeUndefined();
    const net = { kind: 'libvirt' as const, domainXml: `<domain><os><type machine='pc'>hvm</type><boot dev='network'/><boot dev='hd'/></os><devices>${disk('vda', 'virtio')}</devices></domain>` };
    expect(recordedHardware(net, ['vda'], ctx).notes).toContain("<boot dev='network,hd'>: only the disks are recreated; they boot in the point's order");
  });
});

describe('CPU topology', () => {
  it('keeps a recorded -smp with its topology, and builds one from libvirt <vcpu> and <topology>', () => {
    expect(recordedHardware(qemu('-smp', '4,sockets=1,cores=2,threads=2'), [], ctx).smp).toBe('4,sockets=1,cores=2,threads=2');
    expect(recordedHardware(qemu('-smp', 'cpus=2,maxcpus=4'), [], ctx).smp).toBe('cpus=2,maxcpus=4');
    expect(recordedHardware(qemu('-smp', '2'), [], ctx).smp).toBe('2');
    const odd = recordedHardware(qemu('-smp', '2,foo=bar'), [], ctx);
    expect([odd.smp, odd.notes]).toEqual([undefined, ['-smp 2,foo=bar: not understood; the CPU count only']]);
    const lv = (inner: string): string | undefined => recordedHardware({ kind: 'libvirt', domainXml: `<domain><os><type machine='pc'>hvm</type></os>${inner}</domain>` }, [], ctx).smp;
    expect(lv("<vcpu placement='static'>4</vcpu><cpu mode='host-passthrough'><topology sockets='1' dies='1' cores='2' threads='2'/></cpu>")).toBe('4,sockets=1,dies=1,cores=2,threads=2');
    expect(lv("<vcpu placement='static' current='2'>4</vcpu>")).toBe('2,maxcpus=4');
    expect(lv('<vcpu>2</vcpu>')).toBeUndefined();
  });
});

describe('CPU under TCG and boards', () => {
  it("host becomes max under TCG (with a note); named models and KVM's host are kept", () => {
    expect(cpuArgument({ model: 'host', flags: ['pmu=off'] }, 'tcg')).toEqual({ value: 'max,pmu=off', note: expect.stringMatching(/'host' cannot run under TCG/) });
    expect(cpuArgument({ model: 'host', flags: [] }, 'kvm')).toEqual({ value: 'host' });
    expect(cpuArgument({ model: 'Skylake-Client', flags: ['hle=off'] }, 'tcg')).toEqual({ value: 'Skylake-Client,hle=off' });
  });
  it('reads the board from the machine type', () => {
    expect([undefined, 'pc', 'pc-i440fx-7.2', 'pc-1.0', 'q35', 'pc-q35-7.2', 'microvm', 'isapc'].map(boardOf)).toEqual(['pc', 'pc', 'pc', 'pc', 'q35', 'q35', 'other', 'other']);
  });
});
