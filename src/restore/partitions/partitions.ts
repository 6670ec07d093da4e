// Reads MBR (with extended/logical partitions) and GPT partition tables, as specified in
// docs/formats/partition-tables.md. Pure: it only reads sectors through the disk it is given,
// and never trusts a field before checking it (fuzzed bytes give errors or warnings, not crashes).
import { crc32 } from 'node:zlib';
import { BulwarkError } from '../../common/errors.js';

/** What the reader needs of a disk: its size and reads at offsets. */
export interface SectorSource {
  readonly size: number;
  read(offset: number, length: number): Promise<Buffer>;
}

export type PartitionScheme = 'mbr' | 'gpt' | 'none';

export interface Partition {
  /** 1-based, as Linux numbers them: primaries 1–4, logicals from 5, GPT by slot. */
  readonly index: number;
  /** Bytes from the start of the disk. */
  readonly start: number;
  /** Bytes. */
  readonly size: number;
  /** MBR: "0x83"; GPT: the type GUID in upper case. */
  readonly type: string;
  readonly typeName?: string;
  readonly name?: string;
  readonly uuid?: string;
  readonly bootable?: boolean;
  readonly logical?: boolean;
}

export interface PartitionTable {
  readonly scheme: PartitionScheme;
  readonly sectorSize: number;
  readonly diskId?: string;
  readonly partitions: readonly Partition[];
  readonly warnings: readonly string[];
}

const SECTOR = 512;
const EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const GPT_PROTECTIVE = 0xee;
const MAX_LOGICAL = 128;
const MAX_GPT_ENTRIES = 16384;

const MBR_TYPE_NAMES: Record<number, string> = {
  0x01: 'FAT12',
  0x04: 'FAT16 <32M',
  0x05: 'Extended',
  0x06: 'FAT16',
  0x07: 'HPFS/NTFS/exFAT',
  0x0b: 'W95 FAT32',
  0x0c: 'W95 FAT32 (LBA)',
  0x0e: 'W95 FAT16 (LBA)',
  0x0f: 'W95 Ext\'d (LBA)',
  0x82: 'Linux swap',
  0x83: 'Linux',
  0x85: 'Linux extended',
  0x8e: 'Linux LVM',
  0xef: 'EFI (FAT-12/16/32)',
  0xfd: 'Linux raid autodetect',
};

const GPT_TYPE_NAMES: Record<string, string> = {
  'C12A7328-F81F-11D2-BA4B-00A0C93EC93B': 'EFI System',
  '21686148-6449-6E6F-744E-656564454649': 'BIOS boot',
  '0FC63DAF-8483-4772-8E79-3D69D8477DE4': 'Linux filesystem',
  '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709': 'Linux root (x86-64)',
  '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F': 'Linux swap',
  'E6D6D379-F507-44C2-A23C-238F2A3DF928': 'Linux LVM',
  'A19D880F-05FC-4D3B-A006-743F0F84911E': 'Linux RAID',
  '933AC7E1-2EB4-4F13-B844-0E14E2AEF915': 'Linux home',
  'BC13C2FF-59E6-4262-A352-B275FD6F7172': 'Linux extended boot',
  'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7': 'Microsoft basic data',
  'E3C9E316-0B5C-4DB8-817D-F92DF00215AE': 'Microsoft reserved',
  'DE94BBA4-06D1-4D40-A16A-BFD50179D6AC': 'Windows recovery environment',
};

/** Reads the partition table of a disk. Throws `corrupt` only when a GPT is present but unreadable. */
export async function readPartitionTable(disk: SectorSource): Promise<PartitionTable> {
  if (disk.size < 2 * SECTOR) return { scheme: 'none', sectorSize: SECTOR, partitions: [], warnings: [] };
  const mbr = await disk.read(0, SECTOR);
  const entries = parseMbrEntries(mbr);
  const hasProtective = entries?.some((e) => e.type === GPT_PROTECTIVE) ?? false;
  const gptAt512 = (await disk.read(SECTOR, 8)).toString('latin1') === 'EFI PART';
  const gptAt4k = !gptAt512 && disk.size >= 3 * 4096 && (await disk.read(4096, 8)).toString('latin1') === 'EFI PART';
  if (hasProtective || !entries) {
    if (hasProtective || gptAt512 || gptAt4k) return readGpt(disk, gptAt4k ? 4096 : SECTOR, hasProtective ? [] : ['GPT found without a protective MBR']);
  } else if (gptAt512 || gptAt4k) {
    // A valid MBR and a GPT signature but no protective entry: a stale GPT or a hybrid. Prefer
    // the GPT when it checks out, else the MBR.
    try {
      return await readGpt(disk, gptAt4k ? 4096 : SECTOR, ['GPT found without a protective MBR; the MBR is ignored']);
    } catch (err) {
      const table = await readMbr(disk, mbr, entries);
      return { ...table, warnings: [`stale GPT signature ignored (${(err as Error).message})`, ...table.warnings] };
    }
  }
  if (!entries) return { scheme: 'none', sectorSize: SECTOR, partitions: [], warnings: [] };
  return readMbr(disk, mbr, entries);
}

