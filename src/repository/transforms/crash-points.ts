// Fault injection for the transform kill tests: with BULWARK_TEST_CRASH_AT=N in the environment,
// the Nth crash point this process passes kills it with SIGKILL (as a power cut would, with no
// cleanup). Without the variable every call is a no-op counter increment.
import { writeSync } from 'node:fs';

const at = Number(process.env.BULWARK_TEST_CRASH_AT ?? '0');
let passed = 0;

/** Marks a point between two durable steps of a transform. */
export function crashPoint(step: string): void {
  if (at <= 0) return;
  passed++;
  if (passed === at) {
    writeSync(2, `BULWARK_CRASH ${step}\n`);
    process.kill(process.pid, 'SIGKILL');
  }
}
