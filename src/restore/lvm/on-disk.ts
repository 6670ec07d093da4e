// The binary parts of LVM2 as docs/formats/lvm2-reading.md §1–§4 specify them: the label in one
// of the first four sectors of a physical volume, the PV header after it, the metadata area
// header and its circular text buffer. Pure: reads go through the SectorSource it is given, and
// every field is checked before it is used (fuzzed bytes give errors, never crashes or hangs).
import { crc32 } from 'node:zlib';
import { BulwarkError } from '../../common/errors.js';
import type { SectorSource } from '../partitions/partitions.js';

export const SECTOR = 512;
export const LABEL_SCAN_SECTORS = 4;
const LABEL_ID = 'LABELONE';
const LABEL_TYPE = 'LVM2 001';
const INITIAL_CRC = 0xf597a6cf;
export const MDA_HEADER_SIZE = 512;
const MDA_MAGIC = Buffer.from(' LVM2 x[5A%r0N*>', 'latin1');
const RAW_LOCN_IGNORED = 0x1;
/** Our bound on one metadata text (LVM's are kilobytes). */
export const MAX_METADATA_TEXT = 16 * 1024 * 1024;
const UUID_CHARS = /^[0-9A-Za-z!#]{32}$/;

/** LVM's CRC: reflected CRC-32 from 0xF597A6CF without the final inversion. */
export function lvmCrc(data: Buffer, previous = INITIAL_CRC): number {
  return ~crc32(data, ~previous >>> 0) >>> 0;
}

/** A byte range of the PV: `{offset, size}` from the PV's start; size 0 = to the end. */
export interface DiskArea {
  readonly offset: number;
  readonly size: number;
}

export interface PvLabel {
  /** The sector (0–3) the label was found in. */
  readonly sector: number;
  /** 32 characters, no dashes. */
  readonly pvUuid: string;
  readonly deviceSize: number;
  readonly dataAreas: readonly DiskArea[];
  readonly metadataAreas: readonly DiskArea[];
}

function corrupt(message: string, context: Record<string, string | number> = {}): BulwarkError {
  return new BulwarkError(message, { kind: 'corrupt', context });
}

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`LVM ${what} ${v} is too large`);
  return Number(v);
}

/** `ABCDEF…` (32) as LVM shows it: 6-4-4-4-4-4-6 groups joined by `-`. */
export function formatUuid(raw: string): string {
  const groups = [6, 4, 4, 4, 4, 4, 6];
  let i = 0;
  return groups.map((g) => raw.slice(i, (i += g))).join('-');
}

/**
 * Finds and parses the LVM2 label and PV header in the first four sectors of `head` (the first
 * 2048 bytes of a volume, or fewer if it is smaller). Null when no sector starts with LABELONE;
 * a `corrupt` error when one does but its fields do not check out.
 */
export function parsePvLabel(head: Buffer): PvLabel | null {
  for (let s = 0; s < LABEL_SCAN_SECTORS && (s + 1) * SECTOR <= head.length; s++) {
    const sec = head.subarray(s * SECTOR, (s + 1) * SECTOR);
    if (sec.toString('latin1', 0, 8) !== LABEL_ID) continue;
    const where = { sector: s };
    if (sec.toString('latin1', 24, 32) !== LABEL_TYPE) throw corrupt(`LVM label in sector ${s} has type "${sec.toString('latin1', 24, 32)}", not ${LABEL_TYPE}`, where);
    if (sec.readBigUInt64LE(8) !== BigInt(s)) throw corrupt(`LVM label in sector ${s} says it is in sector ${sec.readBigUInt64LE(8)}`, where);
    const crc = sec.readUInt32LE(16);
    const actual = lvmCrc(sec.subarray(20));
    if (crc !== actual) throw corrupt(`LVM label in sector ${s} fails its checksum (stored ${hex(crc)}, computed ${hex(actual)})`, where);
    const headerAt = sec.readUInt32LE(20);
    if (headerAt < 32 || headerAt + 40 + 32 > SECTOR) throw corrupt(`LVM label in sector ${s} puts its PV header at byte ${headerAt}`, where);
    return { sector: s, ...parsePvHeader(sec, headerAt) };
  }
  return null;
}

function parsePvHeader(sec: Buffer, at: number): Omit<PvLabel, 'sector'> {
  const pvUuid = sec.toString('latin1', at, at + 32);
  if (!UUID_CHARS.test(pvUuid)) throw corrupt('LVM PV header holds no valid PV UUID');
  const deviceSize = u64(sec, at + 32, 'device size');
  let p = at + 40;
  const list = (what: string): DiskArea[] => {
    const out: DiskArea[] = [];
    for (;;) {
      if (p + 16 > sec.length) throw corrupt(`LVM PV header: the list of ${what} does not end inside the label sector`);
      const offset = u64(sec, p, `${what} offset`);
      const size = u64(sec, p + 8, `${what} size`);
      p += 16;
      if (offset === 0) return out;
      out.push({ offset, size });
    }
  };
  const dataAreas = list('data areas');
  const metadataAreas = list('metadata areas');
  return { pvUuid, deviceSize, dataAreas, metadataAreas };
}

