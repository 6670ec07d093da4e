// Finishing or undoing a transform a crash interrupted (docs/formats/backup-files.md section 5),
// driven by the journal in the .vbm. Runs under the VM folder's writer lock before anything else
// touches the folder: when a writer starts, when a transform starts, and on openRepository.
import path from 'node:path';
import { open } from 'node:fs/promises';
import { describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { COMMIT_SLOT_OFFSETS, COMMIT_SLOT_SIZE, decodeCommitSlot, HEADER_PAGE_SIZE, type CommitSlot, type TransformJournal } from '../../format/index.js';
import type { VmFolder } from '../folders.js';
import { readChainMetadata } from '../repository.js';
import { commitInjection, commitMerge } from './inplace.js';
import { removeFiles, updateBody } from './metadata.js';

const log = logger('repository');

/** The valid commit slot with the highest generation of a file, or null (missing, damaged). */
export async function highestSlot(file: string): Promise<CommitSlot | null> {
  let fh;
  try {
    fh = await open(file, 'r');
  } catch {
    return null;
  }
  try {
    const size = (await fh.stat()).size;
    const page = Buffer.alloc(HEADER_PAGE_SIZE);
    const { bytesRead } = await fh.read(page, 0, HEADER_PAGE_SIZE, 0);
    if (bytesRead < HEADER_PAGE_SIZE) return null;
    let best: CommitSlot | null = null;
    for (const o of COMMIT_SLOT_OFFSETS) {
      try {
        const s = decodeCommitSlot(page.subarray(o, o + COMMIT_SLOT_SIZE), size);
        if (s && (!best || s.generation > best.generation)) best = s;
      } catch {
        // a damaged slot: the other one decides
      }
    }
    return best;
  } finally {
    await fh.close();
  }
}

/** Finishes or undoes the journaled transform of a folder, if any. Returns what it did. */
export async function recoverFolder(f: VmFolder): Promise<string | null> {
  let meta;
  try {
    meta = await readChainMetadata(f.vbmPath);
  } catch {
    return null; // damaged .vbm: verify reports it; nothing can be decided here
  }
  const j = meta?.body.journal;
  if (!meta || !j) return null;
  const chain = meta.body.chains.find((c) => c.points.some((p) => p.id === j.points[0]));
  try {
    const outcome = await recover(f, j, chain?.id ?? null);
    log.info({ folder: f.dir, transform: j.kind, outcome }, 'recovered an interrupted transform');
    return outcome;
  } catch (err) {
    log.error({ folder: f.dir, transform: j.kind, err: describeError(err) }, 'cannot recover an interrupted transform');
    throw err;
  }
}

async function recover(f: VmFolder, j: TransformJournal, chainId: string | null): Promise<string> {
  const target = j.files[0];
  const flipped = async () => {
    if (!target) return null;
    const s = await highestSlot(path.join(f.dir, target.name));
    return s && s.generation > target.generationBefore ? s : null;
  };
  switch (j.kind) {
    case 'merge': {
      const s = await flipped();
      if (s && chainId) {
        await commitMerge(f, chainId, j.points[0]!, j.points[1]!, s.generation, s.fileLength);
        return 'merge rolled forward';
      }
      await updateBody(f, (b) => ({ ...b, journal: null }));
      return 'merge rolled back';
    }
    case 'reverse-inject': {
      const s = await flipped();
      const vrb = j.files[1]?.name;
      if (s && chainId && vrb && j.newPoint) {
        await commitInjection(f, chainId, j.points[0]!, j.newPoint, vrb, s.generation, s.fileLength, undefined);
        return 'reverse injection rolled forward';
      }
      await updateBody(f, (b) => ({ ...b, journal: null }));
      if (vrb) await removeFiles(f, [vrb]);
      return 'reverse injection rolled back';
    }
    case 'synthetic-full':
    case 'compact':
      // Not journaled by this version (atomic by rename); an old journal is just dropped.
      await updateBody(f, (b) => ({ ...b, journal: null }));
      return `${j.kind} journal dropped`;
  }
}
