// Sealing the guest file index of an encrypted chain's point (docs/formats/file-index.md, "Sealed
// form"): the clear index's gzip bytes are cut into frames of 1 MiB, each AES-256-GCM with a key
// derived from the chain's block key; the reader authenticates each frame before using a byte.
import { createCipheriv, createDecipheriv, randomBytes, timingSafeEqual } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { BulwarkError } from '../../common/errors.js';
import type { KdfParams } from '../../format/header.js';
import {
  decodeFrameHead,
  decodeSealedHeader,
  encodeFrameHead,
  encodeSealedHeader,
  FRAME_HEAD_SIZE,
  FRAME_LAST,
  frameAad,
  GCM_TAG_SIZE,
  SEALED_HEADER_SIZE,
} from '../../format/sealed-file-index.js';
import { FormatError } from '../../format/errors.js';
import { fileIndexKeyOf, keyCheckOf, type ChainKeys } from '../../repository/chain-keys.js';

export const SEAL_FRAME_SIZE = 1024 * 1024;

/** What sealing an index needs: the chain's KDF parameters and keys, and the point it belongs to. */
export interface IndexSeal {
  readonly kdf: KdfParams;
  readonly keys: ChainKeys;
  readonly pointId: string;
  /** Plain bytes per frame (default 1 MiB; tests use smaller ones). */
  readonly frameSize?: number;
}

/**
 * The keys for a sealed index with these KDF parameters, or undefined when no password for it is
 * known (the caller then reports the point as not searchable). `hint` names the password.
 */
export type IndexUnlock = (kdf: KdfParams) => Promise<ChainKeys | undefined>;

function sealFrame(key: Buffer, header: Buffer, pointId: string, n: number, plain: Buffer, last: boolean): Buffer[] {
  const flags = last ? FRAME_LAST : 0;
  const nonce = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', key, nonce);
  c.setAAD(frameAad(header, pointId, n, flags));
  const body = Buffer.concat([c.update(plain), c.final()]);
  return [encodeFrameHead({ length: body.length, flags, nonce }), body, c.getAuthTag()];
}

/** A pipeline stage: gzip bytes in, the sealed file's bytes out (header, frames, last frame). */
export function sealStage(seal: IndexSeal): (source: AsyncIterable<Buffer>) => AsyncGenerator<Buffer> {
  return async function* (source) {
    const key = fileIndexKeyOf(seal.keys);
    const frameSize = seal.frameSize ?? SEAL_FRAME_SIZE;
    const header = encodeSealedHeader({ kdf: seal.kdf, frameSize });
    yield header;
    let pending: Buffer[] = [];
    let size = 0;
    let n = 0;
    for await (const chunk of source) {
      pending.push(chunk);
      size += chunk.length;
      while (size >= frameSize) {
        const all = Buffer.concat(pending);
        yield Buffer.concat(sealFrame(key, header, seal.pointId, n++, all.subarray(0, frameSize), false));
        pending = [all.subarray(frameSize)];
        size = all.length - frameSize;
      }
    }
    yield Buffer.concat(sealFrame(key, header, seal.pointId, n, Buffer.concat(pending), true));
  };
}

function damaged(file: string, what: string, cause?: unknown): BulwarkError {
  return new BulwarkError(`the sealed file index ${file} is damaged: ${what}`, { kind: 'corrupt', context: { file }, cause });
}

async function readExactly(fh: FileHandle, length: number, position: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(b, got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return b.subarray(0, got);
}

/**
 * The plain (gzip) bytes of a sealed index, frame by frame, each authenticated before it is
 * yielded. Throws `unauthorized` when `unlock` knows no password (or the wrong one), `corrupt`
 * when the file is damaged or incomplete.
 */
export async function* unsealedBytes(fh: FileHandle, file: string, pointId: string, unlock: IndexUnlock | undefined): AsyncGenerator<Buffer> {
  const headerBytes = await readExactly(fh, SEALED_HEADER_SIZE, 0);
  let kdf: KdfParams;
  try {
    kdf = decodeSealedHeader(headerBytes).kdf;
  } catch (err) {
    throw damaged(file, err instanceof FormatError ? err.message : 'unreadable header', err);
  }
  const keys = unlock ? await unlock(kdf) : undefined;
  if (!keys) {
    throw new BulwarkError(`the file index ${file} is sealed (its chain is encrypted) and no password for it is known`, {
      kind: 'unauthorized',
      context: { file, point: pointId },
      hint: '`bulwark password add` makes the server remember the chain password',
    });
  }
  const check = keyCheckOf(keys.blockKey);
  if (check.length !== kdf.keyCheck.length || !timingSafeEqual(check, kdf.keyCheck)) {
    throw new BulwarkError(`wrong password for the sealed file index ${file}`, { kind: 'unauthorized', context: { file, point: pointId } });
  }
  const key = fileIndexKeyOf(keys);
  let pos = SEALED_HEADER_SIZE;
  for (let n = 0; ; n++) {
    const headBytes = await readExactly(fh, FRAME_HEAD_SIZE, pos);
    if (headBytes.length === 0) throw damaged(file, `incomplete: it ends after frame ${n - 1} without the last frame`);
    let head;
    try {
      head = decodeFrameHead(headBytes);
    } catch (err) {
      throw damaged(file, `${err instanceof Error ? err.message : String(err)} at offset ${pos}`, err);
    }
    const body = await readExactly(fh, head.length + GCM_TAG_SIZE, pos + FRAME_HEAD_SIZE);
    if (body.length !== head.length + GCM_TAG_SIZE) throw damaged(file, `frame ${n} at offset ${pos} is cut short`);
    const d = createDecipheriv('aes-256-gcm', key, head.nonce);
    d.setAAD(frameAad(headerBytes, pointId, n, head.flags));
    d.setAuthTag(body.subarray(head.length));
    let plain: Buffer;
    try {
      plain = Buffer.concat([d.update(body.subarray(0, head.length)), d.final()]);
    } catch (err) {
      throw damaged(file, `frame ${n} at offset ${pos} failed authentication (altered, moved, or from another point)`, err);
    }
    pos += FRAME_HEAD_SIZE + head.length + GCM_TAG_SIZE;
    if (plain.length > 0) yield plain;
    if (head.flags & FRAME_LAST) {
      if ((await readExactly(fh, 1, pos)).length !== 0) throw damaged(file, `bytes after the last frame at offset ${pos}`);
      return;
    }
  }
}
