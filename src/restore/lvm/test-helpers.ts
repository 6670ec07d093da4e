// Test data for the LVM reader: physical volumes written into memory the way LVM2 lays them out
// (label in sector 1, PV header, metadata area with its circular text buffer), volume group
// metadata text from a short description, and an in-memory disk. Used by unit tests only.
import type { RandomAccessDisk } from '../../disk/types.js';
import { lvmCrc, MDA_HEADER_SIZE, SECTOR } from './on-disk.js';

export function memoryDisk(bytes: Buffer): RandomAccessDisk & { reads: number } {
  const d = {
    size: bytes.length,
    reads: 0,
    read(offset: number, length: number): Promise<Buffer> {
      if (offset < 0 || length < 0 || offset + length > bytes.length) return Promise.reject(new Error(`read ${offset}+${length} outside ${bytes.length}`));
      d.reads++;
      return Promise.resolve(Buffer.from(bytes.subarray(offset, offset + length)));
    },
    close: () => Promise.resolve(),
  };
  return d;
}

export interface PvLayout {
  /** 32 characters. */
  readonly uuid: string;
  /** Where the PV starts in `image`. */
  readonly at: number;
  readonly size: number;
  /** Metadata area (from the PV start); default 4096 / 1 MiB − 4096. */
  readonly mda?: { offset: number; size: number };
  /** Byte offset of extent 0; default 1 MiB. */
  readonly peStart?: number;
  /** Metadata text to store (null: a PV without metadata areas). */
  readonly text: string | null;
  /** Where in the area the text starts (default 512; larger values make it wrap). */
  readonly textOffset?: number;
  readonly labelSector?: number;
}

/** Writes a PV (label, PV header, metadata area with `text`) into `image`. */
export function writePv(image: Buffer, pv: PvLayout): void {
  const mda = pv.mda ?? { offset: 4096, size: 1024 * 1024 - 4096 };
  const peStart = pv.peStart ?? 1024 * 1024;
  const sector = pv.labelSector ?? 1;
  const label = Buffer.alloc(SECTOR);
  label.write('LABELONE', 0, 'latin1');
  label.writeBigUInt64LE(BigInt(sector), 8);
  label.writeUInt32LE(32, 20);
  label.write('LVM2 001', 24, 'latin1');
  label.write(pv.uuid, 32, 'latin1');
  label.writeBigUInt64LE(BigInt(pv.size), 64);
  let p = 72;
  const locn = (offset: number, size: number): void => {
    label.writeBigUInt64LE(BigInt(offset), p);
    label.writeBigUInt64LE(BigInt(size), p + 8);
    p += 16;
  };
  locn(peStart, 0);
  locn(0, 0);
  if (pv.text !== null) locn(mda.offset, mda.size);
  locn(0, 0);
  label.writeUInt32LE(2, p); // extension version 2, no flags, no bootloader areas
  label.writeUInt32LE(lvmCrc(label.subarray(20)), 16);
  label.copy(image, pv.at + sector * SECTOR);
  if (pv.text === null) return;

  const text = Buffer.from(`${pv.text}\0`, 'utf8');
  const textOffset = pv.textOffset ?? MDA_HEADER_SIZE;
  const area = pv.at + mda.offset;
  const first = Math.min(text.length, mda.size - textOffset);
  text.copy(image, area + textOffset, 0, first);
  if (first < text.length) text.copy(image, area + MDA_HEADER_SIZE, first);
  const h = Buffer.alloc(MDA_HEADER_SIZE);
  h.write(' LVM2 x[5A%r0N*>', 4, 'latin1');
  h.writeUInt32LE(1, 20);
  h.writeBigUInt64LE(BigInt(mda.offset), 24);
  h.writeBigUInt64LE(BigInt(mda.size), 32);
  h.writeBigUInt64LE(BigInt(textOffset), 40);
  h.writeBigUInt64LE(BigInt(text.length), 48);
  h.writeUInt32LE(lvmCrc(text), 56);
  h.writeUInt32LE(lvmCrc(h.subarray(4)), 0);
  h.copy(image, area);
}

