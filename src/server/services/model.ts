// The REST API's resource shapes as TypeBox schemas: one source for validation at the API edge,
// the OpenAPI document, and the TypeScript types the services return.
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { BLOCK_SIZES } from '../../format/index.js';

const Nullable = <T extends TSchema>(t: T) => Type.Union([t, Type.Null()]);

export const NamePattern = '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$';
export const Name = Type.String({ pattern: NamePattern, description: 'letters, digits, . _ - (max 63)' });

const ConfigFields = {
  id: Type.String(),
  name: Type.String(),
  version: Type.Integer({ description: '+1 per edit; send it back in PATCH' }),
  createdAt: Type.String({ format: 'date-time' }),
  updatedAt: Type.String({ format: 'date-time' }),
};
/** Every PATCH body carries the version the client read. */
export const VersionField = { version: Type.Integer({ minimum: 1 }) };

// Hosts
export const HostKind = Type.Union([Type.Literal('libvirt'), Type.Literal('qemu')]);
export const Host = Type.Object({
  ...ConfigFields,
  kind: HostKind,
  uri: Type.String({ description: 'libvirt URI (kind libvirt) or glob of QMP sockets (kind qemu)' }),
  agent: Nullable(Type.String()),
});
export type Host = Static<typeof Host>;
export const HostCreate = Type.Object(
  { name: Name, kind: HostKind, uri: Type.String({ minLength: 1 }), agent: Type.Optional(Nullable(Type.String())) },
  { additionalProperties: false },
);
export type HostCreate = Static<typeof HostCreate>;
export const HostPatch = Type.Object(
  { ...VersionField, kind: Type.Optional(HostKind), uri: Type.Optional(Type.String({ minLength: 1 })), agent: Type.Optional(Nullable(Type.String())) },
  { additionalProperties: false },
);
export type HostPatch = Static<typeof HostPatch>;

// Agents
export const AgentState = Type.Union([Type.Literal('pending'), Type.Literal('online'), Type.Literal('offline'), Type.Literal('revoked')]);
export const Agent = Type.Object({
  ...ConfigFields,
  hostname: Type.String(),
  agentVersion: Type.String(),
  cores: Type.Integer(),
  lastSeenAt: Nullable(Type.String()),
  certFingerprint: Nullable(Type.String()),
  state: AgentState,
  /** Most concurrent tasks as a proxy: `maxTasksSetting`, or its CPU cores. */
  maxTasks: Type.Integer(),
  maxTasksSetting: Nullable(Type.Integer({ description: 'null = its CPU cores' })),
  /** From the last heartbeat: uptime and the free space of the agent's repositories. */
  uptimeSeconds: Nullable(Type.Number()),
  repositories: Type.Array(
    Type.Object({ path: Type.String(), freeBytes: Type.Optional(Type.Number()), totalBytes: Type.Optional(Type.Number()), error: Type.Optional(Type.String()) }),
  ),
});
export type Agent = Static<typeof Agent>;
export const AgentPatch = Type.Object(
  {
    ...VersionField,
    state: Type.Optional(AgentState),
    maxTasks: Type.Optional(Nullable(Type.Integer({ minimum: 1, maximum: 1024, description: 'most concurrent tasks; null = its CPU cores' }))),
  },
  { additionalProperties: false },
);
export type AgentPatch = Static<typeof AgentPatch>;

