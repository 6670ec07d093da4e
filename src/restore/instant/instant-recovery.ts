// Instant VM recovery: boot a VM straight from a restore point. Each disk of the point is served
// read-only by the TypeScript NBD server (through a block cache) on a private unix socket; QEMU
// opens it as an `nbd` node and runs the VM on a local qcow2 overlay whose backing is that node,
// so every guest write lands in the overlay and the backup is never written. `migrate()` mirrors
// each overlay (sync=full, i.e. overlay + backing) into a new local qcow2 while the VM runs and
// pivots the VM onto it; after that the backup side (NBD nodes, server, restore point) is closed.
// `stop()` quits QEMU and removes everything the session created except migrated disks.
// See docs/instant-recovery.md.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readFile, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { decodePointMetadata, savedNvram, type PointMetadata } from '../../agent/backup/point-metadata.js';
import { requireFirmwareCode, writeNvram } from '../vm/firmware.js';
import { cpuArgument, deviceArgument, recordedHardware, type DeviceProps, type VmHardware } from '../vm/hardware.js';
import { QgaClient } from '../../hypervisor/qga/client.js';
import { QmpClient, type QmpEvent } from '../../hypervisor/qmp/client.js';
import { socketAnswers } from '../../hypervisor/socket.js';
import type { RandomAccessDisk } from '../../disk/types.js';
import type { VmConfiguration } from '../../hypervisor/types.js';
import type { Repository, RestorePoint } from '../../repository/index.js';
import { withBlockCache } from '../nbd-server/block-cache.js';
import { systemdService, vmProcessArgv, vmScopeUnit } from './vm-process.js';
import { startNbdServer, type NbdServer } from '../nbd-server/server.js';

const run = promisify(execFile);
const log = logger('instant-recovery');

/**
 * How to boot the VM: direct kernel boot (`kernel`), UEFI firmware (`firmware`), both (the kernel
 * loaded by the firmware), or neither: QEMU's default BIOS (SeaBIOS) boots the first disk (the
 * session gives the disks bootindex 1, 2, … in the point's order); the disks are attached by the
 * session.
 */
export interface InstantLaunch {
  readonly kernel?: string;
  /** QEMU machine type (`-machine`), e.g. 'pc' or 'q35'; default QEMU's. From a recorded configuration: the VM's. */
  readonly machine?: string;
  /**
   * UEFI firmware: `code` is the host's firmware file (read-only flash). The VM's variable store is
   * a scratch copy in the session folder of the one saved with the point, else of `varsTemplate`.
   */
  readonly firmware?: { readonly code: string; readonly varsTemplate?: string };
  readonly initrd?: string;
  readonly append?: string;
  /** Default 256. */
  readonly memoryMiB?: number;
  /** Default 1. */
  readonly cpus?: number;
  /** Default 'tcg' (KVM cannot boot a stock kernel on this kind of host). */
  readonly accel?: 'tcg' | 'kvm';
  /** Default 'qemu-system-x86_64'. */
  readonly qemuBinary?: string;
}

/**
 * The restore point a session serves: a point in a repository on this host, or one read from
 * another agent through the data mover (src/agent/remote/restore-reader.ts).
 */
export interface InstantPointSource {
  readonly pointId: string;
  readonly vm: string;
  /** The stored VM configuration (point metadata). */
  readonly config: Buffer;
  readonly disks: readonly { readonly name: string; readonly size: number }[];
  openDisk(name: string): RandomAccessDisk;
  close(): Promise<void>;
}

export interface StartInstantRecoveryOptions {
  /** The point's repository on this host; or give `source` (with its point id). */
  readonly repository?: Repository;
  readonly source?: InstantPointSource;
  /** The restore point; or give `vm` (and optionally `job`) for that VM's latest point. */
  readonly pointId?: string;
  readonly vm?: string;
  readonly job?: string;
  /** Password of an encrypted chain. */
  readonly password?: string;
  /** Parent folder; the session uses (and on stop removes) `workDir/<name>`. Keep it short: unix socket paths are limited to 107 bytes. */
  readonly workDir: string;
  /** Name of the recovered VM (QEMU -name, folder name). */
  readonly name: string;
  /** Boot settings; when absent they are taken from the point's recorded QEMU command line. */
  readonly launch?: InstantLaunch;
  /** Block cache per disk in bytes (default 256 MiB). */
  readonly cacheBytes?: number;
  /**
   * The NICs' network: 'disconnected' (default: no backend, link down; the original VM may still
   * run on its network) or 'recorded' (each NIC on the backend it had: the recorded -netdev, a
   * libvirt `user`, `bridge` or `ethernet` interface; a NIC whose network cannot be recreated so
   * is refused before anything starts).
   */
  readonly network?: 'disconnected' | 'recorded';
}

export type InstantRecoveryState = 'running-from-backup' | 'migrating' | 'migrated' | 'stopped';

export interface InstantDisk {
  /** Disk name in the restore point and device id in the VM ('vda'). */
  readonly name: string;
  readonly size: number;
  /** NBD export name on the session's server. */
  readonly exportName: string;
  /** The local qcow2 that takes the VM's writes while it runs from backup. */
  readonly overlay: string;
  /** The VM's own disk after migrate(). */
  target?: string;
}

