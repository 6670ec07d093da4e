// The configuration database schema as Kysely sees it: one typed model for SQLite and PostgreSQL.
// Portable column choices: ids are text (random UUIDs), times are ISO-8601 text (UTC), JSON is
// text, booleans are integers 0/1, so both engines read back exactly the same values.
import type { ColumnType, Generated, Insertable, Selectable, Updateable } from 'kysely';

/** Columns every configuration object carries (optimistic concurrency via `version`). */
interface ConfigColumns {
  id: string;
  name: string;
  version: number;
  created_at: string;
  updated_at: string;
}

export type HostKind = 'libvirt' | 'qemu';
export interface HostTable extends ConfigColumns {
  kind: HostKind;
  /** libvirt URI (kind libvirt) or a glob of QMP sockets (kind qemu). */
  uri: string;
  agent_id: string | null;
}

export type AgentState = 'pending' | 'online' | 'offline' | 'revoked';
export interface AgentTable extends ConfigColumns {
  hostname: string;
  agent_version: string;
  cores: number;
  last_seen_at: string | null;
  cert_fingerprint: string | null;
  cert_serial: ColumnType<string | null, string | null | undefined, string | null>;
  state: AgentState;
  /** JSON of the last heartbeat's health report (uptime, repository free space). */
  health: ColumnType<string | null, string | null | undefined, string | null>;
  /** Most concurrent tasks as a proxy; null = its CPU cores (migration 202611250200). */
  max_tasks: ColumnType<number | null, number | null | undefined, number | null>;
}

export interface RepositoryTable extends ConfigColumns {
  path: string;
  agent_id: string | null;
  max_tasks: number;
  /** MB/s; null = unlimited. */
  read_rate_mbps: number | null;
  write_rate_mbps: number | null;
}

export type BackupMethod = 'forever-forward' | 'forward' | 'reverse';
export type Compression = 'zstd' | 'lz4' | 'none';
export interface JobTable extends ConfigColumns {
  /** JSON array of VM names. */
  objects: string;
  repository_id: string;
  method: BackupMethod;
  /** JSON: {"points":N} | {"days":N} */
  retention: string;
  block_size: number;
  compression: Compression;
  /** JSON of the scheduler's Schedule, or null = manual only. */
  schedule: string | null;
  enabled: number;
  retry_count: number;
  retry_wait_minutes: number;
  /** JSON backup window, or null = any time. */
  window: string | null;
  require_guest_processing: number;
  /** When the job was created or last enabled: the scheduler's origin for missed runs. */
  scheduled_since: string;
  /** Agent name pinned as the job's proxy; null = automatic selection (migration 202611250201). */
  proxy: ColumnType<string | null, string | null | undefined, string | null>;
  /** JSON of the backup-method options (activeFull, syntheticFull, healthCheck, compact, excludeDisks, …); null = defaults. */
  backup_options: ColumnType<string | null, string | null | undefined, string | null>;
}

/** An ad-hoc export (`bulwark export`): a standalone full in its own folder of a repository. */
export interface ExportTable {
  id: string;
  vm: string;
  repository_id: string;
  /** The export's folder, relative to the repository root. */
  folder: string;
  point_id: string;
  encrypted: number;
  created_at: string;
  /** When the server's sweep deletes it; null = kept until deleted by hand. */
  expires_at: string | null;
}

export type SessionState = 'queued' | 'running' | 'success' | 'warning' | 'failed' | 'stopped';
export interface SessionTable {
  id: string;
  job_id: string | null;
  job_name: string;
  state: SessionState;
  full: number;
  /** manual | schedule | missed-run | after-job */
  trigger: ColumnType<string, string | undefined, string>;
  started_at: string;
  ended_at: string | null;
  reason: string | null;
  percent: number;
  bytes_read: number;
  bytes_transferred: number;
  bytes_stored: number;
  /** bytes/s */
  processing_rate: number;
  updated_at: string;
  /** What ran (migration 202611290100): a job run, or a restore / instant recovery. */
  kind: ColumnType<SessionKind, SessionKind | undefined, SessionKind>;
  /** A restore's VM (the restored or recovered one), point, agent; an instant recovery's status and id. */
  vm: ColumnType<string | null, string | null | undefined, string | null>;
  point_id: ColumnType<string | null, string | null | undefined, string | null>;
  agent: ColumnType<string | null, string | null | undefined, string | null>;
  status: ColumnType<string | null, string | null | undefined, string | null>;
  ref: ColumnType<string | null, string | null | undefined, string | null>;
}

export type SessionKind = 'backup' | 'health-check' | 'restore-vm' | 'restore-disk' | 'restore-files' | 'instant-recovery';

export interface SessionTaskTable {
  id: string;
  session_id: string;
  vm: string;
  disk: string;
  state: SessionState;
  attempt: ColumnType<number, number | undefined, number>;
  proxy: string | null;
  started_at: string | null;
  ended_at: string | null;
  percent: number;
  bytes_total: ColumnType<number, number | undefined, number>;
  bytes_read: number;
  bytes_transferred: number;
  bytes_stored: number;
  processing_rate: number;
  message: string | null;
  /** JSON StageBusy: busy milliseconds per stage, reported by the executor (bottleneck statistics). */
  stage_busy: ColumnType<string | null, string | null | undefined, string | null>;
  /** JSON MaintenanceStepProgress ({ name, bytesDone, bytesTotal }): the task's maintenance step and how far it came. */
  step: ColumnType<string | null, string | null | undefined, string | null>;
}

