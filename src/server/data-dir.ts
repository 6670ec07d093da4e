// Where a Bulwark server (and the local console) keeps its state: `--data DIR`, else
// $BULWARK_DATA, else /var/lib/bulwark for root, else ~/.local/share/bulwark.
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

export interface DataDirSources {
  /** The `--data` option, if given. */
  flag?: string | undefined;
  env?: NodeJS.ProcessEnv;
  uid?: number;
  home?: string;
}

/** Resolves the data directory (absolute) from the flag, the environment and the user. */
export function resolveDataDir(sources: DataDirSources = {}): string {
  const env = sources.env ?? process.env;
  if (sources.flag) return resolve(sources.flag);
  if (env.BULWARK_DATA) return resolve(env.BULWARK_DATA);
  const uid = sources.uid ?? process.getuid?.() ?? -1;
  if (uid === 0) return '/var/lib/bulwark';
  return join(sources.home ?? env.HOME ?? homedir(), '.local', 'share', 'bulwark');
}

/** Files inside the data directory. */
export const dataFiles = {
  database: 'bulwark.db',
  socket: 'bulwark.sock',
  initialAdminPassword: 'initial-admin-password',
  pkiDir: 'pki',
  /** Seals the encryption passwords the server keeps (docs/formats/server-secret-key.md). */
  secretKey: 'secret.key',
} as const;