interface MbrEntry {
  readonly slot: number;
  readonly status: number;
  readonly type: number;
  readonly first: number;
  readonly count: number;
}

/** The four entries of an MBR/EBR sector, or null when it is not one (signature, status bytes). */
export function parseMbrEntries(sector: Buffer): MbrEntry[] | null {
  if (sector.length < SECTOR || sector[510] !== 0x55 || sector[511] !== 0xaa) return null;
  const out: MbrEntry[] = [];
  for (let slot = 0; slot < 4; slot++) {
    const at = 446 + slot * 16;
    const status = sector[at]!;
    if (status !== 0 && status !== 0x80) return null;
    out.push({
      slot,
      status,
      type: sector[at + 4]!,
      first: sector.readUInt32LE(at + 8),
      count: sector.readUInt32LE(at + 12),
    });
  }
  return out;
}

async function readMbr(disk: SectorSource, mbr: Buffer, entries: MbrEntry[]): Promise<PartitionTable> {
  const warnings: string[] = [];
  const partitions: Partition[] = [];
  const sectors = Math.floor(disk.size / SECTOR);
  const fits = (first: number, count: number, what: string): boolean => {
    if (first === 0 || first + count > sectors) {
      warnings.push(`${what} (sectors ${first}+${count}) lies outside the disk (${sectors} sectors); skipped`);
      return false;
    }
    return true;
  };
  let extended: MbrEntry | null = null;
  for (const e of entries) {
    if (e.type === 0 || e.count === 0) continue;
    if (!fits(e.first, e.count, `partition ${e.slot + 1}`)) continue;
    if (EXTENDED_TYPES.has(e.type)) {
      if (extended) warnings.push(`second extended partition ${e.slot + 1} ignored`);
      else extended = e;
    }
    partitions.push(mbrPartition(e.slot + 1, e.first, e.count, e.type, { bootable: e.status === 0x80 }));
  }
  if (extended) {
    let next = 5;
    const seen = new Set<number>();
    let ebr = extended.first;
    for (let hops = 0; ; hops++) {
      if (hops >= MAX_LOGICAL) {
        warnings.push(`more than ${MAX_LOGICAL} logical partitions; stopped`);
        break;
      }
      if (seen.has(ebr) || ebr >= sectors) {
        warnings.push(`extended partition chain loops or leaves the disk at sector ${ebr}; stopped`);
        break;
      }
      seen.add(ebr);
      const chain = parseMbrEntries(await disk.read(ebr * SECTOR, SECTOR));
      if (!chain) {
        warnings.push(`no valid EBR at sector ${ebr}; logical partitions end there`);
        break;
      }
      const [logical, link] = chain as [MbrEntry, MbrEntry];
      if (logical.type !== 0 && logical.count !== 0) {
        const first = ebr + logical.first;
        if (fits(first, logical.count, `logical partition ${next}`)) {
          partitions.push(mbrPartition(next, first, logical.count, logical.type, { logical: true }));
        }
        next++;
      }
      if (!EXTENDED_TYPES.has(link.type) || link.count === 0) break;
      ebr = extended.first + link.first;
    }
  }
  return {
    scheme: 'mbr',
    sectorSize: SECTOR,
    diskId: mbr.readUInt32LE(440).toString(16).padStart(8, '0'),
    partitions,
    warnings,
  };
}

function mbrPartition(
  index: number,
  first: number,
  count: number,
  type: number,
  extra: { bootable?: boolean; logical?: boolean },
): Partition {
  const typeName = MBR_TYPE_NAMES[type];
  return {
    index,
    start: first * SECTOR,
    size: count * SECTOR,
    type: `0x${type.toString(16).padStart(2, '0')}`,
    ...(typeName ? { typeName } : {}),
    ...(extra.bootable ? { bootable: true } : {}),
    ...(extra.logical ? { logical: true } : {}),
  };
}

interface GptHeader {
  readonly myLba: bigint;
  readonly otherLba: bigint;
  readonly diskGuid: string;
  readonly entriesLba: bigint;
  readonly entryCount: number;
  readonly entrySize: number;
}

