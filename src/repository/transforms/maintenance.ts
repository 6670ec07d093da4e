// Chain maintenance of one VM folder, called by Repository under the folder's writer lock (after
// recovery of any interrupted transform): retention (merges, chain and point deletion), synthetic
// full, compaction, health check. docs/formats/backup-files.md section 5.
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { rm } from 'node:fs/promises';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { encodeRecordHeaderInto, NIL_UUID, RECORD_HEADER_SIZE, uuidToBytes, type BlockEntry, type ChainMetadata, type DamagedPointRecord, type DiskDescriptor, type PointRecord, type StoredBlockEntry } from '../../format/index.js';
import { publish, temporaryNameFor, trackTemporary } from '../../storage/local-fs.js';
import { BackupFile } from '../backup-file.js';
import { blockDigest } from '../block-codec.js';
import { sealConfig } from '../chain-keys.js';
import { EncodePool } from '../encode-pool.js';
import { chainsOfFolder, type VmFolder } from '../folders.js';
import { backupFileName } from '../layout.js';
import { planRetention } from '../plan/plan-retention.js';
import { latestChain } from '../plan/plan-run.js';
import type { DamagedBlock, HealthReport, MethodPolicy, PendingRepairRecord, RetentionAction, RetentionReport, SynthesizeFullOptions } from '../plan/types.js';
import type { Repository } from '../repository.js';
import type { RestorePoint, RestorePointInfo } from '../restore-point.js';
import { crashPoint } from './crash-points.js';
import { RecordSink } from './file-ops.js';
import { mergeOldest, type TransformIo } from './inplace.js';
import { findChain, readBody, removeFiles, replaceChain, updateBody } from './metadata.js';
import { pageSpan, StepProgress, type TransformProgressOptions } from './progress.js';

const log = logger('repository');

/** Retention; each merge it does reports its progress (step `merge`) through `progress`. */
export async function applyRetention(
  f: VmFolder, job: string, vm: string, policy: MethodPolicy, now: Date, _password?: string, progress: TransformProgressOptions = {},
): Promise<RetentionReport & { io: TransformIo }> {
  const io: TransformIo = { bytesRead: 0, bytesWritten: 0 };
  const body = await readBody(f).catch((err: unknown) => {
    if (err instanceof BulwarkError && err.kind === 'not-found') return null;
    throw err;
  });
  if (!body) return { job, vm, actions: [], removedPoints: [], deletedFiles: [], io };
  const actions = planRetention({ chains: chainsOfFolder(body, f.dir), repair: body.pendingRepair ?? null, damaged: body.damagedPoints ?? [] }, policy, now);
  const removedPoints: string[] = [];
  const deletedFiles: string[] = [];
  for (const a of actions) {
    switch (a.kind) {
      case 'merge': {
        const r = await mergeOldest(f, a.chain, io, progress);
        removedPoints.push(r.removed);
        deletedFiles.push(r.deletedFile);
        break;
      }
      case 'delete-chain': {
        // The .vbm first: a crash before the files go leaves unnamed files the next sweep removes.
        await updateBody(f, (b) => ({ ...b, chains: b.chains.filter((c) => c.id !== a.chain) }));
        crashPoint('chain-deleted');
        deletedFiles.push(...(await removeFiles(f, a.files)));
        removedPoints.push(...a.points);
        break;
      }
      case 'delete-point': {
        await updateBody(f, (b) => {
          const c = findChain(b, a.chain, f);
          return replaceChain(b, { ...c, points: c.points.filter((p) => p.id !== a.point) });
        });
        crashPoint('point-deleted');
        deletedFiles.push(...(await removeFiles(f, a.files)));
        removedPoints.push(a.point);
        break;
      }
      case 'none':
        break;
    }
  }
  if (removedPoints.length > 0) {
    // Marks of damaged points that are gone go with them.
    const gone = new Set(removedPoints);
    if ((body.damagedPoints ?? []).some((m) => gone.has(m.point))) await updateBody(f, (b) => ({ ...b, damagedPoints: (b.damagedPoints ?? []).filter((m) => !gone.has(m.point)) }));
    log.info({ job, vm, removedPoints, actions: actions.map(describeAction) }, 'retention applied');
  }
  for (const a of actions) if (a.kind === 'none' && a.damaged) log.warn({ job, vm, points: a.damaged }, a.reason);
  return { job, vm, actions, removedPoints, deletedFiles, io };
}

