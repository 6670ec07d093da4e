// A volume group as its metadata text describes it (docs/formats/lvm2-reading.md §5–§6): the
// physical volumes with their extent areas, and each visible logical volume either as a list
// of readable segments (linear, striped) or with the reason it is refused (thin, raid,
// snapshot, cache, a gap, an extent past its PV). Pure.
import { BulwarkError } from '../../common/errors.js';
import { parseConfig, type ConfigScalar, type ConfigSection, type ConfigValue } from './config.js';
import { SECTOR } from './on-disk.js';

export interface PhysicalVolumeInfo {
  /** The name inside the metadata: `pv0`, `pv1`, ... */
  readonly name: string;
  /** 32 characters without dashes (as in the label). */
  readonly uuid: string;
  /** The guest's device name when the metadata was written (messages only). */
  readonly device?: string;
  /** Byte offset of extent 0 from the PV's start. */
  readonly peStart: number;
  readonly peCount: number;
  /** LVM itself flagged it MISSING. */
  readonly missing: boolean;
}

export interface Stripe {
  readonly pv: string;
  readonly startExtent: number;
}

export interface Segment {
  readonly startExtent: number;
  readonly extentCount: number;
  /** One stripe: linear. */
  readonly stripes: readonly Stripe[];
  /** Bytes per chunk when striped over more than one PV; 0 for linear. */
  readonly stripeSize: number;
}

export interface LogicalVolumeInfo {
  readonly name: string;
  readonly id: string;
  /** Bytes. */
  readonly size: number;
  /** Readable segments in LV order; empty when refused. */
  readonly segments: readonly Segment[];
  /** Why it cannot be read (thin, raid, snapshot, ...), or null. */
  readonly refused: string | null;
}

export interface VolumeGroupInfo {
  readonly name: string;
  readonly id: string;
  readonly seqno: number;
  /** Bytes per extent. */
  readonly extentSize: number;
  readonly physicalVolumes: readonly PhysicalVolumeInfo[];
  /** Visible LVs only (hidden ones are parts of others). */
  readonly logicalVolumes: readonly LogicalVolumeInfo[];
}

const SEGMENT_TYPE_WORDS: Record<string, string> = {
  thin: 'a thin volume (thin provisioning is not supported)',
  'thin-pool': 'a thin pool (thin provisioning is not supported)',
  mirror: 'a mirror (old-style LVM mirrors are not supported)',
  snapshot: 'a snapshot (old-style snapshots are not supported)',
  cache: 'a cached volume (dm-cache is not supported)',
  'cache-pool': 'a cache pool (dm-cache is not supported)',
  writecache: 'a volume with a write cache (dm-writecache is not supported)',
  vdo: 'a VDO volume (deduplication/compression is not supported)',
  'vdo-pool': 'a VDO pool (not supported)',
  integrity: 'a volume with dm-integrity (not supported)',
  error: 'an error target (its data is gone, e.g. after vgreduce --removemissing)',
  zero: 'a zero target (holds no data)',
};

function corrupt(message: string): BulwarkError {
  return new BulwarkError(message, { kind: 'corrupt' });
}

function stringOf(s: ConfigSection, key: string, where: string): string {
  const v = s.values.get(key);
  if (typeof v !== 'string') throw corrupt(`LVM metadata: ${where} has no ${key} string`);
  return v;
}

function intOf(s: ConfigSection, key: string, where: string, min = 0): number {
  const v = s.values.get(key);
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw corrupt(`LVM metadata: ${where} has no valid ${key} (a whole number ≥ ${min})`);
  return v;
}

function stringsOf(v: ConfigValue | undefined): string[] {
  return Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : [];
}

/** Parses metadata text into a volume group (the one top-level section). */
export function volumeGroupFromText(text: string): VolumeGroupInfo {
  const root = parseConfig(text);
  const name = root.order[0];
  if (name === undefined) throw corrupt('LVM metadata holds no volume group section');
  return volumeGroupFromConfig(name, root.sections.get(name)!);
}

