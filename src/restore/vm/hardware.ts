// The hardware a backed-up VM ran with, read from the configuration stored with its restore point
// (plain QEMU's recorded command line, libvirt's domain XML), as the QEMU devices that bring it
// back: each disk's bus and device (virtio-blk; SCSI on a virtio-scsi or LSI controller; IDE; SATA
// on AHCI) with the storage controllers it sits on and its boot order, the CPU model, and the NICs
// (model, MAC, boot order). Instant recovery attaches its overlays with these devices
// (src/restore/instant/instant-recovery.ts). A disk on hardware this cannot recreate is refused,
// naming the VM, the disk and the device; what is recorded but not recreated (a PCI address, a
// CD-ROM, a boot from network) is listed in `notes`. Pure: no I/O. docs/instant-recovery.md,
// "Hardware".
import { BulwarkError } from '../../common/errors.js';
import type { VmConfiguration } from '../../hypervisor/types.js';
import { attr, startTag } from './libvirt-config.js';
import { boardOf, deviceOpts, joinOpts, legacyDrives, optionPairs, optValue, splitOpts } from './qemu-config.js';

export { boardOf } from './qemu-config.js';

/** The bus a disk is attached on. */
export type DiskBus = 'virtio-blk' | 'virtio-scsi' | 'lsi-scsi' | 'ide' | 'sata';

/** QEMU device properties in order, `[key, value]`. */
export type DeviceProps = readonly (readonly [string, string])[];

/** A storage controller the disks sit on: `-device DRIVER[,id=ID]`. */
export interface HardwareController {
  readonly driver: string;
  readonly id?: string;
}

export interface HardwareDisk {
  /** The disk's name in the restore point. */
  readonly name: string;
  readonly bus: DiskBus;
  /** QEMU device: 'virtio-blk-pci' (or a transitional variant), 'scsi-hd', 'ide-hd'. */
  readonly driver: string;
  /** Properties besides drive, id and bootindex: bus=, unit=, scsi-id=, serial=, … */
  readonly props: DeviceProps;
  readonly bootindex?: number;
}

export interface HardwareNic {
  /** QEMU device: 'virtio-net-pci', 'e1000', 'rtl8139', … */
  readonly driver: string;
  readonly mac?: string;
  readonly bootindex?: number;
  /** Other properties kept (an empty `romfile`: no option ROM). */
  readonly props: DeviceProps;
  /**
   * The network it was connected to, as a -netdev value without its id (`user`, `tap,ifname=vnet0,script=no`,
   * `bridge,br=br0`), used only when the user asks for the recorded network; else why it cannot be.
   */
  readonly backend?: string;
  readonly backendMissing?: string;
}

/** The CPU model: 'host' (also libvirt's host-passthrough and host-model), 'max' or a named model. */
export interface RecordedCpu {
  readonly model: string;
  /** The rest of the -cpu value: flags and properties ('avx2=on', '-hle', 'check=off'). */
  readonly flags: readonly string[];
}

export interface VmHardware {
  /** Recreated before the disks, in recorded order (their buses' names depend on it). */
  readonly controllers: readonly HardwareController[];
  /** One per disk asked for, in that order. */
  readonly disks: readonly HardwareDisk[];
  readonly nics: readonly HardwareNic[];
  /** Absent: the VM ran with QEMU's default model. */
  readonly cpu?: RecordedCpu;
  /** The -smp value with the recorded topology (`4,sockets=1,cores=2,threads=2`, `2,maxcpus=4`); absent: only a count is known. */
  readonly smp?: string;
  /** Whether a disk or NIC had a boot index / boot order of its own (else the disks boot in order). */
  readonly bootOrderRecorded: boolean;
  /** What the configuration records that is not recreated, one line each. */
  readonly notes: readonly string[];
}

/** Names the refusals: the VM and its restore point. */
export interface HardwareContext {
  readonly vm: string;
  readonly point: string;
}

