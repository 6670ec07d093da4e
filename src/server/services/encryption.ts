// Encryption passwords the server manages (docs/encryption.md): a job's active password (its
// scheduled backups and the restores of its points need nobody to type it), passwords added by
// hand (for imported repositories), and which encrypted chains each one opens. Passwords are kept
// sealed with AES-256-GCM under the server key in `<data>/secret.key` (mode 0600,
// docs/formats/server-secret-key.md); the database never holds one in clear text.
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { chmod, link, open, readFile, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { openSharedRepository, type Repository } from '../../repository/index.js';
import { dataFiles } from '../data-dir.js';
import { newId, notFound, nowIso, type ServiceContext } from './common.js';

const log = logger('encryption-keys');

const KEY_FILE_MAGIC = 'bulwark-secret-key-v1';
const SEAL_PREFIX = 'v1:';
/** Passwords the server keeps must be at least this long (a restore may give any). */
export const MIN_PASSWORD_LENGTH = 8;

/** A password the server knows, as the API shows it (never the password itself). */
export interface EncryptionKeyInfo {
  readonly id: string;
  readonly hint: string;
  /** The job it was set for (null: added by hand, or the job was deleted). */
  readonly job: string | null;
  /** The job's current password (new chains of the job are encrypted with it). */
  readonly active: boolean;
  readonly createdAt: string;
  readonly retiredAt: string | null;
  /** Encrypted chains in the catalog it opens. */
  readonly chains: number;
}

export interface JobEncryption {
  readonly job: string;
  readonly encrypted: boolean;
  readonly hint: string | null;
  readonly keyId: string | null;
  readonly since: string | null;
}

/** What `unlock` needs to know of a restore point (the catalog's RestorePoint has it). */
export interface PointRef {
  readonly id: string;
  /** The job's name, or null (an export, a point of a deleted job). */
  readonly job: string | null;
  readonly chainId: string;
}

/** Reads `<data>/secret.key`, creating it (32 random bytes, mode 0600) on the first start. */
export async function loadServerKey(dataDir: string): Promise<Buffer> {
  const file = path.join(dataDir, dataFiles.secretKey);
  let text: string | undefined;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new BulwarkError(`cannot read the server key ${file}`, { kind: 'unavailable', context: { file }, cause: err });
  }
  if (text === undefined) {
    const key = randomBytes(32);
    const tmp = `${file}.tmp-${process.pid}`;
    await rm(tmp, { force: true }); // a crashed start's leftover
    const fh = await open(tmp, 'wx', 0o600);
    try {
      await fh.writeFile(`${KEY_FILE_MAGIC}\n${key.toString('base64')}\n`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    try {
      // link(): never replaces a key another server process published meanwhile (EEXIST: use theirs).
      await link(tmp, file);
      log.info({ file }, 'server key for encryption passwords created');
      return key;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw new BulwarkError(`cannot create the server key ${file}`, { kind: 'unavailable', context: { file }, cause: err });
      return loadServerKey(dataDir);
    } finally {
      await rm(tmp, { force: true });
    }
  }
  const [magic, b64] = text.split('\n');
  const key = Buffer.from(b64 ?? '', 'base64');
  if (magic !== KEY_FILE_MAGIC || key.length !== 32) {
    throw new BulwarkError(`the server key ${file} is damaged`, {
      kind: 'corrupt',
      context: { file },
      hint: 'restore it from your backup of the data directory: without it the server cannot use the encryption passwords it keeps',
    });
  }
  const st = await stat(file);
  if ((st.mode & 0o077) !== 0) {
    await chmod(file, 0o600);
    log.warn({ file, mode: (st.mode & 0o777).toString(8) }, 'the server key was readable by others: permissions set to 0600');
  }
  return key;
}

function aadOf(id: string): Buffer {
  return Buffer.from(`bulwark sealed password v1 ${id}`, 'utf8');
}

export function sealPassword(key: Buffer, id: string, password: string): string {
  const nonce = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', key, nonce);
  c.setAAD(aadOf(id));
  const ct = Buffer.concat([c.update(password, 'utf8'), c.final()]);
  return SEAL_PREFIX + Buffer.concat([nonce, ct, c.getAuthTag()]).toString('base64');
}

export function unsealPassword(key: Buffer, id: string, sealed: string): string {
  const raw = sealed.startsWith(SEAL_PREFIX) ? Buffer.from(sealed.slice(SEAL_PREFIX.length), 'base64') : Buffer.alloc(0);
  if (raw.length < 28) throw new BulwarkError(`encryption key ${id}: its sealed password is damaged`, { kind: 'corrupt', context: { key: id } });
  const d = createDecipheriv('aes-256-gcm', key, raw.subarray(0, 12));
  d.setAAD(aadOf(id));
  d.setAuthTag(raw.subarray(raw.length - 16));
  try {
    return Buffer.concat([d.update(raw.subarray(12, raw.length - 16)), d.final()]).toString('utf8');
  } catch (cause) {
    throw new BulwarkError(`encryption key ${id}: its password cannot be unsealed with this server's key`, {
      kind: 'corrupt',
      context: { key: id },
      cause,
      hint: `was ${dataFiles.secretKey} of the data directory replaced? Put the original back, or give the password when restoring`,
    });
  }
}

function checkPassword(password: string): void {
  if (password.length < MIN_PASSWORD_LENGTH) {
    throw new BulwarkError(`password: at least ${MIN_PASSWORD_LENGTH} characters`, { kind: 'invalid', context: { field: 'password' } });
  }
}

function isUnauthorized(err: unknown): boolean {
  return err instanceof BulwarkError && err.kind === 'unauthorized';
}

function hintText(hint: string | null | undefined): string {
  return hint ? `hint: ${hint}` : 'no hint was set';
}

/**
 * The error of a wrong password: never reported as damage. `forbidden` (HTTP 403, field
 * `password`): the request is well formed, the credential does not open the point; not 401, which
 * clients read as "log in again".
 */
export function wrongPassword(pointId: string, hint: string | null | undefined): BulwarkError {
  return new BulwarkError(`wrong password for restore point ${pointId} (${hintText(hint)})`, {
    kind: 'forbidden',
    context: { field: 'password', point: pointId },
    hint: 'give the password this chain was encrypted with',
  });
}

/** The error of an encrypted point whose password the server does not know and none was given. */
export function passwordNeeded(pointId: string, hint: string | null | undefined): BulwarkError {
  return new BulwarkError(`restore point ${pointId} is encrypted and this server does not know its password (${hintText(hint)})`, {
    kind: 'forbidden',
    context: { field: 'password', point: pointId },
    hint: 'give it with --password-file FILE (or at the prompt); `bulwark password add` makes the server remember it',
  });
}

/** The server's encryption passwords; one per server process (main.ts). */
export class EncryptionKeys {
  readonly #ctx: ServiceContext;
  readonly #key: Buffer;

  constructor(ctx: ServiceContext, serverKey: Buffer) {
    this.#ctx = ctx;
    this.#key = serverKey;
  }

  static async open(ctx: ServiceContext, dataDir: string): Promise<EncryptionKeys> {
    return new EncryptionKeys(ctx, await loadServerKey(dataDir));
  }

  async #jobRow(name: string): Promise<{ id: string; name: string }> {
    const r =
      (await this.#ctx.db.selectFrom('jobs').select(['id', 'name']).where('name', '=', name).executeTakeFirst()) ??
      (await this.#ctx.db.selectFrom('jobs').select(['id', 'name']).where('id', '=', name).executeTakeFirst());
    if (!r) throw notFound('job', name);
    return r;
  }

  async #insert(password: string, hint: string, jobId: string | null): Promise<string> {
    const id = newId();
    await this.#ctx.db
      .insertInto('encryption_keys')
      .values({ id, job_id: jobId, hint, sealed_password: sealPassword(this.#key, id, password), created_at: nowIso(this.#ctx), retired_at: null })
      .execute();
    return id;
  }

  /**
   * Turns encryption on for a job (or changes its password): the job's next full starts an
   * encrypted chain; the old password is kept (retired) to open the job's older chains.
   */
  async setJobPassword(jobName: string, password: string, hint: string): Promise<JobEncryption> {
    checkPassword(password);
    const job = await this.#jobRow(jobName);
    await this.#retireJobKeys(job.id);
    await this.#insert(password, hint, job.id);
    return this.jobEncryption(job.name);
  }

  /** Turns encryption off for a job's new chains; its passwords stay to open its older ones. */
  async clearJobPassword(jobName: string): Promise<JobEncryption> {
    const job = await this.#jobRow(jobName);
    await this.#retireJobKeys(job.id);
    return this.jobEncryption(job.name);
  }

  async #retireJobKeys(jobId: string): Promise<void> {
    await this.#ctx.db.updateTable('encryption_keys').set({ retired_at: nowIso(this.#ctx) }).where('job_id', '=', jobId).where('retired_at', 'is', null).execute();
  }

  async #activeRow(jobId: string) {
    return this.#ctx.db.selectFrom('encryption_keys').selectAll().where('job_id', '=', jobId).where('retired_at', 'is', null).orderBy('created_at', 'desc').executeTakeFirst();
  }

  async jobEncryption(jobName: string): Promise<JobEncryption> {
    const job = await this.#jobRow(jobName);
    const k = await this.#activeRow(job.id);
    return { job: job.name, encrypted: k !== undefined, hint: k?.hint ?? null, keyId: k?.id ?? null, since: k?.created_at ?? null };
  }

  /** The executors' `password(job)`: the job's active password, if encryption is on. */
  async jobPassword(jobId: string): Promise<string | undefined> {
    const k = await this.#activeRow(jobId);
    return k ? unsealPassword(this.#key, k.id, k.sealed_password) : undefined;
  }

  /**
   * The executors' `passwords(job)`: every password that may open the job's existing chains —
   * the job's active one, its earlier (retired) ones newest first, then those added by hand. A
   * chain keeps the password it was created with until the job's next full (docs/encryption.md),
   * so its increments need the one that opens it, which the executor picks by the chain's key check.
   */
  async jobPasswords(jobId: string): Promise<string[]> {
    const rows = await this.#ctx.db
      .selectFrom('encryption_keys')
      .selectAll()
      .where((eb) => eb.or([eb('job_id', '=', jobId), eb('job_id', 'is', null)]))
      .orderBy('created_at', 'desc')
      .execute();
    const rank = (r: (typeof rows)[number]): number => (r.job_id === jobId ? (r.retired_at === null ? 0 : 1) : 2);
    const out: string[] = [];
    for (const r of [...rows].sort((a, b) => rank(a) - rank(b))) {
      try {
        out.push(unsealPassword(this.#key, r.id, r.sealed_password));
      } catch (err) {
        log.warn({ key: r.id, err: err instanceof Error ? err.message : String(err) }, 'skipping a password this server cannot unseal');
      }
    }
    return out;
  }

  async jobHint(jobId: string): Promise<string | undefined> {
    return (await this.#activeRow(jobId))?.hint;
  }

  /** `password add`: a password the server tries on encrypted points it has no password for. */
  async add(password: string, hint: string): Promise<EncryptionKeyInfo> {
    checkPassword(password);
    const id = await this.#insert(password, hint, null);
    return this.get(id);
  }

  async list(): Promise<EncryptionKeyInfo[]> {
    const rows = await this.#ctx.db
      .selectFrom('encryption_keys as k')
      .leftJoin('jobs as j', 'j.id', 'k.job_id')
      .select(['k.id', 'k.hint', 'k.job_id', 'k.created_at', 'k.retired_at', 'j.name as job_name'])
      .orderBy('k.created_at')
      .execute();
    const counts = await this.#ctx.db.selectFrom('encrypted_chains').select(['key_id']).select((eb) => eb.fn.countAll<number>().as('n')).groupBy('key_id').execute();
    const byKey = new Map(counts.map((c) => [c.key_id, Number(c.n)]));
    return rows.map((r) => ({
      id: r.id,
      hint: r.hint,
      job: r.job_name ?? null,
      active: r.job_id !== null && r.job_name !== null && r.retired_at === null,
      createdAt: r.created_at,
      retiredAt: r.retired_at,
      chains: byKey.get(r.id) ?? 0,
    }));
  }

  async get(id: string): Promise<EncryptionKeyInfo> {
    const k = (await this.list()).find((x) => x.id === id);
    if (!k) throw notFound('encryption key', id);
    return k;
  }

  /**
   * `password remove`: forgets a password. Refused while it is a job's active password, and while
   * chains in the catalog need it unless `force` (their points then need the password typed).
   */
  async remove(id: string, force = false): Promise<void> {
    const k = await this.get(id);
    if (k.active) {
      throw new BulwarkError(`encryption key ${id} is the active password of job ${k.job}`, {
        kind: 'conflict',
        context: { key: id },
        hint: `turn encryption off or change the password of job ${k.job} first (bulwark job edit ${k.job} --no-encrypt)`,
      });
    }
    if (k.chains > 0 && !force) {
      throw new BulwarkError(`encryption key ${id} opens ${k.chains} encrypted chain(s) in the catalog`, {
        kind: 'conflict',
        context: { key: id },
        hint: 'their restore points would then need the password typed at every restore; repeat with --force to remove it anyway',
      });
    }
    await this.#ctx.db.updateTable('encrypted_chains').set({ key_id: null }).where('key_id', '=', id).execute();
    await this.#ctx.db.deleteFrom('encryption_keys').where('id', '=', id).execute();
  }

  /** Records an encrypted chain (after a backup, a rescan, an export), with the key that opens it if known. */
  async recordChain(chainId: string, hint: string, keyId: string | null): Promise<void> {
    const existing = await this.#ctx.db.selectFrom('encrypted_chains').selectAll().where('chain_id', '=', chainId).executeTakeFirst();
    if (!existing) {
      await this.#ctx.db.insertInto('encrypted_chains').values({ chain_id: chainId, hint, key_id: keyId, recorded_at: nowIso(this.#ctx) }).execute();
    } else if (keyId !== null || (hint !== '' && existing.hint === '')) {
      await this.#ctx.db
        .updateTable('encrypted_chains')
        .set({ ...(keyId !== null ? { key_id: keyId } : {}), ...(hint !== '' && existing.hint === '' ? { hint } : {}) })
        .where('chain_id', '=', chainId)
        .execute();
    }
  }

  /**
   * Records a chain written by a job's backup. A new chain was created with the job's active
   * password (its full); a chain already recorded keeps the key it has — after a password change
   * its increments are still written with the chain's own password, not the active one.
   */
  async recordJobChain(jobId: string, chainId: string, hint: string | null): Promise<void> {
    const existing = await this.#ctx.db.selectFrom('encrypted_chains').select('chain_id').where('chain_id', '=', chainId).executeTakeFirst();
    if (existing) return;
    const k = await this.#activeRow(jobId);
    await this.recordChain(chainId, hint ?? k?.hint ?? '', k?.id ?? null);
  }

  /**
   * Tries the known passwords on the encrypted chains of the catalog whose password is not known
   * yet (after `password add`, after a rescan), in repositories of this server's host; a match is
   * remembered. Returns how many chains became known.
   */
  async matchUnknownChains(): Promise<number> {
    const rows = await this.#ctx.db
      .selectFrom('encrypted_chains as c')
      .innerJoin('restore_points as p', 'p.chain_id', 'c.chain_id')
      .innerJoin('repositories as r', 'r.id', 'p.repository_id')
      .leftJoin('jobs as j', 'j.id', 'p.job_id')
      .leftJoin('agents as a', 'a.id', 'r.agent_id')
      .select(['c.chain_id', 'p.id as point_id', 'r.path', 'a.name as agent', 'j.name as job_name'])
      .where('c.key_id', 'is', null)
      .execute();
    const seen = new Set<string>();
    let matched = 0;
    for (const r of rows) {
      if (seen.has(r.chain_id) || (r.agent !== null && r.agent !== 'local')) continue;
      seen.add(r.chain_id);
      try {
        await this.unlock(await openSharedRepository(r.path), { id: r.point_id, job: r.job_name ?? null, chainId: r.chain_id });
        matched++;
      } catch (err) {
        if (!(err instanceof BulwarkError && err.kind === 'forbidden')) log.warn({ chain: r.chain_id, err: err instanceof Error ? err.message : String(err) }, 'could not try the known passwords on a chain');
      }
    }
    return matched;
  }

  /** The hint the catalog knows for a chain ('' when none). */
  async chainHint(chainId: string): Promise<string> {
    return (await this.#ctx.db.selectFrom('encrypted_chains').select('hint').where('chain_id', '=', chainId).executeTakeFirst())?.hint ?? '';
  }

  /**
   * For a repository on another agent's host (the server cannot open it to check): the given
   * password, else the one the server knows for the point's chain, else its job's active one.
   */
  async remotePassword(point: PointRef, given?: string): Promise<string | undefined> {
    if (given !== undefined) return given;
    const known = await this.#ctx.db.selectFrom('encrypted_chains').select('key_id').where('chain_id', '=', point.chainId).executeTakeFirst();
    const row = known?.key_id ? await this.#ctx.db.selectFrom('encryption_keys').selectAll().where('id', '=', known.key_id).executeTakeFirst() : undefined;
    if (row) return unsealPassword(this.#key, row.id, row.sealed_password);
    if (point.job === null) return undefined;
    const job = await this.#ctx.db.selectFrom('jobs').select('id').where('name', '=', point.job).executeTakeFirst();
    return job ? this.jobPassword(job.id) : undefined;
  }

  /**
   * The password to open a restore point with: none for a plain point; `given` (checked: a wrong
   * one is `wrongPassword`); else the server's password for its chain, trying the chain's known
   * key, then the job's passwords, then every other (the match is remembered). Throws
   * `passwordNeeded` when none opens it.
   */
  async unlock(repository: Repository, point: PointRef, given?: string): Promise<string | undefined> {
    // By the catalog's chain id: a VM's part of a single-file point has an id of its own.
    const chain = (await repository.listChains()).find((c) => c.id === point.chainId) ?? (await repository.findRestorePoint(point.id)).chain;
    if (!chain.encrypted) return undefined;
    const known = await this.#ctx.db.selectFrom('encrypted_chains').selectAll().where('chain_id', '=', chain.id).executeTakeFirst();
    const hint = chain.passwordHint || known?.hint || null;
    const opens = async (password: string): Promise<boolean> => {
      try {
        const p = await repository.openRestorePoint(point.id, { password });
        await p.close();
        return true;
      } catch (err) {
        if (isUnauthorized(err)) return false;
        throw err;
      }
    };
    if (given !== undefined) {
      if (!(await opens(given))) throw wrongPassword(point.id, hint);
      return given;
    }
    const rows = await this.#ctx.db.selectFrom('encryption_keys').selectAll().orderBy('created_at', 'desc').execute();
    const jobId = point.job === null ? null : ((await this.#ctx.db.selectFrom('jobs').select('id').where('name', '=', point.job).executeTakeFirst())?.id ?? null);
    const rank = (r: (typeof rows)[number]): number => (r.id === known?.key_id ? 0 : jobId !== null && r.job_id === jobId ? (r.retired_at === null ? 1 : 2) : r.job_id === null ? 3 : 4);
    for (const r of [...rows].sort((a, b) => rank(a) - rank(b))) {
      let password: string;
      try {
        password = unsealPassword(this.#key, r.id, r.sealed_password);
      } catch (err) {
        // A configuration restored from another server: its passwords need that server's key.
        log.warn({ key: r.id, err: err instanceof Error ? err.message : String(err) }, 'skipping a password this server cannot unseal');
        continue;
      }
      if (await opens(password)) {
        if (known?.key_id !== r.id) await this.recordChain(chain.id, hint ?? '', r.id);
        return password;
      }
    }
    if (!known) await this.recordChain(chain.id, hint ?? '', null);
    throw passwordNeeded(point.id, hint);
  }
}

/**
 * The password option for opening a restore point in a restore path: `{}` for a plain point,
 * else `{ password }` (the given one, checked, or the server's). Without a key store (tests that
 * build a plugin alone) the given password passes unchecked.
 */
export async function pointPassword(keys: EncryptionKeys | undefined, repository: Repository, point: PointRef, given?: string): Promise<{ password?: string }> {
  if (!keys) return given === undefined ? {} : { password: given };
  const password = await keys.unlock(repository, point, given);
  return password === undefined ? {} : { password };
}