// Repositories
export const Repository = Type.Object({
  ...ConfigFields,
  path: Type.String(),
  agent: Nullable(Type.String()),
  /** Most concurrent tasks: `maxTasksSetting`, or the CPU cores of its agent. */
  maxTasks: Type.Integer(),
  maxTasksSetting: Nullable(Type.Integer({ description: 'null = the CPU cores of its agent' })),
  readRateMBps: Nullable(Type.Number()),
  writeRateMBps: Nullable(Type.Number()),
});
export type Repository = Static<typeof Repository>;
const RepositoryEditable = {
  path: Type.String({ minLength: 1, description: 'absolute folder path on the agent' }),
  agent: Nullable(Type.String()),
  maxTasks: Nullable(Type.Integer({ minimum: 1, maximum: 1024, description: 'null = the CPU cores of its agent' })),
  readRateMBps: Nullable(Type.Number({ exclusiveMinimum: 0 })),
  writeRateMBps: Nullable(Type.Number({ exclusiveMinimum: 0 })),
};
export const RepositoryCreate = Type.Object(
  {
    name: Name,
    path: RepositoryEditable.path,
    agent: Type.Optional(RepositoryEditable.agent),
    maxTasks: Type.Optional(RepositoryEditable.maxTasks),
    readRateMBps: Type.Optional(RepositoryEditable.readRateMBps),
    writeRateMBps: Type.Optional(RepositoryEditable.writeRateMBps),
  },
  { additionalProperties: false },
);
export type RepositoryCreate = Static<typeof RepositoryCreate>;
export const RepositoryPatch = Type.Object(
  { ...VersionField, ...Type.Partial(Type.Object(RepositoryEditable)).properties },
  { additionalProperties: false },
);
export type RepositoryPatch = Static<typeof RepositoryPatch>;

