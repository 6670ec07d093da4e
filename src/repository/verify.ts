// Offline verification of a repository folder: every .vbm, every backup file's header, commit
// slots, index, block tables and every record (CRC32C; with the password also GCM and digest).
// Returns a typed report naming exactly where damage is; never repairs (repair is separate).
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError, describeError } from '../common/errors.js';
import {
  COMMIT_SLOT_OFFSETS,
  COMMIT_SLOT_SIZE,
  decodeCommitSlot,
  decodeIndex,
  decodeRecordHeader,
  DISK_DESCRIPTOR_SIZE,
  HEADER_PAGE_SIZE,
  INDEX_HEADER_SIZE,
  INDEX_MAGIC,
  MAX_DISKS,
  TABLE_PAGE_REF_SIZE,
  RECORD_HEADER_SIZE,
  type CommitSlot,
  type StoredBlockEntry,
} from '../format/index.js';
import { BackupFile } from './backup-file.js';
import { blockDigest, decodePayload } from './block-codec.js';
import { unlockChain, type ChainKeys } from './chain-keys.js';
import { BACKUP_FILE_RE } from './layout.js';
import { checkFileMatches, readChainMetadata, type BackupChain } from './repository.js';
import { crc32c } from '@node-rs/crc32';
import type { RestorePointInfo } from './restore-point.js';
import { assertNotBesideRepository, listVmFolders, chainsOfFolder } from './folders.js';

/** One place where stored data is damaged. */
export interface Damage {
  /** Path of the damaged file. */
  readonly file: string;
  /** The point whose file this is, when known. */
  readonly point?: string;
  readonly disk?: string;
  readonly block?: number;
  /** Byte offset on the disk of the damaged block. */
  readonly diskOffset?: number;
  /** Byte offset in the file. */
  readonly fileOffset?: number;
  readonly problem: string;
  /** Restore points that cannot be fully restored because of this damage. */
  readonly affectedPoints: readonly string[];
}

export interface VerifyReport {
  readonly repository: string;
  readonly ok: boolean;
  readonly vmFolders: number;
  readonly chains: number;
  readonly points: number;
  readonly filesChecked: number;
  readonly blocksChecked: number;
  readonly bytesChecked: number;
  readonly damage: readonly Damage[];
  /** Things that are not damage but worth knowing (orphan files, digests not checked…). */
  readonly warnings: readonly string[];
}

export interface VerifyOptions {
  /** Password of encrypted chains (one for all, or per chain). Without it only CRCs are checked. */
  readonly password?: string | ((chain: BackupChain) => string | undefined);
}

