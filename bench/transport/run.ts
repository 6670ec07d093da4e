// Transport benchmark (run by hand): moves N MiB of incompressible 1 MiB blocks from a
// TransferSender to a TransferReceiver over mutual TLS on 127.0.0.1 (discarding sink), with 1 and
// 5 streams, against the machine's limit for the same bytes: one bare Node TLS socket writing
// them without framing, CRC, acks or digests. Medians of --runs (default 3).
//   npx tsx bench/transport/run.ts [--mib 512] [--runs 3]
import { randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import tls from 'node:tls';
import type { DiskBlock } from '../../src/disk/types.js';
import { TransferReceiver, type TransferSink } from '../../src/transport/receiver.js';
import { TransferSender, prepareBlocks } from '../../src/transport/sender.js';
import { StageTimes } from '../../src/transport/stage-times.js';
import { serverTlsOptions } from '../../src/transport/connection.js';
import { bottleneckVerdict } from '../../src/server/resources/bottleneck.js';
import { makePki } from '../../test/transport/helpers.js';

const args = process.argv.slice(2);
const opt = (name: string, def: string): string => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1]! : def;
};
const mib = Number(opt('mib', '512'));
const runs = Number(opt('runs', '3'));
const BS = 1024 * 1024;
const pki = makePki();
const pool = Array.from({ length: 8 }, () => randomBytes(BS));

async function* blocks(): AsyncGenerator<DiskBlock> {
  for (let index = 0; index < mib; index++) yield { index, data: pool[index % pool.length]! };
}

const discard: TransferSink = {
  openDisk: async () => undefined,
  writeBlock: async () => undefined,
  writeZeroRun: async () => undefined,
  endDisk: async () => undefined,
  commit: async () => undefined,
  abort: async () => undefined,
};

async function transfer(streams: number): Promise<{ seconds: number; summary: string }> {
  const receiver = await TransferReceiver.listen({ tls: pki.target, grant: () => ({ secret: 's', openSink: async () => discard }) });
  const stageTimes = new StageTimes();
  try {
    const sender = await TransferSender.open({ target: receiver.address, tls: pki.source, taskId: 't', taskSecret: 's', streams, stageTimes });
    const t0 = performance.now();
    await sender.sendDisk({ name: 'vda', size: mib * BS, blockSize: BS }, prepareBlocks(blocks(), { stageTimes }));
    await sender.commit();
    const ms = performance.now() - t0;
    sender.close();
    return { seconds: ms / 1000, summary: bottleneckVerdict(stageTimes.snapshot(), ms).summary };
  } finally {
    await receiver.close();
  }
}

async function bareTls(): Promise<{ seconds: number; summary: string }> {
  let received = 0;
  const total = mib * BS;
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  const server = tls.createServer(serverTlsOptions(pki.target), (s) => {
    s.on('data', (d: Buffer) => {
      received += d.length;
      if (received >= total) done();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  const socket = tls.connect({ host: '127.0.0.1', port, ...pki.source, servername: 'localhost' });
  await new Promise((r) => socket.once('secureConnect', r));
  const t0 = performance.now();
  for (let i = 0; i < mib; i++) {
    if (!socket.write(pool[i % pool.length]!)) await new Promise((r) => socket.once('drain', r));
  }
  await finished;
  const ms = performance.now() - t0;
  socket.destroy();
  await new Promise((r) => server.close(r));
  return { seconds: ms / 1000, summary: 'bare TLS, one socket' };
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const cases: Array<[string, () => Promise<{ seconds: number; summary: string }>]> = [
  ['bare-tls-1', bareTls],
  ['bulwark-1-stream', () => transfer(1)],
  ['bulwark-5-streams', () => transfer(5)],
];
const results: Record<string, { medianMBps: number; runsMBps: number[]; lastVerdict: string }> = {};
for (const [name, fn] of cases) {
  const rates: number[] = [];
  let summary = '';
  for (let r = 0; r < runs; r++) {
    const res = await fn();
    rates.push((mib * BS) / 1e6 / res.seconds);
    summary = res.summary;
  }
  results[name] = { medianMBps: Math.round(median(rates)), runsMBps: rates.map(Math.round), lastVerdict: summary };
}
const limit = results['bare-tls-1']!.medianMBps;
console.log(JSON.stringify({ mib, runs, results, ratioVsBareTls: { oneStream: +(results['bulwark-1-stream']!.medianMBps / limit).toFixed(2), fiveStreams: +(results['bulwark-5-streams']!.medianMBps / limit).toFixed(2) } }, null, 2));