export interface InstantRecoverySession {
  readonly name: string;
  readonly pointId: string;
  readonly vm: string;
  readonly dir: string;
  readonly disks: readonly InstantDisk[];
  readonly qmpSocket: string;
  readonly agentSocket: string;
  readonly nbdSocket: string;
  readonly consoleLog: string;
  /** Date.now() just before QEMU was spawned. */
  readonly launchedAt: number;
  readonly state: InstantRecoveryState;
  readonly pid: number | undefined;
  /** Whether the NBD server (the backup side) is still open. */
  readonly servingBackup: boolean;
  /** A UEFI VM: the scratch copy of its variable store the VM writes (in the session folder). */
  readonly nvram?: string | undefined;
  /** A UEFI VM after migrate(): a copy of its variable store next to the migrated disks. */
  readonly nvramCopy?: string | undefined;
  /** The recorded hardware the VM runs with (disk devices, controllers, CPU, NICs, notes); absent when the point has no configuration. */
  readonly hardware?: VmHardware | undefined;
  /** Waits until the guest agent answers guest-ping. */
  waitForAgent(timeoutMs?: number): Promise<void>;
  /** Runs a QMP command on the VM's monitor, through the session's own connection (QEMU's monitor takes one client). */
  monitor<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T>;
  /**
   * Mirrors each disk to `targetDir/<disk>.qcow2` while the VM runs, pivots the VM onto it, then
   * closes the backup side. Returns the new disk paths by disk name.
   */
  migrate(targetDir: string, opts?: { timeoutMs?: number }): Promise<Record<string, string>>;
  /** Quits the VM, closes the backup side, removes the session folder (migrated disks stay). */
  stop(): Promise<void>;
  /**
   * After migrate(): lets go of the VM without stopping it (its QMP connection closed, its process
   * no longer waited for), so it runs on as a VM of its own; this object manages it no more.
   */
  release(): Promise<void>;
}

/**
 * Boot settings from a restore point's stored configuration: the `-kernel`, `-initrd`, `-append`
 * and `-m` of a recorded QEMU command line, or the `<kernel>`, `<initrd>`, `<cmdline>`, `<memory>`
 * and `<vcpu>` of a libvirt domain XML (the VM then runs under plain QEMU); the recorded UEFI
 * firmware; or, for a VM with neither (a BIOS VM booting from its disk), the machine type, memory
 * and CPU count. Null when the configuration names a firmware that was not saved with the point.
 */
export function launchFromPoint(point: RestorePoint): InstantLaunch | null {
  return launchFromConfig(point.vmConfig);
}

/**
 * launchFromPoint of a point's stored VM configuration (point metadata); null when the point has
 * none. Damaged metadata fails (kind `corrupt`) rather than reading as "nothing to boot".
 */
export function launchFromConfig(config: Buffer): InstantLaunch | null {
  const meta = decodePointMetadata(config);
  return meta ? launchFromConfiguration(meta.configuration) : null;
}

/** A point of a repository on this host as a session's source. */
async function openRepositoryPoint(o: StartInstantRecoveryOptions, pointId: string): Promise<InstantPointSource> {
  if (!o.repository) throw new BulwarkError('instant recovery needs a repository or a point source', { kind: 'internal' });
  const point = await o.repository.openRestorePoint(pointId, o.password !== undefined ? { password: o.password } : {});
  return {
    pointId,
    vm: point.info.vm,
    config: point.vmConfig,
    disks: point.disks,
    openDisk: (name) => point.openDisk(name),
    close: () => point.close(),
  };
}

const xmlText = (xml: string, tag: string): string | undefined => {
  const m = xml.match(new RegExp(`<${tag}(?:\\s[^>]*)?>([^<]*)</${tag}>`));
  return m?.[1] === undefined ? undefined : m[1].replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&apos;/g, "'").replace(/&quot;/g, '"').replace(/&amp;/g, '&');
};

const MEMORY_UNITS: Record<string, number> = { b: 1, bytes: 1, k: 1024, kib: 1024, kb: 1000, m: 1024 ** 2, mib: 1024 ** 2, mb: 1e6, g: 1024 ** 3, gib: 1024 ** 3, gb: 1e9 };

