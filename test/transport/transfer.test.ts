// Sender and receiver over real TCP and real mutual TLS on 127.0.0.1: bit-exact multi-stream
// transfer, CRC corruption resent, a cut stream resumed, a long outage failing cleanly, and
// credit back-pressure keeping memory bounded when the repository is slow.
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../src/common/errors.js';
import { TransferReceiver, type SessionOutcome, type TransferReceiverOptions, type TransferSink } from '../../src/transport/receiver.js';
import { TransferSender, prepareBlocks, type TransferSenderOptions } from '../../src/transport/sender.js';
import { StageTimes } from '../../src/transport/stage-times.js';
import { RateLimiter } from '../../src/transport/throttle.js';
import { MemorySink, Relay, diskBlocks, makePki, patternDisk, sha256, type TestPki } from './helpers.js';

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

const TASK = 'task-1';
const SECRET = 'c0ffee'.repeat(10);

interface Setup {
  receiver: TransferReceiver;
  sink: MemorySink;
  ended: Array<{ outcome: SessionOutcome; reason?: string }>;
}

async function startReceiver(sink: MemorySink, extra: Partial<TransferReceiverOptions> = {}): Promise<Setup> {
  const ended: Setup['ended'] = [];
  const receiver = await TransferReceiver.listen({
    tls: pki.target,
    grant: (taskId) => (taskId === TASK ? { secret: SECRET, openSink: async () => sink } : undefined),
    onSessionEnd: (e) => ended.push({ outcome: e.outcome, reason: e.reason }),
    ...extra,
  });
  cleanups.push(() => receiver.close());
  return { receiver, sink, ended };
}

async function openSender(port: number, extra: Partial<TransferSenderOptions> = {}): Promise<TransferSender> {
  const sender = await TransferSender.open({ target: { host: '127.0.0.1', port }, tls: pki.source, taskId: TASK, taskSecret: SECRET, ...extra });
  cleanups.push(() => sender.close());
  return sender;
}

const BS = 64 * 1024;
const SIZE = 300 * BS - 1234; // unaligned: the last block is short

async function waitFor(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 5));
}

