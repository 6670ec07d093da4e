// A plain-QEMU VM's stored configuration (its recorded command line and block graph) read and
// rewritten for a restore: which image file and format each disk had, and the command line of a
// new VM with new disk paths and formats, a new name, UUID and MAC addresses, and every path that
// lived in the original VM's folder (sockets, pid file, logs) moved into the new VM's folder.
// Pure: no I/O. See docs/restore-vm.md.
import { BulwarkError } from '../../common/errors.js';

/** One disk of the recorded VM. */
export interface RecordedDisk {
  /** Disk name as the backup keys it: the device id, else the drive id, else the node name. */
  readonly name: string;
  /** The image file the VM used (top of its backing chain). */
  readonly imagePath: string;
  /** Its format ('qcow2', 'raw', …). */
  readonly format: string;
  /** The format node's name (or the -drive id), where the format is set. */
  readonly node: string;
}

/** Splits a QemuOpts string (`a=b,c=d`, `,,` is a literal comma). */
export function splitOpts(s: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (c === ',') {
      if (s[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      out.push(cur);
      cur = '';
      continue;
    }
    cur += c;
  }
  out.push(cur);
  return out;
}

export function joinOpts(parts: readonly string[]): string {
  return parts.map((p) => p.replace(/,/g, ',,')).join(',');
}

/** The value of `key=` in a QemuOpts string (the implied first key counts as `implied`). */
export function optValue(s: string, key: string, implied?: string): string | undefined {
  const parts = splitOpts(s);
  for (const [i, p] of parts.entries()) {
    const eq = p.indexOf('=');
    if (eq < 0) {
      if (i === 0 && implied === key) return p;
      continue;
    }
    if (p.slice(0, eq) === key) return p.slice(eq + 1);
  }
  return undefined;
}

/** Sets (or adds) `key=value` in a QemuOpts string. */
export function setOpt(s: string, key: string, value: string): string {
  const parts = splitOpts(s);
  const i = parts.findIndex((p) => p.startsWith(`${key}=`));
  if (i >= 0) parts[i] = `${key}=${value}`;
  else parts.push(`${key}=${value}`);
  return joinOpts(parts);
}

/** Each `-opt value` pair of an argv (argv[0] is the binary). */
export function optionPairs(argv: readonly string[]): { opt: string; index: number; value: string }[] {
  const out: { opt: string; index: number; value: string }[] = [];
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith('-')) continue;
    const opt = a.replace(/^--?/, '');
    const v = argv[i + 1];
    if (v !== undefined && !v.startsWith('-')) {
      out.push({ opt, index: i + 1, value: v });
      i++;
    }
  }
  return out;
}

/** A -device (or -drive, -nic) value as properties: QemuOpts (`driver,k=v`) or JSON. */
export function deviceOpts(value: string, implied = 'driver'): Map<string, string> {
  const m = new Map<string, string>();
  if (value.trimStart().startsWith('{')) {
    for (const [k, v] of Object.entries(JSON.parse(value) as Record<string, unknown>)) {
      if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') m.set(k, String(v));
    }
    return m;
  }
  splitOpts(value).forEach((p, i) => {
    const eq = p.indexOf('=');
    if (eq >= 0) m.set(p.slice(0, eq), p.slice(eq + 1));
    else if (i === 0) m.set(implied, p);
    else if (p) m.set(p, 'on');
  });
  return m;
}

/** 'pc' (i440FX + PIIX: IDE buses ide.0, ide.1, two units each), 'q35' (ICH9: AHCI ports ide.0-ide.5), or another board. */
export function boardOf(machine: string | undefined): 'pc' | 'q35' | 'other' {
  const m = machine ?? 'pc';
  if (/(^|-)q35(-|$)/.test(m)) return 'q35';
  if (/^pc(-i440fx(-[\w.]+)?|-[\d.]+)?$/.test(m)) return 'pc';
  return 'other';
}

/** A drive QEMU attaches by itself (see legacyDrives). */
export interface LegacyDrive {
  readonly name: string;
  readonly iface: string;
  readonly media: string;
  readonly bus: number;
  readonly unit: number;
  /** Its image file and format as given (`file=`, `format=`; -hda's value). */
  readonly file?: string;
  readonly format?: string;
  readonly id?: string;
}

