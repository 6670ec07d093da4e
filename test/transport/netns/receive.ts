// Child process for the network-namespace test: a target agent that receives one task and
// discards the data (counting it). Prints {"listening":port} then {"ended":...} as JSON lines.
import { readFileSync } from 'node:fs';
import { TransferReceiver, type TransferSink } from '../../../src/transport/receiver.js';

const [certDir = '', host = '', taskId = '', secret = ''] = process.argv.slice(2);
const read = (f: string): string => readFileSync(`${certDir}/${f}`, 'utf8');
let bytes = 0;
const sink: TransferSink = {
  openDisk: async () => undefined,
  writeBlock: async (b) => {
    bytes += b.data.length;
  },
  writeZeroRun: async () => undefined,
  endDisk: async () => undefined,
  commit: async () => undefined,
  abort: async () => undefined,
};
const receiver = await TransferReceiver.listen({
  tls: { key: read('target.key'), cert: read('target.crt'), ca: read('ca.crt') },
  host,
  port: 0,
  grant: (id) => (id === taskId ? { secret, openSink: async () => sink } : undefined),
  onSessionEnd: (e) => {
    process.stdout.write(`${JSON.stringify({ ended: e.outcome, bytes })}\n`);
    // Let the source read COMMITTED and close its streams before this agent goes away.
    const done = setInterval(() => {
      if ((receiver.sessionStats(e.sessionId)?.connections ?? 0) === 0) {
        clearInterval(done);
        void receiver.close().then(() => process.exit(0));
      }
    }, 20);
  },
});
process.stdout.write(`${JSON.stringify({ listening: receiver.address.port })}\n`);
