// The in-place transforms of a full backup file (docs/formats/backup-files.md section 5):
// merging the oldest increment into the full (forever forward) and injecting a new point into
// the full of a reverse chain. Both append the overlay's records beyond the full's committed
// length, write the changed table pages and a new index, flip the full's commit slot, and only
// then commit the .vbm; a journal in the .vbm lets recovery finish or undo them.
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import {
  HOLE,
  INHERIT,
  type BlockEntry,
  type DiskDescriptor,
  type PendingRepairRecord,
  type PointRecord,
  type StoredBlockEntry,
  type TablePageRef,
} from '../../format/index.js';
import { temporaryNameFor, trackTemporary, publish } from '../../storage/local-fs.js';
import { BackupFile } from '../backup-file.js';
import type { VmFolder } from '../folders.js';
import { backupFileName } from '../layout.js';
import { crashPoint } from './crash-points.js';
import { otherSlot, RecordSink } from './file-ops.js';
import { findChain, readBody, removeFiles, replaceChain, updateBody } from './metadata.js';
import { rm } from 'node:fs/promises';

export interface TransformIo {
  bytesRead: number;
  bytesWritten: number;
}

/**
 * Writes `overlay`'s non-inherit entries over `full`'s tables into `sink` (the full reopened):
 * the disks are the overlay's; blocks the overlay inherits keep the full's entry (a hole past the
 * end of the full's disk). Pages the overlay does not change are not rewritten.
 */