const VIRTIO_BLK = /^virtio-blk-pci(-transitional|-non-transitional)?$/;
/** SCSI controllers recreated, by QEMU device, and the bus their disks are on. */
const SCSI_CONTROLLERS: Readonly<Record<string, DiskBus>> = {
  'virtio-scsi-pci': 'virtio-scsi',
  'virtio-scsi-pci-transitional': 'virtio-scsi',
  'virtio-scsi-pci-non-transitional': 'virtio-scsi',
  lsi53c895a: 'lsi-scsi',
};
/** SCSI controllers QEMU has that are not recreated (a disk on one is refused). */
const OTHER_SCSI_CONTROLLERS = /^(megasas(-gen2)?|mptsas1068|pvscsi|am53c974|dc390|lsi53c810|virtio-scsi-device|virtio-scsi-ccw|spapr-vscsi|usb-bot|usb-uas)$/;
const AHCI = 'ich9-ahci';
/** Disk device properties that describe the disk to the guest and are kept. */
const DISK_PROPS = new Set([
  'serial', 'wwn', 'model', 'ver', 'vendor', 'product', 'rotation_rate', 'logical_block_size', 'physical_block_size',
  'min_io_size', 'opt_io_size', 'discard_granularity', 'num-queues', 'queue-size', 'write-cache',
]);
/** Addressing properties kept on IDE/SATA and SCSI disks. */
const ADDRESS_PROPS: Readonly<Record<'ide' | 'scsi', readonly string[]>> = { ide: ['bus', 'unit'], scsi: ['bus', 'channel', 'scsi-id', 'lun'] };
/** Properties that are the session's own (not notes when dropped). */
const OWN_PROPS = new Set(['driver', 'drive', 'id', 'bootindex']);
const NIC_MODELS = /^(virtio-net-pci(-transitional|-non-transitional)?|e1000|e1000-82544gc|e1000-82545em|e1000e|rtl8139|vmxnet3|ne2k_pci|pcnet|i8255[0-9][a-z]*|i82562|i82801)$/;

function refuse(ctx: HardwareContext, disk: string, what: string): never {
  throw new BulwarkError(`VM ${ctx.vm} (restore point ${ctx.point}): disk ${disk} is ${what}, which instant recovery cannot recreate`, {
    kind: 'invalid',
    context: { vm: ctx.vm, point: ctx.point, disk },
    hint: `restore the VM with \`bulwark restore vm ${ctx.point} --name NEW\`, which keeps its recorded hardware as it is (or one disk with \`bulwark restore disk\`)`,
  });
}

/** The recorded hardware of `disks` (names as the point has them); see the file comment. */
export function recordedHardware(c: VmConfiguration, disks: readonly string[], ctx: HardwareContext): VmHardware {
  switch (c.kind) {
    case 'qemu':
      return qemuHardware(c.commandLine, disks, ctx);
    case 'libvirt':
      return libvirtHardware(c.domainXml, disks, ctx);
    default:
      return { controllers: [], disks: [], nics: [], bootOrderRecorded: false, notes: [] };
  }
}

function bootindexOf(v: string | undefined): number | undefined {
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined;
}

/** The kept properties of a recorded disk device, and notes for the dropped ones. */
function keptProps(opts: Map<string, string>, address: readonly string[], name: string, notes: string[]): [string, string][] {
  const props: [string, string][] = [];
  const dropped: string[] = [];
  for (const [k, v] of opts) {
    if (OWN_PROPS.has(k)) continue;
    if (address.includes(k) || DISK_PROPS.has(k)) props.push([k, v]);
    else dropped.push(`${k}=${v}`);
  }
  if (dropped.length > 0) notes.push(`disk ${name}: ${dropped.join(', ')} not kept (the session places its devices itself)`);
  return props;
}