function describeAction(a: RetentionAction): string {
  return `${a.kind}: ${a.reason}`;
}

/** Tip of the chain holding `pointId` (or the VM's latest point). */
function pickPoint(body: ChainMetadata, f: VmFolder, pointId: string | undefined): { chain: ChainMetadata['chains'][number]; point: PointRecord } {
  const chains = chainsOfFolder(body, f.dir);
  const id = pointId ?? latestChain(chains)?.points.at(-1)?.id;
  for (const c of body.chains) {
    const p = c.points.find((x) => x.id === id);
    if (p) return { chain: c, point: p };
  }
  throw new BulwarkError(id ? `no restore point ${id} of VM ${body.vm}` : `VM ${body.vm} has no restore point`, { kind: 'not-found', context: { point: id, vm: body.vm } });
}

/** Progress (step `synthetic-full`): the point's disk bytes gone through, the live records copied. */
export async function synthesizeFull(
  repo: Repository, f: VmFolder, _job: string, _vm: string, opts: SynthesizeFullOptions & TransformProgressOptions,
): Promise<RestorePointInfo & { io: TransformIo }> {
  const io: TransformIo = { bytesRead: 0, bytesWritten: 0 };
  const body = await readBody(f);
  const { chain, point } = pickPoint(body, f, opts.point);
  if (chain.method !== 'forward' || point.kind !== 'incremental' || chain.points.at(-1)!.id !== point.id) {
    throw new BulwarkError(`restore point ${point.id} is not an increment at the tip of a forward chain; a synthetic full is built from one`, {
      kind: 'invalid', context: { point: point.id, chain: chain.id },
    });
  }
  const rp = await repo.openRestorePoint(point.id, opts.password !== undefined ? { password: opts.password } : {});
  const newChain = randomUUID();
  const fileId = randomUUID();
  const name = backupFileName(new Date(point.time), point.id, 'vbk');
  const finalPath = path.join(f.dir, name);
  const tmp = temporaryNameFor(finalPath);
  const untrack = trackTemporary(tmp);
  let fileLength = 0;
  // An encrypted chain: every block is authenticated with its chain's id, so the new chain's file
  // takes each block decrypted and encrypted again (same key: the new chain keeps the chain's
  // password and key parameters); a plain chain's records are copied as stored.
  const aad = uuidToBytes(newChain);
  const pool = chain.encryption ? new EncodePool({ blockSize: rp.info.blockSize, compression: chain.compression, keys: rp.keys, aad, threads: opts.threads ?? 0 }) : null;
  try {
    const top = rp.files[0]!;
    const sink = await RecordSink.create(tmp, { ...top.header, kind: 'full', fileId, chainId: newChain, pointId: point.id, baseFileId: NIL_UUID, timeMs: Date.parse(point.time) });
    const reencoded = new Map<string, StoredBlockEntry>(); // source file id:record offset -> the new record
    const reencode = async (file: BackupFile, e: StoredBlockEntry): Promise<void> => {
      const key = `${file.header.fileId}:${e.recordOffset}`;
      if (reencoded.has(key)) return;
      const plain = await file.readBlock(e, rp.keys);
      sink.bytesRead += RECORD_HEADER_SIZE + e.storedLength;
      const enc = await pool!.encode(plain);
      try {
        encodeRecordHeaderInto(
          { type: 'block', compression: enc.compression, encrypted: true, storedLength: enc.storedLength, plainLength: plain.length, payloadCrc: enc.crc },
          enc.header,
          0,
        );
        const recordOffset = await sink.append(Buffer.concat([enc.header, enc.payload]));
        reencoded.set(key, { kind: 'stored', digest: Buffer.from(enc.digest), recordOffset, storedLength: enc.storedLength, plainLength: plain.length, crc: enc.crc });
      } finally {
        pool!.release(enc.slot);
      }
    };
    const progress = new StepProgress('synthetic-full', top.index.disks.reduce((sum, d) => sum + d.size, 0), () => ({ bytesRead: sink.bytesRead, bytesWritten: sink.bytesWritten }), opts);
    progress.start();
    try {
      const disks: DiskDescriptor[] = [];
      let diskBase = 0;
      for (const d of top.index.disks) {
        const base = diskBase;
        const source = async (p: number, count: number): Promise<BlockEntry[]> => {
          const { from, to } = pageSpan(base, d.size, p, d.entriesPerPage, top.header.blockSize);
          const resolved = [];
          for (let k = 0; k < count; k++) resolved.push(await rp.resolve(d.name, p * d.entriesPerPage + k));
          const byFile = new Map<BackupFile, StoredBlockEntry[]>();
          for (const r of resolved) if (r.kind === 'stored') byFile.set(r.file, [...(byFile.get(r.file) ?? []), r.entry]);
          // The page's span is shared by the files its records come from, in proportion to their bytes.
          const files = [...byFile];
          const weights = files.map(([, entries]) => entries.reduce((sum, e) => sum + e.storedLength, 0));
          const weightTotal = weights.reduce((a, b) => a + b, 0);
          let at = from;
          for (const [n, [file, entries]] of files.entries()) {
            const until = weightTotal > 0 ? at + ((to - from) * weights[n]!) / weightTotal : to;
            const start = at;
            if (pool) {
              for (const [k, e] of entries.entries()) {
                await reencode(file, e);
                progress.within(start, until, k + 1, entries.length);
              }
            } else await sink.copyRecords(file, entries, (c, total) => progress.within(start, until, c, total));
            at = until;
          }
          progress.at(to);
          crashPoint('synthetic-page');
          const mapped = (r: { file: BackupFile; entry: StoredBlockEntry }): StoredBlockEntry =>
            pool ? reencoded.get(`${r.file.header.fileId}:${r.entry.recordOffset}`)! : sink.mapped(r.file, r.entry);
          return resolved.map((r) => (r.kind === 'stored' ? mapped(r) : r.kind === 'zero' ? { kind: 'zero' } : { kind: 'hole' }));
        };
        disks.push(await sink.writeTable(d.name, d.size, top.header.blockSize, source));
        diskBase += d.size;
      }
      // The configuration is sealed with the chain's id too.
      ({ fileLength } = await sink.commit(chain.encryption ? sealConfig(rp.vmConfig, rp.keys, aad) : top.index.config, disks, 1, 0));
      progress.end();
    } finally {
      io.bytesRead += sink.bytesRead;
      io.bytesWritten += sink.bytesWritten;
      await sink.close();
    }
    crashPoint('synthetic-written');
    await publish(tmp, finalPath);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  } finally {
    untrack();
    await pool?.close();
    await rp.close();
  }
  crashPoint('synthetic-published');
  // One .vbm commit moves the point into the new chain; a crash before it leaves an unnamed file
  // (swept), after it the old increment is unnamed (swept if its removal did not happen).
  await updateBody(f, (b) => {
    const old = findChain(b, chain.id, f);
    const moved: PointRecord = { id: point.id, time: point.time, kind: 'full', file: name, fileId, base: null, generation: 1, disks: point.disks, fileBytes: fileLength };
    const rest = replaceChain(b, { ...old, points: old.points.filter((p) => p.id !== point.id) });
    return { ...rest, chains: [...rest.chains, { ...old, id: newChain, points: [moved] }] };
  });
  crashPoint('synthetic-committed');
  await removeFiles(f, [point.file]);
  const after = chainsOfFolder(await readBody(f), f.dir).find((c) => c.id === newChain)!;
  return { ...after.points[0]!, io };
}