// Jobs
export const BackupMethod = Type.Union([Type.Literal('forever-forward'), Type.Literal('forward'), Type.Literal('reverse')]);
export type BackupMethod = Static<typeof BackupMethod>;
export const Compression = Type.Union([Type.Literal('zstd'), Type.Literal('lz4'), Type.Literal('none')]);
export const Retention = Type.Union([
  Type.Object({ points: Type.Integer({ minimum: 1 }) }, { additionalProperties: false }),
  Type.Object({ days: Type.Integer({ minimum: 1 }) }, { additionalProperties: false }),
]);
export type Retention = Static<typeof Retention>;
export const Retries = Type.Object(
  { count: Type.Integer({ minimum: 0, maximum: 100 }), waitMinutes: Type.Integer({ minimum: 0, maximum: 1440 }) },
  { additionalProperties: false },
);
/** A day of the week (schedules, backup windows, throttling rules). */
export const Weekday = Type.Union([
  Type.Literal('mon'),
  Type.Literal('tue'),
  Type.Literal('wed'),
  Type.Literal('thu'),
  Type.Literal('fri'),
  Type.Literal('sat'),
  Type.Literal('sun'),
]);
const TimeOfDay = Type.String({ pattern: '^([01][0-9]|2[0-3]):[0-5][0-9]$', description: 'HH:MM (24 h)' });
const TimeZone = Type.Optional(Type.String({ description: 'IANA time zone, e.g. Europe/Berlin (default: the server\'s)' }));
/** Hours a job may run (the scheduler's BackupWindow); a session still running at the end is stopped. */
export const BackupWindow = Type.Object(
  {
    allow: Type.Array(
      Type.Object({ days: Type.Optional(Type.Array(Weekday)), from: TimeOfDay, to: TimeOfDay }, { additionalProperties: false }),
      { minItems: 1 },
    ),
    timeZone: TimeZone,
  },
  { additionalProperties: false },
);
export type BackupWindow = Static<typeof BackupWindow>;
/** When a job runs on its own (the scheduler's Schedule, src/server/scheduler/schedule.ts). */
export const Schedule = Type.Union([
  Type.Object({ kind: Type.Literal('cron'), expression: Type.String({ minLength: 1 }), timeZone: TimeZone }, { additionalProperties: false }),
  Type.Object({ kind: Type.Literal('daily'), at: TimeOfDay, days: Type.Optional(Type.Array(Weekday)), timeZone: TimeZone }, { additionalProperties: false }),
  Type.Object(
    {
      kind: Type.Literal('monthly'),
      at: TimeOfDay,
      on: Type.Union([
        Type.Object({ day: Type.Integer({ minimum: 1, maximum: 31 }) }, { additionalProperties: false }),
        Type.Object({ day: Type.Literal('last') }, { additionalProperties: false }),
        Type.Object(
          { week: Type.Union([Type.Literal('first'), Type.Literal('second'), Type.Literal('third'), Type.Literal('fourth'), Type.Literal('last')]), weekday: Weekday },
          { additionalProperties: false },
        ),
      ]),
      timeZone: TimeZone,
    },
    { additionalProperties: false },
  ),
  Type.Object(
    { kind: Type.Literal('periodic'), every: Type.Integer({ minimum: 1 }), unit: Type.Union([Type.Literal('minutes'), Type.Literal('hours')]) },
    { additionalProperties: false },
  ),
  Type.Object({ kind: Type.Literal('after-job'), job: Type.String({ minLength: 1 }) }, { additionalProperties: false }),
]);
export type Schedule = Static<typeof Schedule>;
/** The block sizes a job may use: exactly those the backup file format allows (docs/formats/backup-files.md). */
export const blockSizes: readonly number[] = BLOCK_SIZES;
/** Days of the week and/or of the month (1-31, -1 = the last day) a periodic operation runs on. */
const OnDays = {
  weekdays: Type.Optional(Type.Array(Weekday, { description: 'days of the week, e.g. ["sat"]' })),
  monthDays: Type.Optional(Type.Array(Type.Integer({ minimum: -1, maximum: 31 }), { description: 'days of the month 1-31; -1 = the last day' })),
};
export const PeriodicDays = Type.Object(OnDays, { additionalProperties: false });
export type PeriodicDays = Static<typeof PeriodicDays>;
export const HealthCheckSchedule = Type.Object(
  { ...OnDays, wholeChain: Type.Optional(Type.Boolean({ description: 'check every point of the chain, not only the latest' })) },
  { additionalProperties: false },
);
export type HealthCheckSchedule = Static<typeof HealthCheckSchedule>;
/** The backup-method options of a job (issue 6); the engine hands them to the executor in JobDefinition.settings. */
export const JobBackupOptions = {
  activeFull: Nullable(PeriodicDays),
  syntheticFull: Nullable(PeriodicDays),
  healthCheck: Nullable(HealthCheckSchedule),
  compact: Nullable(PeriodicDays),
  excludeDisks: Type.Array(Type.String({ minLength: 1 }), { description: 'disks not backed up: "VM:DISK", or "DISK" for every VM of the job' }),
  removedVmRetentionDays: Type.Integer({ minimum: 0, maximum: 36500, description: 'days a VM removed from the job keeps its restore points (counted from its last point)' }),
  fileIndex: Type.Boolean({ description: 'index guest files after each backup' }),
  multithreadedTransfer: Type.Boolean({
    description: 'several parallel TCP streams per task between agents (5; default on); off: one stream (for links that punish parallel connections)',
  }),
  storage: Type.Union([Type.Literal('per-vm'), Type.Literal('per-job')], {
    description: 'per-vm (default): one chain per VM; per-job: all VMs of the job in one file set per point (the `_all` folder, docs/formats/backup-files.md section 2)',
  }),
};
export interface JobBackupOptionValues {
  activeFull: PeriodicDays | null;
  syntheticFull: PeriodicDays | null;
  healthCheck: HealthCheckSchedule | null;
  compact: PeriodicDays | null;
  excludeDisks: string[];
  removedVmRetentionDays: number;
  fileIndex: boolean;
  multithreadedTransfer: boolean;
  storage: 'per-vm' | 'per-job';
}
export const defaultJobBackupOptions: JobBackupOptionValues = {
  activeFull: null,
  syntheticFull: null,
  healthCheck: null,
  compact: null,
  excludeDisks: [],
  removedVmRetentionDays: 14,
  fileIndex: false,
  multithreadedTransfer: true,
  storage: 'per-vm',
};
const JobEditable = {
  vms: Type.Array(Type.String({ minLength: 1 }), { minItems: 1, description: 'VM names (the job objects)' }),
  repository: Type.String({ description: 'repository name' }),
  method: BackupMethod,
  retention: Retention,
  blockSize: Type.Integer({ description: `bytes: one of ${blockSizes.join(', ')}` }),
  compression: Compression,
  schedule: Nullable(Schedule),
  enabled: Type.Boolean(),
  retries: Retries,
  window: Nullable(BackupWindow),
  requireGuestProcessing: Type.Boolean(),
  // Null first: the API's type coercion would turn null into "" for a string tried first.
  proxy: Type.Union([Type.Null(), Type.String({ description: 'the agent that moves the data of this job (pinned proxy); null = automatic: an agent on the VM host, else the least busy one that reaches the disk' })]),
  ...JobBackupOptions,
};
export const Job = Type.Object({ ...ConfigFields, ...JobEditable, running: Type.Boolean() });
export type Job = Static<typeof Job>;
export const JobCreate = Type.Object(
  {
    name: Name,
    vms: JobEditable.vms,
    repository: JobEditable.repository,
    ...Type.Partial(Type.Omit(Type.Object(JobEditable), ['vms', 'repository'])).properties,
  },
  { additionalProperties: false },
);
export type JobCreate = Static<typeof JobCreate>;
export const JobPatch = Type.Object({ ...VersionField, ...Type.Partial(Type.Object(JobEditable)).properties }, { additionalProperties: false });
export type JobPatch = Static<typeof JobPatch>;

