// Recognises what a partition (or a whole disk) holds from the superblock magic at its fixed
// offset, the way blkid does for these types: ext2/3/4, xfs, btrfs, vfat, ntfs, an LVM physical
// volume, swap. Pure: it reads at most the first 68 KiB through the given source.
import type { SectorSource } from '../partitions/partitions.js';

export type FileSystemType = 'ext2' | 'ext3' | 'ext4' | 'xfs' | 'btrfs' | 'vfat' | 'ntfs' | 'lvm2-pv' | 'swap';

export interface DetectedFileSystem {
  readonly type: FileSystemType;
  readonly label?: string;
  readonly uuid?: string;
}

/** Bytes read from the start of the volume: enough for the btrfs superblock at 64 KiB. */
const PROBE_BYTES = 0x10000 + 0x1000;

/**
 * What file system (or volume signature) starts at `offset` of the disk, or null if none is
 * recognised. `length` bounds the volume (a partition's size).
 */
export async function detectFileSystem(
  disk: SectorSource,
  offset = 0,
  length = disk.size - offset,
): Promise<DetectedFileSystem | null> {
  const n = Math.min(PROBE_BYTES, length, disk.size - offset);
  if (n < 1024) return null;
  return detectFromBytes(await disk.read(offset, n));
}

/** The same, over the first bytes of a volume already in memory (at least 64 KiB for btrfs). */
export function detectFromBytes(b: Buffer): DetectedFileSystem | null {
  return ext(b) ?? xfs(b) ?? btrfs(b) ?? lvm(b) ?? swap(b) ?? ntfs(b) ?? vfat(b);
}

function ext(b: Buffer): DetectedFileSystem | null {
  const sb = 1024;
  if (b.length < sb + 0x100 || b.readUInt16LE(sb + 0x38) !== 0xef53) return null;
  const compat = b.readUInt32LE(sb + 0x5c);
  const incompat = b.readUInt32LE(sb + 0x60);
  const roCompat = b.readUInt32LE(sb + 0x64);
  const HAS_JOURNAL = 0x4;
  // ext4-only features: extents, 64bit, flex_bg, mmp, meta_bg+..., inline data; huge_file,
  // gdt_csum, dir_nlink, extra_isize, metadata_csum in ro_compat.
  const EXT4_INCOMPAT = 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x8000;
  const EXT4_RO = 0x8 | 0x10 | 0x20 | 0x40 | 0x400;
  const type: FileSystemType =
    (incompat & EXT4_INCOMPAT) !== 0 || (roCompat & EXT4_RO) !== 0 ? 'ext4' : (compat & HAS_JOURNAL) !== 0 ? 'ext3' : 'ext2';
  return withOptional(type, cString(b, sb + 0x78, 16), uuid(b.subarray(sb + 0x68, sb + 0x78)));
}

function xfs(b: Buffer): DetectedFileSystem | null {
  if (b.length < 512 || b.toString('latin1', 0, 4) !== 'XFSB') return null;
  return withOptional('xfs', cString(b, 108, 12), uuid(b.subarray(32, 48)));
}

function btrfs(b: Buffer): DetectedFileSystem | null {
  const sb = 0x10000;
  if (b.length < sb + 0x22b || b.toString('latin1', sb + 0x40, sb + 0x48) !== '_BHRfS_M') return null;
  return withOptional('btrfs', cString(b, sb + 0x12b, 256), uuid(b.subarray(sb + 0x20, sb + 0x30)));
}

function lvm(b: Buffer): DetectedFileSystem | null {
  // The label sits in one of the first four sectors, usually the second.
  for (let s = 0; s < 4 && (s + 1) * 512 <= b.length; s++) {
    const at = s * 512;
    if (b.toString('latin1', at, at + 8) !== 'LABELONE' || b.toString('latin1', at + 24, at + 32) !== 'LVM2 001') continue;
    const id = b.toString('latin1', at + 32, at + 64);
    const groups = [6, 4, 4, 4, 4, 4, 6];
    let i = 0;
    const parts = groups.map((g) => id.slice(i, (i += g)));
    return { type: 'lvm2-pv', uuid: parts.join('-') };
  }
  return null;
}

function swap(b: Buffer): DetectedFileSystem | null {
  for (const page of [4096, 8192, 16384, 65536]) {
    if (b.length < page) break;
    const sig = b.toString('latin1', page - 10, page);
    if (sig !== 'SWAPSPACE2' && sig !== 'SWAP-SPACE') continue;
    if (sig === 'SWAP-SPACE') return { type: 'swap' };
    return withOptional('swap', cString(b, 1024 + 28, 16), uuid(b.subarray(1024 + 12, 1024 + 28)));
  }
  return null;
}

function ntfs(b: Buffer): DetectedFileSystem | null {
  if (b.length < 512 || b.toString('latin1', 3, 11) !== 'NTFS    ' || b[510] !== 0x55 || b[511] !== 0xaa) return null;
  // The label lives in the $Volume MFT record: not cheap, so only the serial number is given.
  return { type: 'ntfs', uuid: b.readBigUInt64LE(0x48).toString(16).toUpperCase().padStart(16, '0') };
}

function vfat(b: Buffer): DetectedFileSystem | null {
  if (b.length < 512 || b[510] !== 0x55 || b[511] !== 0xaa) return null;
  const bytesPerSector = b.readUInt16LE(11);
  const sectorsPerCluster = b[13]!;
  const fats = b[16]!;
  if (![512, 1024, 2048, 4096].includes(bytesPerSector) || sectorsPerCluster === 0 || (sectorsPerCluster & (sectorsPerCluster - 1)) !== 0 || fats === 0) {
    return null;
  }
  // FAT32 keeps its extended BPB at 0x40, FAT12/16 at 0x24.
  let ebpb: number;
  if (b.toString('latin1', 0x52, 0x57) === 'FAT32') ebpb = 0x40;
  else if (/^FAT1[26]/.test(b.toString('latin1', 0x36, 0x3b)) || b.toString('latin1', 0x36, 0x39) === 'FAT') ebpb = 0x24;
  else return null;
  const hasIds = b[ebpb + 2] === 0x29;
  if (!hasIds) return { type: 'vfat' };
  const serial = b.readUInt32LE(ebpb + 3);
  const hex = serial.toString(16).toUpperCase().padStart(8, '0');
  const label = b.toString('latin1', ebpb + 7, ebpb + 18).trimEnd();
  return withOptional('vfat', label === 'NO NAME' ? '' : label, `${hex.slice(0, 4)}-${hex.slice(4)}`);
}

function withOptional(type: FileSystemType, label: string, id: string | undefined): DetectedFileSystem {
  return { type, ...(label ? { label } : {}), ...(id ? { uuid: id } : {}) };
}

function cString(b: Buffer, at: number, max: number): string {
  const s = b.subarray(at, at + max);
  const end = s.indexOf(0);
  return s.toString('utf8', 0, end === -1 ? s.length : end).trim();
}

/** A 16-byte big-endian UUID in text form; undefined when all zero. */
function uuid(b: Buffer): string | undefined {
  if (b.every((x) => x === 0)) return undefined;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