/** Progress (step `compact`): the full's disk bytes gone through, its referenced records copied. */
export async function compactFull(f: VmFolder, chainId?: string, progressOpts: TransformProgressOptions = {}): Promise<{ file: string; bytesBefore: number; bytesAfter: number; io: TransformIo }> {
  const io: TransformIo = { bytesRead: 0, bytesWritten: 0 };
  const body = await readBody(f);
  const chain = chainId ? findChain(body, chainId, f) : body.chains.find((c) => c.id === latestChain(chainsOfFolder(body, f.dir))?.id);
  const fp = chain?.points.find((p) => p.kind === 'full');
  if (!chain || !fp) throw new BulwarkError(`VM ${body.vm} has no full backup file to compact`, { kind: 'not-found', context: { vm: body.vm, chain: chainId } });
  const filePath = path.join(f.dir, fp.file);
  const full = await BackupFile.open(filePath, { generation: fp.generation });
  const tmp = temporaryNameFor(filePath);
  const untrack = trackTemporary(tmp);
  let fileLength = 0;
  const generation = full.slot.generation + 1;
  try {
    // Same header (file id, point, chain), a fresh data area with only referenced records.
    const sink = await RecordSink.create(tmp, full.header);
    const progress = new StepProgress('compact', full.index.disks.reduce((sum, d) => sum + d.size, 0), () => ({ bytesRead: sink.bytesRead, bytesWritten: sink.bytesWritten }), progressOpts);
    progress.start();
    try {
      const disks: DiskDescriptor[] = [];
      let diskBase = 0;
      for (const d of full.index.disks) {
        const base = diskBase;
        const source = async (p: number): Promise<BlockEntry[]> => {
          const { from, to } = pageSpan(base, d.size, p, d.entriesPerPage, full.header.blockSize);
          const entries = await full.page(d, p);
          await sink.copyRecords(full, entries.filter((e): e is StoredBlockEntry => e.kind === 'stored'), (c, n) => progress.within(from, to, c, n));
          progress.at(to);
          crashPoint('compact-page');
          return entries.map((e) => (e.kind === 'stored' ? sink.mapped(full, e) : e));
        };
        disks.push(await sink.writeTable(d.name, d.size, full.header.blockSize, source));
        diskBase += d.size;
      }
      ({ fileLength } = await sink.commit(full.index.config, disks, generation, 0));
      progress.end();
    } finally {
      io.bytesRead += sink.bytesRead;
      io.bytesWritten += sink.bytesWritten;
      await sink.close();
    }
    crashPoint('compact-written');
    // Atomic: either the old file or the new one has the name. Readers that opened the old one
    // keep reading it; the .vbm's generation falls back to the highest slot until it is updated.
    await publish(tmp, filePath);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  } finally {
    untrack();
    await full.close();
  }
  crashPoint('compact-published');
  await updateBody(f, (b) => {
    const c = findChain(b, chain.id, f);
    return replaceChain(b, { ...c, points: c.points.map((p) => (p.id === fp.id ? { ...p, generation, fileBytes: fileLength } : p)) });
  });
  return { file: filePath, bytesBefore: full.size, bytesAfter: fileLength, io };
}

