// LVM2 read in user space (docs/formats/lvm2-reading.md): logical volumes as disks, without
// device-mapper.
export { scanLvm, deviceMapperName } from './scan.js';
export type { PvCandidate, FoundLogicalVolume, FoundPhysicalVolume, LvmScan } from './scan.js';
export { openLogicalVolume } from './lv-disk.js';
export type { ExtentArea, LinearRun, LogicalVolumeDisk } from './lv-disk.js';
export { volumeGroupFromText } from './volume-group.js';
export type { VolumeGroupInfo, LogicalVolumeInfo, PhysicalVolumeInfo, Segment } from './volume-group.js';
export { parsePvLabel, readMetadataText, lvmCrc, formatUuid } from './on-disk.js';
export { parseConfig } from './config.js';