function qemuHardware(argv: readonly string[], diskNames: readonly string[], ctx: HardwareContext): VmHardware {
  const pairs = optionPairs(argv);
  const notes: string[] = [];
  const machineValue = pairs.find((p) => p.opt === 'machine' || p.opt === 'M')?.value;
  const machine = machineValue === undefined ? undefined : optValue(machineValue, 'type', 'type');
  const board = boardOf(machine);
  const devices = pairs.filter((p) => p.opt === 'device').map((p) => deviceOpts(p.value));
  const driverOf = (d: Map<string, string>): string => d.get('driver') ?? '';
  const isScsiController = (d: Map<string, string>): boolean => driverOf(d) in SCSI_CONTROLLERS || OTHER_SCSI_CONTROLLERS.test(driverOf(d));
  const controllers: HardwareController[] = devices
    .filter((d) => driverOf(d) in SCSI_CONTROLLERS || driverOf(d) === AHCI)
    .map((d) => ({ driver: driverOf(d), ...(d.get('id') ? { id: d.get('id')! } : {}) }));

  // Legacy -drive if=ide|virtio|… (and -hda…-hdd, -cdrom): the device QEMU made for each, and its name.
  const legacy = legacyDrives(pairs, board);

  const scsiControllerOf = (bus: string | undefined): Map<string, string> | undefined => {
    const all = devices.filter(isScsiController);
    if (bus === undefined) return all[0];
    const prefix = bus.replace(/\.\d+$/, '');
    const byId = devices.find((d) => d.get('id') === prefix);
    if (byId) return byId;
    // A controller without an id has its bus named scsi.N (N-th such controller).
    const m = bus.match(/^scsi\.(\d+)$/);
    return m ? all.filter((d) => !d.get('id'))[Number(m[1])] : undefined;
  };

  const disks: HardwareDisk[] = [];
  for (const name of diskNames) {
    const dev = devices.find((d) => d.get('id') === name && d.has('drive')) ?? devices.find((d) => d.get('drive') === name);
    if (dev) {
      const driver = driverOf(dev);
      const bootindex = bootindexOf(dev.get('bootindex'));
      const boot = bootindex !== undefined ? { bootindex } : {};
      if (VIRTIO_BLK.test(driver)) {
        const bus = dev.get('bus');
        if (bus !== undefined && !/^pcie?\.0$/.test(bus)) notes.push(`disk ${name}: PCI bus ${bus} not kept (the device sits on the root bus)`);
        dev.delete('bus');
        disks.push({ name, bus: 'virtio-blk', driver, props: keptProps(dev, [], name, notes), ...boot });
      } else if (driver === 'scsi-hd' || driver === 'scsi-disk') {
        const ctl = scsiControllerOf(dev.get('bus'));
        if (!ctl) refuse(ctx, name, `a SCSI disk on bus ${dev.get('bus') ?? '(none given)'} whose controller is not on the recorded command line`);
        const bus = SCSI_CONTROLLERS[driverOf(ctl)];
        if (!bus) refuse(ctx, name, `a SCSI disk on a ${driverOf(ctl)} controller${ctl.get('id') ? ` (${ctl.get('id')!})` : ''} (instant recovery recreates virtio-scsi-pci and lsi53c895a)`);
        disks.push({ name, bus, driver: 'scsi-hd', props: keptProps(dev, ADDRESS_PROPS.scsi, name, notes), ...boot });
      } else if (driver === 'ide-hd' || driver === 'ide-drive') {
        const busName = dev.get('bus');
        const prefix = busName?.replace(/\.\d+$/, '');
        let bus: DiskBus;
        if (prefix === undefined || prefix === 'ide') {
          if (board === 'other') refuse(ctx, name, `an IDE disk on machine ${machine ?? '(default)'} (instant recovery knows the IDE/SATA buses of the pc and q35 machines)`);
          const n = Number(busName?.slice(4) ?? '0');
          // pc: PIIX IDE is ide.0/ide.1; an AHCI controller without an id continues the numbering.
          bus = board === 'q35' || (n >= 2 && controllers.some((x) => x.driver === AHCI && !x.id)) ? 'sata' : 'ide';
        } else {
          const ctl = devices.find((d) => d.get('id') === prefix);
          if (!ctl) refuse(ctx, name, `an IDE/SATA disk on bus ${busName!} whose controller is not on the recorded command line`);
          if (driverOf(ctl) !== AHCI) refuse(ctx, name, `an IDE/SATA disk on a ${driverOf(ctl)} controller (${prefix}) (instant recovery recreates ich9-ahci)`);
          bus = 'sata';
        }
        disks.push({ name, bus, driver: 'ide-hd', props: keptProps(dev, ADDRESS_PROPS.ide, name, notes), ...boot });
      } else if (driver === 'scsi-block' || driver === 'scsi-generic') {
        refuse(ctx, name, `a SCSI pass-through device (${driver})`);
      } else {
        refuse(ctx, name, `attached as ${driver || 'a device without a driver'}`);
      }
      continue;
    }
    const ld = legacy.find((l) => l.name === name && l.media !== 'cdrom');
    if (ld) {
      if (ld.iface === 'virtio') disks.push({ name, bus: 'virtio-blk', driver: 'virtio-blk-pci', props: [] });
      else if (ld.iface === 'ide') {
        if (board === 'other') refuse(ctx, name, `an IDE disk (-drive if=ide) on machine ${machine ?? '(default)'}`);
        const props: [string, string][] = board === 'q35' ? [['bus', `ide.${ld.bus}`]] : [['bus', `ide.${ld.bus}`], ['unit', String(ld.unit)]];
        disks.push({ name, bus: board === 'q35' ? 'sata' : 'ide', driver: 'ide-hd', props });
      } else refuse(ctx, name, `a -drive if=${ld.iface} disk`);
      continue;
    }
    notes.push(`disk ${name}: no device on the recorded command line; attached as virtio-blk-pci`);
    disks.push({ name, bus: 'virtio-blk', driver: 'virtio-blk-pci', props: [] });
  }

  // NICs: -device NIC, -nic, -net nic; QEMU's own default NIC when nothing else says.
  const defaultNic = board === 'q35' ? 'e1000e' : 'e1000';
  const nicModel = (m: string | undefined): string => (m === undefined ? defaultNic : m === 'virtio' ? 'virtio-net-pci' : m);
  const nics: HardwareNic[] = [];
  // The recorded backends by id (QemuOpts only), for a connection to the recorded network.
  const netdevs = new Map<string, Map<string, string>>();
  for (const p of pairs) {
    if (p.opt !== 'netdev' || p.value.trimStart().startsWith('{')) continue;
    const d = deviceOpts(p.value, 'type');
    if (d.get('id')) netdevs.set(d.get('id')!, d);
  }
  const backendOf = (d: Map<string, string> | undefined, drop: readonly string[]): string | undefined => {
    if (!d || !d.get('type') || d.get('type') === 'none' || d.get('type') === 'hubport') return undefined;
    return joinOpts([d.get('type')!, ...[...d].filter(([k]) => k !== 'type' && k !== 'id' && !drop.includes(k)).map(([k, v]) => `${k}=${v}`)]);
  };
  const addNic = (driver: string, mac: string | undefined, bootindex: number | undefined, romfile: string | undefined, backend: string | undefined, why: string): void => {
    if (!NIC_MODELS.test(driver)) {
      notes.push(`NIC ${driver}${mac ? ` (${mac})` : ''} not recreated (instant recovery recreates PCI NICs: virtio-net-pci, e1000, e1000e, rtl8139, vmxnet3, …)`);
      return;
    }
    nics.push({
      driver, ...(mac ? { mac } : {}), ...(bootindex !== undefined ? { bootindex } : {}), props: romfile === '' ? [['romfile', '']] : [],
      ...(backend ? { backend } : { backendMissing: why }),
    });
  };
  let networkOption = false;
  for (const p of pairs) {
    if (p.opt === 'device') {
      const d = deviceOpts(p.value);
      const driver = driverOf(d);
      if (NIC_MODELS.test(driver) || /^(virtio-net-(device|ccw)|usb-net)$/.test(driver)) {
        const id = d.get('netdev');
        addNic(driver, d.get('mac'), bootindexOf(d.get('bootindex')), d.get('romfile'), backendOf(id ? netdevs.get(id) : undefined, []), id ? `its -netdev ${id} is not on the recorded command line in key=value form` : 'it had no -netdev');
      }
    } else if (p.opt === 'nic') {
      networkOption = true;
      const d = deviceOpts(p.value, 'type');
      if (d.get('type') !== 'none') addNic(nicModel(d.get('model')), d.get('mac'), undefined, undefined, backendOf(d, ['model', 'mac']), `-nic ${d.get('type') ?? ''}`);
    } else if (p.opt === 'net') {
      networkOption = true;
      const d = deviceOpts(p.value, 'type');
      if (d.get('type') === 'nic') addNic(nicModel(d.get('model')), d.get('macaddr'), undefined, undefined, undefined, 'it is on a -net hub (legacy -net nic)');
    } else if (p.opt === 'netdev') {
      networkOption = true;
    }
  }
  if (!networkOption && !argv.includes('-nodefaults')) addNic(defaultNic, undefined, undefined, undefined, 'user', '');

  const smpValue = pairs.find((p) => p.opt === 'smp')?.value;
  const smpOk = smpValue !== undefined && /^(\d+)?(,?(cpus|sockets|dies|clusters|cores|threads|maxcpus)=\d+)*$/.test(smpValue);
  if (smpValue !== undefined && !smpOk) notes.push(`-smp ${smpValue}: not understood; the CPU count only`);
  const cpuValue = pairs.find((p) => p.opt === 'cpu')?.value;
  const cpuParts = cpuValue === undefined ? [] : splitOpts(cpuValue);
  const cpu = cpuParts[0] ? { model: cpuParts[0], flags: cpuParts.slice(1) } : undefined;

  const bootOrderRecorded = disks.some((d) => d.bootindex !== undefined) || nics.some((n) => n.bootindex !== undefined);
  const bootValue = pairs.find((p) => p.opt === 'boot')?.value;
  const order = bootValue === undefined ? undefined : optValue(bootValue, 'order', 'order');
  if (!bootOrderRecorded && order && order[0] !== 'c') notes.push(`-boot order=${order}: only the disks are recreated; they boot in the point's order`);
  return { controllers, disks, nics, ...(cpu ? { cpu } : {}), ...(smpOk ? { smp: smpValue } : {}), bootOrderRecorded, notes };
}