// Sessions
export const SessionState = Type.Union([
  Type.Literal('queued'),
  Type.Literal('running'),
  Type.Literal('success'),
  Type.Literal('warning'),
  Type.Literal('failed'),
  Type.Literal('stopped'),
]);
export const Progress = Type.Object({
  percent: Type.Number(),
  bytesRead: Type.Number(),
  bytesTransferred: Type.Number(),
  bytesStored: Type.Number(),
  processingRate: Type.Number({ description: 'bytes/s' }),
  step: Type.Optional(
    Type.Object(
      { name: Type.String({ description: 'merge, synthetic-full, compact, inject or health-check' }), bytesDone: Type.Number(), bytesTotal: Type.Number() },
      { description: "A task's chain maintenance step after its backup (running, or the last one it ran): disk bytes gone through of the total" },
    ),
  ),
});
export type Progress = Static<typeof Progress>;
/** Bottleneck statistics: busy time per stage, its share of the running time, the busiest stage. */
const StageFigures = Type.Object({ source: Type.Number(), proxy: Type.Number(), network: Type.Number(), target: Type.Number(), throttling: Type.Number() });
export const StageStats = Type.Object({
  busyMs: StageFigures,
  shares: StageFigures,
  bottleneck: Nullable(Type.Union([Type.Literal('source'), Type.Literal('proxy'), Type.Literal('network'), Type.Literal('target'), Type.Literal('throttling')])),
  summary: Type.String({ description: 'e.g. "Source 30% > Proxy 10% > Network 20% > Target 90%; bottleneck: Target"' }),
});
export type StageStats = Static<typeof StageStats>;
export const SessionTask = Type.Object({
  id: Type.String(),
  vm: Type.String(),
  disk: Type.String(),
  state: SessionState,
  startedAt: Type.Optional(Type.String()),
  endedAt: Type.Optional(Type.String()),
  progress: Progress,
  message: Type.Optional(Type.String()),
  /** The proxy (agent) that ran it. */
  proxy: Type.Optional(Type.String()),
  stages: Type.Optional(StageStats),
});
export type SessionTask = Static<typeof SessionTask>;
export const LogLevel = Type.Union([Type.Literal('info'), Type.Literal('warning'), Type.Literal('error')]);
export type LogLevelT = Static<typeof LogLevel>;
export const SessionLogLine = Type.Object({ time: Type.String(), level: LogLevel, message: Type.String() });
export type SessionLogLine = Static<typeof SessionLogLine>;
export const SessionKind = Type.Union([
  Type.Literal('backup'), Type.Literal('health-check'), Type.Literal('restore-vm'), Type.Literal('restore-disk'), Type.Literal('restore-files'), Type.Literal('instant-recovery'),
], { description: 'backup: a job run; health-check: a job\'s health check; the rest: a restore or an instant recovery (the session of the time the VM ran from the backup)' });
export const Session = Type.Object({
  id: Type.String(),
  jobName: Type.String(),
  jobId: Nullable(Type.String()),
  state: SessionState,
  full: Type.Boolean(),
  startedAt: Type.String(),
  endedAt: Type.Optional(Type.String()),
  reason: Type.Optional(Type.String()),
  progress: Progress,
  tasks: Type.Array(SessionTask),
  log: Type.Array(SessionLogLine),
  /** The session's busy shares per stage (its tasks' busy time over their running time). */
  stages: Type.Optional(StageStats),
  // Sessions of every kind (added 2026-11-26; absent from older servers: a job run).
  kind: Type.Optional(SessionKind),
  vm: Type.Optional(Type.String({ description: 'restores: the VM restored or recovered (its new name)' })),
  point: Type.Optional(Type.String({ description: 'restores: the restore point' })),
  agent: Type.Optional(Type.String({ description: 'restores: the agent that did the work (absent: this server\'s process)' })),
  status: Type.Optional(Type.String({ description: 'instant recovery: running-from-backup | migrating | migrated | stopped' })),
  ref: Type.Optional(Type.String({ description: 'the id of what the session records: an instant recovery (ir-…) or VM restore (vr-…)' })),
  runningFromBackup: Type.Optional(Type.Boolean({ description: 'instant recovery: the VM runs from the backup now' })),
});
export type Session = Static<typeof Session>;

