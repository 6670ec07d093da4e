// Keys of an encrypted chain: scrypt(password, salt) gives a block key (AES-256-GCM) and a digest
// key (HMAC-SHA-256 of plain blocks, so stored digests reveal nothing without the password).
import { createCipheriv, createDecipheriv, createHmac, randomBytes, scrypt, timingSafeEqual } from 'node:crypto';
import { BulwarkError } from '../common/errors.js';
import type { KdfParams } from '../format/index.js';

export interface ChainKeys {
  readonly blockKey: Buffer;
  readonly digestKey: Buffer;
}

/** Defaults: scrypt N = 2^15, r = 8, p = 1 (~32 MiB, ~0.1 s). */
export const DEFAULT_SCRYPT = { log2N: 15, r: 8, p: 1 } as const;
const KEY_CHECK_LABEL = 'bulwark key check v1';

async function scryptAsync(password: string, salt: Buffer, log2N: number, r: number, p: number): Promise<Buffer> {
  const N = 2 ** log2N;
  return new Promise((resolve, reject) => {
    scrypt(password.normalize('NFC'), salt, 64, { N, r, p, maxmem: 256 * N * r + 32 * 1024 * 1024 }, (err, key) =>
      err ? reject(err) : resolve(key),
    );
  });
}

export function keyCheckOf(blockKey: Buffer): Buffer {
  return createHmac('sha256', blockKey).update(KEY_CHECK_LABEL).digest();
}

/** New KDF parameters (fresh salt) and the keys for a new encrypted chain. */
export async function newChainKeys(password: string, log2N: number = DEFAULT_SCRYPT.log2N): Promise<{ params: KdfParams; keys: ChainKeys }> {
  if (password.length === 0) throw new BulwarkError('the encryption password is empty', { kind: 'invalid' });
  const salt = randomBytes(32);
  const { r, p } = DEFAULT_SCRYPT;
  const key = await scryptAsync(password, salt, log2N, r, p);
  const keys = { blockKey: key.subarray(0, 32), digestKey: key.subarray(32, 64) };
  return { params: { log2N, r, p, salt, keyCheck: keyCheckOf(keys.blockKey) }, keys };
}

/**
 * Derives the keys of an existing chain and checks them against the stored key check. A wrong
 * password is an `unauthorized` error that says so (never reported as damage).
 */
export async function unlockChain(password: string | undefined, params: KdfParams, what: Record<string, string>, hint?: string): Promise<ChainKeys> {
  if (password === undefined) {
    throw new BulwarkError('this backup chain is encrypted: a password is needed', {
      kind: 'unauthorized',
      context: what,
      hint: hint ? `password hint: ${hint}` : 'pass the chain password',
    });
  }
  const key = await scryptAsync(password, params.salt, params.log2N, params.r, params.p);
  const keys = { blockKey: key.subarray(0, 32), digestKey: key.subarray(32, 64) };
  const check = keyCheckOf(keys.blockKey);
  if (check.length !== params.keyCheck.length || !timingSafeEqual(check, params.keyCheck)) {
    throw new BulwarkError('wrong password for this encrypted backup chain', {
      kind: 'unauthorized',
      context: what,
      hint: hint ? `password hint: ${hint}` : undefined,
    });
  }
  return keys;
}

/** VM configuration in stored form: plain, or nonce || AES-256-GCM ciphertext || tag. */
export function sealConfig(config: Buffer, keys: ChainKeys | null, aad: Buffer): Buffer {
  if (!keys) return config;
  const nonce = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', keys.blockKey, nonce);
  c.setAAD(aad);
  return Buffer.concat([nonce, c.update(config), c.final(), c.getAuthTag()]);
}

export function openConfig(stored: Buffer, keys: ChainKeys | null, aad: Buffer): Buffer {
  if (!keys) return stored;
  if (stored.length < 28) throw new Error('stored VM configuration too short');
  const d = createDecipheriv('aes-256-gcm', keys.blockKey, stored.subarray(0, 12));
  d.setAAD(aad);
  d.setAuthTag(stored.subarray(stored.length - 16));
  try {
    return Buffer.concat([d.update(stored.subarray(12, stored.length - 16)), d.final()]);
  } catch {
    throw new Error('VM configuration failed authentication (data altered)');
  }
}

const FILE_INDEX_KEY_LABEL = 'bulwark file index key v1';

/**
 * Key that seals the guest file index of the chain's points (docs/formats/file-index.md, "Sealed
 * form"): derived from the block key, so index frames never share a key or nonce space with blocks.
 */
export function fileIndexKeyOf(keys: ChainKeys): Buffer {
  return createHmac('sha256', keys.blockKey).update(FILE_INDEX_KEY_LABEL).digest();
}
