// Child process of the multi-host test: the backup server in its own network namespace, with the
// dispatch timings the test needs (short agent-lost and resume windows) and throttling rules read
// from a JSON file the test rewrites. Prints one JSON line when it listens; SIGTERM closes it.
import { readFileSync } from 'node:fs';
import { startServer } from '../../../src/server/main.js';
import type { ThrottlingRule } from '../../../src/server/resources/throttling-rules.js';

const [dataDir = '', listen = '', rulesFile = ''] = process.argv.slice(2);
const server = await startServer({
  dataDir,
  listen,
  hostnames: [listen.split(':')[0]!],
  configBackupAt: false,
  defaultRepository: false,
  localAgent: false,
  print: () => undefined,
  dispatch: {
    agentLostMs: 3000,
    pollWaitMs: 2000,
    resumeWindowMs: 4000,
    throttling: async () => ({ rules: JSON.parse(readFileSync(rulesFile, 'utf8')) as ThrottlingRule[], timeZone: 'UTC' }),
  },
});
process.stdout.write(`${JSON.stringify({ url: server.url, socket: server.socketPath })}\n`);
process.once('SIGTERM', () => {
  void server.close().then(() => process.exit(0));
});