/** Verifies every block of every restore point under `root`. */
export async function verifyRepository(root: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const abs = path.resolve(root);
  const damage: Damage[] = [];
  const warnings: string[] = [];
  let chainsN = 0;
  let pointsN = 0;
  let filesChecked = 0;
  let blocksChecked = 0;
  let bytesChecked = 0;
  const folders = await listVmFolders(abs);
  for (const f of folders) {
    let chains: BackupChain[];
    try {
      const meta = await readChainMetadata(f.vbmPath);
      if (!meta) {
        const files = (await readdir(f.dir)).filter((n) => BACKUP_FILE_RE.test(n));
        if (files.length > 0) damage.push({ file: f.vbmPath, problem: `missing chain metadata; ${files.length} backup files cannot be placed in a chain`, affectedPoints: [] });
        continue;
      }
      chains = chainsOfFolder(meta.body, f.dir);
    } catch (err) {
      damage.push({ file: f.vbmPath, problem: describeError(err), affectedPoints: [] });
      continue;
    }
    const named = new Set(chains.flatMap((c) => c.points.map((p) => path.basename(p.file))));
    for (const n of await readdir(f.dir)) {
      if (BACKUP_FILE_RE.test(n) && !named.has(n)) warnings.push(`${path.join(f.dir, n)} is not named by the chain metadata (uncommitted; removed on the next open)`);
    }
    for (const chain of chains) {
      chainsN++;
      pointsN += chain.points.length;
      const byId = new Map(chain.points.map((p) => [p.id, p]));
      // Points that depend on each point's file (the point itself and all that inherit through it).
      const dependents = new Map<string, string[]>();
      for (const p of chain.points) {
        const seen = new Set<string>();
        for (let cur: RestorePointInfo | undefined = p; cur && !seen.has(cur.id); cur = cur.base ? byId.get(cur.base) : undefined) {
          seen.add(cur.id);
          dependents.set(cur.id, [...(dependents.get(cur.id) ?? []), p.id]);
        }
      }
      let keys: ChainKeys | null = null;
      let keysTried = false;
      for (const p of chain.points) {
        const affected = dependents.get(p.id) ?? [p.id];
        const add = (d: Omit<Damage, 'affectedPoints' | 'file' | 'point'> & { file?: string }) =>
          damage.push({ file: p.file, point: p.id, affectedPoints: affected, ...d });
        let file: BackupFile;
        try {
          file = await BackupFile.open(p.file, p.generation !== undefined ? { generation: p.generation } : {});
        } catch (err) {
          add({ problem: describeError(err) });
          continue;
        }
        filesChecked++;
        try {
          const base = p.base ? byId.get(p.base) : undefined;
          try {
            checkFileMatches(file, chain, p, null);
            if (base) {
              const bf = await BackupFile.open(base.file).catch(() => null);
              if (bf) {
                if (bf.header.fileId !== file.header.baseFileId && !(base.aliasFileIds ?? []).includes(file.header.baseFileId)) add({ problem: `base file id ${file.header.baseFileId} is not the id of ${base.file}` });
                await bf.close();
              }
            }
          } catch (err) {
            add({ problem: describeError(err) });
          }
          if (file.header.encryption && !keysTried) {
            keysTried = true;
            const pw = typeof opts.password === 'function' ? opts.password(chain) : opts.password;
            if (pw === undefined) warnings.push(`chain ${chain.id} of VM ${chain.vm} is encrypted: no password given, so only CRCs were checked`);
            else {
              try {
                keys = await unlockChain(pw, file.header.encryption, { chain: chain.id });
              } catch (err) {
                if (err instanceof BulwarkError && err.kind === 'unauthorized') warnings.push(`chain ${chain.id} of VM ${chain.vm}: ${err.message}; only CRCs were checked`);
                else throw err;
              }
            }
          }
          const r = await verifyBackupFile(file, keys, add);
          blocksChecked += r.blocks;
          bytesChecked += r.bytes;
          if (file.slot.fileLength < file.size) warnings.push(`${p.file}: ${file.size - file.slot.fileLength} bytes after the committed end (left by an interrupted transform; ignored)`);
        } finally {
          await file.close();
        }
      }
    }
  }
  if (chainsN === 0 && damage.length === 0) {
    await assertNotBesideRepository(abs, 'verify');
    warnings.push(`no backup chains under ${abs} (a repository folder holds JOB/VM/VM.vbm): nothing was verified`);
  }
  return { repository: abs, ok: damage.length === 0, vmFolders: folders.length, chains: chainsN, points: pointsN, filesChecked, blocksChecked, bytesChecked, damage, warnings };
}

export type AddDamage = (d: { problem: string; disk?: string; block?: number; diskOffset?: number; fileOffset?: number }) => void;

/**
 * The checks of one opened backup file beyond those of BackupFile.open: the commit slot not in
 * use, a walk of the data area record by record, every table page and block (CRC32C; decoded and
 * digest with keys), records no table names. verifyRepository runs it for every point's file.
 */
