// `list-vms` (docs/formats/agent-link.md): the VMs of hypervisor connections, for `bulwark vm list`.
// Run by an agent for the hosts it serves, and by the server for its own hosts (one-host install).
import { describeError } from '../../common/errors.js';
import { openHypervisor, type HypervisorConnection } from '../../hypervisor/index.js';
import type { Hypervisor, VmInfo } from '../../hypervisor/types.js';
import type { ListVmsResult, WireVm } from '../../transport/agent-tasks.js';

/** A VM without its configuration: name, state and disks. */
export function wireVm(vm: VmInfo): WireVm {
  return {
    name: vm.name,
    ...(vm.uuid !== undefined ? { uuid: vm.uuid } : {}),
    state: vm.state,
    disks: vm.disks.map((d) => ({ name: d.name, sizeBytes: d.virtualSize, format: d.format, image: d.imagePath })),
  };
}

/**
 * Per connection, in order (side by side), its VMs sorted by name, or the reason they could not
 * be listed (a host that does not answer does not hide the others).
 */
export async function listVmsOnHosts(hosts: readonly HypervisorConnection[], open: (c: HypervisorConnection) => Hypervisor = openHypervisor): Promise<ListVmsResult['hosts']> {
  return Promise.all(
    hosts.map(async (c) => {
      try {
        const vms = await open(c).listVms();
        return { vms: vms.map(wireVm).sort((a, b) => a.name.localeCompare(b.name)) };
      } catch (err) {
        return { error: describeError(err) };
      }
    }),
  );
}