export interface VgDescription {
  readonly name: string;
  readonly seqno?: number;
  /** Sectors. */
  readonly extentSize: number;
  readonly pvs: ReadonlyArray<{ uuid: string; peStart: number; peCount: number; flags?: string[] }>;
  readonly lvs: ReadonlyArray<{
    name: string;
    hidden?: boolean;
    segments: ReadonlyArray<{ start: number; count: number; type?: string; stripeSize?: number; stripes?: Array<[string, number]>; extra?: string }>;
  }>;
}

/** `ABCDEF...` (32) with LVM's dashes. */
export function dashed(u: string): string {
  return [u.slice(0, 6), u.slice(6, 10), u.slice(10, 14), u.slice(14, 18), u.slice(18, 22), u.slice(22, 26), u.slice(26)].join('-');
}

/** Metadata text in the shape LVM2 writes it. */
export function vgText(vg: VgDescription): string {
  const t: string[] = [];
  t.push(`${vg.name} {`, `id = "${dashed('VGID'.padEnd(32, 'v'))}"`, `seqno = ${vg.seqno ?? 1}`, 'format = "lvm2"', 'status = ["RESIZEABLE", "READ", "WRITE"]', 'flags = []');
  t.push(`extent_size = ${vg.extentSize}`, 'max_lv = 0', 'max_pv = 0', 'metadata_copies = 0', '', 'physical_volumes {', '');
  vg.pvs.forEach((pv, i) => {
    t.push(`pv${i} {`, `id = "${dashed(pv.uuid)}"`, `device = "/dev/vd${String.fromCharCode(97 + i)}2"\t# Hint only`, '', 'status = ["ALLOCATABLE"]');
    t.push(`flags = [${(pv.flags ?? []).map((f) => `"${f}"`).join(', ')}]`, `dev_size = ${(pv.peStart + pv.peCount * vg.extentSize) * 1}`, `pe_start = ${pv.peStart}`, `pe_count = ${pv.peCount}`, '}');
  });
  t.push('}', '', 'logical_volumes {', '');
  for (const lv of vg.lvs) {
    t.push(`${lv.name} {`, `id = "${dashed(lv.name.padEnd(32, 'x').slice(0, 32).replace(/[^0-9A-Za-z]/g, 'y'))}"`, `status = ["READ", "WRITE"${lv.hidden ? '' : ', "VISIBLE"'}]`, 'flags = []');
    t.push('creation_time = 1764000000\t# 2025-11-24 16:00:00 +0000', 'creation_host = "guest \\"one\\""', `segment_count = ${lv.segments.length}`, '');
    lv.segments.forEach((s, i) => {
      t.push(`segment${i + 1} {`, `start_extent = ${s.start}`, `extent_count = ${s.count}`, '', `type = "${s.type ?? 'striped'}"`);
      if (s.stripes) {
        t.push(`stripe_count = ${s.stripes.length}${s.stripes.length === 1 ? '\t# linear' : ''}`);
        if (s.stripeSize !== undefined) t.push(`stripe_size = ${s.stripeSize}`);
        t.push('', 'stripes = [', s.stripes.map(([pv, e]) => `"${pv}", ${e}`).join(',\n'), ']');
      }
      if (s.extra) t.push(s.extra);
      t.push('}');
    });
    t.push('}');
  }
  t.push('}', '}', '# Generated by LVM2 version 2.03.16(2) (2022-05-18): Tue Nov 25 20:00:00 2026', '', 'contents = "Text Format Volume Group"', 'version = 1', '', 'description = ""', '', 'creation_host = "builder"\t# Linux builder', 'creation_time = 1764100800\t# Tue Nov 25 20:00:00 2026', '');
  return `${t.join('\n')}\n`;
}
