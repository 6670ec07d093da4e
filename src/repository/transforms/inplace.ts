// The in-place transforms of a full backup file (docs/formats/backup-files.md section 5):
// merging the oldest increment into the full (forever forward) and the .vbm commit that ends a
// reverse injection (written by inject-writer.ts). A merge appends the increment's records beyond
// the full's committed length, writes the changed table pages and a new index, flips the full's
// commit slot, and only then commits the .vbm; a journal in the .vbm lets recovery finish or undo it.
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import {
  HOLE,
  type BlockEntry,
  type DiskDescriptor,
  type PendingRepairRecord,
  type PointRecord,
  type StoredBlockEntry,
  type TablePageRef,
} from '../../format/index.js';
import { BackupFile } from '../backup-file.js';
import type { VmFolder } from '../folders.js';
import { crashPoint } from './crash-points.js';
import { otherSlot, RecordSink } from './file-ops.js';
import { findChain, readBody, removeFiles, replaceChain, updateBody } from './metadata.js';
import { pageSpan, StepProgress, type TransformProgressOptions } from './progress.js';

export interface TransformIo {
  bytesRead: number;
  bytesWritten: number;
}

/**
 * Writes `overlay`'s non-inherit entries over `full`'s tables into `sink` (the full reopened):
 * the disks are the overlay's; blocks the overlay inherits keep the full's entry (a hole past the
 * end of the full's disk). Pages the overlay does not change are not rewritten.
 */
async function overlayTables(sink: RecordSink, full: BackupFile, overlay: BackupFile, progress: StepProgress): Promise<DiskDescriptor[]> {
  const out: DiskDescriptor[] = [];
  const blockSize = full.header.blockSize;
  let diskBase = 0;
  for (const od of overlay.index.disks) {
    const fd = full.disk(od.name);
    const unchanged = new Set<number>();
    const base = diskBase;
    const source = async (p: number, count: number): Promise<BlockEntry[]> => {
      const { from, to } = pageSpan(base, od.size, p, od.entriesPerPage, blockSize);
      const oEntries = await overlay.page(od, p);
      const fEntries = fd && p < fd.pages.length ? await full.page(fd, p) : [];
      await sink.copyRecords(overlay, oEntries.filter((e): e is StoredBlockEntry => e.kind === 'stored'), (c, n) => progress.within(from, to, c, n));
      progress.at(to);
      let changed = false;
      const entries: BlockEntry[] = [];
      for (let k = 0; k < count; k++) {
        const e = oEntries[k]!;
        if (e.kind === 'inherit') entries.push(fEntries[k] ?? HOLE);
        else {
          changed = true;
          entries.push(e.kind === 'stored' ? sink.mapped(overlay, e) : e);
        }
      }
      if (!changed && fEntries.length === count) unchanged.add(p);
      return entries;
    };
    const reuse = (p: number, count: number): TablePageRef | null => (fd && unchanged.has(p) && fd.pages[p]?.entryCount === count ? fd.pages[p] : null);
    out.push(await sink.writeTable(od.name, od.size, blockSize, source, reuse));
    diskBase += od.size;
    crashPoint('overlay-disk');
  }
  return out;
}

/**
 * Appends `overlay` into `full` and flips the full's commit slot (generation + 1). Returns the
 * new commit. Crash before the flip: the old commit stays current (the appended bytes are cut
 * by the next transform); after it: the full holds the overlay's point.
 */
async function applyOverlay(full: BackupFile, overlay: BackupFile, io: TransformIo, progressOpts: TransformProgressOptions): Promise<{ generation: number; fileLength: number }> {
  const sink = await RecordSink.reopen(full);
  crashPoint('reopened');
  const bytesTotal = overlay.index.disks.reduce((sum, d) => sum + d.size, 0);
  const progress = new StepProgress('merge', bytesTotal, () => ({ bytesRead: io.bytesRead + sink.bytesRead, bytesWritten: io.bytesWritten + sink.bytesWritten }), progressOpts);
  progress.start();
  try {
    const disks = await overlayTables(sink, full, overlay, progress);
    const generation = full.slot.generation + 1;
    const { fileLength } = await sink.commit(overlay.index.config, disks, generation, otherSlot(full), async () => crashPoint('before-flip'));
    crashPoint('flipped');
    progress.end();
    return { generation, fileLength };
  } finally {
    io.bytesRead += sink.bytesRead;
    io.bytesWritten += sink.bytesWritten;
    await sink.close();
  }
}

