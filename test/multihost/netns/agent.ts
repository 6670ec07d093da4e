// Child process of the multi-host test: an agent (`bulwark agent`) in its own network namespace.
// Enrolls with the token on first start, then takes tasks; prints one JSON line when running.
import { runAgent } from '../../../src/agent/main.js';

const [dataDir = '', server = '', token = '', name = '', dataListen = ''] = process.argv.slice(2);
const agent = await runAgent({
  dataDir,
  serverUrl: server,
  ...(token !== '-' ? { enrollToken: token } : {}),
  name,
  dataListen,
  resumeWindowMs: 4000,
  heartbeatIntervalMs: 2000,
});
process.stdout.write(`${JSON.stringify({ name: agent.name, pid: process.pid })}\n`);
process.once('SIGTERM', () => {
  void agent.close().then(() => process.exit(0));
});