const DISK_RE = /<disk(\s[^>]*)?>[\s\S]*?<\/disk>/g;
const INTERFACE_RE = /<interface(\s[^>]*)?>[\s\S]*?<\/interface>/g;
/** Start tags only (self-closing or not): the attributes are all that is read. */
const CONTROLLER_RE = /<controller\s[^>]*>/g;
/** libvirt SCSI controller models recreated, as QEMU devices (no model: libvirt's x86 default, lsilogic). */
const LIBVIRT_SCSI: Readonly<Record<string, string>> = {
  'virtio-scsi': 'virtio-scsi-pci',
  'virtio-transitional': 'virtio-scsi-pci-transitional',
  'virtio-non-transitional': 'virtio-scsi-pci-non-transitional',
  lsilogic: 'lsi53c895a',
};

function elementText(xml: string, tag: string): string | undefined {
  const m = xml.match(new RegExp(`<${tag}(?:\\s[^>]*)?>([^<]*)</${tag}>`));
  return m?.[1];
}

/** The drive address of a libvirt disk, or the one libvirt derives from its target dev (hda → 0/0/0, sdb → unit 1). */
function driveAddress(disk: string, dev: string, perController: number, perBus: number): { controller: number; bus: number; target: number; unit: number } {
  const a = [...disk.matchAll(/<address\s[^>]*\/?>/g)].map((m) => m[0]).find((t) => attr(t, 'type') === 'drive');
  if (a) {
    const n = (k: string): number => Number(attr(a, k) ?? '0');
    return { controller: n('controller'), bus: n('bus'), target: n('target'), unit: n('unit') };
  }
  const letters = dev.replace(/^(hd|sd|vd|xvd)/, '');
  let idx = 0;
  for (const ch of letters) idx = idx * 26 + (ch.charCodeAt(0) - 96);
  idx = Math.max(0, idx - 1);
  const controller = Math.floor(idx / perController);
  const rest = idx % perController;
  return { controller, bus: Math.floor(rest / perBus), target: 0, unit: rest % perBus };
}