export async function verifyBackupFile(file: BackupFile, keys: ChainKeys | null, add: AddDamage): Promise<{ blocks: number; bytes: number }> {
  let blocks = 0;
  let bytes = 0;
  // The slot not in use must be empty or valid: a flipped byte there is damage too.
  const page = Buffer.alloc(HEADER_PAGE_SIZE);
  await file.readAt(page, 0);
  const otherSlots: Array<{ slot: CommitSlot; name: string }> = [];
  COMMIT_SLOT_OFFSETS.forEach((o, i) => {
    if (i === file.slotIndex) return;
    try {
      const s = decodeCommitSlot(page.subarray(o, o + COMMIT_SLOT_SIZE), file.size);
      if (s) otherSlots.push({ slot: s, name: 'AB'[i]! });
    } catch (err) {
      add({ problem: `commit slot ${'AB'[i]} damaged: ${(err as Error).message}`, fileOffset: o });
    }
  });
  // Walk the data area record by record, so every byte below the index is covered by a CRC.
  const records = new Map<number, number>(); // offset -> stored length
  const hdr = Buffer.alloc(RECORD_HEADER_SIZE);
  let pos = HEADER_PAGE_SIZE;
  while (pos < file.slot.indexOffset) {
    try {
      if (pos + RECORD_HEADER_SIZE > file.slot.indexOffset) throw new Error('record header crosses the index');
      await file.readAt(hdr, pos);
      if (hdr.subarray(0, 8).equals(INDEX_MAGIC)) {
        // The index of an earlier generation (a file transformed in place, section 5). The one
        // the other commit slot names (kept for crash recovery) is checked against that slot's
        // CRC; older ones no slot names cannot be checked, and nothing reads them (section 3).
        const len = await oldIndexLength(file, pos, file.slot.indexOffset);
        const named = otherSlots.find((o) => o.slot.indexOffset === pos);
        const raw = Buffer.alloc(len);
        await file.readAt(raw, pos);
        if (named && (len !== named.slot.indexLength || crc32c(raw) !== named.slot.indexCrc)) {
          add({ problem: `index of generation ${named.slot.generation} (commit slot ${named.name}, kept for crash recovery) fails its CRC32C`, fileOffset: pos });
        } else {
          // Its layout obeys the rules of any index (section 3.4), its pages lie before it.
          try {
            decodeIndex(raw, file.header.blockSize, pos);
          } catch (err) {
            add({ problem: `index of an earlier generation at ${pos} is damaged: ${(err as Error).message}`, fileOffset: pos });
          }
        }
        pos += len;
        continue;
      }
      const h = decodeRecordHeader(hdr);
      if (pos + RECORD_HEADER_SIZE + h.storedLength > file.slot.indexOffset) throw new Error('record payload crosses the index');
      records.set(pos, h.storedLength);
      pos += RECORD_HEADER_SIZE + h.storedLength;
    } catch (err) {
      add({ problem: `data area unreadable from here on: ${(err as Error).message}`, fileOffset: pos });
      break;
    }
  }
  const walkComplete = pos === file.slot.indexOffset;
  const checked = new Map<number, Buffer | null>(); // record offset -> digest (null: damaged or not decryptable)
  for (const d of file.index.disks) {
    const pageRecords = new Set(d.pages.map((p) => p.offset));
    for (let p = 0; p < d.pages.length; p++) {
      let entries;
      try {
        entries = await file.page(d, p);
      } catch (err) {
        add({ problem: describeError(err), disk: d.name, fileOffset: d.pages[p]!.offset, block: p * d.entriesPerPage });
        continue;
      }
      for (const [k, e] of entries.entries()) {
        if (e.kind !== 'stored') continue;
        const i = p * d.entriesPerPage + k;
        const where = { disk: d.name, block: i, diskOffset: i * file.header.blockSize, fileOffset: e.recordOffset };
        if (walkComplete && !records.has(e.recordOffset)) {
          add({ ...where, problem: 'block table points into the middle of a record' });
          continue;
        }
        if (pageRecords.has(e.recordOffset)) {
          add({ ...where, problem: 'block table points at a table page' });
          continue;
        }
        let digest = checked.get(e.recordOffset);
        if (digest === undefined) {
          digest = await checkBlock(file, e, keys).then(
            (r) => {
              blocks++;
              bytes += e.plainLength;
              return r;
            },
            (err: unknown) => {
              add({ ...where, problem: `damaged block: ${(err as Error).message}` });
              return null;
            },
          );
          checked.set(e.recordOffset, digest);
        }
        if (digest && !digest.equals(e.digest) && (keys || !file.header.encryption)) add({ ...where, problem: 'digest of the plain data does not match the block table' });
      }
    }
  }
  // Records no table references (deduplicated away, or left by a transform): CRC only.
  for (const [offset, len] of records) {
    if (checked.has(offset) || isPage(file, offset)) continue;
    const buf = Buffer.alloc(RECORD_HEADER_SIZE + len);
    await file.readAt(buf, offset);
    const h = decodeRecordHeader(buf);
    if (crc32c(buf.subarray(RECORD_HEADER_SIZE)) !== h.payloadCrc) add({ problem: 'unreferenced record fails its CRC32C', fileOffset: offset });
  }
  return { blocks, bytes };
}

/** Length of the earlier index at `pos` (section 3.4 layout), checked to end inside the data area. */
async function oldIndexLength(file: BackupFile, pos: number, limit: number): Promise<number> {
  const head = Buffer.alloc(INDEX_HEADER_SIZE);
  await file.readAt(head, pos);
  const disks = head.readUInt32LE(8);
  const configLength = head.readUInt32LE(12);
  if (disks > MAX_DISKS) throw new Error(`earlier index at ${pos} has ${disks} disks`);
  let len = INDEX_HEADER_SIZE + ((configLength + 7) & ~7);
  const d = Buffer.alloc(DISK_DESCRIPTOR_SIZE);
  for (let i = 0; i < disks; i++) {
    if (pos + len + DISK_DESCRIPTOR_SIZE > limit) throw new Error(`earlier index at ${pos} crosses the current index`);
    await file.readAt(d, pos + len);
    len += DISK_DESCRIPTOR_SIZE + d.readUInt32LE(80) * TABLE_PAGE_REF_SIZE;
  }
  if (pos + len > limit) throw new Error(`earlier index at ${pos} crosses the current index`);
  return len;
}

function isPage(file: BackupFile, offset: number): boolean {
  return file.index.disks.some((d) => d.pages.some((p) => p.offset === offset));
}

/** Reads, checks and decodes one block; returns its digest (null digest check when encrypted without keys). */
async function checkBlock(file: BackupFile, e: StoredBlockEntry, keys: ChainKeys | null): Promise<Buffer | null> {
  const { header, payload } = await file.readRecord(e);
  if (header.encrypted && !keys) return null;
  const plain = decodePayload(payload, header.compression, header.encrypted, e.plainLength, keys, file.aad);
  return blockDigest(plain, keys);
}