// Restore points
export const RestorePoint = Type.Object({
  id: Type.String(),
  vm: Type.String(),
  disks: Type.Array(Type.Object({ name: Type.String(), size: Type.Number() }, { additionalProperties: true })),
  time: Type.String(),
  type: Type.Union([Type.Literal('full'), Type.Literal('incremental'), Type.Literal('reverse')], { description: 'reverse: an older point of a reverse-incremental chain (the newest point is the full)' }),
  chainId: Type.String(),
  size: Type.Number(),
  state: Type.Union([Type.Literal('ready'), Type.Literal('corrupt')], { description: 'ready: committed; corrupt: the last health check that read it found damage' }),
  repository: Type.String(),
  job: Nullable(Type.String()),
  sessionId: Nullable(Type.String()),
  /** Encryption (docs/encryption.md): absent on plain points. */
  encrypted: Type.Optional(Type.Boolean()),
  keyKnown: Type.Optional(Type.Boolean({ description: 'the server knows the password of this encrypted point (restores need none typed)' })),
  passwordHint: Type.Optional(Type.String()),
});
export type RestorePoint = Static<typeof RestorePoint>;

// Users
export const Role = Type.Union([
  Type.Literal('administrator'),
  Type.Literal('operator'),
  Type.Literal('restore-operator'),
  Type.Literal('viewer'),
]);
export type Role = Static<typeof Role>;
export const User = Type.Object({ ...ConfigFields, role: Role });
export type User = Static<typeof User>;
const Password = Type.String({ minLength: 8, maxLength: 1024 });
export const UserCreate = Type.Object({ name: Name, password: Password, role: Role }, { additionalProperties: false });
export type UserCreate = Static<typeof UserCreate>;
export const UserPatch = Type.Object(
  { ...VersionField, password: Type.Optional(Password), role: Type.Optional(Role) },
  { additionalProperties: false },
);
export type UserPatch = Static<typeof UserPatch>;

export const ErrorBody = Type.Object({
  error: Type.Object({
    kind: Type.String(),
    message: Type.String(),
    hint: Type.Optional(Type.String()),
    field: Type.Optional(Type.String()),
  }),
});
