// The one interface Bulwark's backup path uses to reach a hypervisor, whatever runs the VM: plain
// QEMU reached by its QMP socket (`qemu` adapter) or libvirt (`libvirt` adapter). An adapter lists
// VMs with their disks and configuration, and takes a consistent point-in-time view of a VM's
// disks, exported read-only over NBD, with the changed-block information of the chain.
//
// Lifecycle of a backup: `beginBackup` -> read every `BackupView.disks[i]` through NBD (see
// hypervisor/cbt) -> `commit()` when the restore point is stored, or `abort()` when anything
// failed. Both end the backup: they remove every temporary file, NBD export and block job.

/** Which adapter reaches the VM. */
export type HypervisorKind = 'qemu' | 'libvirt';

/** One virtual disk of a VM, as the backup sees it. */
export interface VmDisk {
  /**
   * The disk's name within the VM, stable across backups; it keys the disk in a backup chain.
   * libvirt: the target dev (`vda`). QEMU: the device id (`-device …,id=NAME`), else the block
   * backend name (`-drive id=`), else the format node name.
   */
  readonly name: string;
  /** Where the guest sees it: libvirt's `<target dev>`, QEMU's qdev path or device id. */
  readonly targetDev: string;
  /** The image file on the host (the top of its backing chain). */
  readonly imagePath: string;
  /** Image format of the top layer: 'qcow2', 'raw', … */
  readonly format: string;
  /** Virtual size in bytes, as the guest sees it. */
  readonly virtualSize: number;
  /** QEMU block node the adapter works on (the format node), when known. */
  readonly nodeName?: string;
  /**
   * Whether dirty bitmaps on this disk survive a restart of QEMU (qcow2 only). On other formats
   * tracking restarts with a full read (with digests) after every restart of the VM.
   */
  readonly persistentBitmaps: boolean;
}

export type VmRunState = 'running' | 'paused' | 'shut-off' | 'other';

/**
 * A UEFI VM's variable store (NVRAM): plain QEMU's second flash device (pflash1), libvirt's
 * `<nvram>` file. It belongs to the VM (boot entries, Secure Boot keys), so a backup saves it.
 */
export interface VmNvram {
  /** The file on the host. */
  readonly path: string;
  /** Its image format ('raw', 'qcow2'). */
  readonly format: string;
  /**
   * Its raw contents at the backup: `gzip` is base64 of their gzip stream (a store is mostly
   * erased flash, 0xff: 528 KiB compress to about 1-6 KiB), `size` and `sha256` (hex) are of the
   * raw bytes. Present in a backup's configuration (`BackupView.vm`), not in what `listVms` reports.
   */
  readonly contents?: { readonly gzip: string; readonly sha256: string; readonly size: number };
}

/**
 * UEFI firmware of a VM (OVMF): the read-only code flash is the host's file (a package such as
 * Debian's `ovmf` provides it) and is never backed up; only its path is recorded.
 */
export interface VmFirmware {
  /** The firmware code on the host (plain QEMU: pflash0; libvirt: `<loader>`). */
  readonly code: string;
  /** Its image format (plain QEMU's pflash0 node; 'raw' for libvirt). */
  readonly codeFormat: string;
  /** The VM's variable store, when it has one. */
  readonly nvram?: VmNvram;
  /** libvirt: `<nvram template=…>`, the store a fresh VM starts from. */
  readonly nvramTemplate?: string;
}

/**
 * What the backup stores so the VM can be recreated: libvirt's domain XML, or for plain QEMU its
 * command line (from /proc/PID/cmdline) and its block graph (QMP query-named-block-nodes); and,
 * for a UEFI VM, its firmware and saved variable store (`firmware`).
 */
export type VmConfiguration =
  | { readonly kind: 'libvirt'; readonly domainXml: string; readonly firmware?: VmFirmware }
  | { readonly kind: 'qemu'; readonly commandLine: readonly string[]; readonly blockGraph: unknown; readonly firmware?: VmFirmware };

/** A VM an adapter can back up. */
export interface VmInfo {
  /** Adapter-specific locator: the QMP socket path (qemu) or the domain UUID (libvirt). */
  readonly id: string;
  /** The VM's name: libvirt domain name; QEMU `-name`, else the QMP socket's file name. */
  readonly name: string;
  readonly uuid?: string;
  readonly state: VmRunState;
  readonly disks: readonly VmDisk[];
  readonly configuration: VmConfiguration;
}

/**
 * What one backup leaves for the next backup of the same chain. The caller stores it with the
 * restore point (it is plain JSON) and passes it back as `previous`.
 */
export interface Checkpoint {
  /** The chain (job + VM) this checkpoint belongs to; bitmaps of other chains are never touched. */
  readonly chainId: string;
  /** Name of the dirty bitmap (qemu) or libvirt checkpoint that tracks changes since this backup. */
  readonly name: string;
  /** 1 for the first backup of the chain, +1 per backup. */
  readonly sequence: number;
  /**
   * The hypervisor process that holds the bitmaps (QEMU pid and start time). A different value
   * next time means QEMU was restarted, which explains a missing or inconsistent bitmap.
   */
  readonly instance: string;
  /** Virtual size of each backed-up disk at this checkpoint, by disk name (a resize is detected). */
  readonly disks: Readonly<Record<string, { readonly size: number }>>;
  readonly createdAt: string;
}

