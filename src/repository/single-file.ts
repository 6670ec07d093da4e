// Single-file mode (docs/formats/backup-files.md section 2): one restore point file set holding
// every VM of a job, in the job's `_all` folder. It is an ordinary VM folder whose VM is the
// reserved name `_all`, with disks named `<vm>/<disk>` and a JSON VM configuration listing the
// VMs; so chains, transforms, sweep, lock, inspect and verify need nothing special. This module
// writes such points (one writer for all VMs) and reads a VM back out of one.
import { createHash } from 'node:crypto';
import { BulwarkError } from '../common/errors.js';
import type { DiskBlock } from '../disk/types.js';
import type { DiskWriteStats, WriteDiskOptions } from './backup-file-writer.js';
import type { Repository, RestorePointWriter, StartRestorePointOptions } from './repository.js';
import { RestorePoint, type OpenDiskOptions, type ResolvedBlock, type RestorePointDisk, type RestorePointInfo } from './restore-point.js';

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

/**
 * The catalog id of VM `vm`'s part of single-file point `pointId`: a UUID derived from both
 * (SHA-256, version nibble 5-like), so every VM of a job's point has a record of its own and a
 * rescan finds the same ids again. Repository#openRestorePoint accepts it (a VmSlicePoint).
 */
export function vmSliceId(pointId: string, vm: string): string {
  const h = createHash('sha256').update('bulwark vm slice v1\0').update(pointId).update('\0').update(vm, 'utf8').digest();
  h[6] = (h[6]! & 0x0f) | 0x50;
  h[8] = (h[8]! & 0x3f) | 0x80;
  const x = h.subarray(0, 16).toString('hex');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20, 32)}`;
}

/** The VMs (with their disks, names without the prefix) a single-file point's listing names. */
export function vmsOfPointInfo(p: RestorePointInfo): Map<string, { name: string; size: number }[]> {
  const out = new Map<string, { name: string; size: number }[]>();
  for (const d of p.disks) {
    const s = splitAllVmsDiskName(d.name);
    if (s) out.set(s.vm, [...(out.get(s.vm) ?? []), { name: s.disk, size: d.size }]);
  }
  return out;
}

/**
 * Restore points as the catalog records them: a per-VM point as it is; a single-file point as one
 * point per VM it holds (id vmSliceId, the VM's name and disks; base mapped the same way, file
 * and size those of the shared file).
 */
export function catalogPoints(points: readonly RestorePointInfo[]): RestorePointInfo[] {
  const out: RestorePointInfo[] = [];
  for (const p of points) {
    if (p.vm !== ALL_VMS) {
      out.push(p);
      continue;
    }
    for (const [vm, disks] of vmsOfPointInfo(p)) {
      // A VM's slice is damaged when the file's metadata is, or when blocks of its own disks are.
      const { damage: _whole, ...rest } = p;
      const own = p.damage?.disks.flatMap((d) => {
        const s = splitAllVmsDiskName(d);
        return s && s.vm === vm ? [s.disk] : [];
      }) ?? [];
      const damage = p.damage && (p.damage.metadata || own.length > 0) ? { damage: { metadata: p.damage.metadata, disks: own } } : {};
      out.push({ ...rest, id: vmSliceId(p.id, vm), vm, disks, base: p.base === null ? null : vmSliceId(p.base, vm), ...damage });
    }
  }
  return out;
}

/**
 * One VM of an opened single-file point, as if it were a per-VM point: its disks under their own
 * names, its own VM configuration, the catalog id. Reads go to the shared file set.
 */
export class VmSlicePoint extends RestorePoint {
  override readonly vmConfig: Buffer;
  readonly #vm: string;
  readonly #disks: { name: string; size: number }[];

  constructor(whole: RestorePoint, info: RestorePointInfo, vm: PointVm) {
    super(info, whole.files, whole.keys);
    this.vmConfig = vm.config;
    this.#vm = vm.name;
    this.#disks = vm.disks.map((d) => ({ name: d.name, size: d.size }));
  }

  override get disks(): readonly { name: string; size: number }[] {
    return this.#disks;
  }

  override openDisk(name: string, opts: OpenDiskOptions = {}): RestorePointDisk {
    if (!this.#disks.some((d) => d.name === name)) {
      throw new BulwarkError(`restore point ${this.info.id} of VM ${this.#vm} has no disk ${name}`, {
        kind: 'not-found', context: { point: this.info.id, disk: name, vm: this.#vm }, hint: `disks: ${this.#disks.map((d) => d.name).join(', ')}`,
      });
    }
    const disk = super.openDisk(allVmsDiskName(this.#vm, name), opts);
    // The disk keeps the VM's own name for messages; reads resolve through the prefixed name.
    Object.defineProperty(disk, 'name', { value: name });
    return disk;
  }

  override resolve(name: string, i: number): Promise<ResolvedBlock> {
    return super.resolve(this.#full(name), i);
  }

  override resolveRange(name: string, first: number, count: number): Promise<ResolvedBlock[]> {
    return super.resolveRange(this.#full(name), first, count);
  }

  #full(name: string): string {
    return splitAllVmsDiskName(name)?.vm === this.#vm ? name : allVmsDiskName(this.#vm, name);
  }
}

/** Finds the single-file point and VM whose catalog id is `id`, or null. */
export function findVmSlice(points: readonly RestorePointInfo[], id: string): { point: RestorePointInfo; vm: string; info: RestorePointInfo } | null {
  for (const p of points) {
    if (p.vm !== ALL_VMS) continue;
    for (const [vm, disks] of vmsOfPointInfo(p)) {
      if (vmSliceId(p.id, vm) === id) return { point: p, vm, info: { ...p, id, vm, disks, base: p.base === null ? null : vmSliceId(p.base, vm) } };
    }
  }
  return null;
}
