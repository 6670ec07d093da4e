// Single-file mode (docs/formats/backup-files.md section 2): one restore point file set holding
// every VM of a job, in the job's `_all` folder. It is an ordinary VM folder whose VM is the
// reserved name `_all`, with disks named `<vm>/<disk>` and a JSON VM configuration listing the
// VMs; so chains, transforms, sweep, lock, inspect and verify need nothing special. This module
// writes such points (one writer for all VMs) and reads a VM back out of one.
import { BulwarkError } from '../common/errors.js';
import type { DiskBlock } from '../disk/types.js';
import type { DiskWriteStats, WriteDiskOptions } from './backup-file-writer.js';
import type { Repository, RestorePointWriter, StartRestorePointOptions } from './repository.js';
import type { OpenDiskOptions, RestorePoint, RestorePointDisk, RestorePointInfo } from './restore-point.js';

/** The reserved VM name (and folder name) of a job's single-file set. */
export const ALL_VMS = '_all';
const CONFIG_FORMAT = 'bulwark all-vms config v1';
const MAX_NAME_BYTES = 64;

/** `<vm>/<disk>`, checked against the format's limits. */
export function allVmsDiskName(vm: string, disk: string): string {
  if (vm.length === 0 || disk.length === 0) throw new BulwarkError('VM and disk names must not be empty', { kind: 'invalid', context: { vm, disk } });
  if (disk.includes('/')) throw new BulwarkError(`disk name ${disk} of VM ${vm} contains '/': not allowed in single-file mode`, { kind: 'invalid', context: { vm, disk } });
  const name = `${vm}/${disk}`;
  if (Buffer.byteLength(name, 'utf8') > MAX_NAME_BYTES) {
    throw new BulwarkError(`VM and disk name ${name} is longer than ${MAX_NAME_BYTES} bytes: too long for single-file mode`, {
      kind: 'invalid',
      context: { vm, disk },
      hint: 'back this job up per VM (the default), or shorten the VM name',
    });
  }
  return name;
}

/** Splits `<vm>/<disk>` at the last `/`; null when `name` has no `/`. */
export function splitAllVmsDiskName(name: string): { vm: string; disk: string } | null {
  const at = name.lastIndexOf('/');
  if (at <= 0 || at === name.length - 1) return null;
  return { vm: name.slice(0, at), disk: name.slice(at + 1) };
}

/** Checks the disks declared for a point of the `_all` folder (called by startRestorePoint). */
export function checkAllVmsDisks(disks: readonly { readonly name: string }[]): void {
  for (const d of disks) {
    if (!splitAllVmsDiskName(d.name)) {
      throw new BulwarkError(`disk ${d.name}: a restore point of the single-file set '${ALL_VMS}' names its disks VM/DISK`, {
        kind: 'invalid',
        context: { disk: d.name },
        hint: `'${ALL_VMS}' is reserved for single-file mode: use startJobRestorePoint, or another VM name`,
      });
    }
  }
}

export interface AllVmsConfigEntry {
  readonly name: string;
  readonly config: Buffer;
  readonly disks: readonly string[];
}

export function encodeAllVmsConfig(vms: readonly AllVmsConfigEntry[]): Buffer {
  return Buffer.from(JSON.stringify({ format: CONFIG_FORMAT, vms: vms.map((v) => ({ name: v.name, config: v.config.toString('base64'), disks: v.disks })) }), 'utf8');
}

/** Parses the VM configuration of a single-file point; a malformed one is a plain Error. */
export function decodeAllVmsConfig(raw: Buffer): AllVmsConfigEntry[] {
  const doc = JSON.parse(raw.toString('utf8')) as unknown;
  const bad = (why: string) => new Error(`single-file VM configuration: ${why}`);
  if (typeof doc !== 'object' || doc === null || (doc as { format?: unknown }).format !== CONFIG_FORMAT) throw bad(`format is not '${CONFIG_FORMAT}'`);
  const vms = (doc as { vms?: unknown }).vms;
  if (!Array.isArray(vms)) throw bad('vms is not a list');
  return vms.map((v: unknown, i) => {
    const e = v as { name?: unknown; config?: unknown; disks?: unknown };
    if (typeof e.name !== 'string' || e.name.length === 0) throw bad(`vms[${i}].name`);
    if (typeof e.config !== 'string') throw bad(`vms[${i}].config`);
    if (!Array.isArray(e.disks) || !e.disks.every((d) => typeof d === 'string')) throw bad(`vms[${i}].disks`);
    return { name: e.name, config: Buffer.from(e.config, 'base64'), disks: e.disks };
  });
}

export interface JobVm {
  readonly name: string;
  readonly disks: readonly { readonly name: string; readonly size: number }[];
  /** VM configuration stored with the point (libvirt XML, QEMU arguments…). */
  readonly config?: Buffer;
}

export type StartJobRestorePointOptions = Omit<StartRestorePointOptions, 'vm' | 'disks' | 'vmConfig'> & { readonly vms: readonly JobVm[] };

/** Writes one single-file restore point: every disk of every VM, then commit() (or abort()). */
export class JobRestorePointWriter {
  readonly #w: RestorePointWriter;
  readonly #vms: ReadonlyMap<string, ReadonlySet<string>>;