export interface BeginBackupOptions {
  /** online: freeze the guest's file systems around the snapshot; offline: pause the VM instead. */
  readonly mode: 'online' | 'offline';
  /**
   * Fail when guest processing (the file-system freeze) does not succeed, instead of falling back
   * to a crash-consistent view with a warning.
   */
  readonly requireGuestProcessing: boolean;
  /** Names this chain's bitmaps/checkpoints (letters, digits, '-', '_', '.'; at most 40). */
  readonly chainId: string;
  /** The checkpoint of the previous backup of this chain, or null for its first backup. */
  readonly previous: Checkpoint | null;
  /** Back up only these disks (by `VmDisk.name`); default: all. */
  readonly disks?: readonly string[];
  /** Read every disk in full even if a bitmap is usable (an active full). Tracking starts anew. */
  readonly full?: boolean;
  /** Why `full` was asked for (said in each disk's full-read line). */
  readonly fullReason?: string;
  /** Deadline for the guest agent's freeze (default 10 s); past it the backup goes on crash-consistent. */
  readonly freezeTimeoutMs?: number;
}

/** Why a disk must be read in full this time. */
export type FullReadReason =
  /** The chain's first backup: there is nothing to compare with. */
  | 'no-checkpoint'
  /** The caller asked for a full. */
  | 'full-requested'
  /** The disk was not in the previous backup (added to the VM). */
  | 'disk-new'
  /** The bitmap of the previous checkpoint is not on the disk (deleted, or lost with a restart). */
  | 'bitmap-missing'
  /** The bitmap exists but QEMU marked it inconsistent (QEMU stopped without saving it). */
  | 'bitmap-inconsistent'
  /** QEMU was restarted since the previous backup and its bitmap did not survive. */
  | 'hypervisor-restarted'
  /** The disk's virtual size changed since the previous backup. */
  | 'disk-resized';

/** Where the changes of a disk come from. */
export type DiskChanges =
  /** Only the extents dirty in this bitmap changed since the previous checkpoint. */
  | { readonly kind: 'bitmap'; readonly bitmap: string; readonly context: string }
  /**
   * Everything must be read. `compareDigests`: a previous restore point exists for this disk, so
   * the target should compare block digests with it and store only blocks that differ.
   */
  | { readonly kind: 'full'; readonly reason: FullReadReason; readonly detail: string; readonly compareDigests: boolean };

/** Where a disk's point-in-time view is served. */
export interface NbdLocation {
  readonly socketPath: string;
  readonly exportName: string;
}

/** One disk's point-in-time view during a backup. */
export interface BackupDiskView {
  readonly disk: VmDisk;
  readonly nbd: NbdLocation;
  /** Size of the view in bytes (the disk's virtual size at the point in time). */
  readonly size: number;
  readonly changes: DiskChanges;
}

/**
 * application: the guest's file systems were frozen at the point in time (guest agent).
 * crash: as if power was cut at that instant (no agent, or the freeze failed; see warnings).
 */
export type Consistency = 'application' | 'crash';

/** A running backup of one VM: its disks' views and how to end it. */
export interface BackupView {
  /** The VM as it was at the point in time (with its configuration, to store). */
  readonly vm: VmInfo;
  /** The checkpoint this backup creates; store it with the restore point after `commit()`. */
  readonly checkpoint: Checkpoint;
  readonly consistency: Consistency;
  /** How long the guest's file systems were frozen (ms), or null if they were not. */
  readonly freezeWindowMs: number | null;
  /** How long the VM was paused (offline mode, ms), or null if it was not. */
  readonly pauseWindowMs: number | null;
  /** Things the user should know (fallback to crash-consistent, full reads and why). */
  readonly warnings: readonly string[];
  readonly disks: readonly BackupDiskView[];
  /**
   * The restore point is stored: keep the new bitmaps, drop the previous ones, remove every
   * temporary export, block job, node and file. Idempotent.
   */
  commit(): Promise<void>;
  /**
   * The backup failed: merge the new bitmaps back into the previous ones so no change is lost,
   * and remove every temporary export, block job, node and file. Idempotent; never throws for a
   * cleanup step that fails (it logs it), so it is safe in `finally`.
   */
  abort(reason?: unknown): Promise<void>;
}

/** One hypervisor host, reached by one adapter. */
export interface Hypervisor {
  readonly kind: HypervisorKind;
  /** Every VM this adapter reaches, with disks and configuration. */
  listVms(): Promise<VmInfo[]>;
  /** One VM by name or id; fails with kind 'not-found' when there is none. */
  getVm(nameOrId: string): Promise<VmInfo>;
  /** Takes the point-in-time view of a VM's disks; see `BackupView`. */
  beginBackup(vm: string, options: BeginBackupOptions): Promise<BackupView>;
  /** Closes connections the adapter keeps open. */
  close(): Promise<void>;
}

/** Bitmap / checkpoint name of a chain's n-th backup. */
export function checkpointName(chainId: string, sequence: number): string {
  return `bulwark-${chainId}-${sequence}`;
}

/** Whether a bitmap / checkpoint name belongs to a chain (used to sweep leftovers). */
export function isCheckpointOf(chainId: string, name: string): boolean {
  const prefix = `bulwark-${chainId}-`;
  return name.startsWith(prefix) && /^[0-9]+$/.test(name.slice(prefix.length));
}

/** Checks a chain id is safe inside bitmap, checkpoint, export and file names. */
export function validChainId(chainId: string): boolean {
  return /^[A-Za-z0-9_.-]{1,40}$/.test(chainId);
}
