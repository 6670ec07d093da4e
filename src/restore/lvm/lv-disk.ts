// A logical volume read as a disk of its own: each read is split at segment and stripe-chunk
// boundaries and sent to the disks that hold the physical volumes (docs/formats/lvm2-reading.md
// §6). The PV disks are not owned: close() does nothing; the caller closes them.
import { BulwarkError } from '../../common/errors.js';
import type { Extent, RandomAccessDisk } from '../../disk/types.js';
import type { LogicalVolumeInfo } from './volume-group.js';

/** Where a PV's extent 0 lies: on which disk, at which byte. */
export interface ExtentArea {
  readonly disk: RandomAccessDisk;
  /** Name of that disk, for messages and for callers that map back (e.g. `vdb`). */
  readonly diskName: string;
  /** Byte offset of the PV's extent 0 on `disk`. */
  readonly offset: number;
}

/** One contiguous run of the LV on one disk. */
export interface LinearRun {
  readonly diskName: string;
  readonly disk: RandomAccessDisk;
  /** Byte offset on that disk. */
  readonly offset: number;
  readonly size: number;
}

export interface LogicalVolumeDisk extends RandomAccessDisk {
  /** The whole LV as one run on one disk (a loop `offset=` is enough), or null. */
  readonly linear: LinearRun | null;
}

interface MappedSegment {
  /** Byte range of the LV. */
  readonly start: number;
  readonly length: number;
  readonly stripes: ReadonlyArray<{ area: ExtentArea; offset: number }>;
  readonly chunk: number;
}

/**
 * The LV as a RandomAccessDisk. `areas` maps each PV name the LV uses to where its extents are;
 * `extentSize` is the VG's extent size in bytes.
 */
export function openLogicalVolume(lv: LogicalVolumeInfo, extentSize: number, areas: ReadonlyMap<string, ExtentArea>): LogicalVolumeDisk {
  if (lv.refused !== null) throw new BulwarkError(`logical volume ${lv.name} cannot be read: ${lv.refused}`, { kind: 'invalid' });
  const segments: MappedSegment[] = lv.segments.map((s) => ({
    start: s.startExtent * extentSize,
    length: s.extentCount * extentSize,
    chunk: s.stripeSize,
    stripes: s.stripes.map((st) => {
      const area = areas.get(st.pv);
      if (!area) throw new BulwarkError(`logical volume ${lv.name}: physical volume ${st.pv} is not available`, { kind: 'not-found' });
      return { area, offset: area.offset + st.startExtent * extentSize };
    }),
  }));
  const size = lv.size;

  /** The disk pieces of [offset, offset + length) of the LV, in order. */
  const pieces = (offset: number, length: number): Array<{ area: ExtentArea; at: number; length: number }> => {
    const out: Array<{ area: ExtentArea; at: number; length: number }> = [];
    let pos = offset;
    const end = offset + length;
    let i = segments.findIndex((s) => pos < s.start + s.length);
    while (pos < end && i >= 0 && i < segments.length) {
      const s = segments[i]!;
      const inSeg = pos - s.start;
      const segLeft = s.start + s.length - pos;
      if (s.stripes.length === 1) {
        const n = Math.min(segLeft, end - pos);
        const st = s.stripes[0]!;
        out.push({ area: st.area, at: st.offset + inSeg, length: n });
        pos += n;
      } else {
        const chunk = Math.floor(inSeg / s.chunk);
        const within = inSeg % s.chunk;
        const st = s.stripes[chunk % s.stripes.length]!;
        const n = Math.min(s.chunk - within, segLeft, end - pos);
        out.push({ area: st.area, at: st.offset + Math.floor(chunk / s.stripes.length) * s.chunk + within, length: n });
        pos += n;
      }
      if (pos >= s.start + s.length) i++;
    }
    return out;
  };

  // Adjacent linear segments on the same PV merge into one run (an lvextend into free space right after).
  let linear: LinearRun | null = null;
  const first = segments[0]?.stripes[0];
  if (first && segments.every((s) => s.stripes.length === 1)) {
    let at = first.offset;
    const contiguous = segments.every((s) => {
      const st = s.stripes[0]!;
      const ok = st.area.disk === first.area.disk && st.offset === at;
      at += s.length;
      return ok;
    });
    if (contiguous) linear = { diskName: first.area.diskName, disk: first.area.disk, offset: first.offset, size };
  }

  const check = (offset: number, length: number): void => {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new BulwarkError(`read of ${length} bytes at ${offset} is outside logical volume ${lv.name} (${size} bytes)`, { kind: 'invalid', context: { lv: lv.name, offset, length } });
    }
  };

  return {
    size,
    linear,
    async read(offset: number, length: number): Promise<Buffer> {
      check(offset, length);
      if (length === 0) return Buffer.alloc(0);
      const parts = await Promise.all(pieces(offset, length).map((p) => p.area.disk.read(p.at, p.length)));
      return parts.length === 1 ? parts[0]! : Buffer.concat(parts, length);
    },
    /** The allocation map, from the PV disks' own maps (data where a disk has none). */
    async extents(offset: number, length: number): Promise<Extent[]> {
      check(offset, length);
      const out: Extent[] = [];
      let at = offset;
      for (const p of pieces(offset, length)) {
        const sub = p.area.disk.extents ? await p.area.disk.extents(p.at, p.length) : [{ offset: p.at, length: p.length, kind: 'data' as const }];
        for (const e of sub) {
          // Clipped to the piece, in case a disk answers with a wider extent.
          const start = Math.max(e.offset, p.at);
          const end = Math.min(e.offset + e.length, p.at + p.length);
          if (end <= start) continue;
          const x: Extent = { offset: at + (start - p.at), length: end - start, kind: e.kind };
          const last = out[out.length - 1];
          if (last && last.kind === x.kind && last.offset + last.length === x.offset) out[out.length - 1] = { ...last, length: last.length + x.length };
          else out.push(x);
        }
        at += p.length;
      }
      return out;
    },
    async close(): Promise<void> {
      /* the PV disks belong to the caller */
    },
  };
}