/**
 * The drives QEMU attaches by itself (-drive with an interface other than none, -hda…-hdd,
 * -cdrom), with the name QEMU gives them when they have no id: `ide<bus>-hd<unit>`, `virtio<n>`,
 * `scsi<bus>-hd<unit>`; indexes are given out in command-line order as QEMU does.
 */
export function legacyDrives(pairs: readonly { opt: string; value: string }[], board: 'pc' | 'q35' | 'other'): LegacyDrive[] {
  const perBus: Record<string, number> = { ide: board === 'q35' ? 1 : 2, scsi: 7 };
  const used = new Map<string, Set<number>>();
  const out: LegacyDrive[] = [];
  const hd = ['hda', 'hdb', 'hdc', 'hdd'];
  for (const p of pairs) {
    let o: Map<string, string>;
    if (p.opt === 'drive') o = deviceOpts(p.value, 'file');
    else if (hd.includes(p.opt)) o = new Map([['if', 'ide'], ['index', String(hd.indexOf(p.opt))], ['file', p.value]]);
    else if (p.opt === 'cdrom') o = new Map([['if', 'ide'], ['index', '2'], ['media', 'cdrom']]);
    else continue;
    const iface = o.get('if') ?? 'ide';
    if (iface === 'none' || iface === 'pflash') continue;
    const max = perBus[iface] ?? 0;
    const taken = used.get(iface) ?? new Set<number>();
    used.set(iface, taken);
    let index: number;
    const busOpt = o.get('bus');
    const unitOpt = o.get('unit');
    if (o.get('index') !== undefined) index = Number(o.get('index'));
    else if (busOpt !== undefined || unitOpt !== undefined) index = Number(busOpt ?? 0) * (max || 1) + Number(unitOpt ?? 0);
    else {
      index = 0;
      while (taken.has(index)) index++;
    }
    taken.add(index);
    const bus = max ? Math.floor(index / max) : 0;
    const unit = max ? index % max : index;
    const media = o.get('media') ?? 'disk';
    const name = o.get('id') ?? (max ? `${iface}${bus}-${media === 'cdrom' ? 'cd' : 'hd'}${unit}` : `${iface}${unit}`);
    const file = o.get('file');
    const format = o.get('format');
    const id = o.get('id');
    out.push({ name, iface, media, bus, unit, ...(file !== undefined ? { file } : {}), ...(format !== undefined ? { format } : {}), ...(id !== undefined ? { id } : {}) });
  }
  return out;
}

type Json = { [k: string]: unknown };

/** A -blockdev value as an object (JSON form, or dotted QemuOpts keys flattened). */
function blockdevObject(value: string): Json {
  if (value.trimStart().startsWith('{')) return JSON.parse(value) as Json;
  const o: Json = {};
  for (const p of splitOpts(value)) {
    const eq = p.indexOf('=');
    if (eq > 0) o[p.slice(0, eq)] = p.slice(eq + 1);
  }
  return o;
}

interface BlockGraphNode {
  'node-name'?: string;
  drv?: string;
  file?: string;
  image?: { filename?: string; format?: string };
}

/**
 * The disks of a recorded QEMU VM, named as the backup named them (device id, else drive id,
 * else node name): `-device …,drive=NODE[,id=NAME]` ties a name to a node; the block graph
 * (query-named-block-nodes) gives that node's image file and format; the command line is the
 * fallback when the graph lacks it. Drives QEMU attaches by itself (`-drive if=ide|virtio|…`,
 * `-hda`…`-hdd`) are disks too, named as QEMU names them (`ide0-hd0`, `virtio0`) unless they have
 * an id. With `pointDisks` (the point's disk names), a disk the point names by its node (the
 * backup names an IDE or SCSI device with an id by its node: query-block gives such a device's
 * `qdev` as the bare id) takes that name.
 */
