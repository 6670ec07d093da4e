// Instant VM recovery (docs/instant-recovery.md).
export { startInstantRecovery, launchFromPoint, launchFromConfig, launchFromConfiguration } from './instant-recovery.js';
export type { InstantDisk, InstantLaunch, InstantPointSource, InstantRecoverySession, InstantRecoveryState, StartInstantRecoveryOptions } from './instant-recovery.js';
export { InstantRecoverySessions } from './sessions.js';
export type { InstantSessionInfo } from './sessions.js';
