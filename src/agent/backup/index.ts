// The data path of a backup (docs/data-path.md): one VM into one restore point, and the job
// engine's executor for the one-host install.
export { backupVm, chainIdFor, previousCheckpoint } from './disk-backup.js';
export type { BackupVmOptions, BackupVmSummary, BackupProgress, DiskBackupProgress, DiskBackupSummary, BackupLogLevel } from './disk-backup.js';
export { LocalDataPathExecutor, type LocalDataPathOptions } from './executor.js';
export { decodePointMetadata, encodePointMetadata, POINT_METADATA_FORMAT, type PointMetadata } from './point-metadata.js';