export interface RawLocation {
  /** From the start of the metadata area. */
  readonly offset: number;
  readonly size: number;
  readonly checksum: number;
  readonly ignored: boolean;
}

export interface MdaHeader {
  readonly start: number;
  readonly size: number;
  readonly locations: readonly RawLocation[];
}

/** Parses and checks a 512-byte metadata area header found at `area`. */
export function parseMdaHeader(b: Buffer, area: DiskArea): MdaHeader {
  const where = { offset: area.offset };
  if (b.length < MDA_HEADER_SIZE) throw corrupt('LVM metadata area header is cut short', where);
  const h = b.subarray(0, MDA_HEADER_SIZE);
  if (!h.subarray(4, 20).equals(MDA_MAGIC)) throw corrupt(`no LVM metadata area header at byte ${area.offset} of the PV (bad magic)`, where);
  const crc = h.readUInt32LE(0);
  const actual = lvmCrc(h.subarray(4));
  if (crc !== actual) throw corrupt(`LVM metadata area header at byte ${area.offset} fails its checksum (stored ${hex(crc)}, computed ${hex(actual)})`, where);
  const version = h.readUInt32LE(20);
  if (version !== 1) throw corrupt(`LVM metadata area header at byte ${area.offset} has version ${version}, not 1`, where);
  const start = u64(h, 24, 'metadata area start');
  const size = u64(h, 32, 'metadata area size');
  if (start !== area.offset) throw corrupt(`LVM metadata area header at byte ${area.offset} says it starts at byte ${start}`, where);
  if (size !== area.size) throw corrupt(`LVM metadata area at byte ${area.offset} is ${size} bytes by its header, ${area.size} by the PV header`, where);
  if (size <= MDA_HEADER_SIZE) throw corrupt(`LVM metadata area at byte ${area.offset} is only ${size} bytes`, where);
  const locations: RawLocation[] = [];
  for (let p = 40; p + 24 <= MDA_HEADER_SIZE; p += 24) {
    const offset = u64(h, p, 'metadata offset');
    const len = u64(h, p + 8, 'metadata size');
    const checksum = h.readUInt32LE(p + 16);
    const flags = h.readUInt32LE(p + 20);
    if (offset === 0 && len === 0 && checksum === 0 && flags === 0) break;
    locations.push({ offset, size: len, checksum, ignored: (flags & RAW_LOCN_IGNORED) !== 0 });
  }
  return { start, size, locations };
}

/**
 * Reads the committed metadata text of one metadata area of a PV (`pv` reads the PV from its own
 * byte 0). Null when the area holds no metadata (ignored, or empty); `corrupt` errors for a bad
 * header, a location outside the area, or a checksum mismatch.
 */
export async function readMetadataText(pv: SectorSource, area: DiskArea): Promise<string | null> {
  if (area.size <= MDA_HEADER_SIZE || area.offset + area.size > pv.size) {
    throw corrupt(`LVM metadata area at byte ${area.offset} (${area.size} bytes) does not fit in the ${pv.size}-byte PV`, { offset: area.offset });
  }
  const header = parseMdaHeader(await pv.read(area.offset, MDA_HEADER_SIZE), area);
  const loc = header.locations[0];
  if (!loc || loc.ignored || loc.size === 0) return null;
  const ring = area.size - MDA_HEADER_SIZE;
  if (loc.offset < MDA_HEADER_SIZE || loc.offset >= area.size) throw corrupt(`LVM metadata text at offset ${loc.offset} lies outside its ${area.size}-byte area`, { offset: area.offset });
  if (loc.size > ring || loc.size > MAX_METADATA_TEXT) throw corrupt(`LVM metadata text of ${loc.size} bytes does not fit its ${area.size}-byte area`, { offset: area.offset });
  const first = Math.min(loc.size, area.size - loc.offset);
  const parts = [await pv.read(area.offset + loc.offset, first)];
  if (first < loc.size) parts.push(await pv.read(area.offset + MDA_HEADER_SIZE, loc.size - first));
  const text = Buffer.concat(parts);
  const actual = lvmCrc(text);
  if (actual !== loc.checksum) throw corrupt(`LVM metadata text at byte ${area.offset + loc.offset} fails its checksum (stored ${hex(loc.checksum)}, computed ${hex(actual)})`, { offset: area.offset });
  let end = text.length;
  while (end > 0 && text[end - 1] === 0) end--;
  return text.toString('utf8', 0, end);
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}
