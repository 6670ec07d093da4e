// `restore files --to-guest` on libvirt: the refusals, against real libvirt and two bare transient
// TCG domains that boot nothing (SeaBIOS finds no disk and idles, so no guest is booted): one
// without a guest agent channel, one with a channel no agent ever opens. The success path (a
// booted test guest written through libvirt) is in test/e2e/recovery-libvirt.test.ts.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectLibvirtGuestAgent, LibvirtGuestAgent } from '../../src/hypervisor/qga/libvirt.js';
import { QgaError } from '../../src/hypervisor/qga/guest-agent.js';
import { ensureLibvirtd, LIBVIRT_URI, virsh } from '../fixtures/libvirt.js';

const BARE = `bulwark-bare-${process.pid}`;
const WITH_CHANNEL = `bulwark-bare-ch-${process.pid}`;
let dir: string;

function bareDomain(name: string, channel: boolean): string {
  return `<domain type='qemu'><name>${name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>${channel ? "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>" : ''}<memballoon model='none'/></devices>
</domain>`;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bulwark-qga-lv-'));
  await ensureLibvirtd();
  for (const [name, channel] of [[BARE, false], [WITH_CHANNEL, true]] as const) {
    const xml = join(dir, `${name}.xml`);
    await writeFile(xml, bareDomain(name, channel));
    await virsh(['create', xml]);
  }
}, 180_000);

afterAll(async () => {
  for (const name of [BARE, WITH_CHANNEL]) await virsh(['destroy', name]).catch(() => undefined);
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('guest agent of a libvirt domain: refusals', () => {
  it('a domain the connection does not have: undefined (the caller tries its other hosts)', async () => {
    expect(await connectLibvirtGuestAgent({ uri: LIBVIRT_URI, domain: `no-such-domain-${process.pid}` })).toBeUndefined();
  });

  it('no guest agent channel: says how to add one', async () => {
    const err = await connectLibvirtGuestAgent({ uri: LIBVIRT_URI, domain: BARE, host: 'lv' }).then(() => undefined, (e: unknown) => e);
    expect(err).toMatchObject({ kind: 'unavailable', message: `VM ${BARE} on host lv (${LIBVIRT_URI}) has no guest agent channel (org.qemu.guest_agent.0)` });
    expect((err as { hint?: string }).hint).toContain(`virsh edit ${BARE}`);
    // A command sent anyway is named and carries libvirt's reason.
    const direct = await new LibvirtGuestAgent({ uri: LIBVIRT_URI, domain: BARE, timeoutMs: 3000 }).ping().then(() => undefined, (e: unknown) => e);
    expect(direct).toBeInstanceOf(QgaError);
    expect((direct as Error).message).toMatch(new RegExp(`guest-ping|${BARE}`));
  });

  it('a channel no agent has opened: does not answer, start qemu-guest-agent', async () => {
    const err = await connectLibvirtGuestAgent({ uri: LIBVIRT_URI, domain: WITH_CHANNEL }).then(() => undefined, (e: unknown) => e);
    expect(err).toMatchObject({ kind: 'unavailable', message: expect.stringContaining(`the guest agent of VM ${WITH_CHANNEL} on ${LIBVIRT_URI} does not answer`) });
    expect((err as { hint?: string }).hint).toContain('qemu-guest-agent');
    const direct = await new LibvirtGuestAgent({ uri: LIBVIRT_URI, domain: WITH_CHANNEL, timeoutMs: 2000 }).ping().then(() => undefined, (e: unknown) => e);
    expect(direct).toMatchObject({ reason: 'timeout' });
  });

  it('a paused domain: not running, resume it', async () => {
    await virsh(['suspend', WITH_CHANNEL]);
    try {
      const err = await connectLibvirtGuestAgent({ uri: LIBVIRT_URI, domain: WITH_CHANNEL }).then(() => undefined, (e: unknown) => e);
      expect(err).toMatchObject({ kind: 'conflict', message: `VM ${WITH_CHANNEL} on ${LIBVIRT_URI} is paused, not running` });
      expect((err as { hint?: string }).hint).toContain(`virsh resume ${WITH_CHANNEL}`);
    } finally {
      await virsh(['resume', WITH_CHANNEL]);
    }
  });
});