/** What a health check reads: the latest point or the whole chain; the password of an encrypted chain; progress in disk bytes checked. */
export interface HealthCheckOptions {
  readonly wholeChain?: boolean;
  readonly password?: string;
  /** Told every 250 ms at most and at the end: disk bytes of the checked points gone through, of all. */
  readonly onProgress?: (p: { bytesDone: number; bytesTotal: number }) => void;
}

export async function healthCheck(repo: Repository, f: VmFolder, job: string, vm: string, opts: HealthCheckOptions): Promise<HealthReport> {
  let body: ChainMetadata;
  try {
    body = await readBody(f);
  } catch (err) {
    if (err instanceof BulwarkError && err.kind === 'corrupt') {
      return { job, vm, points: [], blocksChecked: 0, ok: false, damaged: [], metadataDamaged: true, metadataProblems: [describeError(err)], repair: null };
    }
    throw err;
  }
  const chain = latestChain(chainsOfFolder(body, f.dir));
  const tip = chain?.points.at(-1);
  if (!chain || !tip) throw new BulwarkError(`VM ${vm} of job ${job} has no restore point to check`, { kind: 'not-found', context: { job, vm } });
  const points = opts.wholeChain ? chain.points : [tip];
  const damaged: DamagedBlock[] = [];
  const metadataProblems: string[] = [];
  const metadataHurt = new Set<string>(); // points whose metadata (or a file's) is damaged
  let blocksChecked = 0;
  const checked = new Map<string, string | null>(); // file:offset -> problem (null = good)
  // Progress: the disk bytes of every point checked (what a restore of them would read).
  const bytesTotal = points.reduce((sum, p) => sum + p.disks.reduce((s, d) => s + d.size, 0), 0);
  let bytesDone = 0;
  let lastTold = 0;
  const tell = (force: boolean): void => {
    if (!opts.onProgress) return;
    const now = Date.now();
    if (!force && now - lastTold < 250) return;
    lastTold = now;
    opts.onProgress({ bytesDone: Math.min(bytesDone, bytesTotal), bytesTotal });
  };
  tell(true);
  for (const p of points) {
    let rp: RestorePoint;
    try {
      rp = await repo.openRestorePoint(p.id, opts.password !== undefined ? { password: opts.password } : {});
    } catch (err) {
      if (err instanceof BulwarkError && err.kind === 'corrupt') {
        metadataProblems.push(`point ${p.id}: ${describeError(err)}`);
        metadataHurt.add(p.id);
        continue;
      }
      throw err;
    }
    try {
      for (const d of rp.disks) {
        const count = Math.ceil(d.size / rp.info.blockSize);
        for (let i = 0; i < count; i++) {
          bytesDone += Math.min(rp.info.blockSize, d.size - i * rp.info.blockSize);
          tell(false);
          let r;
          try {
            r = await rp.resolve(d.name, i);
          } catch (err) {
            metadataProblems.push(`point ${p.id}, disk ${d.name}, block ${i}: ${describeError(err)}`);
            metadataHurt.add(p.id);
            i = (Math.floor(i / 1024) + 1) * 1024 - 1; // the rest of this table page is unknown too
            continue;
          }
          if (r.kind !== 'stored') continue;
          blocksChecked++;
          const key = `${r.file.path}:${r.entry.recordOffset}`;
          let problem = checked.get(key);
          if (problem === undefined) {
            try {
              const plain = await r.file.readBlock(r.entry, rp.keys);
              problem = blockDigest(plain, rp.keys).equals(r.entry.digest) ? null : 'the digest of the plain data does not match the block table';
            } catch (err) {
              problem = (err as Error).message;
            }
            checked.set(key, problem);
          }
          if (problem !== null) {
            damaged.push({ file: r.file.path, point: p.id, disk: d.name, block: i, diskOffset: i * rp.info.blockSize, reason: problem });
          }
        }
      }
    } finally {
      await rp.close();
    }
  }
  bytesDone = bytesTotal;
  tell(true);
  const metadataDamaged = metadataProblems.length > 0;
  const byDisk = new Map<string, number[]>();
  for (const d of damaged) if (d.point === tip.id) byDisk.set(d.disk, [...(byDisk.get(d.disk) ?? []), d.block]);
  const repair: PendingRepairRecord | null =
    metadataDamaged || byDisk.size > 0
      ? { detectedAt: new Date().toISOString(), point: tip.id, metadataDamaged, disks: [...byDisk].map(([disk, blocks]) => ({ disk, blocks })) }
      : null;
  // Every damaged point checked is marked (kept after its repair: retention never merges it);
  // points checked clean lose an old mark; marks of points no longer in the .vbm go.
  const detectedAt = new Date().toISOString();
  const marks: DamagedPointRecord[] = [];
  for (const p of points) {
    const blocks = new Map<string, number[]>();
    for (const d of damaged) if (d.point === p.id) blocks.set(d.disk, [...(blocks.get(d.disk) ?? []), d.block]);
    if (blocks.size > 0 || metadataHurt.has(p.id)) marks.push({ point: p.id, detectedAt, metadataDamaged: metadataHurt.has(p.id), disks: [...blocks].map(([disk, b]) => ({ disk, blocks: b })) });
  }
  await updateBody(f, (b) => {
    const live = new Set(b.chains.flatMap((c) => c.points.map((p) => p.id)));
    const checkedIds = new Set(points.map((p) => p.id));
    const damagedPoints = [...(b.damagedPoints ?? []).filter((m) => live.has(m.point) && !checkedIds.has(m.point)), ...marks];
    return { ...b, pendingRepair: repair, damagedPoints };
  });
  const ok = damaged.length === 0 && !metadataDamaged;
  if (!ok) log.warn({ job, vm, damaged: damaged.length, metadataProblems }, 'health check found damage; the next run repairs it');
  return { job, vm, points: points.map((p) => p.id), blocksChecked, ok, damaged, metadataDamaged, metadataProblems, repair };
}
