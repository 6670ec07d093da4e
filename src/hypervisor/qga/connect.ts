// Finding a running VM's guest agent on a hypervisor host: on a QEMU host through the agent's own
// socket (found through the VM's QMP), on a libvirt host through libvirt (`virsh
// qemu-agent-command`: libvirtd holds the socket). Used by the server for its own hosts and by an
// agent for the hosts it serves (`restore files --to-guest`).
import { BulwarkError, describeError } from '../../common/errors.js';
import { ToolError } from '../../common/process.js';
import { QemuHypervisor } from '../qemu/adapter.js';
import { findAgentSocket } from '../qemu/discovery.js';
import { QmpClient } from '../qmp/client.js';
import { QgaClient } from './client.js';
import type { GuestAgent } from './guest-agent.js';
import { connectLibvirtGuestAgent } from './libvirt.js';

/** A host as the server configures it (`host add`): a QEMU QMP socket glob or a libvirt URI. */
export interface GuestAgentHost {
  /** The host's name, for messages (default: its URI or glob). */
  readonly name?: string | undefined;
  readonly kind: 'qemu' | 'libvirt';
  /** libvirt URI, or the QEMU host's glob of QMP sockets. */
  readonly uri: string;
}

/**
 * The guest agent of VM `vm` running on `host`, checked to answer; undefined when the host has no
 * such VM. Throws, with what to do, when the VM is there but not running, has no agent channel,
 * or its agent does not answer.
 */
export async function guestAgentOnHost(host: GuestAgentHost, vm: string, timeoutMs = 30_000): Promise<GuestAgent | undefined> {
  if (host.kind === 'libvirt') return connectLibvirtGuestAgent({ uri: host.uri, domain: vm, ...(host.name !== undefined ? { host: host.name } : {}), timeoutMs });
  const hv = new QemuHypervisor({ qmpGlob: host.uri });
  try {
    const info = await hv.getVm(vm).catch(() => undefined);
    if (!info) return undefined;
    if (info.state !== 'running') throw new BulwarkError(`VM ${vm} is ${info.state}, not running`, { kind: 'conflict', context: { vm }, hint: 'start the VM, or restore to a folder with --to' });
    const qmp = await QmpClient.connect({ endpoint: { socketPath: info.id }, label: vm });
    let socket: string | undefined;
    try {
      socket = await findAgentSocket(qmp);
    } finally {
      await qmp.close();
    }
    if (!socket) throw new BulwarkError(`VM ${vm} has no guest agent channel (org.qemu.guest_agent.0)`, { kind: 'unavailable', context: { vm } });
    const qga = await QgaClient.connect({ socketPath: socket, label: vm, timeoutMs });
    try {
      await qga.ping({ timeoutMs: 5000 });
    } catch (err) {
      await qga.close();
      throw new BulwarkError(`the guest agent of VM ${vm} does not answer`, { kind: 'unavailable', context: { vm }, cause: err, hint: 'is qemu-guest-agent running in the guest?' });
    }
    return qga;
  } finally {
    await hv.close();
  }
}

/**
 * The guest agent of VM `vm` on the first of `hosts` that runs it. A libvirt host whose daemon
 * does not answer is skipped (the VM may be elsewhere) and named in the refusal, as are `skipped`
 * reasons the caller gives (hosts it could not look at).
 */
export async function findGuestAgent(hosts: readonly GuestAgentHost[], vm: string, where: string, skipped: readonly string[] = []): Promise<GuestAgent> {
  const reasons = [...skipped];
  for (const h of hosts) {
    try {
      const agent = await guestAgentOnHost(h, vm);
      if (agent) return agent;
    } catch (err) {
      // libvirt itself did not answer (daemon down): the VM may be on another host.
      if (!(err instanceof ToolError)) throw err;
      reasons.push(`host ${h.name ?? h.uri}: ${describeError(err)}`);
    }
  }
  throw new BulwarkError(`VM ${vm} is not running on any ${where}${reasons.length ? ` (${reasons.join('; ')})` : ''}`, {
    kind: 'not-found',
    context: { vm },
    hint: hosts.length ? `it is on none of the hosts ${hosts.map((h) => h.name ?? h.uri).join(', ')}: add its host with \`bulwark host add\`, or restore to a folder with --to` : 'add its host with `bulwark host add`, or restore to a folder with --to',
  });
}
