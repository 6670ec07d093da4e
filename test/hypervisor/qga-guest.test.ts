// The guest agent client against qemu-ga INSIDE the test guest (TCG): the commands that must never
// run against a host agent — freeze, thaw, shutdown — plus fs info and file I/O on the guest.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QgaClient, QgaError } from '../../src/hypervisor/qga/client.js';
import { startTestGuest, type TestGuest } from '../fixtures/guest.js';

let guest: TestGuest;

beforeAll(async () => {
  guest = await startTestGuest({ name: 'qga-guest' });
  await guest.waitForAgent();
});

afterAll(async () => {
  await guest?.stop();
});

describe('guest agent client in the test guest', () => {
  it('freezes and thaws the guest file systems', async () => {
    const qga = await QgaClient.connect({ socketPath: guest.agentSocket, timeoutMs: 30_000, label: 'qga-guest' });
    try {
      expect(await qga.fsfreezeStatus()).toBe('thawed');
      const frozen = await qga.fsfreezeFreeze();
      try {
        expect(frozen).toBeGreaterThanOrEqual(1);
        expect(await qga.fsfreezeStatus()).toBe('frozen');
      } finally {
        expect(await qga.fsfreezeThaw()).toBe(frozen);
      }
      expect(await qga.fsfreezeStatus()).toBe('thawed');
      // Writes work again after the thaw.
      const r = await qga.exec('/bin/sh', ['-c', 'echo thawed > /root/after-thaw && sync && cat /root/after-thaw']);
      expect(r.exitCode).toBe(0);
      expect(r.stdout.toString()).toBe('thawed\n');
    } finally {
      await qga.close();
    }
  });

  it('reports the root file system on the virtio disk and moves files both ways', async () => {
    const qga = await QgaClient.connect({ socketPath: guest.agentSocket, timeoutMs: 30_000 });
    try {
      const fs = await qga.getFsInfo();
      const root = fs.find((f) => f.mountpoint === '/');
      expect(root?.type).toBe('ext4');
      expect(root?.disk[0]?.['bus-type']).toBe('virtio');
      const data = Buffer.from(Array.from({ length: 300_001 }, (_, i) => (i * 7) & 0xff));
      await qga.writeFile('/root/blob.bin', data);
      expect((await qga.readFile('/root/blob.bin')).equals(data)).toBe(true);
      const sums = (await qga.readFile('/srv/testdata/SHA256SUMS')).toString();
      const check = await qga.exec('/bin/sh', ['-c', 'cd /srv/testdata && sha256sum -c SHA256SUMS']);
      expect(check.exitCode).toBe(0);
      expect(sums.length).toBeGreaterThan(0);
    } finally {
      await qga.close();
    }
  });

  it('shuts the guest down', async () => {
    const qga = await QgaClient.connect({ socketPath: guest.agentSocket, timeoutMs: 30_000 });
    try {
      await qga.shutdown();
    } finally {
      await qga.close();
    }
    expect(await guest.waitForExit(60_000)).toBe(true);
    // Nobody answers any more.
    const err = (await QgaClient.connect({ socketPath: guest.agentSocket, timeoutMs: 500 }).catch((e: unknown) => e)) as QgaError;
    expect(err).toBeInstanceOf(QgaError);
  });
});
