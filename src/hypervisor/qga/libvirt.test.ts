import { describe, expect, it } from 'vitest';
import { agentChannelOf } from './libvirt.js';

const live = `<domain type='qemu' id='3'>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/3-web01/org.qemu.spice.0'/>
      <target type='virtio' name='com.redhat.spice.0' state='disconnected'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/3-web01/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
    </channel>
  </devices>
</domain>`;

describe('agentChannelOf', () => {
  it('finds the guest agent channel among others, with its socket and state', () => {
    expect(agentChannelOf(live)).toEqual({ socketPath: '/run/libvirt/qemu/channel/3-web01/org.qemu.guest_agent.0', state: 'connected' });
    expect(agentChannelOf(live.replace("state='connected'", "state='disconnected'"))?.state).toBe('disconnected');
  });
  it('inactive XML: a channel without source or state', () => {
    expect(agentChannelOf(`<domain><devices><channel type='unix'><target type='virtio' name="org.qemu.guest_agent.0"/></channel></devices></domain>`)).toEqual({ socketPath: undefined, state: undefined });
  });
  it('no agent channel', () => {
    expect(agentChannelOf(live.replace(/org\.qemu\.guest_agent\.0/g, 'org.example.other'))).toBeUndefined();
    expect(agentChannelOf('<domain><devices/></domain>')).toBeUndefined();
  });
});