describe('data-mover transfer over TLS', () => {
  it('moves a few hundred blocks over 5 streams bit-exact', async () => {
    const { receiver, sink, ended } = await startReceiver(new MemorySink());
    const sender = await openSender(receiver.address.port);
    const summary = await sender.sendDisk({ name: 'vda', size: SIZE, blockSize: BS }, prepareBlocks(diskBlocks(image, BS)));
    await sender.commit();

    expect(sha256(sink.image)).toBe(sha256(image));
    expect(sink.committed).toBe(true);
    expect(sink.aborted).toBeUndefined();
    expect(ended).toEqual([{ outcome: 'committed', reason: undefined }]);
    const zeroBlocks = Array.from({ length: 300 }, (_, i) => i).filter((i) => i % 7 === 3).length;
    expect(summary).toMatchObject({ blocks: 300 - zeroBlocks, zeroBlocks });
    expect(sink.end).toMatchObject({ blocks: 300 - zeroBlocks, zeroBlocks });
    // every stream carried blocks
    expect(sender.stats.framesByStream).toHaveLength(5);
    for (const n of sender.stats.framesByStream) expect(n).toBeGreaterThan(0);
    const rs = receiver.sessionStats(sender.sessionId)!;
    expect(rs.framesByStream.filter((n) => n > 0)).toHaveLength(5);
    expect(rs.nacks).toBe(0);
    // Five streams deliver out of order, yet the sink gets the disk in block order (sequence order).
    expect(sink.order).toHaveLength(300 - zeroBlocks + sink.zeroRuns.length);
    expect(sink.order).toEqual([...sink.order].sort((a, b) => a - b));
  });

  it('with multithreaded transfer off, one stream carries everything', async () => {
    const image = patternDisk(40 * BS + 17, BS);
    const { receiver, sink } = await startReceiver(new MemorySink());
    const sender = await openSender(receiver.address.port, { streams: 1 });
    await sender.sendDisk({ name: 'vdb', size: image.length, blockSize: BS }, prepareBlocks(diskBlocks(image, BS)));
    await sender.commit();
    expect(sha256(sink.image)).toBe(sha256(image));
    expect(sender.stats.framesByStream).toHaveLength(1);
  });

  it('a block corrupted in transit is NACKed, resent, and the disk arrives bit-exact', async () => {
    const { receiver, sink } = await startReceiver(new MemorySink());
    const corrupted: number[] = [];
    const sender = await openSender(receiver.address.port, {
      corruptInTransit: ({ index, attempt }) => {
        if ((index === 18 || index === 200) && attempt === 1) {
          corrupted.push(index);
          return true;
        }
        return false;
      },
    });
    await sender.sendDisk({ name: 'vda', size: SIZE, blockSize: BS }, prepareBlocks(diskBlocks(image, BS)));
    await sender.commit();
    expect(corrupted.sort((a, b) => a - b)).toEqual([18, 200]);
    expect(receiver.sessionStats(sender.sessionId)!.nacks).toBe(2);
    expect(sender.stats.nacks).toBe(2);
    expect(sender.stats.resends).toBe(2);
    expect(sha256(sink.image)).toBe(sha256(image));
  });

  it('a block that arrives damaged every time fails the task as corrupt, and nothing is committed', async () => {
    const image = patternDisk(20 * BS, BS);
    const { receiver, sink, ended } = await startReceiver(new MemorySink());
    const sender = await openSender(receiver.address.port, { corruptInTransit: ({ index }) => index === 5 });
    const err = await sender.sendDisk({ name: 'vda', size: image.length, blockSize: BS }, prepareBlocks(diskBlocks(image, BS))).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect((err as BulwarkError).kind).toBe('corrupt');
    await waitFor(() => ended.length > 0);
    expect(sink.committed).toBe(false);
    expect(sink.aborted).toBeDefined();
  });

  it('a stream cut mid-transfer reconnects and resumes; the result is bit-exact', async () => {
    const sink = new MemorySink(() => yieldToLoop());
    const { receiver } = await startReceiver(sink);
    const relay = await Relay.start(receiver.address);
    cleanups.push(() => relay.close());
    let cut = 0;
    sink.onBlock = (n) => {
      if (n === 60 || n === 120) cut += relay.cut(2);
    };
    const sender = await openSender(relay.port, { reconnectDelayMs: 20 });
    await sender.sendDisk({ name: 'vda', size: SIZE, blockSize: BS }, prepareBlocks(diskBlocks(image, BS)));
    await sender.commit();
    // Under load a stream may still be reconnecting at the second cut, so count what was cut.
    expect(cut).toBeGreaterThanOrEqual(3);
    expect(sender.stats.reconnects).toBeGreaterThanOrEqual(1);
    expect(sha256(sink.image)).toBe(sha256(image));
    expect(sink.committed).toBe(true);
  });

  it('every stream cut at once and refused for a moment: all reconnect within the window and resume; bit-exact', async () => {
    const sink = new MemorySink(() => yieldToLoop());
    const { receiver, ended } = await startReceiver(sink, { resumeWindowMs: 10_000 });
    const relay = await Relay.start(receiver.address);
    cleanups.push(() => relay.close());
    let cut = 0;
    sink.onBlock = (n) => {
      if (n !== 80) return;
      relay.refuse = true;
      cut = relay.cut();
      setTimeout(() => (relay.refuse = false), 300);
    };
    const sender = await openSender(relay.port, { reconnectDelayMs: 20, resumeWindowMs: 10_000 });
    await sender.sendDisk({ name: 'vda', size: SIZE, blockSize: BS }, prepareBlocks(diskBlocks(image, BS)));
    await sender.commit();
    expect(cut).toBe(5);
    expect(sender.stats.reconnects).toBeGreaterThanOrEqual(5);
    expect(sha256(sink.image)).toBe(sha256(image));
    expect(sink.committed).toBe(true);
    expect(ended).toEqual([{ outcome: 'committed', reason: undefined }]);
  });

  it('an outage longer than the resume window fails the task cleanly on both sides', async () => {
    const sink = new MemorySink(() => yieldToLoop());
    const { receiver, ended } = await startReceiver(sink, { resumeWindowMs: 600 });
    const relay = await Relay.start(receiver.address);
    cleanups.push(() => relay.close());
    sink.onBlock = (n) => {
      if (n === 50) {
        relay.refuse = true;
        relay.cut();
      }
    };
    const sender = await openSender(relay.port, { reconnectDelayMs: 50, resumeWindowMs: 600 });
    const err = await sender
      .sendDisk({ name: 'vda', size: SIZE, blockSize: BS }, prepareBlocks(diskBlocks(image, BS)))
      .then(() => sender.commit())
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect((err as BulwarkError).kind).toBe('unavailable');
    expect((err as BulwarkError).message).toMatch(/for more than/);
    await waitFor(() => ended.length > 0);
    expect(ended[0]!.outcome).toBe('failed');
    expect(sink.aborted).toMatch(/down for more than/);
    expect(sink.committed).toBe(false);
  });

  it('a slow repository holds the source back: in-flight and queued bytes stay within the window', async () => {
    const window = 256 * 1024;
    const bs = 16 * 1024;
    const image = patternDisk(250 * bs, bs, 1000);
    const sink = new MemorySink(() => new Promise((r) => setTimeout(r, 1)));
    const { receiver } = await startReceiver(sink, { window });
    const sender = await openSender(receiver.address.port);
    await sender.sendDisk({ name: 'vda', size: image.length, blockSize: bs }, prepareBlocks(diskBlocks(image, bs)));
    await sender.commit();
    expect(sha256(sink.image)).toBe(sha256(image));
    expect(sender.stats.creditWaits).toBeGreaterThan(10);
    expect(sender.stats.maxInFlightBytes).toBeLessThanOrEqual(window);
    expect(receiver.sessionStats(sender.sessionId)!.maxQueuedBytes).toBeLessThanOrEqual(window);
    expect(image.length).toBeGreaterThan(10 * window);
  });

  it('a rate limit holds blocks back before they take credit: little in flight, the wait counted as Throttling, not Target', async () => {
    const window = 512 * 1024;
    const bs = 16 * 1024;
    const image = patternDisk(64 * bs, bs, 1000); // 1 MiB, no zero blocks
    const { receiver, sink } = await startReceiver(new MemorySink(), { window });
    const stageTimes = new StageTimes();
    const throttle = new RateLimiter('rule:test', { bytesPerSecond: 1_000_000, burst: 64 * 1024 });
    const sender = await openSender(receiver.address.port, { throttle, stageTimes });
    const started = performance.now();
    await sender.sendDisk({ name: 'vda', size: image.length, blockSize: bs }, prepareBlocks(diskBlocks(image, bs)));
    await sender.commit();
    const elapsed = performance.now() - started;
    expect(sha256(sink.image)).toBe(sha256(image));
    const busy = stageTimes.snapshot();
    // Held back by the limit for most of the run (1 MiB at 1 MB/s less the burst) ...
    expect(busy.throttling).toBeGreaterThan(elapsed / 2);
    // ... while the repository, which keeps up, is not what the source waited for, and the window
    // never filled with blocks that only wait for tokens.
    expect(busy.target).toBeLessThan(elapsed / 4);
    expect(sender.stats.maxInFlightBytes).toBeLessThan(window / 2);
  });

  it('two disks side by side on one transfer: a short disk ends while the long one still streams', async () => {
    const bs = 16 * 1024;
    const short = patternDisk(8 * bs, bs, 1000);
    const long = patternDisk(300 * bs, bs, 1000);
    /** Blocks written per disk, slowly (a repository that takes 1 ms a block), and the disks ended. */
    const written = new Map<number, number>();
    const ended: number[] = [];
    const sink: TransferSink = {
      openDisk: async () => undefined,
      writeBlock: async (b) => {
        await new Promise((r) => setTimeout(r, 1));
        written.set(b.disk, (written.get(b.disk) ?? 0) + 1);
      },
      writeZeroRun: async () => undefined,
      endDisk: async (e) => void ended.push(e.disk),
      commit: async () => undefined,
      abort: async () => undefined,
    };
    // A window of 16 blocks: the long disk keeps sending new blocks while the short one runs.
    const receiver = await TransferReceiver.listen({ tls: pki.target, window: 16 * bs, grant: (taskId) => (taskId === TASK ? { secret: SECRET, openSink: async () => sink } : undefined) });
    cleanups.push(() => receiver.close());
    const sender = await openSender(receiver.address.port);
    const longDone = sender.sendDisk({ name: 'vdb', size: long.length, blockSize: bs }, prepareBlocks(diskBlocks(long, bs)));
    await new Promise((r) => setTimeout(r, 20)); // vdb is streaming
    const shortDone = await sender.sendDisk({ name: 'vda', size: short.length, blockSize: bs }, prepareBlocks(diskBlocks(short, bs)));
    // vda's end is durable on the target while most of vdb has yet to arrive.
    expect(shortDone.blocks).toBe(7); // block 3 reads as zeroes: a zero run
    expect(ended).toEqual([shortDone.disk]);
    expect(written.get(shortDone.disk)).toBe(7);
    expect(written.get(1 - shortDone.disk) ?? 0).toBeLessThan(150);
    expect((await longDone).blocks).toBe(299);
    await sender.commit();
    expect(written.get(1 - shortDone.disk)).toBe(299);
  });

  it('refuses a wrong task secret and a certificate from another CA', async () => {
    const { receiver, ended } = await startReceiver(new MemorySink());
    const wrong = await TransferSender.open({ target: { host: '127.0.0.1', port: receiver.address.port }, tls: pki.source, taskId: TASK, taskSecret: 'nope', streams: 1 }).catch((e: unknown) => e);
    expect(wrong).toBeInstanceOf(BulwarkError);
    expect((wrong as BulwarkError).kind).toBe('unauthorized');
    const stranger = await TransferSender.open({ target: { host: '127.0.0.1', port: receiver.address.port }, tls: pki.stranger, taskId: TASK, taskSecret: SECRET, streams: 1, connectTimeoutMs: 5000 }).catch((e: unknown) => e);
    expect(stranger).toBeInstanceOf(BulwarkError);
    expect((stranger as BulwarkError).kind).toBe('unavailable');
    expect(ended).toEqual([]);
  });
});