export function volumeGroupFromConfig(name: string, vg: ConfigSection): VolumeGroupInfo {
  const where = `volume group ${name}`;
  const id = stringOf(vg, 'id', where);
  const seqno = intOf(vg, 'seqno', where);
  const extentSectors = intOf(vg, 'extent_size', where, 1);
  const extentSize = extentSectors * SECTOR;
  if (!Number.isSafeInteger(extentSize)) throw corrupt(`LVM metadata: ${where} has an extent size too large`);
  const physicalVolumes: PhysicalVolumeInfo[] = [];
  const pvSection = vg.sections.get('physical_volumes');
  for (const pvName of pvSection?.order ?? []) {
    const pv = pvSection!.sections.get(pvName)!;
    const w = `${where}, physical volume ${pvName}`;
    const uuid = stringOf(pv, 'id', w).replaceAll('-', '');
    const device = pv.values.get('device');
    const peStart = intOf(pv, 'pe_start', w) * SECTOR;
    const peCount = intOf(pv, 'pe_count', w);
    if (!Number.isSafeInteger(peStart) || !Number.isSafeInteger(peStart + peCount * extentSize)) throw corrupt(`LVM metadata: ${w} is too large`);
    physicalVolumes.push({
      name: pvName,
      uuid,
      ...(typeof device === 'string' ? { device } : {}),
      peStart,
      peCount,
      missing: stringsOf(pv.values.get('flags')).includes('MISSING') || stringsOf(pv.values.get('status')).includes('MISSING'),
    });
  }
  const pvByName = new Map(physicalVolumes.map((p) => [p.name, p]));
  const lvSection = vg.sections.get('logical_volumes');
  // A snapshot's copy-on-write store is a visible LV with plain segments: its bytes are no file system.
  const cowStores = new Map<string, string>();
  for (const lvName of lvSection?.order ?? []) {
    const lv = lvSection!.sections.get(lvName)!;
    for (const segName of lv.order) {
      const seg = lv.sections.get(segName)!;
      const cow = seg.values.get('cow_store');
      const origin = seg.values.get('origin');
      if (seg.values.get('type') === 'snapshot' && typeof cow === 'string') cowStores.set(cow, typeof origin === 'string' ? origin : '?');
    }
  }
  const logicalVolumes: LogicalVolumeInfo[] = [];
  for (const lvName of lvSection?.order ?? []) {
    const lv = lvSection!.sections.get(lvName)!;
    if (!stringsOf(lv.values.get('status')).includes('VISIBLE')) continue;
    const id = typeof lv.values.get('id') === 'string' ? (lv.values.get('id') as string) : '';
    const cowOf = cowStores.get(lvName);
    if (cowOf !== undefined) {
      logicalVolumes.push({ name: lvName, id, size: 0, segments: [], refused: `a snapshot of ${cowOf} (old-style snapshots are not supported: its data is a copy-on-write store, not a file system)` });
      continue;
    }
    try {
      const segments = readSegments(lv, `${where}, logical volume ${lvName}`, pvByName, new Set(lvSection!.order), extentSize);
      const extents = segments.reduce((n, s) => n + s.extentCount, 0);
      const size = extents * extentSize;
      if (!Number.isSafeInteger(size)) throw corrupt(`LVM metadata: logical volume ${lvName} is too large`);
      logicalVolumes.push({ name: lvName, id, size, segments, refused: null });
    } catch (err) {
      if (!(err instanceof Refusal)) throw err;
      logicalVolumes.push({ name: lvName, id, size: 0, segments: [], refused: err.message });
    }
  }
  return { name, id, seqno, extentSize, physicalVolumes, logicalVolumes };
}

/** A reason an LV cannot be read, as opposed to metadata that makes no sense at all. */
class Refusal extends Error {}

function readSegments(lv: ConfigSection, where: string, pvs: ReadonlyMap<string, PhysicalVolumeInfo>, lvNames: ReadonlySet<string>, extentSize: number): Segment[] {
  const raw = lv.order.filter((n) => /^segment\d+$/.test(n)).map((n) => ({ name: n, s: lv.sections.get(n)! }));
  if (raw.length === 0) throw new Refusal('it has no segments');
  const segments: Segment[] = [];
  for (const { name, s } of raw) {
    const w = `${where}, ${name}`;
    const type = s.values.get('type');
    if (type !== 'striped' && type !== 'linear') {
      const t = typeof type === 'string' ? type : '?';
      throw new Refusal(`it is ${SEGMENT_TYPE_WORDS[t] ?? (/^raid/.test(t) ? `a RAID volume (${t} is not supported)` : `of segment type ${t}, which is not supported`)}`);
    }
    const startExtent = intOf(s, 'start_extent', w);
    const extentCount = intOf(s, 'extent_count', w, 1);
    const stripeCount = type === 'linear' ? 1 : intOf(s, 'stripe_count', w, 1);
    const list = s.values.get('stripes');
    if (!Array.isArray(list) || list.length !== 2 * stripeCount) throw new Refusal(`${name} lists ${Array.isArray(list) ? list.length / 2 : 0} stripes, not ${stripeCount}`);
    if (extentCount % stripeCount !== 0) throw new Refusal(`${name}: ${extentCount} extents do not divide into ${stripeCount} stripes`);
    const perStripe = extentCount / stripeCount;
    const stripes: Stripe[] = [];
    for (let i = 0; i < stripeCount; i++) {
      const pvName: ConfigScalar | undefined = (list as readonly ConfigScalar[])[2 * i];
      const start: ConfigScalar | undefined = (list as readonly ConfigScalar[])[2 * i + 1];
      if (typeof pvName !== 'string' || typeof start !== 'number' || !Number.isSafeInteger(start) || start < 0) throw new Refusal(`${name}: stripe ${i + 1} is not "pvN", extent`);
      const pv = pvs.get(pvName);
      if (!pv) {
        // During pvmove an LV's segments point at the hidden mirror LV `pvmoveN` instead of a PV.
        if (lvNames.has(pvName)) throw new Refusal(`its extents are on ${pvName}, not on a physical volume (a pvmove was in progress); not supported`);
        throw new Refusal(`${name} uses physical volume ${pvName}, which the volume group does not list`);
      }
      if (start + perStripe > pv.peCount) throw new Refusal(`${name} uses extents ${start}–${start + perStripe - 1} of ${pvName}, which has only ${pv.peCount}`);
      stripes.push({ pv: pvName, startExtent: start });
    }
    let stripeSize = 0;
    if (stripeCount > 1) {
      stripeSize = intOf(s, 'stripe_size', w, 1) * SECTOR;
      if (stripeSize > extentSize || extentSize % stripeSize !== 0) throw new Refusal(`${name}: stripe size ${stripeSize} does not divide the extent size ${extentSize}`);
    }
    segments.push({ startExtent, extentCount, stripes, stripeSize });
  }
  segments.sort((a, b) => a.startExtent - b.startExtent);
  let next = 0;
  for (const s of segments) {
    if (s.startExtent !== next) throw new Refusal(s.startExtent > next ? `its segments leave a gap at extent ${next}` : `its segments overlap at extent ${s.startExtent}`);
    next += s.extentCount;
  }
  return segments;
}