function libvirtHardware(xml: string, diskNames: readonly string[], ctx: HardwareContext): VmHardware {
  const notes: string[] = [];
  const machine = xml.match(/<type\s[^>]*machine=['"]([^'"]+)['"]/)?.[1];
  const board = boardOf(machine);
  const controllerEls = [...xml.matchAll(CONTROLLER_RE)].map((m) => m[0]);
  const controllers: HardwareController[] = [];
  const scsiModel = new Map<number, string | undefined>();
  for (const c of controllerEls) {
    const type = attr(c, 'type');
    const index = Number(attr(c, 'index') ?? '0');
    if (type === 'scsi') {
      const model = attr(c, 'model') ?? 'lsilogic';
      scsiModel.set(index, model);
      const driver = LIBVIRT_SCSI[model];
      if (driver) controllers.push({ driver, id: `scsi${index}` });
    } else if (type === 'sata' && !(board === 'q35' && index === 0)) {
      controllers.push({ driver: AHCI, id: `sata${index}` });
    }
  }
  const diskEls = [...xml.matchAll(DISK_RE)].map((m) => m[0]);
  const disks: HardwareDisk[] = [];
  for (const name of diskNames) {
    const el = diskEls.find((d) => (attr(startTag(d, 'disk') ?? '', 'device') ?? 'disk') === 'disk' && attr(startTag(d, 'target') ?? '', 'dev') === name);
    if (!el) {
      notes.push(`disk ${name}: not in the domain XML; attached as virtio-blk-pci`);
      disks.push({ name, bus: 'virtio-blk', driver: 'virtio-blk-pci', props: [] });
      continue;
    }
    const target = startTag(el, 'target') ?? '';
    const bus = attr(target, 'bus') ?? (name.startsWith('hd') ? 'ide' : name.startsWith('sd') ? 'scsi' : name.startsWith('vd') ? 'virtio' : 'unknown');
    const order = bootindexOf(attr(startTag(el, 'boot') ?? '', 'order'));
    const boot = order !== undefined ? { bootindex: order } : {};
    const props: [string, string][] = [];
    const serial = elementText(el, 'serial');
    const wwn = elementText(el, 'wwn');
    const blockio = startTag(el, 'blockio');
    const describe = (scsi: boolean): void => {
      if (serial) props.push(['serial', serial]);
      if (wwn) props.push(['wwn', `0x${wwn.replace(/^0x/i, '')}`]);
      if (scsi) {
        const vendor = elementText(el, 'vendor');
        const product = elementText(el, 'product');
        if (vendor) props.push(['vendor', vendor]);
        if (product) props.push(['product', product]);
      }
      for (const k of ['logical_block_size', 'physical_block_size']) {
        const v = blockio ? attr(blockio, k) : undefined;
        if (v) props.push([k, v]);
      }
      const rr = attr(target, 'rotation_rate');
      if (rr && bus !== 'virtio') props.push(['rotation_rate', rr]);
    };
    if ([...el.matchAll(/<address\s[^>]*\/?>/g)].some((m) => attr(m[0], 'type') === 'pci')) notes.push(`disk ${name}: PCI address not kept (the device sits on the root bus)`);
    switch (bus) {
      case 'virtio': {
        const model = attr(startTag(el, 'disk') ?? '', 'model');
        const driver = model === 'virtio-transitional' ? 'virtio-blk-pci-transitional' : model === 'virtio-non-transitional' ? 'virtio-blk-pci-non-transitional' : 'virtio-blk-pci';
        describe(false);
        disks.push({ name, bus: 'virtio-blk', driver, props, ...boot });
        break;
      }
      case 'ide': {
        if (board !== 'pc') refuse(ctx, name, `an IDE disk on machine ${machine ?? '(default)'} (libvirt's IDE is the pc machine's PIIX)`);
        const a = driveAddress(el, name, 4, 2);
        props.push(['bus', `ide.${a.bus}`], ['unit', String(a.unit)]);
        describe(false);
        disks.push({ name, bus: 'ide', driver: 'ide-hd', props, ...boot });
        break;
      }
      case 'sata': {
        if (board === 'other') refuse(ctx, name, `a SATA disk on machine ${machine ?? '(default)'}`);
        const a = driveAddress(el, name, 6, 6);
        props.push(['bus', board === 'q35' && a.controller === 0 ? `ide.${a.unit}` : `sata${a.controller}.${a.unit}`]);
        if (!(board === 'q35' && a.controller === 0) && !controllers.some((x) => x.id === `sata${a.controller}`)) controllers.push({ driver: AHCI, id: `sata${a.controller}` });
        describe(false);
        disks.push({ name, bus: 'sata', driver: 'ide-hd', props, ...boot });
        break;
      }
      case 'scsi': {
        const a = driveAddress(el, name, 7, 7);
        const model = scsiModel.has(a.controller) ? scsiModel.get(a.controller)! : 'lsilogic';
        const driver = LIBVIRT_SCSI[model];
        if (!driver) refuse(ctx, name, `a SCSI disk on a ${model} controller (instant recovery recreates virtio-scsi and lsilogic)`);
        if (!controllers.some((x) => x.id === `scsi${a.controller}`)) controllers.push({ driver, id: `scsi${a.controller}` });
        // libvirt's own mapping: LSI has one bus and takes the unit as its SCSI id.
        if (driver === 'lsi53c895a') props.push(['bus', `scsi${a.controller}.0`], ['scsi-id', String(a.unit)]);
        else props.push(['bus', `scsi${a.controller}.0`], ['channel', String(a.bus)], ['scsi-id', String(a.target)], ['lun', String(a.unit)]);
        describe(true);
        disks.push({ name, bus: SCSI_CONTROLLERS[driver]!, driver: 'scsi-hd', props, ...boot });
        break;
      }
      default:
        refuse(ctx, name, `on a ${bus} bus`);
    }
  }

  const nics: HardwareNic[] = [];
  for (const m of xml.matchAll(INTERFACE_RE)) {
    const el = m[0];
    const type = attr(startTag(el, 'interface') ?? '', 'type') ?? 'network';
    const mac = attr(startTag(el, 'mac') ?? '', 'address');
    if (type === 'hostdev' || type === 'vhostuser' || type === 'vdpa') {
      notes.push(`NIC ${mac ?? ''} (interface type ${type}) not recreated`);
      continue;
    }
    const model = attr(startTag(el, 'model') ?? '', 'type') ?? 'rtl8139';
    const driver = model === 'virtio' ? 'virtio-net-pci' : model === 'virtio-transitional' ? 'virtio-net-pci-transitional' : model === 'virtio-non-transitional' ? 'virtio-net-pci-non-transitional' : model;
    if (!NIC_MODELS.test(driver)) {
      notes.push(`NIC ${mac ?? ''} (model ${model}) not recreated`);
      continue;
    }
    const order = bootindexOf(attr(startTag(el, 'boot') ?? '', 'order'));
    const romOff = attr(startTag(el, 'rom') ?? '', 'enabled') === 'no';
    // The recorded network: user networking, a bridge (qemu-bridge-helper) or a tap device as QEMU backends; a libvirt network is libvirt's.
    const source = startTag(el, 'source') ?? '';
    const tapDev = attr(startTag(el, 'target') ?? '', 'dev');
    const backend = type === 'user' ? 'user'
      : type === 'bridge' && attr(source, 'bridge') ? joinOpts(['bridge', `br=${attr(source, 'bridge')!}`])
      : type === 'ethernet' && tapDev ? joinOpts(['tap', `ifname=${tapDev}`, 'script=no', 'downscript=no'])
      : undefined;
    nics.push({
      driver, ...(mac ? { mac } : {}), ...(order !== undefined ? { bootindex: order } : {}), props: romOff ? [['romfile', '']] : [],
      ...(backend ? { backend } : { backendMissing: `interface type ${type}${attr(source, 'network') ? ` (libvirt network ${attr(source, 'network')!})` : ''} is libvirt's to connect` }),
    });
  }

  const cpu = libvirtCpu(xml, notes);
  const bootOrderRecorded = disks.some((d) => d.bootindex !== undefined) || nics.some((n) => n.bootindex !== undefined);
  const os = xml.match(/<os(?:\s[^>]*)?>[\s\S]*?<\/os>/)?.[0] ?? '';
  const devs = [...os.matchAll(/<boot\s[^>]*\/?>/g)].map((b) => attr(b[0], 'dev')).filter((d): d is string => d !== undefined);
  if (!bootOrderRecorded && devs.length > 0 && devs[0] !== 'hd') notes.push(`<boot dev='${devs.join(',')}'>: only the disks are recreated; they boot in the point's order`);
  const smp = libvirtSmp(xml);
  return { controllers, disks, nics, ...(cpu ? { cpu } : {}), ...(smp ? { smp } : {}), bootOrderRecorded, notes };
}