export function recordedDisks(argv: readonly string[], blockGraph: unknown, pointDisks?: readonly string[]): RecordedDisk[] {
  const graph = Array.isArray(blockGraph) ? (blockGraph as BlockGraphNode[]) : [];
  const pairs = optionPairs(argv);
  const blockdevs = new Map<string, Json>();
  const drives = new Map<string, string>();
  for (const p of pairs) {
    if (p.opt === 'blockdev') {
      const o = blockdevObject(p.value);
      if (typeof o['node-name'] === 'string') blockdevs.set(o['node-name'], o);
    } else if (p.opt === 'drive') {
      const id = optValue(p.value, 'id') ?? optValue(p.value, 'node-name');
      if (id) drives.set(id, p.value);
    }
  }
  const fileOf = (node: string): string | undefined => {
    const bd = blockdevs.get(node);
    if (bd) {
      if (typeof bd.filename === 'string') return bd.filename;
      const f = bd.file;
      if (typeof f === 'string') return fileOf(f);
      if (f && typeof f === 'object' && typeof (f as Json).filename === 'string') return (f as Json).filename as string;
      if (typeof bd['file.filename'] === 'string') return bd['file.filename'];
    }
    const dr = drives.get(node);
    return dr ? optValue(dr, 'file') : undefined;
  };
  const formatOf = (node: string): string | undefined => {
    const bd = blockdevs.get(node);
    if (bd && typeof bd.driver === 'string') return bd.driver === 'file' || bd.driver === 'host_device' ? 'raw' : bd.driver;
    const dr = drives.get(node);
    return dr ? optValue(dr, 'format') : undefined;
  };
  const out: RecordedDisk[] = [];
  for (const p of pairs) {
    if (p.opt !== 'device') continue;
    const node = optValue(p.value, 'drive');
    if (!node) continue;
    const name = optValue(p.value, 'id') ?? node;
    const g = graph.find((n) => n['node-name'] === node);
    const imagePath = g?.image?.filename ?? g?.file ?? fileOf(node);
    const format = g?.drv ?? g?.image?.format ?? formatOf(node) ?? 'raw';
    if (!imagePath) continue;
    const named = pointDisks && !pointDisks.includes(name) && pointDisks.includes(node) ? node : name;
    out.push({ name: named, imagePath, format: format === 'file' ? 'raw' : format, node });
  }
  const machineValue = pairs.find((p) => p.opt === 'machine' || p.opt === 'M')?.value;
  for (const ld of legacyDrives(pairs, boardOf(machineValue === undefined ? undefined : optValue(machineValue, 'type', 'type')))) {
    if (ld.media === 'cdrom' || !ld.file || out.some((d) => d.name === ld.name)) continue;
    const g = graph.filter((n) => n.file === ld.file || n.image?.filename === ld.file).find((n) => n.drv !== 'file' && n.drv !== 'host_device');
    const format = ld.format ?? g?.drv ?? g?.image?.format ?? 'raw';
    out.push({ name: ld.name, imagePath: ld.file, format: format === 'file' ? 'raw' : format, node: ld.id ?? ld.name });
  }
  return out;
}

export interface RewriteQemuOptions {
  /** The new VM's name (`-name`). */
  readonly name: string;
  /** New image path and format of each disk, by disk name. */
  readonly disks: ReadonlyMap<string, { readonly path: string; readonly format: string }>;
  /** The original VM's folder (its QMP socket's folder) and the new VM's folder. */
  readonly fromDir: string;
  readonly toDir: string;
  /** The original QMP socket and the new VM's (when the host's glob places it elsewhere). */
  readonly qmpSocket?: { readonly from: string; readonly to: string };
  readonly uuid: string;
  /** Makes a new MAC address (one per NIC). */
  readonly newMac: () => string;
  /**
   * A UEFI VM's variable store: the recorded file and the new VM's copy. The pflash drive (or
   * `-blockdev` file node) that named the recorded file names the copy; the firmware code stays.
   */
  readonly nvram?: { readonly from: string; readonly to: string };
}

const NIC_DRIVERS = /^(virtio-net(-pci|-device|-ccw)?|e1000e?|rtl8139|vmxnet3|ne2k_pci|pcnet|i82559er|usb-net)$/;

/**
 * The recorded command line rewritten for a new VM (see the file comment). Fails when a disk's
 * format is to change but its format node cannot be found in the command line.
 */
