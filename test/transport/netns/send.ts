// Child process for the network-namespace test: a source agent that sends `mib` MiB of random
// blocks to the target, throttled by the throttling rules that match its connection (one shared
// RateLimiter per rule), and prints the measured rate and bottleneck verdict as one JSON line.
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { bottleneckVerdict } from '../../../src/server/resources/bottleneck.js';
import { matchingThrottlingRules, mbpsToBytesPerSecond, type ThrottlingRule } from '../../../src/server/resources/throttling-rules.js';
import { TransferSender, prepareBlocks } from '../../../src/transport/sender.js';
import { StageTimes } from '../../../src/transport/stage-times.js';
import { RateLimiter, allOf } from '../../../src/transport/throttle.js';
import type { DiskBlock } from '../../../src/disk/types.js';

const [certDir = '', sourceIp = '', targetIp = '', port = '', taskId = '', secret = '', mibText = '', rulesJson = '[]'] = process.argv.slice(2);
const read = (f: string): string => readFileSync(`${certDir}/${f}`, 'utf8');
const rules = JSON.parse(rulesJson) as ThrottlingRule[];
const matching = matchingThrottlingRules(rules, { sourceIp, targetIp, at: new Date(), timeZone: 'UTC' });
const limiters = matching.map((r) => new RateLimiter(r.name, { bytesPerSecond: mbpsToBytesPerSecond(r.mbps), burst: 64 * 1024 }));
const stageTimes = new StageTimes();
const bs = 256 * 1024;
const count = (Number(mibText) * 1024 * 1024) / bs;
const block = randomBytes(bs);

async function* blocks(): AsyncGenerator<DiskBlock> {
  for (let index = 0; index < count; index++) yield { index, data: block };
}

const sender = await TransferSender.open({
  target: { host: targetIp, port: Number(port) },
  tls: { key: read('source.key'), cert: read('source.crt'), ca: read('ca.crt') },
  taskId,
  taskSecret: secret,
  streams: 5,
  throttle: limiters.length > 0 ? allOf(limiters) : undefined,
  stageTimes,
});
const started = performance.now();
await sender.sendDisk({ name: 'vda', size: count * bs, blockSize: bs }, prepareBlocks(blocks(), { stageTimes }));
const elapsedMs = performance.now() - started;
await sender.commit();
sender.close();
const wireBytes = sender.stats.bytesSent;
process.stdout.write(
  `${JSON.stringify({
    rules: matching.map((r) => r.name),
    elapsedMs,
    wireBytes,
    mbps: (wireBytes * 8) / 1e6 / (elapsedMs / 1000),
    verdict: bottleneckVerdict(stageTimes.snapshot(), elapsedMs),
  })}\n`,
);
