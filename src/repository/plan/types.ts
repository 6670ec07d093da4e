// Types of the backup-method planning (pure) and of the chain maintenance the repository does:
// what a run must be (planRun), what retention removes (planRetention), and the reports of the
// transforms (docs/formats/backup-files.md section 5). The job engine's executor calls these.
import type { DamagedPointRecord, PendingRepairRecord } from '../../format/chain-metadata.js';
import type { BackupChain } from '../folders.js';

/** How a job builds its chains. */
export type BackupMethod = 'forever-forward' | 'forward' | 'reverse';

export type Weekday = 'mon' | 'tue' | 'wed' | 'thu' | 'fri' | 'sat' | 'sun';

/** Days something runs on: any listed weekday or day of the month (1-31; -1 = last day). */
export interface DaySchedule {
  readonly weekdays?: readonly Weekday[];
  readonly monthDays?: readonly number[];
}

/** Keep the newest N restore points, or the points of the last N days. */
export type Retention = { readonly points: number } | { readonly days: number };

/** What planRun and planRetention need to know about a job (JobDefinition.settings subset). */
export interface MethodPolicy {
  readonly method: BackupMethod;
  readonly retention: Retention;
  /** Forward (and forever-forward, reverse): read everything from the source again on these days. */
  readonly activeFull?: DaySchedule | null;
  /** Forward: build a full in the repository from the chain on these days (no source read). */
  readonly syntheticFull?: DaySchedule | null;
  /** IANA time zone the days are counted in (weekdays, month days, retention days). Default UTC. */
  readonly timeZone?: string;
  /**
   * Keep the newest point whatever the retention says (default true), so failed runs never leave
   * a VM without a restore point. False for a VM removed from its job once its days are over.
   */
  readonly keepLatest?: boolean;
}

/** What the repository knows about one VM folder: its chains and any pending repair. */
export interface VmChainState {
  /** Chains of the VM, oldest first (Repository#listChains({ job, vm })). */
  readonly chains: readonly BackupChain[];
  /** Recorded by a health check; the next run must store these blocks fresh. */
  readonly repair: PendingRepairRecord | null;
  /** Points health checks found damaged (kept after their repair; retention never merges them). */
  readonly damaged?: readonly DamagedPointRecord[];
}

/** What one run of a VM must write. */
export type RunKind =
  /** A new chain: read every block from the source (chainMethod says forward or reverse). */
  | 'full'
  /** A forward increment on the tip of the latest chain (parent). */
  | 'incremental'
  /** A forward increment on the tip (parent), then Repository#synthesizeFull on the new point. */
  | 'synthetic-full'
  /** A reverse injection into the latest reverse chain's full (startRestorePoint kind 'reverse'). */
  | 'reverse';

export interface RunPlan {
  readonly kind: RunKind;
  /** Why, for the session log ("active full scheduled on sun", "no restore point yet"…). */
  readonly reason: string;
  /** The chain method of the point written: 'reverse' for the reverse method, else 'forward'. */
  readonly chainMethod: 'forward' | 'reverse';
  /** The point the run continues from (incremental, synthetic-full, reverse); null for a full. */
  readonly parent: string | null;
}

/** One step retention takes on a VM folder. Files are absolute paths. */
export type RetentionAction =
  | {
      /** Forever forward: merge the oldest increment into the full; the full's old point goes. */
      readonly kind: 'merge';
      readonly chain: string;
      /** The increment merged (its point survives, now held by the full). */
      readonly point: string;
      /** The point the full held before, which disappears. */
      readonly removes: string;
      readonly files: { readonly increment: string; readonly full: string };
      readonly reason: string;
    }
  | {
      /** A whole chain none of whose points is kept. */
      readonly kind: 'delete-chain';
      readonly chain: string;
      readonly points: readonly string[];
      readonly files: readonly string[];
      readonly reason: string;
    }
  | {
      /** Reverse: the oldest reverse increment. */
      readonly kind: 'delete-point';
      readonly chain: string;
      readonly point: string;
      readonly files: readonly string[];
      readonly reason: string;
    }
  | {
      /** Points outside retention kept anyway (a kept point depends on them), or nothing to do. */
      readonly kind: 'none';
      readonly chain: string;
      readonly points: readonly string[];
      readonly reason: string;
      /**
       * Set when a merge was refused because a point it involves is damaged: merging would make
       * the damaged blocks the full's. The reason is a warning for the session; planRun takes an
       * active full on the next run, and the old chain is deleted whole once no point of it is kept.
       */
      readonly damaged?: readonly string[];
    };

export interface RetentionReport {
  readonly job: string;
  readonly vm: string;
  /** Actions taken, in order ('none' entries explain what was kept beyond retention). */
  readonly actions: readonly RetentionAction[];
  readonly removedPoints: readonly string[];
  readonly deletedFiles: readonly string[];
}

/** Blocks the next backup must read from the source and store fresh (not inherit). */
export interface PendingRepair {
  readonly disk: string;
  readonly blocks: readonly number[];
}

/** The repair a health check recorded in the .vbm (docs/formats/backup-files.md section 4). */
export type { DamagedPointRecord, PendingRepairRecord } from '../../format/chain-metadata.js';

/** One damaged block a health check found. */
export interface DamagedBlock {
  /** Absolute path of the file holding the damaged record. */
  readonly file: string;
  /** Restore point checked (whose read hits the damage). */
  readonly point: string;
  readonly disk: string;
  readonly block: number;
  /** Byte offset of the block on the disk. */
  readonly diskOffset: number;
  readonly reason: string;
}

export interface HealthReport {
  readonly job: string;
  readonly vm: string;
  /** Points verified (the latest, or every point of the latest chain with wholeChain). */
  readonly points: readonly string[];
  readonly blocksChecked: number;
  readonly ok: boolean;
  readonly damaged: readonly DamagedBlock[];
  /** Damage outside block data (file header, index, table pages): an active full is needed. */
  readonly metadataDamaged: boolean;
  readonly metadataProblems: readonly string[];
  /** What was recorded for the next run (null when nothing is damaged). */
  readonly repair: PendingRepairRecord | null;
}

export interface SynthesizeFullOptions {
  /** The point to turn into a full (default: the latest point). It must be the tip of a forward chain. */
  readonly point?: string;
  /** Password of an encrypted chain. */
  readonly password?: string;
  /** Encoder threads for an encrypted chain (re-encoded); default min(2, cores). */
  readonly threads?: number;
}
