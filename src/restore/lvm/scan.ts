// Finds the LVM volume groups on the volumes of a restore point (docs/formats/lvm2-reading.md §7):
// every candidate volume's label and metadata areas are read, VGs are grouped by id (newest
// seqno wins), their PVs matched to volumes by UUID — across several disks of one VM — and each
// visible logical volume comes back as a readable disk or with the reason it is refused.
import { describeError } from '../../common/errors.js';
import type { RandomAccessDisk } from '../../disk/types.js';
import type { SectorSource } from '../partitions/partitions.js';
import { openLogicalVolume, type ExtentArea, type LogicalVolumeDisk } from './lv-disk.js';
import { formatUuid, LABEL_SCAN_SECTORS, parsePvLabel, readMetadataText, SECTOR, type PvLabel } from './on-disk.js';
import { volumeGroupFromText, type VolumeGroupInfo } from './volume-group.js';

/** A volume that may be an LVM physical volume: a partition or a whole disk. */
export interface PvCandidate {
  /** The disk it is on, e.g. `vdb`. */
  readonly diskName: string;
  /** For messages: `vdb2`, `vda`. */
  readonly volumeName: string;
  readonly disk: RandomAccessDisk;
  /** Byte offset and size of the volume on the disk. */
  readonly offset: number;
  readonly size: number;
}

export interface FoundLogicalVolume {
  readonly vg: string;
  /** The VG's id (two VGs may share a name, e.g. disks of two cloned guests). */
  readonly vgId: string;
  readonly name: string;
  /** Bytes (0 when refused). */
  readonly size: number;
  /** The LV as a disk, or null when refused. */
  readonly disk: LogicalVolumeDisk | null;
  readonly refused: string | null;
  /** The volumes (`vdb2`, ...) holding its extents. */
  readonly on: readonly string[];
  /** The disks (`vdb`, ...) holding its extents. */
  readonly disks: readonly string[];
}

export interface FoundPhysicalVolume {
  readonly volumeName: string;
  readonly uuid: string;
  /** Its VG's name, or null when no readable metadata names it. */
  readonly vg: string | null;
  /** Why it gives nothing (no readable metadata, ...), or null. */
  readonly problem: string | null;
}

export interface LvmScan {
  readonly physicalVolumes: readonly FoundPhysicalVolume[];
  readonly volumeGroups: readonly VolumeGroupInfo[];
  readonly logicalVolumes: readonly FoundLogicalVolume[];
  readonly warnings: readonly string[];
}

/** The candidate volume seen from its own byte 0. */
function volumeSource(c: PvCandidate): SectorSource {
  return { size: c.size, read: (offset, length) => c.disk.read(c.offset + offset, length) };
}