export function rewriteQemuCommandLine(argv: readonly string[], recorded: readonly RecordedDisk[], o: RewriteQemuOptions): string[] {
  const out = [...argv];
  const fromDir = o.fromDir.replace(/\/+$/, '');
  const toDir = o.toDir.replace(/\/+$/, '');
  // Paths: disks exactly, the QMP socket exactly, then anything under the old VM's folder.
  const exact = new Map<string, string>();
  for (const d of recorded) {
    const n = o.disks.get(d.name);
    if (n) exact.set(d.imagePath, n.path);
  }
  if (o.qmpSocket) exact.set(o.qmpSocket.from, o.qmpSocket.to);
  if (o.nvram) exact.set(o.nvram.from, o.nvram.to);
  const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const alternatives = [...[...exact.keys()].sort((a, b) => b.length - a.length).map((p) => `${escape(p)}(?=$|[,"'])`), `${escape(fromDir)}/`];
  const re = new RegExp(`(?<=^|[=:,"'])(?:${alternatives.join('|')})`, 'g');
  const mapPaths = (s: string): string => s.replace(re, (m) => exact.get(m) ?? `${toDir}/`);

  const formatNodes = new Map<string, string>();
  for (const d of recorded) {
    const n = o.disks.get(d.name);
    if (n && n.format !== d.format) formatNodes.set(d.node, n.format);
  }
  const changed = new Set<string>();
  let hasPidfile = false;
  let nameSet = false;
  for (const p of optionPairs(out)) {
    let v = p.value;
    switch (p.opt) {
      case 'name':
        v = splitOpts(v)[0]!.includes('=') ? setOpt(v, 'guest', o.name) : joinOpts([o.name, ...splitOpts(v).slice(1)]);
        nameSet = true;
        break;
      case 'uuid':
        v = o.uuid;
        break;
      case 'pidfile':
        hasPidfile = true;
        break;
      case 'blockdev': {
        if (v.trimStart().startsWith('{')) {
          const obj = JSON.parse(v) as Json;
          const node = obj['node-name'];
          if (typeof node === 'string' && formatNodes.has(node)) {
            obj.driver = formatNodes.get(node);
            changed.add(node);
          }
          v = JSON.stringify(obj);
        } else {
          const node = optValue(v, 'node-name');
          if (node && formatNodes.has(node)) {
            v = setOpt(v, 'driver', formatNodes.get(node)!);
            changed.add(node);
          }
        }
        break;
      }
      case 'drive': {
        const id = optValue(v, 'id') ?? optValue(v, 'node-name');
        if (id && formatNodes.has(id)) {
          v = setOpt(v, 'format', formatNodes.get(id)!);
          changed.add(id);
        }
        break;
      }
      case 'device': {
        const driver = optValue(v, 'driver', 'driver');
        if (driver && NIC_DRIVERS.test(driver)) v = setOpt(v, 'mac', o.newMac());
        break;
      }
      case 'nic':
        v = setOpt(v, 'mac', o.newMac());
        break;
      case 'net':
        if (optValue(v, 'type', 'type') === 'nic') v = setOpt(v, 'macaddr', o.newMac());
        break;
      default:
        break;
    }
    out[p.index] = mapPaths(v);
  }
  for (const node of formatNodes.keys()) {
    if (!changed.has(node)) {
      throw new BulwarkError(`cannot change the format of the disk on node ${node}: its definition is not in the recorded command line`, {
        kind: 'invalid',
        context: { node },
        hint: 'restore the disk in its original format (leave out --format)',
      });
    }
  }
  if (o.nvram && !out.some((a) => a.includes(o.nvram!.to))) {
    throw new BulwarkError(`the recorded command line does not name the UEFI variable store ${o.nvram.from}`, {
      kind: 'corrupt',
      context: { file: o.nvram.from },
      hint: 'the VM configuration stored with the point does not match its command line',
    });
  }
  if (!nameSet) out.push('-name', o.name);
  if (!hasPidfile) out.push('-pidfile', `${toDir}/qemu.pid`);
  return out;
}

/** A random locally administered unicast MAC in QEMU's 52:54:00 range. */
export function randomMac(random: (n: number) => Buffer): string {
  const b = random(3);
  return ['52', '54', '00', ...[...b].map((x) => x.toString(16).padStart(2, '0'))].join(':');
}

/** Quotes an argv for a POSIX shell script. */
export function shellQuote(argv: readonly string[]): string {
  return argv.map((a) => (/^[A-Za-z0-9_@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}
