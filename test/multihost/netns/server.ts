// Child process of the multi-host test: the backup server in its own network namespace, with the
// dispatch timings the test needs (short agent-lost and resume windows). Prints one JSON line when
// it listens; SIGTERM closes it.
import { startServer } from '../../../src/server/main.js';

const [dataDir = '', listen = ''] = process.argv.slice(2);
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
  },
});
process.stdout.write(`${JSON.stringify({ url: server.url, socket: server.socketPath })}\n`);
process.once('SIGTERM', () => {
  void server.close().then(() => process.exit(0));
});
