// Read-modify-write of a VM folder's .vbm under its writer lock (each write is atomic: temp,
// fsync, rename, fsync dir), and the small helpers the transforms share.
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import { encodeChainMetadata, type ChainMetadata, type ChainRecord } from '../../format/index.js';
import { fsyncDirectory, writeFileAtomic } from '../../storage/local-fs.js';
import type { VmFolder } from '../folders.js';
import { readChainMetadata } from '../repository.js';

export async function readBody(f: VmFolder): Promise<ChainMetadata> {
  const meta = await readChainMetadata(f.vbmPath);
  if (!meta) throw new BulwarkError(`no chain metadata in ${f.dir}`, { kind: 'not-found', context: { folder: f.dir } });
  return meta.body;
}

/** Re-reads the .vbm, applies `fn`, writes generation + 1. Returns the new body. */
export async function updateBody(f: VmFolder, fn: (body: ChainMetadata) => ChainMetadata): Promise<ChainMetadata> {
  const meta = await readChainMetadata(f.vbmPath);
  if (!meta) throw new BulwarkError(`no chain metadata in ${f.dir}`, { kind: 'not-found', context: { folder: f.dir } });
  const body = fn(meta.body);
  await writeFileAtomic(f.vbmPath, encodeChainMetadata(meta.generation + 1, body));
  return body;
}

export function findChain(body: ChainMetadata, chainId: string, f: VmFolder): ChainRecord {
  const c = body.chains.find((x) => x.id === chainId);
  if (!c) throw new BulwarkError(`chain ${chainId} is not in ${f.vbmPath}`, { kind: 'not-found', context: { chain: chainId, file: f.vbmPath } });
  return c;
}

export function replaceChain(body: ChainMetadata, chain: ChainRecord): ChainMetadata {
  return { ...body, chains: body.chains.map((c) => (c.id === chain.id ? chain : c)) };
}

/** Removes files of the folder (names or absolute paths) and fsyncs the folder. */
export async function removeFiles(f: VmFolder, names: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  for (const n of names) {
    const p = path.isAbsolute(n) ? n : path.join(f.dir, n);
    await rm(p, { force: true });
    out.push(p);
  }
  if (names.length > 0) await fsyncDirectory(f.dir);
  return out;
}
