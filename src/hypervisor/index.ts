// Entry point of the hypervisor layer: the one interface (types.ts), the two adapters, and the
// changed-block reader the data path uses to read a backup view.
import { assertNever } from '../common/errors.js';
import { LibvirtHypervisor, type LibvirtHypervisorOptions } from './libvirt/adapter.js';
import { QemuHypervisor, type QemuHypervisorOptions } from './qemu/adapter.js';
import type { Hypervisor } from './types.js';

export * from './types.js';
export { QemuHypervisor, type QemuHypervisorOptions } from './qemu/adapter.js';
export { LibvirtHypervisor, type LibvirtHypervisorOptions } from './libvirt/adapter.js';
export {
  ChangedBlockReader,
  readBackupDisk,
  contextsFor,
  type BlockSource,
  type ChangedBlock,
  type ChangedBlockReaderOptions,
  type ChangedBlockStats,
  type ReadBackupDiskOptions,
} from './cbt/reader.js';
export { planDiskChanges, describeChanges } from './cbt/policy.js';

/** How a host's hypervisor is reached (what `bulwark host add` records). */
export type HypervisorConnection =
  | ({ readonly kind: 'qemu' } & QemuHypervisorOptions)
  | ({ readonly kind: 'libvirt' } & LibvirtHypervisorOptions);

/** The adapter for a host. */
export function openHypervisor(connection: HypervisorConnection): Hypervisor {
  switch (connection.kind) {
    case 'qemu':
      return new QemuHypervisor(connection);
    case 'libvirt':
      return new LibvirtHypervisor(connection);
    default:
      return assertNever(connection, 'hypervisor kind');
  }
}
