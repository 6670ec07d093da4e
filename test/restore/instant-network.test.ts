// `instant-recovery start --network` through the server's recovery service (POST
// /instant-recoveries { network }), with a real QEMU: the point's VM had a NIC on a user-mode
// network. By default the recovered VM gets the NIC (recorded model and MAC) with no network
// backend (the original may still be on its network); with `recorded` the NIC is on the backend
// it had. Seen in the QEMU process's own command line. (What each mode builds is tested in
// instant-hw.test.ts; this is the path from the request to the agent's engine.)
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ConfigDatabase } from '../../src/server/db/connect.js';
import { RecoveryService } from '../../src/server/api/recovery.js';
import { seedQemuVmPoint } from '../../src/server/api/recovery-test-point.js';
import type { ServiceContext } from '../../src/server/services/common.js';

let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let pointId: string;
const MAC = '52:54:00:6e:65:74';

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-ir-net-'));
  ({ cdb, ctx, pointId } = await seedQemuVmPoint(dir, { extraArgs: ['-netdev', 'user,id=net0', '-device', `virtio-net-pci,netdev=net0,mac=${MAC},id=nic0`] }));
});

afterAll(async () => {
  await cdb?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const argv = (pid: number | null | undefined): string[] => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');

describe('instant recovery start --network', () => {
  it('default: the recorded NIC and MAC with no network; recorded: on the user network it had', async () => {
    const service = new RecoveryService({ ctx, dataDir: path.join(dir, 'data') });
    try {
      const off = await service.startInstant({ point: pointId, name: 'vm1-off' });
      const offArgs = argv(off.pid);
      expect(offArgs.join(' ')).toContain(MAC);
      expect(offArgs.some((a) => /^user\b|type=user|"type":"user"/.test(a))).toBe(false);
      await service.stopInstant(off.id);

      const on = await service.startInstant({ point: pointId, name: 'vm1-on', network: 'recorded' });
      const onArgs = argv(on.pid);
      expect(onArgs.join(' ')).toContain(MAC);
      expect(onArgs.some((a) => /^user\b|type=user|"type":"user"/.test(a)), onArgs.join(' ')).toBe(true);
      await service.stopInstant(on.id);
    } finally {
      await service.close();
    }
  }, 120_000);
});
