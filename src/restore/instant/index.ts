// Instant VM recovery (docs/instant-recovery.md).
export { startInstantRecovery, instantQemuArgs, launchFromPoint, launchFromConfig, launchFromConfiguration } from './instant-recovery.js';
export type { InstantDisk, InstantLaunch, InstantQemuTarget, InstantPointSource, InstantRecoverySession, InstantRecoveryState, StartInstantRecoveryOptions } from './instant-recovery.js';
export { InstantRecoverySessions } from './sessions.js';
export type { InstantSessionInfo, MigratePlace } from './sessions.js';
