// The data-mover transport's public surface: what the agent (source, target, restore) and the
// server (busy-time verdicts) use. Spec: docs/formats/data-mover-protocol.md.
export { TransferSender, prepareBlocks, DEFAULT_STREAMS, DEFAULT_RESUME_WINDOW_MS } from './sender.js';
export type { TransferSenderOptions, TransferSenderStats, OutgoingBlock, OutgoingZeroRun, OutgoingItem, DiskToSend, DiskSendSummary } from './sender.js';
export { TransferReceiver, DEFAULT_WINDOW } from './receiver.js';
export type { TransferReceiverOptions, TransferSink, TransferTaskGrant, SessionOutcome, ReceiverSessionStats } from './receiver.js';
export { TransferReader } from './reader.js';
export type { TransferReaderOptions, RestoreConsumer, TransferReaderStats } from './reader.js';
export type { RestoreSource } from './read-serve.js';
export type { TlsIdentity } from './connection.js';
export { TokenBucket, RateLimiter, SharedLimiters, allOf, throttleStream } from './throttle.js';
export type { Throttle, NamedLimit, Clock } from './throttle.js';
export { StageTimes, STAGES, emptyStageBusy } from './stage-times.js';
export type { Stage, StageBusy } from './stage-times.js';
export type { OpenDiskMessage, EndDiskMessage, ZeroRunMessage, ReceivedBlockMessage, CompressionName } from './frame.js';
