// Entry of the `bulwark` program (bin/bulwark.js runs the compiled dist/cli/main.js).
import { processOutput } from './output.js';
import { runConsole } from './program.js';

const reconnectSeconds = Number(process.env.BULWARK_RECONNECT_SECONDS ?? 300);

const code = await runConsole(
  {
    output: processOutput,
    env: process.env,
    tty: Boolean(process.stderr.isTTY && process.stdout.isTTY),
    reconnectLimitMs: (Number.isFinite(reconnectSeconds) && reconnectSeconds >= 0 ? reconnectSeconds : 300) * 1000,
    exitCode: 0,
  },
  process.argv.slice(2),
);
process.exitCode = code;