  constructor(w: RestorePointWriter, vms: readonly JobVm[]) {
    this.#w = w;
    this.#vms = new Map(vms.map((v) => [v.name, new Set(v.disks.map((d) => d.name))]));
  }

  get pointId(): string {
    return this.#w.pointId;
  }

  /** Like RestorePointWriter.writeDisk, for disk `disk` of VM `vm`. Disks may be written concurrently. */
  async writeDisk(vm: string, disk: string, blocks: AsyncIterable<DiskBlock>, opts: WriteDiskOptions = {}): Promise<DiskWriteStats> {
    if (!this.#vms.get(vm)?.has(disk)) throw new BulwarkError(`VM ${vm} has no disk ${disk} declared for this restore point`, { kind: 'invalid', context: { vm, disk } });
    return this.#w.writeDisk(allVmsDiskName(vm, disk), blocks, opts);
  }

  commit(): Promise<RestorePointInfo> {
    return this.#w.commit();
  }

  abort(): Promise<void> {
    return this.#w.abort();
  }
}

/**
 * Starts a restore point of every VM of a job in one file set (single-file mode). The `_all`
 * folder is locked until commit() or abort(); an incremental continues the set's latest point.
 *
 * @example
 * const w = await startJobRestorePoint(repo, { job: 'nightly', kind: 'full', vms: [{ name: 'web1', disks: [{ name: 'vda', size }] }] });
 * await w.writeDisk('web1', 'vda', blocks);
 * await w.commit();
 */
export async function startJobRestorePoint(repo: Repository, opts: StartJobRestorePointOptions): Promise<JobRestorePointWriter> {
  const names = new Set<string>();
  const disks: { name: string; size: number }[] = [];
  for (const vm of opts.vms) {
    if (names.has(vm.name)) throw new BulwarkError(`VM ${vm.name} listed twice`, { kind: 'invalid', context: { vm: vm.name } });
    names.add(vm.name);
    for (const d of vm.disks) disks.push({ name: allVmsDiskName(vm.name, d.name), size: d.size });
  }
  const { vms, ...rest } = opts;
  const vmConfig = encodeAllVmsConfig(vms.map((v) => ({ name: v.name, config: v.config ?? Buffer.alloc(0), disks: v.disks.map((d) => d.name) })));
  const w = await repo.startRestorePoint({ ...rest, vm: ALL_VMS, disks, vmConfig });
  return new JobRestorePointWriter(w, vms);
}

/** One VM of an opened restore point (per-VM or single-file). */
export interface PointVm {
  readonly name: string;
  readonly config: Buffer;
  readonly disks: readonly { readonly name: string; readonly size: number }[];
}

/** The VMs an opened restore point holds: its own VM, or every VM of a single-file point. */
export function vmsOfRestorePoint(point: RestorePoint): PointVm[] {
  if (point.info.vm !== ALL_VMS) return [{ name: point.info.vm, config: point.vmConfig, disks: point.disks }];
  let entries: AllVmsConfigEntry[];
  try {
    entries = decodeAllVmsConfig(point.vmConfig);
  } catch (err) {
    throw new BulwarkError(`restore point ${point.info.id}: ${(err as Error).message}`, { kind: 'corrupt', context: { point: point.info.id, file: point.info.file }, cause: err });
  }
  const sizes = new Map(point.disks.map((d) => [d.name, d.size]));
  return entries.map((e) => ({
    name: e.name,
    config: e.config,
    disks: e.disks.map((d) => {
      const size = sizes.get(`${e.name}/${d}`);
      if (size === undefined) throw new BulwarkError(`restore point ${point.info.id}: VM ${e.name} lists disk ${d} the file does not hold`, { kind: 'corrupt', context: { point: point.info.id, vm: e.name, disk: d } });
      return { name: d, size };
    }),
  }));
}

/** Opens disk `disk` of VM `vm` of a restore point, per-VM or single-file. */
export function openVmDisk(point: RestorePoint, vm: string, disk: string, opts: OpenDiskOptions = {}): RestorePointDisk {
  if (point.info.vm !== ALL_VMS) {
    if (vm !== point.info.vm) throw new BulwarkError(`restore point ${point.info.id} is of VM ${point.info.vm}, not ${vm}`, { kind: 'not-found', context: { point: point.info.id, vm } });
    return point.openDisk(disk, opts);
  }
  return point.openDisk(allVmsDiskName(vm, disk), opts);
}

/**
 * Restore points holding VM `vm` of job `job`: its own folder's, and the job's single-file
 * points that hold one of its disks. Oldest first.
 */
export async function listVmRestorePoints(repo: Repository, job: string, vm: string): Promise<RestorePointInfo[]> {
  const own = vm === ALL_VMS ? [] : await repo.listRestorePoints({ job, vm });
  const shared = (await repo.listRestorePoints({ job, vm: ALL_VMS })).filter((p) => p.disks.some((d) => splitAllVmsDiskName(d.name)?.vm === vm));
  return [...own, ...shared].sort((a, b) => a.time.getTime() - b.time.getTime());
}
