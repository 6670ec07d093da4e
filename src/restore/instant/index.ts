// Instant VM recovery (docs/instant-recovery.md).
export { startInstantRecovery, launchFromPoint, launchFromConfiguration } from './instant-recovery.js';
export type { InstantDisk, InstantLaunch, InstantRecoverySession, InstantRecoveryState, StartInstantRecoveryOptions } from './instant-recovery.js';
export { InstantRecoverySessions } from './sessions.js';
export type { InstantSessionInfo } from './sessions.js';
