// A UEFI VM's firmware at restore time: the firmware code the point recorded must exist on the
// host the VM is restored to (it is the host's file, never backed up), and the variable store
// (NVRAM) saved with the point is written for the restored VM, next to its disks (new VM) or over
// the original's store (restore over the original). docs/restore-vm.md, "UEFI VMs".
import { randomBytes } from 'node:crypto';
import { chmod, mkdtemp, open, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import { runTool } from '../../common/process.js';
import { savedNvram, type PointMetadata } from '../../agent/backup/point-metadata.js';
import type { VmFirmware } from '../../hypervisor/types.js';

/** What a restore does about the point's firmware: nothing (BIOS VM), or this. */
export interface RestoreFirmware {
  readonly firmware: VmFirmware;
  /** The saved variable store's raw contents (checked against their SHA-256), when saved. */
  readonly nvram: Buffer | undefined;
}

/** The point's firmware and its saved variable store; undefined for a BIOS VM. */
export function pointFirmware(meta: PointMetadata, pointId: string): RestoreFirmware | undefined {
  const firmware = meta.configuration.firmware;
  if (!firmware) return undefined;
  return { firmware, nvram: savedNvram(meta, pointId) };
}

/** Where a package provides a firmware file, for the refusal's hint. */
function installHint(code: string): string {
  const base = path.basename(code);
  if (/OVMF|edk2|AAVMF|QEMU_EFI/i.test(code)) {
    return `install the UEFI firmware package that provides ${base} (Debian/Ubuntu: \`apt-get install ovmf\`; Fedora/RHEL: \`dnf install edk2-ovmf\`), so that ${code} exists, then run the restore again`;
  }
  return `install the firmware that provides ${code} on this host (or place a copy of it at that path), then run the restore again`;
}

/**
 * Refuses (before anything is written) when the firmware code the VM boots is not on this host.
 * `where` names the host ("host kvm1").
 */
export async function requireFirmwareCode(fw: RestoreFirmware, vm: string, pointId: string, where: string): Promise<void> {
  const code = fw.firmware.code;
  const st = await stat(code).catch(() => undefined);
  if (!st?.isFile()) {
    throw new BulwarkError(`VM ${vm} (restore point ${pointId}) boots the UEFI firmware ${code}, which ${where} does not have`, {
      kind: 'conflict',
      context: { vm, point: pointId, file: code },
      hint: installHint(code),
    });
  }
}

/** File name of a restored VM's variable store: libvirt's convention `<name>_VARS.fd`. */
export function nvramFileName(vm: string, format: string): string {
  return `${vm}_VARS.${format === 'raw' ? 'fd' : format}`;
}

/**
 * Writes a variable store to `to` in `format` (raw, or converted by qemu-img): to a temporary
 * file next to it, synced, then renamed over it. Without `overwrite`, an existing `to` is refused.
 */
export async function writeNvram(data: Buffer, to: string, format: string, overwrite: boolean, context: { vm: string; point: string }): Promise<void> {
  if (!overwrite && (await stat(to).then(() => true, () => false))) {
    throw new BulwarkError(`the UEFI variable store ${to} of VM ${context.vm} already exists`, { kind: 'conflict', context: { ...context, file: to }, hint: 'choose another --name or --storage' });
  }
  const tmp = path.join(path.dirname(to), `.${path.basename(to)}.bulwark-${randomBytes(4).toString('hex')}`);
  const raw = format === 'raw' ? tmp : `${tmp}.raw`;
  try {
    const fh = await open(raw, 'wx', 0o600);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    if (raw !== tmp) {
      // qemu-img creates its output 0644: it writes into a folder only this user enters, and the
      // store leaves it 0600, as the raw one is created.
      const privateDir = await mkdtemp(path.join(path.dirname(to), '.bulwark-nvram-'));
      try {
        const converted = path.join(privateDir, 'vars');
        await runTool('qemu-img', ['convert', '-f', 'raw', '-O', format, raw, converted], `converting the UEFI variable store of VM ${context.vm} to ${format}`, { context: { ...context, file: to } });
        await chmod(converted, 0o600);
        await rename(converted, tmp);
      } finally {
        await rm(privateDir, { recursive: true, force: true });
      }
      await rm(raw, { force: true });
      const fh2 = await open(tmp, 'r');
      try {
        await fh2.sync();
      } finally {
        await fh2.close();
      }
    }
    await rename(tmp, to);
  } catch (err) {
    await rm(tmp, { force: true });
    await rm(raw, { force: true });
    if (err instanceof BulwarkError) throw err;
    throw new BulwarkError(`writing the UEFI variable store ${to} of VM ${context.vm} failed: ${(err as Error).message}`, { kind: 'internal', context: { ...context, file: to }, cause: err });
  }
}