/** Reads the LVM layout of the candidates (those without an LVM label are ignored). */
export async function scanLvm(candidates: readonly PvCandidate[]): Promise<LvmScan> {
  const warnings: string[] = [];
  const labelled: Array<{ c: PvCandidate; label: PvLabel }> = [];
  const problems = new Map<PvCandidate, string>();
  const newest = new Map<string, VolumeGroupInfo>();
  for (const c of candidates) {
    let label: PvLabel | null;
    try {
      label = parsePvLabel(await c.disk.read(c.offset, Math.min(LABEL_SCAN_SECTORS * SECTOR, c.size)));
    } catch (err) {
      problems.set(c, `its LVM label cannot be read: ${describeError(err)}`);
      continue;
    }
    if (!label) continue;
    labelled.push({ c, label });
    const errors: string[] = [];
    for (const area of label.metadataAreas) {
      try {
        const text = await readMetadataText(volumeSource(c), area);
        if (text === null) continue;
        const vg = volumeGroupFromText(text);
        const known = newest.get(vg.id);
        if (!known || vg.seqno > known.seqno) newest.set(vg.id, vg);
      } catch (err) {
        errors.push(describeError(err));
      }
    }
    if (errors.length > 0) warnings.push(`${c.volumeName}: LVM metadata copy skipped: ${errors.join('; ')}`);
  }

  const byUuid = new Map<string, { c: PvCandidate; label: PvLabel }>();
  for (const l of labelled) {
    const seen = byUuid.get(l.label.pvUuid);
    if (seen) warnings.push(`LVM PV ${formatUuid(l.label.pvUuid)} is on both ${seen.c.volumeName} and ${l.c.volumeName} (a cloned disk?); ${seen.c.volumeName} is used`);
    else byUuid.set(l.label.pvUuid, l);
  }

  const vgOfPv = new Map<string, string>();
  const logicalVolumes: FoundLogicalVolume[] = [];
  const groups = [...newest.values()].sort((a, b) => a.name.localeCompare(b.name));
  for (const vg of groups) {
    const areas = new Map<string, ExtentArea>();
    const missing = new Map<string, string>();
    for (const pv of vg.physicalVolumes) {
      const found = byUuid.get(pv.uuid);
      const guestName = pv.device ? ` (the guest's ${pv.device})` : '';
      if (!found) {
        missing.set(pv.name, `physical volume ${pv.name}${guestName}, UUID ${formatUuid(pv.uuid)}, is not in this restore point (a disk left out of the backup?)`);
        continue;
      }
      vgOfPv.set(pv.uuid, vg.name);
      if (pv.missing) missing.set(pv.name, `LVM marked physical volume ${pv.name}${guestName} as MISSING`);
      const end = pv.peStart + pv.peCount * vg.extentSize;
      if (end > found.c.size) {
        missing.set(pv.name, `physical volume ${pv.name} on ${found.c.volumeName} is ${found.c.size} bytes, shorter than its ${pv.peCount} extents (${end} bytes)`);
        continue;
      }
      areas.set(pv.name, { disk: found.c.disk, diskName: found.c.diskName, offset: found.c.offset + pv.peStart });
    }
    const candidateOf = (pvName: string): PvCandidate | undefined => {
      const uuid = vg.physicalVolumes.find((p) => p.name === pvName)?.uuid;
      return uuid !== undefined ? byUuid.get(uuid)?.c : undefined;
    };
    for (const lv of vg.logicalVolumes) {
      const pvs = [...new Set(lv.segments.flatMap((s) => s.stripes.map((st) => st.pv)))];
      const on = pvs.map((p) => candidateOf(p)?.volumeName ?? p);
      const disks = [...new Set(pvs.flatMap((p) => candidateOf(p)?.diskName ?? []))];
      let refused = lv.refused;
      const lost = pvs.find((p) => missing.has(p));
      if (refused === null && lost !== undefined) refused = `it has extents on a missing physical volume: ${missing.get(lost)!}`;
      if (refused !== null) {
        logicalVolumes.push({ vg: vg.name, vgId: vg.id, name: lv.name, size: lv.size, disk: null, refused, on, disks });
        continue;
      }
      logicalVolumes.push({ vg: vg.name, vgId: vg.id, name: lv.name, size: lv.size, disk: openLogicalVolume(lv, vg.extentSize, areas), refused: null, on, disks });
    }
  }

  const physicalVolumes: FoundPhysicalVolume[] = [];
  for (const c of candidates) {
    const l = labelled.find((x) => x.c === c);
    const problem = problems.get(c);
    if (!l) {
      if (problem !== undefined) physicalVolumes.push({ volumeName: c.volumeName, uuid: '', vg: null, problem });
      continue;
    }
    const vg = vgOfPv.get(l.label.pvUuid) ?? null;
    physicalVolumes.push({
      volumeName: c.volumeName,
      uuid: formatUuid(l.label.pvUuid),
      vg,
      problem: vg === null ? (l.label.metadataAreas.length === 0 ? 'an LVM physical volume without metadata, and no other volume of this restore point describes its volume group' : 'an LVM physical volume whose volume group metadata cannot be read') : null,
    });
  }
  return { physicalVolumes, volumeGroups: groups, logicalVolumes, warnings };
}

/** The device-mapper name of an LV, as the guest's /dev/mapper shows it: `-` in names doubled. */
export function deviceMapperName(vg: string, lv: string): string {
  return `${vg.replaceAll('-', '--')}-${lv.replaceAll('-', '--')}`;
}
