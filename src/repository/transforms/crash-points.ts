// Fault injection for the transform kill tests: with BULWARK_TEST_CRASH_AT=N in the environment,
// the Nth crash point this process passes kills it with SIGKILL (as a power cut would, with no
// cleanup). Without the variable every call is a no-op counter increment.
const at = Number(process.env.BULWARK_TEST_CRASH_AT ?? '0');
let passed = 0;

/** Marks a point between two durable steps of a transform. */
export function crashPoint(_step: string): void {
  if (at <= 0) return;
  passed++;
  if (passed === at) process.kill(process.pid, 'SIGKILL');
}
