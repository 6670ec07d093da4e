// The one-host install's agent: runs inside the server process and joins through the same
// enrollment and heartbeat link as any other agent, so nothing in the server special-cases it.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { agentFiles, runAgent, type RunAgentOptions, type RunningAgent } from './main.js';

/** Whether `<dataDir>/agent/` holds an enrolled identity. */
export function isAgentEnrolled(dataDir: string): boolean {
  return existsSync(path.join(dataDir, 'agent', agentFiles.state));
}

/**
 * Starts the local agent (default name `local`). On the first start it asks `createToken` for a
 * one-time token (the server calls `createEnrollmentToken(store, pki, { name })`) and enrolls
 * with it; later starts reuse `<dataDir>/agent/`.
 */
export async function runLocalAgent(
  opts: Omit<RunAgentOptions, 'enrollToken'> & { serverUrl: string; createToken: (name: string) => Promise<string> },
): Promise<RunningAgent> {
  const name = opts.name ?? 'local';
  const { createToken, ...rest } = opts;
  const enrollToken = isAgentEnrolled(opts.dataDir) ? undefined : await createToken(name);
  return runAgent({ ...rest, name, enrollToken });
}
