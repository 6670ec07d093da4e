// The repository library: backup chains on disk (docs/formats/backup-files.md). The agent's target
// side writes through startRestorePoint(); restore engines read through openRestorePoint();
// `bulwark repo inspect|verify` and the server's rescan use inspect/verify/listChains.
export { openRepository, Repository, RestorePointWriter, readChainMetadata } from './repository.js';
export { openSharedRepository } from './open-shared.js';
export type { BackupChain, StartRestorePointOptions, SweepReport } from './repository.js';
export type { TransformProgress, TransformProgressListener, TransformProgressOptions, TransformStep } from './transforms/progress.js';
export { RestorePoint, RestorePointDisk } from './restore-point.js';
export type { RestorePointInfo, OpenDiskOptions, ResolvedBlock } from './restore-point.js';
export type { DiskWriteStats, WriteDiskOptions } from './backup-file-writer.js';
export { escapeName, unescapeName, vmFolder } from './layout.js';
export { verifyRepository } from './verify.js';
export type { VerifyReport, VerifyOptions, Damage } from './verify.js';
export { inspectRepository } from './inspect.js';
export {
  ALL_VMS, JobRestorePointWriter, startJobRestorePoint, vmsOfRestorePoint, openVmDisk, listVmRestorePoints, splitAllVmsDiskName, catalogPoints, vmSliceId, VmSlicePoint,
} from './single-file.js';
export type { JobVm, PointVm, StartJobRestorePointOptions } from './single-file.js';
export type { InspectReport, InspectChain, InspectPoint, InspectDisk } from './inspect.js';
// Backup methods and chain maintenance (issue 6): pure planning + Repository#applyRetention,
// #synthesizeFull, #compactFull, #healthCheck, #pendingRepair, #chainState, and
// startRestorePoint({ kind: 'reverse' }) for reverse injection.
export { planRun, latestChain } from './plan/plan-run.js';
export { planRetention, keptPoints, retentionCutoff } from './plan/plan-retention.js';
export type {
  BackupMethod, Weekday, DaySchedule, Retention, MethodPolicy, VmChainState, RunKind, RunPlan, RetentionAction, RetentionReport,
  PendingRepair, PendingRepairRecord, DamagedPointRecord, DamagedBlock, HealthReport, SynthesizeFullOptions,
} from './plan/types.js';