async function overlayTables(sink: RecordSink, full: BackupFile, overlay: BackupFile): Promise<DiskDescriptor[]> {
  const out: DiskDescriptor[] = [];
  const blockSize = full.header.blockSize;
  for (const od of overlay.index.disks) {
    const fd = full.disk(od.name);
    const unchanged = new Set<number>();
    const source = async (p: number, count: number): Promise<BlockEntry[]> => {
      const oEntries = await overlay.page(od, p);
      const fEntries = fd && p < fd.pages.length ? await full.page(fd, p) : [];
      await sink.copyRecords(overlay, oEntries.filter((e): e is StoredBlockEntry => e.kind === 'stored'));
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
    crashPoint('overlay-disk');
  }
  return out;
}

/**
 * Appends `overlay` into `full` and flips the full's commit slot (generation + 1). Returns the
 * new commit. Crash before the flip: the old commit stays current (the appended bytes are cut
 * by the next transform); after it: the full holds the overlay's point.
 */
async function applyOverlay(full: BackupFile, overlay: BackupFile, io: TransformIo): Promise<{ generation: number; fileLength: number }> {
  const sink = await RecordSink.reopen(full);
  crashPoint('reopened');
  try {
    const disks = await overlayTables(sink, full, overlay);
    const generation = full.slot.generation + 1;
    const { fileLength } = await sink.commit(overlay.index.config, disks, generation, otherSlot(full), async () => crashPoint('before-flip'));
    crashPoint('flipped');
    return { generation, fileLength };
  } finally {
    io.bytesRead += sink.bytesRead;
    io.bytesWritten += sink.bytesWritten;
    await sink.close();
  }
}

/**
 * Merges the chain's first increment into its full: afterwards the full holds that increment's
 * point and the full's old point is gone. `chainId` must be a linear forward chain.
 */
export async function mergeOldest(f: VmFolder, chainId: string, io: TransformIo): Promise<{ removed: string; deletedFile: string }> {
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
    const { generation, fileLength } = await applyOverlay(full, inc, io);
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

export interface InjectInput {
  readonly chainId: string;
  /** The committed staging file holding the new point's changed blocks (kind forward, base = the full). */
  readonly staging: string;
  readonly point: { readonly id: string; readonly time: Date };
  /** Pending repair to leave in the .vbm once the point is committed. */
  readonly repair: PendingRepairRecord | null;
}

/**
 * Reverse injection: (1) a .vrb for the full's current point Q with the full's entries of every
 * block the new point P changes (records copied), inheriting the rest from P; (2) journal;
 * (3) P's changed blocks appended into the full and its slot flipped; (4) .vbm: the full holds P,
 * the .vrb holds Q with base P. Returns P's point record.
 */
export async function injectReverse(f: VmFolder, input: InjectInput, io: TransformIo): Promise<PointRecord> {
  const body = await readBody(f);
  const chain = findChain(body, input.chainId, f);
  const qp = chain.points.at(-1);
  if (!qp || qp.kind !== 'full' || chain.method !== 'reverse') {
    throw new BulwarkError(`chain ${input.chainId} is not a reverse chain ending in its full`, { kind: 'conflict', context: { chain: input.chainId } });
  }
  const full = await BackupFile.open(path.join(f.dir, qp.file), { generation: qp.generation });
  const staging = await BackupFile.open(input.staging);
  let vrbPath: string | null = null;
  try {
    if (staging.header.baseFileId !== full.header.fileId) {
      throw new BulwarkError(`the new point was written on another full than ${qp.file}`, { kind: 'conflict', context: { file: qp.file } });
    }
    // (1) the reverse increment of Q.
    const vrbName = backupFileName(new Date(qp.time), qp.id, 'vrb');
    vrbPath = path.join(f.dir, vrbName);
    const vrbFileId = randomUUID();
    const tmp = temporaryNameFor(vrbPath);
    const untrack = trackTemporary(tmp);
    try {
      const sink = await RecordSink.create(tmp, {
        ...full.header, kind: 'reverse', fileId: vrbFileId, pointId: qp.id, baseFileId: full.header.fileId, timeMs: Date.parse(qp.time),
      });
      try {
        const disks: DiskDescriptor[] = [];
        for (const fd of full.index.disks) {
          const od = staging.disk(fd.name);
          const source = async (p: number, count: number): Promise<BlockEntry[]> => {
            const fEntries = await full.page(fd, p);
            const oEntries = od && p < od.pages.length ? await staging.page(od, p) : [];
            const entries: BlockEntry[] = [];
            const copy: StoredBlockEntry[] = [];
            for (let k = 0; k < count; k++) {
              const i = p * fd.entriesPerPage + k;
              const o = oEntries[k];
              const changed = !od || i >= od.blockCount || !o || o.kind !== 'inherit' || (od.size !== fd.size && (i === fd.blockCount - 1 || i === od.blockCount - 1));
              const e = fEntries[k]!;
              if (!changed) entries.push(INHERIT);
              else {
                entries.push(e);
                if (e.kind === 'stored') copy.push(e);
              }
            }
            await sink.copyRecords(full, copy);
            return entries.map((e) => (e.kind === 'stored' ? sink.mapped(full, e) : e));
          };
          disks.push(await sink.writeTable(fd.name, fd.size, full.header.blockSize, source));
        }
        crashPoint('vrb-tables');
        await sink.commit(full.index.config, disks, 1, 0);
      } finally {
        io.bytesRead += sink.bytesRead;
        io.bytesWritten += sink.bytesWritten;
        await sink.close();
      }
      crashPoint('vrb-written');
      await publish(tmp, vrbPath);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    } finally {
      untrack();
    }
    crashPoint('vrb-published');
    // (2) journal: from here a crash after the slot flip rolls forward.
    await updateBody(f, (b) => ({
      ...b,
      journal: {
        kind: 'reverse-inject', startedAt: new Date().toISOString(), points: [qp.id, input.point.id],
        files: [{ name: qp.file, generationBefore: full.slot.generation }, { name: vrbName, generationBefore: 0 }], step: 'append',
        newPoint: { id: input.point.id, time: input.point.time.toISOString() },
      },
    }));
    crashPoint('inject-journal');
    // (3) the new point into the full.
    const { generation, fileLength } = await applyOverlay(full, staging, io);
    // (4)
    return await commitInjection(f, input.chainId, qp.id, { id: input.point.id, time: input.point.time.toISOString() }, vrbName, generation, fileLength, input.repair);
  } catch (err) {
    // Not committed: undo (the .vrb is not named by the .vbm; the full's slot was not flipped).
    if (vrbPath) await rollbackInjection(f, vrbPath).catch(() => undefined);
    throw err;
  } finally {
    await full.close();
    await staging.close();
  }
}

async function rollbackInjection(f: VmFolder, vrbPath: string): Promise<void> {
  const body = await readBody(f);
  if (body.journal?.kind === 'reverse-inject') await updateBody(f, (b) => ({ ...b, journal: null }));
  await removeFiles(f, [vrbPath]);
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