/** Global server settings (key -> JSON value), e.g. `processing` = "parallel" | "sequential". */
export interface ServerSettingTable {
  key: string;
  value: string;
  version: number;
  updated_at: string;
}

/** Network throttling rules (src/server/resources/throttling-rules.ts). */
export interface ThrottlingRuleTable extends ConfigColumns {
  source: string;
  target: string;
  /** Mbit/s. */
  mbps: number;
  /** JSON array of weekdays, or null = always. */
  days: string | null;
  from_time: string | null;
  to_time: string | null;
  enabled: number;
}

export type LogLevel = 'info' | 'warning' | 'error';
export interface SessionLogTable {
  id: Generated<number>;
  session_id: string;
  task_id: ColumnType<string | null, string | null | undefined, string | null>;
  time: string;
  level: LogLevel;
  message: string;
}

/** reverse: an older point of a reverse chain (its .vrb); the chain's newest point is its full. */
export type RestorePointType = 'full' | 'incremental' | 'reverse';
/** ready: committed; corrupt: the last health check that read it found damage (docs/api.md, Restore point). */
export type RestorePointState = 'ready' | 'corrupt';
export interface RestorePointTable {
  id: string;
  vm: string;
  /** JSON array of { name, size, ... } per disk. */
  disks: string;
  time: string;
  type: RestorePointType;
  chain_id: string;
  size: number;
  state: RestorePointState;
  repository_id: string;
  job_id: string | null;
  session_id: string | null;
  created_at: string;
}

export type Role = 'administrator' | 'operator' | 'restore-operator' | 'viewer';
export interface UserTable extends ConfigColumns {
  password_hash: string;
  role: Role;
}

export interface ApiTokenTable {
  id: string;
  token_hash: string;
  user_id: string;
  expires_at: string;
  created_at: string;
}

export interface EnrollmentTokenTable {
  id: string;
  token_hash: string;
  expires_at: string;
  used_at: string | null;
  /** When set, only an agent of this name may enroll with the token. */
  agent_name: ColumnType<string | null, string | null | undefined, string | null>;
  agent_id: string | null;
  created_at: string;
}

export interface MigrationTable {
  name: string;
  applied_at: ColumnType<string, string, never>;
}

export interface Database {
  hosts: HostTable;
  agents: AgentTable;
  repositories: RepositoryTable;
  jobs: JobTable;
  sessions: SessionTable;
  session_tasks: SessionTaskTable;
  session_log: SessionLogTable;
  restore_points: RestorePointTable;
  users: UserTable;
  api_tokens: ApiTokenTable;
  enrollment_tokens: EnrollmentTokenTable;
  server_settings: ServerSettingTable;
  throttling_rules: ThrottlingRuleTable;
  bulwark_migrations: MigrationTable;
  exports: ExportTable;
  encryption_keys: EncryptionKeyTable;
  encrypted_chains: EncryptedChainTable;
}

/** A password the server knows (docs/encryption.md): sealed with <data>/secret.key, never clear. */
export interface EncryptionKeyTable {
  id: string;
  /** The job it encrypts (while retired_at is null, its active password); null = added by hand. */
  job_id: string | null;
  hint: string;
  /** `v1:` + base64(nonce 12 || AES-256-GCM ciphertext || tag 16), AAD = `bulwark sealed password v1 <id>`. */
  sealed_password: string;
  created_at: string;
  /** Replaced or turned off in its job: kept to open that job's older chains. */
  retired_at: string | null;
}

/** An encrypted backup chain the catalog has seen. */
export interface EncryptedChainTable {
  chain_id: string;
  hint: string;
  /** The encryption key that opens it; null = the server does not know its password. */
  key_id: string | null;
  recorded_at: string;
}

/** Tables in dependency order (parents first): used by restore and by tests. */
export const dataTables = [
  'agents',
  'hosts',
  'repositories',
  'jobs',
  'sessions',
  'session_tasks',
  'session_log',
  'restore_points',
  'users',
  'api_tokens',
  'enrollment_tokens',
  'server_settings',
  'throttling_rules',
  'exports',
  'encryption_keys',
  'encrypted_chains',
] as const satisfies ReadonlyArray<keyof Database>;

export type HostRow = Selectable<HostTable>;
export type AgentRow = Selectable<AgentTable>;
export type RepositoryRow = Selectable<RepositoryTable>;
export type JobRow = Selectable<JobTable>;
export type SessionRow = Selectable<SessionTable>;
export type SessionTaskRow = Selectable<SessionTaskTable>;
export type SessionLogRow = Selectable<SessionLogTable>;
export type RestorePointRow = Selectable<RestorePointTable>;
export type UserRow = Selectable<UserTable>;
export type NewJob = Insertable<JobTable>;
export type JobUpdate = Updateable<JobTable>;
