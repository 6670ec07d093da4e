// Offline inspection of a repository folder: chains, restore points, disks, sizes, compression
// and deduplication ratios, read from the .vbm files and each file's index (no block is read).
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { describeError } from '../common/errors.js';
import { BackupFile } from './backup-file.js';
import { assertNotBesideRepository, chainsOfFolder, listVmFolders, type BackupChain } from './folders.js';
import { BACKUP_FILE_RE } from './layout.js';
import { readChainMetadata } from './repository.js';
import type { PointKind } from '../format/index.js';

export interface InspectDisk {
  readonly name: string;
  readonly size: number;
  readonly storedBlocks: number;
  readonly dedupBlocks: number;
  readonly zeroBlocks: number;
  readonly holeBlocks: number;
  readonly inheritedBlocks: number;
  /** Plain bytes of the records this file stores for the disk. */
  readonly plainBytes: number;
  /** Stored (compressed, encrypted) bytes of those records. */
  readonly storedBytes: number;
}

export interface InspectPoint {
  readonly id: string;
  readonly kind: PointKind;
  readonly time: string;
  readonly file: string;
  readonly fileBytes: number;
  readonly disks: readonly InspectDisk[];
  /** plainBytes / storedBytes over the file's records (1 when nothing stored). */
  readonly compressionRatio: number;
  /** Stored entries / distinct records (1 = no duplicates inside the file). */
  readonly dedupRatio: number;
  /** Set when the file could not be read; verify tells more. */
  readonly problem?: string;
}

/** A chain as `BackupChain` describes it, with each point's sizes and the chain's file bytes. */
export interface InspectChain extends Omit<BackupChain, 'points'> {
  readonly points: readonly InspectPoint[];
  readonly fileBytes: number;
}

export interface InspectReport {
  readonly repository: string;
  readonly chains: readonly InspectChain[];
  readonly totals: { readonly points: number; readonly fileBytes: number; readonly plainBytes: number; readonly storedBytes: number; readonly compressionRatio: number; readonly dedupRatio: number };
  /** .vbm files that could not be read. */
  readonly problems: readonly { readonly file: string; readonly problem: string }[];
}

const ratio = (a: number, b: number) => (b === 0 ? 1 : a / b);

/** Describes every chain and restore point under `root`. */
export async function inspectRepository(root: string): Promise<InspectReport> {
  const abs = path.resolve(root);
  const chains: InspectChain[] = [];
  const problems: { file: string; problem: string }[] = [];
  let plainAll = 0;
  let storedAll = 0;
  let entriesAll = 0;
  let recordsAll = 0;
  for (const f of await listVmFolders(abs)) {
    let meta;
    try {
      meta = await readChainMetadata(f.vbmPath);
    } catch (err) {
      problems.push({ file: f.vbmPath, problem: describeError(err) });
      continue;
    }
    if (!meta) {
      // As verify says it: backup files no chain metadata places are not a repository's points.
      const files = (await readdir(f.dir)).filter((n) => BACKUP_FILE_RE.test(n));
      if (files.length > 0) problems.push({ file: f.vbmPath, problem: `missing chain metadata; ${files.length} backup files cannot be placed in a chain` });
      continue;
    }
    for (const c of chainsOfFolder(meta.body, f.dir)) {
      const points: InspectPoint[] = [];
      for (const p of c.points) {
        const base = { id: p.id, kind: p.kind, time: p.time.toISOString(), file: p.file, fileBytes: p.fileBytes };
        let file: BackupFile;
        try {
          file = await BackupFile.open(p.file, p.generation !== undefined ? { generation: p.generation } : {}); // the generation the .vbm names, as readers and verify
        } catch (err) {
          points.push({ ...base, disks: p.disks.map((d) => ({ name: d.name, size: d.size, storedBlocks: 0, dedupBlocks: 0, zeroBlocks: 0, holeBlocks: 0, inheritedBlocks: 0, plainBytes: 0, storedBytes: 0 })), compressionRatio: 1, dedupRatio: 1, problem: describeError(err) });
          continue;
        }
        try {
          const disks = file.index.disks.map((d) => ({
            name: d.name,
            size: d.size,
            storedBlocks: d.stats.storedBlocks,
            dedupBlocks: d.stats.dedupBlocks,
            zeroBlocks: d.stats.zeroBlocks,
            holeBlocks: d.stats.holeBlocks,
            inheritedBlocks: d.stats.inheritBlocks,
            plainBytes: d.stats.plainBytes,
            storedBytes: d.stats.storedBytes,
          }));
          const plain = disks.reduce((a, d) => a + d.plainBytes, 0);
          const stored = disks.reduce((a, d) => a + d.storedBytes, 0);
          const entries = disks.reduce((a, d) => a + d.storedBlocks, 0);
          const records = entries - disks.reduce((a, d) => a + d.dedupBlocks, 0);
          plainAll += plain;
          storedAll += stored;
          entriesAll += entries;
          recordsAll += records;
          points.push({ ...base, fileBytes: file.size, disks, compressionRatio: ratio(plain, stored), dedupRatio: ratio(entries, records) });
        } finally {
          await file.close();
        }
      }
      chains.push({
        id: c.id, job: c.job, vm: c.vm, method: c.method, blockSize: c.blockSize, compression: c.compression,
        encrypted: c.encrypted, passwordHint: c.passwordHint, folder: c.folder, points,
        fileBytes: points.reduce((a, p) => a + p.fileBytes, 0),
      });
    }
  }
  if (chains.length === 0 && problems.length === 0) await assertNotBesideRepository(abs, 'inspect');
  return {
    repository: abs,
    chains,
    totals: {
      points: chains.reduce((a, c) => a + c.points.length, 0),
      fileBytes: chains.reduce((a, c) => a + c.fileBytes, 0),
      plainBytes: plainAll,
      storedBytes: storedAll,
      compressionRatio: ratio(plainAll, storedAll),
      dedupRatio: ratio(entriesAll, recordsAll),
    },
    problems,
  };
}