async function readGpt(disk: SectorSource, sectorSize: number, warnings: string[]): Promise<PartitionTable> {
  const lastLba = BigInt(Math.floor(disk.size / sectorSize) - 1);
  const primary = await tryGptHeader(disk, sectorSize, 1n);
  let chosen: { header: GptHeader; entries: Buffer };
  if (primary.ok) {
    chosen = primary.value;
  } else {
    const where = primary.header && primary.header.otherLba <= lastLba ? primary.header.otherLba : lastLba;
    const backup = await tryGptHeader(disk, sectorSize, where);
    if (!backup.ok) {
      throw new BulwarkError('no readable GPT: primary and backup headers are both damaged', {
        kind: 'corrupt',
        context: { primary: primary.reason, backup: backup.reason },
      });
    }
    warnings.push(`primary GPT header damaged (${primary.reason}); using the backup at LBA ${where}`);
    chosen = backup.value;
  }
  const { header, entries } = chosen;
  const partitions: Partition[] = [];
  const sectors = BigInt(Math.floor(disk.size / sectorSize));
  for (let slot = 0; slot < header.entryCount; slot++) {
    const e = entries.subarray(slot * header.entrySize, slot * header.entrySize + 128);
    const type = guidString(e.subarray(0, 16));
    if (type === '00000000-0000-0000-0000-000000000000') continue;
    const first = e.readBigUInt64LE(32);
    const last = e.readBigUInt64LE(40);
    if (last < first || last >= sectors || first === 0n) {
      warnings.push(`GPT partition ${slot + 1} (LBA ${first}..${last}) is outside the disk or reversed; skipped`);
      continue;
    }
    const name = decodeUtf16Name(e.subarray(56, 128));
    const typeName = GPT_TYPE_NAMES[type];
    partitions.push({
      index: slot + 1,
      start: Number(first) * sectorSize,
      size: Number(last - first + 1n) * sectorSize,
      type,
      ...(typeName ? { typeName } : {}),
      ...(name ? { name } : {}),
      uuid: guidString(e.subarray(16, 32)),
    });
  }
  return { scheme: 'gpt', sectorSize, diskId: header.diskGuid, partitions, warnings };
}

type GptAttempt =
  | { ok: true; value: { header: GptHeader; entries: Buffer } }
  | { ok: false; reason: string; header?: GptHeader };

async function tryGptHeader(disk: SectorSource, sectorSize: number, lba: bigint): Promise<GptAttempt> {
  const offset = Number(lba) * sectorSize;
  if (offset + sectorSize > disk.size) return { ok: false, reason: `LBA ${lba} is past the end of the disk` };
  const sector = await disk.read(offset, sectorSize);
  if (sector.toString('latin1', 0, 8) !== 'EFI PART') return { ok: false, reason: `no signature at LBA ${lba}` };
  const headerSize = sector.readUInt32LE(12);
  if (headerSize < 92 || headerSize > sectorSize) return { ok: false, reason: `header size ${headerSize} out of range` };
  const header: GptHeader = {
    myLba: sector.readBigUInt64LE(24),
    otherLba: sector.readBigUInt64LE(32),
    diskGuid: guidString(sector.subarray(56, 72)),
    entriesLba: sector.readBigUInt64LE(72),
    entryCount: sector.readUInt32LE(80),
    entrySize: sector.readUInt32LE(84),
  };
  const copy = Buffer.from(sector.subarray(0, headerSize));
  const storedCrc = copy.readUInt32LE(16);
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== storedCrc) return { ok: false, reason: `header CRC mismatch at LBA ${lba}`, header };
  if (header.myLba !== lba) return { ok: false, reason: `header at LBA ${lba} says it is at LBA ${header.myLba}`, header };
  const { entryCount, entrySize } = header;
  if (entryCount > MAX_GPT_ENTRIES || entrySize < 128 || entrySize > 4096 || (entrySize & (entrySize - 1)) !== 0) {
    return { ok: false, reason: `entry array of ${entryCount} × ${entrySize} bytes is not plausible`, header };
  }
  const arrayOffset = Number(header.entriesLba) * sectorSize;
  const arrayBytes = entryCount * entrySize;
  if (header.entriesLba < 1n || arrayOffset + arrayBytes > disk.size) {
    return { ok: false, reason: `entry array at LBA ${header.entriesLba} is outside the disk`, header };
  }
  const entries = await disk.read(arrayOffset, arrayBytes);
  if (crc32(entries) !== sector.readUInt32LE(88)) return { ok: false, reason: `entry array CRC mismatch (header at LBA ${lba})`, header };
  return { ok: true, value: { header, entries } };
}

/** A GUID in its usual text form from its mixed-endian on-disk bytes. */
export function guidString(b: Buffer): string {
  const hex = (x: Buffer): string => x.toString('hex');
  const le = (x: Buffer): string => hex(Buffer.from(x).reverse());
  return [le(b.subarray(0, 4)), le(b.subarray(4, 6)), le(b.subarray(6, 8)), hex(b.subarray(8, 10)), hex(b.subarray(10, 16))]
    .join('-')
    .toUpperCase();
}

function decodeUtf16Name(b: Buffer): string {
  let end = 0;
  while (end + 1 < b.length && (b[end] !== 0 || b[end + 1] !== 0)) end += 2;
  return b.toString('utf16le', 0, end);
}
