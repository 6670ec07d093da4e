// The remote server saved by `bulwark login`: URL, the CA the user trusted, and the session
// token. Kept in `<config dir>/credentials.json`, mode 0600, written atomically.
import { chmod, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { BulwarkError } from '../common/errors.js';

export interface SavedLogin {
  /** Origin of the server, e.g. "https://backup.example:9392". */
  url: string;
  /** PEM of the server's CA, trusted at login. */
  caPem: string;
  /** SHA-256 fingerprint of that CA ("AB:CD:…"), as shown at login. */
  caFingerprint: string;
  token: string;
  expiresAt?: string;
  user: string;
  role?: string;
}

export async function loadLogin(path: string): Promise<SavedLogin | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new BulwarkError(`cannot read the saved login ${path}`, { cause: err, kind: 'internal' });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new BulwarkError(`the saved login ${path} is not valid JSON`, {
      cause: err,
      kind: 'corrupt',
      hint: 'run `bulwark logout` and `bulwark login URL` again',
    });
  }
  const p = parsed as Partial<SavedLogin>;
  if (typeof p.url !== 'string' || typeof p.token !== 'string' || typeof p.caPem !== 'string') {
    throw new BulwarkError(`the saved login ${path} lacks url, token or caPem`, {
      kind: 'corrupt',
      hint: 'run `bulwark logout` and `bulwark login URL` again',
    });
  }
  return parsed as SavedLogin;
}

export async function saveLogin(path: string, login: SavedLogin): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const tmp = `${path}.${process.pid}.tmp`;
  try {
    await writeFile(tmp, JSON.stringify(login, null, 2) + '\n', { mode: 0o600 });
    await chmod(tmp, 0o600); // the umask may have widened nothing, but an existing file keeps its mode
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw new BulwarkError(`cannot save the login to ${path}`, { cause: err });
  }
}

/** Removes the saved login; true when there was one. */
export async function forgetLogin(path: string): Promise<boolean> {
  try {
    await rm(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw new BulwarkError(`cannot remove the saved login ${path}`, { cause: err });
  }
}