/**
 * Merges the chain's first increment into its full: afterwards the full holds that increment's
 * point and the full's old point is gone. `chainId` must be a linear forward chain. Progress
 * (step `merge`): the increment's disk bytes gone through, its records copied into the full.
 */
export async function mergeOldest(f: VmFolder, chainId: string, io: TransformIo, progress: TransformProgressOptions = {}): Promise<{ removed: string; deletedFile: string }> {
  const body = await readBody(f);
  const chain = findChain(body, chainId, f);
  const [fp, ip] = chain.points;
  if (!fp || !ip || fp.kind !== 'full' || ip.kind !== 'incremental' || ip.base !== fp.id) {
    throw new BulwarkError(`chain ${chainId} has no increment to merge into its full`, { kind: 'invalid', context: { chain: chainId } });
  }
  const full = await BackupFile.open(path.join(f.dir, fp.file), { generation: fp.generation });
  const inc = await BackupFile.open(path.join(f.dir, ip.file), { generation: ip.generation });
  try {
    await updateBody(f, (b) => ({
      ...b,
      journal: {
        kind: 'merge', startedAt: new Date().toISOString(), points: [fp.id, ip.id],
        files: [{ name: fp.file, generationBefore: full.slot.generation }, { name: ip.file, generationBefore: inc.slot.generation }], step: 'append',
      },
    }));
    crashPoint('merge-journal');
    const { generation, fileLength } = await applyOverlay(full, inc, io, progress);
    await commitMerge(f, chainId, fp.id, ip.id, generation, fileLength);
    return { removed: fp.id, deletedFile: path.join(f.dir, ip.file) };
  } finally {
    await full.close();
    await inc.close();
  }
}

/** The .vbm commit that ends a merge (also the roll-forward of recovery), then the increment's deletion. */
export async function commitMerge(f: VmFolder, chainId: string, fullPoint: string, incPoint: string, generation: number, fileLength: number): Promise<void> {
  let incFile = '';
  await updateBody(f, (b) => {
    const c = findChain(b, chainId, f);
    const fp = c.points.find((p) => p.id === fullPoint)!;
    const ip = c.points.find((p) => p.id === incPoint)!;
    incFile = ip.file;
    const merged: PointRecord = {
      id: ip.id, time: ip.time, kind: 'full', file: fp.file, fileId: fp.fileId, base: null, generation, disks: ip.disks, fileBytes: fileLength,
      aliasFileIds: [ip.fileId],
    };
    return { ...replaceChain(b, { ...c, points: [merged, ...c.points.filter((p) => p.id !== fullPoint && p.id !== incPoint)] }), journal: null };
  });
  crashPoint('merge-committed');
  await removeFiles(f, [incFile]);
  crashPoint('merge-removed');
}

/** The .vbm commit that ends a reverse injection (also the roll-forward of recovery). */
export async function commitInjection(
  f: VmFolder, chainId: string, oldPoint: string, newPoint: { id: string; time: string }, vrbName: string, generation: number, fileLength: number,
  repair: PendingRepairRecord | null | undefined,
): Promise<PointRecord> {
  const vrb = await BackupFile.open(path.join(f.dir, vrbName));
  const vrbInfo = { fileId: vrb.header.fileId, bytes: vrb.slot.fileLength };
  await vrb.close();
  const before = await readBody(f);
  const fullName = findChain(before, chainId, f).points.find((p) => p.id === oldPoint)!.file;
  const full = await BackupFile.open(path.join(f.dir, fullName), { generation });
  const disks = full.index.disks.map((d) => ({ name: d.name, size: d.size }));
  await full.close();
  let record: PointRecord | null = null;
  await updateBody(f, (b) => {
    const c = findChain(b, chainId, f);
    const q = c.points.find((p) => p.id === oldPoint)!;
    const moved: PointRecord = {
      id: q.id, time: q.time, kind: 'reverse', file: vrbName, fileId: vrbInfo.fileId, base: newPoint.id, generation: 1, disks: q.disks, fileBytes: vrbInfo.bytes,
      aliasFileIds: [q.fileId],
    };
    record = { id: newPoint.id, time: newPoint.time, kind: 'full', file: q.file, fileId: q.fileId, base: null, generation, disks, fileBytes: fileLength };
    const points = [...c.points.filter((p) => p.id !== oldPoint), moved, record];
    return { ...replaceChain(b, { ...c, points }), journal: null, ...(repair !== undefined ? { pendingRepair: repair } : {}) };
  });
  return record!;
}
