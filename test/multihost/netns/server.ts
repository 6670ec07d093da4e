// Child process of the multi-host test: the backup server in its own network namespace, with the
// dispatch timings the test needs (short agent-lost and resume windows). Prints one JSON line when
// it listens; SIGTERM closes it. BULWARK_TEST_CLOCK_FILE: the server's clock runs that many ms
// ahead of the real one (the file's number, re-read at each reading), so tests can move days on.
import { readFileSync } from 'node:fs';
import { startServer } from '../../../src/server/main.js';
import { systemClock } from '../../../src/server/scheduler/clock.js';

const clockFile = process.env.BULWARK_TEST_CLOCK_FILE;
const offset = (): number => {
  try {
    return Number(readFileSync(clockFile!, 'utf8')) || 0;
  } catch {
    return 0;
  }
};

const [dataDir = '', listen = ''] = process.argv.slice(2);
const server = await startServer({
  dataDir,
  listen,
  hostnames: [listen.split(':')[0]!],
  configBackupAt: false,
  defaultRepository: false,
  localAgent: false,
  print: () => undefined,
  ...(clockFile ? { clock: { now: () => new Date(Date.now() + offset()), setTimer: (ms: number, fn: () => void) => systemClock.setTimer(ms, fn) } } : {}),
  dispatch: {
    // A test that keeps an agent away longer (over a restart) sets BULWARK_TEST_AGENT_LOST_MS.
    agentLostMs: Number(process.env.BULWARK_TEST_AGENT_LOST_MS ?? 3000),
    // A loaded CI machine can take more than agentLostMs for a live agent to pick a task up ("agent
    // repo1 did not pick up the task within 3 s", seen once); a dead agent is refused as not
    // connected before anything is queued.
    pickupTimeoutMs: 8000,
    pollWaitMs: 2000,
    resumeWindowMs: 4000,
    // Tasks agents still hold after a server restart are adopted within this time, else stopped.
    adoptWindowMs: 6000,
  },
});
process.stdout.write(`${JSON.stringify({ url: server.url, socket: server.socketPath })}\n`);
process.once('SIGTERM', () => {
  void server.close().then(() => process.exit(0));
});
