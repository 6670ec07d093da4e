// Restore over the data-mover protocol (role "read") on real TLS sockets: a disk read back over
// 5 streams bit-exact, a corrupted block NACKed and resent, and a cut stream asked again.
import { createHash } from 'node:crypto';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../src/common/errors.js';
import type { RestoreSource } from '../../src/transport/read-serve.js';
import { TransferReader, type TransferReaderOptions } from '../../src/transport/reader.js';
import { TransferReceiver } from '../../src/transport/receiver.js';
import { Relay, makePki, patternDisk, sha256, type TestPki } from './helpers.js';

const BS = 64 * 1024;
const SIZE = 300 * BS - 999;
let pki: TestPki;
let image: Buffer;
const cleanups: Array<() => Promise<void> | void> = [];

beforeAll(() => {
  pki = makePki();
  image = patternDisk(SIZE, BS);
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function source(opened: { count: number; closed: number }): RestoreSource {
  opened.count++;
  return {
    disks: [{ disk: 0, name: 'vda', size: SIZE, blockSize: BS }],
    readBlock: async (_disk, index) => {
      const data = image.subarray(index * BS, Math.min(SIZE, (index + 1) * BS));
      if (data.every((b) => b === 0)) return null;
      return { index, plainLength: data.length, compression: 'none', sha256: createHash('sha256').update(data).digest(), data };
    },
    close: async () => {
      opened.closed++;
    },
  };
}

async function setup(extra: Partial<TransferReaderOptions> = {}, viaRelay = false): Promise<{ reader: TransferReader; relay?: Relay; opened: { count: number; closed: number } }> {
  const opened = { count: 0, closed: 0 };
  const receiver = await TransferReceiver.listen({ tls: pki.target, grant: (id) => (id === 'restore-1' ? { secret: 'sek', openSource: async () => source(opened) } : undefined) });
  cleanups.push(() => receiver.close());
  const relay = viaRelay ? await Relay.start(receiver.address) : undefined;
  if (relay) cleanups.push(() => relay.close());
  const reader = await TransferReader.open({ target: { host: '127.0.0.1', port: relay?.port ?? receiver.address.port }, tls: pki.source, taskId: 'restore-1', taskSecret: 'sek', chunkBlocks: 16, ...extra });
  cleanups.push(() => reader.close());
  return { reader, relay, opened };
}

function collector(onBlock?: (n: number) => void): { out: Buffer; consumer: Parameters<TransferReader['readDisk']>[1] } {
  const out = Buffer.alloc(SIZE);
  let n = 0;
  return {
    out,
    consumer: {
      block: async (b) => {
        b.data.copy(out, b.index * BS);
        onBlock?.(++n);
      },
      zeroRun: async () => undefined,
    },
  };
}

describe('restore reader over TLS', () => {
  it('reads a disk over 5 streams bit-exact, zero blocks as runs', async () => {
    const { reader, opened } = await setup();
    expect(reader.disks).toEqual([{ disk: 0, name: 'vda', size: SIZE, blockSize: BS }]);
    const { out, consumer } = collector();
    await reader.readDisk(0, consumer);
    expect(sha256(out)).toBe(sha256(image));
    const zero = Array.from({ length: 300 }, (_, i) => i).filter((i) => i % 7 === 3).length;
    expect(reader.stats).toMatchObject({ blocks: 300 - zero, zeroBlocks: zero, nacks: 0 });
    expect(opened.count).toBe(5);
  });

  it('a block damaged in transit is NACKed and resent', async () => {
    const { reader } = await setup({ corruptOnArrival: ({ index, attempt }) => (index === 40 || index === 41) && attempt === 1 });
    const { out, consumer } = collector();
    await reader.readDisk(0, consumer);
    expect(reader.stats.nacks).toBe(2);
    expect(sha256(out)).toBe(sha256(image));
  });

  it('a stream cut mid-restore reconnects and asks again for what it missed', async () => {
    const cutter: { relay?: Relay } = {};
    const { out, consumer } = collector((n) => {
      if (n === 80) cutter.relay!.cut(2);
    });
    const s = await setup({ reconnectDelayMs: 20 }, true);
    cutter.relay = s.relay;
    await s.reader.readDisk(0, consumer);
    expect(s.reader.stats.reconnects).toBeGreaterThanOrEqual(1);
    expect(sha256(out)).toBe(sha256(image));
  });

  it('refuses a reader with the wrong secret, and a backup grant is not readable', async () => {
    const receiver = await TransferReceiver.listen({ tls: pki.target, grant: () => ({ secret: 'sek', openSink: async () => { throw new Error('unused'); } }) });
    cleanups.push(() => receiver.close());
    const base = { target: { host: '127.0.0.1', port: receiver.address.port }, tls: pki.source, taskId: 'x', streams: 1 };
    const wrong = await TransferReader.open({ ...base, taskSecret: 'bad' }).catch((e: unknown) => e);
    expect((wrong as BulwarkError).kind).toBe('unauthorized');
    const notRestore = await TransferReader.open({ ...base, taskSecret: 'sek' }).catch((e: unknown) => e);
    expect(notRestore).toBeInstanceOf(BulwarkError);
    expect((notRestore as BulwarkError).message).toMatch(/not a restore/);
  });
});