/** QEMU's `-m` value in MiB: `512`, `1G`, `512M`, `size=2G,slots=…` (no suffix: MiB); undefined when unreadable. */
function qemuMemoryMiB(value: string): number | undefined {
  const size = value.split(',').find((x, i) => (i === 0 && !x.includes('=')) || x.startsWith('size='))?.replace(/^size=/, '');
  const m = size?.match(/^(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?$/i);
  if (!m) return undefined;
  const scale: Record<string, number> = { '': 1, K: 1 / 1024, M: 1, G: 1024, T: 1024 * 1024 };
  const mib = Math.floor(Number(m[1]) * (scale[m[2]!.toUpperCase()] ?? 1));
  return mib > 0 ? mib : undefined;
}

export function launchFromConfiguration(c: VmConfiguration): InstantLaunch | null {
  switch (c.kind) {
    case 'qemu': {
      const argv = c.commandLine;
      const opt = (name: string): string | undefined => {
        const i = argv.indexOf(name);
        return i >= 0 ? argv[i + 1] : undefined;
      };
      const kernel = opt('-kernel');
      const firmware = c.firmware ? { code: c.firmware.code } : undefined;
      const mem = opt('-m');
      const memoryMiB = mem ? qemuMemoryMiB(mem) : undefined;
      // The machine type stays: the disks' buses (IDE, AHCI) are the board's.
      const machine = (opt('-machine') ?? opt('-M'))?.split(',').find((x, i) => (i === 0 && !x.includes('=')) || x.startsWith('type='))?.replace(/^type=/, '');
      if (!kernel && !firmware) {
        // A firmware image the point did not save (-bios, a writable pflash): not SeaBIOS, refused.
        if (argv.some((x) => x === '-bios' || /(^|,)if=pflash(,|$)|pflash[01]=/.test(x))) return null;
        const smp = (opt('-smp') ?? '').split(',').find((x, i) => (i === 0 && /^\d+$/.test(x)) || x.startsWith('cpus='))?.replace(/^cpus=/, '');
        const cpus = smp && /^\d+$/.test(smp) && Number(smp) > 0 ? Number(smp) : undefined;
        return { ...(machine ? { machine } : {}), ...(memoryMiB ? { memoryMiB } : {}), ...(cpus ? { cpus } : {}) };
      }
      const initrd = opt('-initrd');
      const append = opt('-append');
      return {
        ...(machine ? { machine } : {}),
        ...(kernel ? { kernel } : {}),
        ...(firmware ? { firmware } : {}),
        ...(initrd ? { initrd } : {}),
        ...(append ? { append } : {}),
        ...(memoryMiB ? { memoryMiB } : {}),
      };
    }
    case 'libvirt': {
      const xml = c.domainXml;
      const kernel = xmlText(xml, 'kernel');
      const firmware = c.firmware ? { code: c.firmware.code, ...(c.firmware.nvramTemplate ? { varsTemplate: c.firmware.nvramTemplate } : {}) } : undefined;
      // A <loader> the point did not save as firmware (or firmware='efi' resolved elsewhere): refused.
      if (!kernel && !firmware && (/<loader[\s>]/.test(xml) || /<os\s[^>]*firmware=/.test(xml))) return null;
      const initrd = xmlText(xml, 'initrd');
      const append = xmlText(xml, 'cmdline');
      const memTag = xml.match(/<memory(?:\s+unit=['"]([^'"]+)['"])?\s*>(\d+)<\/memory>/);
      const memBytes = memTag ? Number(memTag[2]) * (MEMORY_UNITS[(memTag[1] ?? 'KiB').toLowerCase()] ?? 1024) : undefined;
      const memoryMiB = memBytes ? Math.max(1, Math.round(memBytes / 1024 ** 2)) : undefined;
      const vcpu = Number(xmlText(xml, 'vcpu') ?? '');
      const machine = xml.match(/<type\s[^>]*machine=['"]([^'"]+)['"]/)?.[1];
      return {
        ...(machine ? { machine } : {}),
        ...(kernel ? { kernel } : {}),
        ...(firmware ? { firmware } : {}),
        ...(initrd ? { initrd } : {}),
        ...(append ? { append } : {}),
        ...(memoryMiB ? { memoryMiB } : {}),
        ...(Number.isInteger(vcpu) && vcpu > 0 ? { cpus: vcpu } : {}),
      };
    }
    default:
      return null;
  }
}

async function resolvePointId(o: StartInstantRecoveryOptions): Promise<string> {
  if (o.source) return o.source.pointId;
  if (o.pointId) return o.pointId;
  if (!o.repository) throw new BulwarkError('instant recovery needs a repository or a point source', { kind: 'internal' });
  if (!o.vm) throw new BulwarkError('instant recovery needs a restore point id or a VM name', { kind: 'invalid' });
  const repository = o.repository;
  const points = await repository.listRestorePoints({ vm: o.vm, ...(o.job ? { job: o.job } : {}) });
  const latest = [...points].sort((a, b) => a.time.getTime() - b.time.getTime()).at(-1);
  if (!latest) {
    throw new BulwarkError(`no restore point of VM ${o.vm} in repository ${repository.root}`, {
      kind: 'not-found',
      context: { vm: o.vm, repository: repository.root },
    });
  }
  return latest.id;
}

const nodeName = (disk: string, role: 'backup' | 'overlay' | 'target'): string => `${disk}-${role}`;

/** What the QEMU command line of a session is built from. */
export interface InstantQemuTarget {
  readonly name: string;
  readonly disks: readonly Pick<InstantDisk, 'name' | 'exportName' | 'overlay'>[];
  readonly nbdSocket: string;
  readonly agentSocket: string;
  readonly qmpSocket: string;
  readonly consoleLog: string;
  /** The scratch variable store of a UEFI VM. */
  readonly nvram?: string | undefined;
  /** The VM's recorded hardware (src/restore/vm/hardware.ts); absent: virtio-blk disks, QEMU's default CPU, no NICs. */
  readonly hardware?: VmHardware | undefined;
  /** 'recorded': the NICs on their recorded backends; default disconnected. */
  readonly network?: 'disconnected' | 'recorded' | undefined;
}

/**
 * The QEMU arguments of a session: each disk an nbd node (the export) under a qcow2 overlay node,
 * on the device and bus the VM had (`t.hardware`: virtio-blk, scsi-hd on its virtio-scsi or LSI
 * controller, ide-hd on IDE or AHCI; virtio-blk without it), with its recorded boot index; the
 * recorded CPU model (`host` becomes `max` under TCG) and NICs (model and MAC, no network backend;
 * the session sets their links down as soon as the monitor answers); serial console to
 * `consoleLog`; guest agent and QMP sockets. A BIOS VM (neither kernel nor firmware) without a
 * recorded boot order gets its disks bootindex 1, 2, … so SeaBIOS boots the first one.
 */
export function instantQemuArgs(t: InstantQemuTarget, l: InstantLaunch): string[] {
  const bios = !l.kernel && !l.firmware;
  const hw = t.hardware;
  const accel = l.accel ?? 'tcg';
  const a = [
    '-name', t.name,
    ...(l.machine ? ['-machine', l.machine] : []),
    '-accel', accel, '-m', String(l.memoryMiB ?? 256), '-smp', hw?.smp ?? String(l.cpus ?? 1),
    ...(hw?.cpu ? ['-cpu', cpuArgument(hw.cpu, accel).value] : []),
    '-nodefaults', '-display', 'none', '-no-user-config', '-no-reboot',
    ...(l.firmware && t.nvram
      ? ['-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${l.firmware.code.replace(/,/g, ',,')}`, '-drive', `if=pflash,format=raw,unit=1,file=${t.nvram.replace(/,/g, ',,')}`]
      : []),
    ...(l.kernel ? ['-kernel', l.kernel] : []),
    ...(l.kernel && l.initrd ? ['-initrd', l.initrd] : []),
    ...(l.kernel && l.append ? ['-append', l.append] : []),
    '-serial', `file:${t.consoleLog}`,
  ];
  for (const c of hw?.controllers ?? []) a.push('-device', deviceArgument(c.driver, c.id ? [['id', c.id]] : []));
  t.disks.forEach((d, i) => {
    a.push('-blockdev', JSON.stringify({
      driver: 'nbd', 'node-name': nodeName(d.name, 'backup'), 'read-only': true,
      server: { type: 'unix', path: t.nbdSocket }, export: d.exportName,
    }));
    a.push('-blockdev', JSON.stringify({
      driver: 'qcow2', 'node-name': nodeName(d.name, 'overlay'),
      file: { driver: 'file', filename: d.overlay }, backing: nodeName(d.name, 'backup'),
    }));
    const h = hw?.disks.find((x) => x.name === d.name);
    const bootindex = hw?.bootOrderRecorded ? h?.bootindex : bios ? i + 1 : undefined;
    const props: DeviceProps = [['drive', nodeName(d.name, 'overlay')], ['id', d.name], ...(h?.props ?? []), ...(bootindex !== undefined ? [['bootindex', String(bootindex)] as const] : [])];
    a.push('-device', deviceArgument(h?.driver ?? 'virtio-blk-pci', props));
  });
  // NICs with the recorded model and MAC: without a network backend (the session sets their links
  // down), or on their recorded backend when asked.
  (hw?.nics ?? []).forEach((n, i) => {
    const bootindex = hw?.bootOrderRecorded ? n.bootindex : undefined;
    const backend = t.network === 'recorded' ? n.backend : undefined;
    const connect = backend !== undefined;
    if (backend !== undefined) a.push('-netdev', `${backend},id=${nicId(i)}-net`);
    a.push('-device', deviceArgument(n.driver, [
      ['id', nicId(i)], ...(n.mac ? [['mac', n.mac] as const] : []), ...(connect ? [['netdev', `${nicId(i)}-net`] as const] : []), ...n.props,
      ...(bootindex !== undefined ? [['bootindex', String(bootindex)] as const] : []),
    ]));
  });
  a.push(
    '-device', 'virtio-serial-pci',
    '-chardev', `socket,id=qga0,path=${t.agentSocket},server=on,wait=off`,
    '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
    '-device', 'virtio-rng-pci',
    '-chardev', `socket,id=qmp0,path=${t.qmpSocket},server=on,wait=off`, '-mon', 'chardev=qmp0,mode=control',
  );
  return a;
}

const nicId = (i: number): string => `net${i}`;

/**
 * An empty qcow2 of `size` bytes at `file`, mode 0600 from the start (a guest's disk): qemu-img
 * creates its output 0644, so it writes into a temporary folder only this user can enter, next to
 * `file`, and the image leaves it by rename.
 */
async function createPrivateQcow2(file: string, size: number): Promise<void> {
  const dir = await mkdtemp(path.join(path.dirname(file), '.bulwark-'));
  try {
    const tmp = path.join(dir, 'image.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', tmp, String(size)]);
    await chmod(tmp, 0o600);
    await rename(tmp, file);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const helpCache = new Map<string, Promise<string>>();
/** `qemu -machine help` / `-cpu help` of a QEMU binary (cached per binary). */
function qemuHelp(binary: string, what: '-machine' | '-cpu'): Promise<string> {
  const key = `${binary}\0${what}`;
  let p = helpCache.get(key);
  if (!p) {
    p = run(binary, [what, 'help'], { timeout: 30_000, maxBuffer: 4 << 20 }).then((r) => r.stdout);
    helpCache.set(key, p);
    p.catch(() => helpCache.delete(key));
  }
  return p;
}

/**
 * Refuses, before anything starts, a recorded machine type or CPU model this host's QEMU does not
 * have (a VM backed up on a newer QEMU); logs what of the recorded hardware is not recreated.
 */
async function checkHardware(l: InstantLaunch, hw: VmHardware | undefined, ids: { vm: string; point: string; session: string }, network: 'disconnected' | 'recorded'): Promise<void> {
  const binary = l.qemuBinary ?? 'qemu-system-x86_64';
  const lost = network === 'recorded' ? hw?.nics.find((n) => n.backend === undefined) : undefined;
  if (lost) {
    throw new BulwarkError(`VM ${ids.vm} (restore point ${ids.point}): NIC ${lost.driver}${lost.mac ? ` ${lost.mac}` : ''} cannot be connected to its recorded network: ${lost.backendMissing ?? 'no backend recorded'}`, {
      kind: 'invalid', context: { vm: ids.vm, point: ids.point, ...(lost.mac ? { mac: lost.mac } : {}) },
      hint: 'start it without its network (the default) and connect it after migrate, or restore it with `bulwark restore vm`',
    });
  }
  const hint = `restore it with \`bulwark restore vm ${ids.point} --host H\` on a host whose QEMU has it, or install a newer QEMU here`;
  if (l.machine) {
    const names = (await qemuHelp(binary, '-machine')).split('\n').map((x) => x.split(/\s+/)[0]);
    if (!names.includes(l.machine)) {
      throw new BulwarkError(`VM ${ids.vm} (restore point ${ids.point}) ran on machine type ${l.machine}, which this host's QEMU (${binary}) does not have`, {
        kind: 'invalid', context: { vm: ids.vm, point: ids.point, machine: l.machine }, hint,
      });
    }
  }
  const notes = [...(hw?.notes ?? [])];
  if (hw?.cpu && hw.cpu.model !== 'host' && hw.cpu.model !== 'max') {
    const models = (await qemuHelp(binary, '-cpu')).split('\n').map((x) => x.match(/^x86\s+(\S+)/)?.[1]);
    if (!models.includes(hw.cpu.model)) {
      throw new BulwarkError(`VM ${ids.vm} (restore point ${ids.point}) ran with CPU model ${hw.cpu.model}, which this host's QEMU (${binary}) does not have`, {
        kind: 'invalid', context: { vm: ids.vm, point: ids.point, cpu: hw.cpu.model }, hint,
      });
    }
  }
  const cpuNote = hw?.cpu ? cpuArgument(hw.cpu, l.accel ?? 'tcg').note : undefined;
  if (cpuNote) notes.push(cpuNote);
  if (hw && hw.nics.length > 0) {
    notes.push(network === 'recorded'
      ? `${hw.nics.length} NIC(s) recreated with their recorded model and MAC, on their recorded network (${hw.nics.map((n) => n.backend ?? '').join('; ')})`
      : `${hw.nics.length} NIC(s) recreated with their recorded model and MAC, not connected to any network (link down)`);
  }
  if (notes.length > 0) log.info({ session: ids.session, vm: ids.vm, point: ids.point, notes }, 'recorded hardware: what differs from the backed-up VM');
}

/** Boots the VM of a restore point from the backup. Everything is closed again if a step fails. */
export async function startInstantRecovery(o: StartInstantRecoveryOptions): Promise<InstantRecoverySession> {
  if (!/^[A-Za-z0-9._-]+$/.test(o.name)) {
    throw new BulwarkError(`instant recovery name "${o.name}" may only use letters, digits, '.', '_' and '-'`, { kind: 'invalid' });
  }
  const pointId = await resolvePointId(o);
  const dir = path.join(o.workDir, o.name);
  try {
    await stat(dir);
    throw new BulwarkError(`an instant recovery session named ${o.name} already exists in ${o.workDir}`, { kind: 'conflict', context: { dir } });
  } catch (err) {
    if (err instanceof BulwarkError) throw err;
  }
  const session = new Session(o, pointId, dir);
  try {
    await session.start();
    return session;
  } catch (err) {
    await session.stop().catch((e: unknown) => log.warn({ err: describeError(e), session: o.name }, 'cleanup after failed start'));
    throw err;
  }
}

class Session implements InstantRecoverySession {
  readonly name: string;
  readonly pointId: string;
  vm = '';
  readonly dir: string;
  disks: InstantDisk[] = [];
  readonly qmpSocket: string;
  readonly agentSocket: string;
  readonly nbdSocket: string;
  readonly consoleLog: string;
  readonly qemuLog: string;
  launchedAt = 0;
  state: InstantRecoveryState = 'running-from-backup';
  readonly #o: StartInstantRecoveryOptions;
  #point: InstantPointSource | undefined;
  #server: NbdServer | undefined;
  #child: ChildProcess | undefined;
  #exited: Promise<void> = Promise.resolve();
  #qmp: QmpClient | undefined;

  constructor(o: StartInstantRecoveryOptions, pointId: string, dir: string) {
    this.#o = o;
    this.name = o.name;
    this.pointId = pointId;
    this.dir = dir;
    this.qmpSocket = path.join(dir, 'qmp.sock');
    this.agentSocket = path.join(dir, 'qga.sock');
    this.nbdSocket = path.join(dir, 'nbd.sock');
    this.consoleLog = path.join(dir, 'console.log');
    this.qemuLog = path.join(dir, 'qemu.log');
  }

  get pid(): number | undefined {
    const c = this.#child;
    return c && c.exitCode === null && c.signalCode === null ? c.pid : undefined;
  }

  get servingBackup(): boolean {
    return this.#server !== undefined;
  }

  async start(): Promise<void> {
    // Only this user enters it: the overlays hold the guest's writes, the sockets are the VM's monitor and agent.
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    this.#point = this.#o.source ?? (await openRepositoryPoint(this.#o, this.pointId));
    const point = this.#point;
    this.vm = point.vm;
    const launch = this.#o.launch ?? launchFromConfig(point.config);
    if (!launch) {
      throw new BulwarkError(`restore point ${this.pointId} of VM ${this.vm} records a firmware image that was not saved with it (or no VM configuration): instant recovery cannot tell how to boot it`, {
        kind: 'invalid',
        context: { point: this.pointId, vm: this.vm },
        hint: `restore it with \`bulwark restore vm ${this.pointId} --name NEW\` (or one disk with \`bulwark restore disk\`); instant recovery boots VMs with a direct kernel (QEMU -kernel, libvirt <kernel>), UEFI firmware (pflash, <loader type='pflash'>) or QEMU's default BIOS from their first disk`,
      });
    }
    // The VM's hardware as recorded (disk buses, controllers, boot order, CPU, NICs); what cannot
    // be recreated is refused here, before anything is served or started.
    const meta = decodePointMetadata(point.config);
    this.hardware = meta ? recordedHardware(meta.configuration, point.disks.map((d) => d.name), { vm: this.vm, point: this.pointId }) : undefined;
    await checkHardware(launch, this.hardware, { vm: this.vm, point: this.pointId, session: this.name }, this.network);
    if (launch.firmware) await this.#prepareFirmware(launch.firmware, point.config);
    const exports = point.disks.map((d) => ({
      name: d.name,
      disk: withBlockCache(point.openDisk(d.name), { maxBytes: this.#o.cacheBytes ?? 256 * 1024 * 1024 }),
      description: `restore point ${this.pointId} of VM ${this.vm}, disk ${d.name} (read-only)`,
    }));
    try {
      this.#server = await startNbdServer({ exports, listen: { socketPath: this.nbdSocket } });
    } catch (err) {
      await Promise.all(exports.map((e) => e.disk.close()));
      throw err;
    }
    this.#exportDisks = exports.map((e) => e.disk);
    for (const d of point.disks) {
      const overlay = path.join(this.dir, `${d.name}.overlay.qcow2`);
      // No backing in the header: QEMU is given the backing node explicitly (an NBD socket path
      // in a file header would outlive the session).
      await createPrivateQcow2(overlay, d.size);
      this.disks.push({ name: d.name, size: d.size, exportName: d.name, overlay });
    }
    const args = this.#args(launch);
    const logFd = openSync(this.qemuLog, 'a');
    this.launchedAt = Date.now();
    let child: ChildProcess;
    try {
      // Own process group, and a systemd scope of its own under a service: a migrated VM outlives this process (vm-process.ts).
      const argv = vmProcessArgv([launch.qemuBinary ?? 'qemu-system-x86_64', ...args], vmScopeUnit(this.name, randomBytes(3).toString('hex')), systemdService());
      child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', logFd, logFd], detached: true });
    } finally {
      closeSync(logFd);
    }
    this.#child = child;
    this.#exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.once('error', () => undefined);
    const deadline = Date.now() + 30_000;
    while (!(await socketAnswers(this.qmpSocket))) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new BulwarkError(`QEMU of instant recovery ${this.name} exited at start: ${await this.#tail()}`, {
          kind: 'internal',
          context: { vm: this.vm, point: this.pointId, log: this.qemuLog },
        });
      }
      if (Date.now() > deadline) throw new BulwarkError(`QEMU of instant recovery ${this.name} did not open its monitor within 30 s`, { kind: 'unavailable' });
      await sleep(10);
    }
    try {
      this.#qmp = await QmpClient.connect({ endpoint: { socketPath: this.qmpSocket }, label: `instant recovery ${this.name}` });
    } catch (err) {
      // QEMU opens its monitor before it loads the kernel and disks: a bad one ends it right here.
      const exited = await Promise.race([this.#exited.then(() => true), sleep(2000).then(() => false)]);
      if (!exited) throw err;
      throw new BulwarkError(`QEMU of instant recovery ${this.name} exited at start: ${await this.#tail()}`, {
        kind: 'internal',
        context: { vm: this.vm, point: this.pointId, log: this.qemuLog },
        cause: err,
      });
    }
    // NICs have no backend (nothing leaves the VM); their links go down too, long before the
    // guest's drivers load, so the guest sees a cable unplugged. Not -S: a backup of the VM once
    // migrated records this command line, and its restore would start paused.
    const nics = this.network === 'recorded' ? [] : (this.hardware?.nics ?? []);
    for (let i = 0; i < nics.length; i++) await this.#qmp.execute('set_link', { name: nicId(i), up: false });
    log.info({ session: this.name, vm: this.vm, point: this.pointId, disks: this.disks.map((d) => d.name), pid: child.pid }, 'VM started from backup');
  }

  #exportDisks: { close(): Promise<void> }[] = [];
  /** The recorded hardware the VM is recreated with (absent when the point has no configuration). */
  hardware: VmHardware | undefined;

  get network(): 'disconnected' | 'recorded' {
    return this.#o.network ?? 'disconnected';
  }
  /** The scratch copy of the VM's UEFI variable store (pflash1), when it boots firmware. */
  nvram: string | undefined;
  /** After migrate(): the copy of the variable store placed next to the migrated disks. */
  nvramCopy: string | undefined;

  /**
   * A UEFI VM: the firmware code must be on this host; the variable store the VM writes is a
   * scratch copy in the session folder (of the store saved with the point, else of the template),
   * so the backup is never written.
   */
  async #prepareFirmware(fw: NonNullable<InstantLaunch['firmware']>, config: Buffer): Promise<void> {
    await requireFirmwareCode({ firmware: { code: fw.code, codeFormat: 'raw' }, nvram: undefined }, this.vm, this.pointId, 'this host');
    const meta: PointMetadata | null = decodePointMetadata(config);
    const saved = meta ? savedNvram(meta, this.pointId) : undefined;
    const data = saved ?? (fw.varsTemplate ? await readFile(fw.varsTemplate).catch(() => undefined) : undefined);
    if (!data) {
      throw new BulwarkError(`restore point ${this.pointId} of VM ${this.vm} saved no UEFI variable store, and no template to start one from was given`, {
        kind: 'invalid',
        context: { point: this.pointId, vm: this.vm, file: fw.code },
        hint: 'pass launch.firmware.varsTemplate (e.g. /usr/share/OVMF/OVMF_VARS.fd)',
      });
    }
    this.nvram = path.join(this.dir, 'nvram.fd');
    await writeNvram(data, this.nvram, 'raw', false, { vm: this.vm, point: this.pointId });
  }

  #args(l: InstantLaunch): string[] {
    return instantQemuArgs(this, l);
  }

  async #tail(): Promise<string> {
    return (await readFile(this.qemuLog, 'utf8').catch(() => '(no output)')).slice(-2000);
  }

  async monitor<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    const qmp = this.#qmp;
    if (!qmp || qmp.isClosed) throw new BulwarkError(`instant recovery ${this.name} has no monitor connection (it is ${this.state})`, { kind: 'conflict' });
    return qmp.execute<T>(command, args);
  }

  async waitForAgent(timeoutMs = 120_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.pid === undefined) throw new BulwarkError(`VM ${this.name} stopped while booting`, { kind: 'internal', context: { log: this.qemuLog } });
      try {
        const qga = await QgaClient.connect({ socketPath: this.agentSocket, timeoutMs: 2000, label: this.name });
        try {
          await qga.ping();
          return;
        } finally {
          await qga.close();
        }
      } catch (err) {
        if (Date.now() > deadline) {
          throw new BulwarkError(`guest agent of instant recovery ${this.name} did not answer within ${timeoutMs} ms`, { kind: 'unavailable', cause: err });
        }
        await sleep(200);
      }
    }
  }

  async migrate(targetDir: string, opts: { timeoutMs?: number } = {}): Promise<Record<string, string>> {
    if (this.state !== 'running-from-backup') {
      throw new BulwarkError(`instant recovery ${this.name} cannot migrate: it is ${this.state}`, { kind: 'conflict' });
    }
    const qmp = this.#qmp;
    if (!qmp || this.pid === undefined) throw new BulwarkError(`instant recovery ${this.name} is not running`, { kind: 'conflict' });
    const timeoutMs = opts.timeoutMs ?? 30 * 60_000;
    this.state = 'migrating';
    await mkdir(targetDir, { recursive: true, mode: 0o750 });
    const out: Record<string, string> = {};
    const created: string[] = [];
    try {
      for (const d of this.disks) {
        const target = path.join(targetDir, `${d.name}.qcow2`);
        try {
          await stat(target);
          throw new BulwarkError(`target disk ${target} already exists`, { kind: 'conflict', context: { disk: d.name, target } });
        } catch (err) {
          if (err instanceof BulwarkError) throw err;
        }
        await createPrivateQcow2(target, d.size);
        created.push(target);
        await qmp.execute('blockdev-add', {
          driver: 'qcow2', 'node-name': nodeName(d.name, 'target'),
          file: { driver: 'file', filename: target },
        });
        await this.#mirror(qmp, d, timeoutMs);
        d.target = target;
        out[d.name] = target;
      }
    } catch (err) {
      for (const d of this.disks) {
        if (d.target) continue;
        await qmp.execute('block-job-cancel', { device: `mirror-${d.name}`, force: true }).catch(() => undefined);
        await qmp.execute('blockdev-del', { 'node-name': nodeName(d.name, 'target') }).catch(() => undefined);
      }
      for (const f of created) if (!Object.values(out).includes(f)) await rm(f, { force: true });
      this.state = Object.keys(out).length === 0 ? 'running-from-backup' : 'migrating';
      throw new BulwarkError(`migration of instant recovery ${this.name} failed`, { kind: 'internal', cause: err, context: { vm: this.vm, targetDir } });
    }
    // The VM now runs on its own disks: drop the overlay and NBD nodes, then the backup side.
    for (const d of this.disks) {
      await qmp.execute('blockdev-del', { 'node-name': nodeName(d.name, 'overlay') });
      await qmp.execute('blockdev-del', { 'node-name': nodeName(d.name, 'backup') });
      await rm(d.overlay, { force: true });
    }
    await this.#closeBackupSide();
    // The variable store stays the session's scratch file while the VM runs (QEMU cannot move a
    // flash device); a copy as it is now goes next to the disks, as a restore would place it.
    if (this.nvram) {
      const copy = path.join(targetDir, `${this.name}_VARS.fd`);
      await copyFile(this.nvram, copy);
      this.nvramCopy = copy;
    }
    this.state = 'migrated';
    log.info({ session: this.name, vm: this.vm, disks: out, nvram: this.nvramCopy }, 'VM migrated off the backup');
    return out;
  }

  async #mirror(qmp: QmpClient, d: InstantDisk, timeoutMs: number): Promise<void> {
    const job = `mirror-${d.name}`;
    const isJob = (e: QmpEvent): boolean => (e.data as { device?: string }).device === job;
    const ready = qmp.waitForEvent('BLOCK_JOB_READY', isJob, timeoutMs);
    const failed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', isJob, timeoutMs);
    ready.catch(() => undefined);
    failed.catch(() => undefined);
    await qmp.execute('blockdev-mirror', {
      'job-id': job, device: nodeName(d.name, 'overlay'), target: nodeName(d.name, 'target'), sync: 'full', 'auto-dismiss': true,
    });
    // A job that fails before READY ends with BLOCK_JOB_COMPLETED carrying an error.
    const first = await Promise.race([ready.then(() => 'ready' as const), failed.then((e) => e)]);
    if (first !== 'ready') {
      throw new BulwarkError(`mirror of disk ${d.name} ended before it was ready: ${(first.data as { error?: string }).error ?? 'no error given'}`, { kind: 'internal' });
    }
    const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', isJob, timeoutMs);
    await qmp.execute('block-job-complete', { device: job });
    const ev = await completed;
    const error = (ev.data as { error?: string }).error;
    if (error) throw new BulwarkError(`mirror of disk ${d.name} failed at completion: ${error}`, { kind: 'internal', context: { disk: d.name } });
  }

  async #closeBackupSide(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    if (server) await server.close();
    const disks = this.#exportDisks;
    this.#exportDisks = [];
    await Promise.all(disks.map((x) => x.close()));
    const point = this.#point;
    this.#point = undefined;
    if (point) await point.close();
  }

  async release(): Promise<void> {
    if (this.state !== 'migrated') throw new BulwarkError(`instant recovery ${this.name} runs from the backup (${this.state}): only a migrated VM can be let go`, { kind: 'conflict' });
    const qmp = this.#qmp;
    this.#qmp = undefined;
    await qmp?.close().catch(() => undefined);
    this.#child?.unref();
    this.#child = undefined;
  }

  async stop(): Promise<void> {
    const errors: unknown[] = [];
    if (this.#qmp && !this.#qmp.isClosed && this.pid !== undefined) {
      await this.#qmp.execute('quit', {}, { timeoutMs: 5000 }).catch(() => undefined);
    }
    if (this.pid !== undefined) {
      const exited = await Promise.race([this.#exited.then(() => true), sleep(10_000).then(() => false)]);
      if (!exited) {
        this.#child?.kill('SIGKILL');
        await this.#exited;
      }
    }
    await this.#qmp?.close().catch((e: unknown) => errors.push(e));
    this.#qmp = undefined;
    await this.#closeBackupSide().catch((e: unknown) => errors.push(e));
    await rm(this.dir, { recursive: true, force: true }).catch((e: unknown) => errors.push(e));
    this.state = 'stopped';
    if (errors.length > 0) {
      throw new BulwarkError(`stopping instant recovery ${this.name} left errors`, { kind: 'internal', cause: errors[0] });
    }
  }
}