/**
 * libvirt's `<vcpu current=C>N</vcpu>` and `<cpu><topology sockets dies cores threads/>` as a
 * -smp value; undefined when the domain says no more than a count.
 */
function libvirtSmp(xml: string): string | undefined {
  const vcpuTag = xml.match(/<vcpu(\s[^>]*)?>\s*(\d+)\s*<\/vcpu>/);
  if (!vcpuTag) return undefined;
  const max = Number(vcpuTag[2]);
  const current = attr(`<vcpu${vcpuTag[1] ?? ''}>`, 'current');
  const topology = startTag(xml.match(/<cpu(\s[^>]*?)?(\/>|>[\s\S]*?<\/cpu>)/)?.[0] ?? '', 'topology');
  const parts = topology ? ['sockets', 'dies', 'cores', 'threads'].flatMap((k) => (attr(topology, k) ? [`${k}=${attr(topology, k)!}`] : [])) : [];
  if (!topology && (current === undefined || Number(current) === max)) return undefined;
  return [current !== undefined && Number(current) !== max ? `${current},maxcpus=${max}` : String(max), ...parts].join(',');
}

/** libvirt `<cpu>` as a QEMU -cpu model: host-passthrough/host-model → host, maximum → max, custom → its model and features. */
function libvirtCpu(xml: string, notes: string[]): RecordedCpu | undefined {
  const el = xml.match(/<cpu(\s[^>]*?)?(\/>|>[\s\S]*?<\/cpu>)/)?.[0];
  if (!el) return undefined;
  const mode = attr(startTag(el, 'cpu') ?? '', 'mode') ?? 'custom';
  if (mode === 'host-passthrough' || mode === 'host-model') return { model: 'host', flags: [] };
  if (mode === 'maximum') return { model: 'max', flags: [] };
  const model = elementText(el, 'model')?.trim();
  if (!model) return undefined;
  const flags: string[] = [];
  for (const f of el.matchAll(/<feature\s[^>]*\/?>/g)) {
    const name = attr(f[0], 'name');
    const policy = attr(f[0], 'policy') ?? 'require';
    if (!name) continue;
    if (policy === 'require' || policy === 'force') flags.push(`${name}=on`);
    else if (policy === 'disable' || policy === 'forbid') flags.push(`${name}=off`);
    else notes.push(`CPU feature ${name} (policy ${policy}) left to QEMU`);
  }
  return { model, flags };
}

/**
 * The -cpu value for the recorded CPU under `accel`: `host` cannot run under TCG, so it becomes
 * `max` (everything TCG emulates), which `note` says; a named model and `max` are kept.
 */
export function cpuArgument(cpu: RecordedCpu, accel: 'tcg' | 'kvm'): { value: string; note?: string } {
  if (cpu.model === 'host' && accel === 'tcg') {
    return { value: ['max', ...cpu.flags].join(','), note: "CPU model 'host' cannot run under TCG: the VM gets 'max' (every feature TCG emulates)" };
  }
  return { value: [cpu.model, ...cpu.flags].join(',') };
}

/** One -device value: `driver,k=v,…` (commas in values doubled). */
export function deviceArgument(driver: string, props: DeviceProps): string {
  return joinOpts([driver, ...props.map(([k, v]) => `${k}=${v}`)]);
}
