// Where the console finds things: the data directory (whose unix socket reaches the local
// server) and the console's own configuration directory (credentials saved by `bulwark login`).
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { resolveDataDir } from '../server/data-dir.js';

export type Env = Readonly<Record<string, string | undefined>>;

/**
 * `--data DIR`, else $BULWARK_DATA, else /var/lib/bulwark (root) or ~/.local/share/bulwark:
 * the server's own rule, so console and server always meet at the same socket.
 */
export function dataDirectory(flag: string | undefined, env: Env = process.env): string {
  return resolveDataDir({ flag, env });
}

/** $BULWARK_CONFIG, else ~/.config/bulwark. */
export function configDirectory(env: Env = process.env): string {
  if (env.BULWARK_CONFIG) return resolve(env.BULWARK_CONFIG);
  return join(env.XDG_CONFIG_HOME || join(homedir(), '.config'), 'bulwark');
}

export const socketPath = (dataDir: string): string => join(dataDir, 'bulwark.sock');
export const caPath = (dataDir: string): string => join(dataDir, 'pki', 'ca.crt');
export const credentialsPath = (configDir: string): string => join(configDir, 'credentials.json');
