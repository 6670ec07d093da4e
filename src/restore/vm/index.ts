// Full VM restore (docs/restore-vm.md).
export { restoreVm, qmpSocketFor, globMatches, launchDetached } from './restore-vm.js';
export { processesHolding } from '../../hypervisor/proc.js';
export type { RestoreVmHost, RestoreVmOptions, RestoreVmProgress, RestoreVmResult, RestoredDisk } from './restore-vm.js';
export { recordedDisks, rewriteQemuCommandLine } from './qemu-config.js';
export { domainDisks, rewriteDomainXml } from './libvirt-config.js';
export { repositoryPointSource } from './point-source.js';
export type { PointDiskWrite, VmPointSource, WrittenDisk } from './point-source.js';
