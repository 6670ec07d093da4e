// Chain maintenance of one VM folder, called by Repository under the folder's writer lock:
// retention (merge, chain and point deletion), synthetic full, compaction, health check.
// docs/formats/backup-files.md section 5.
import { BulwarkError } from '../../common/errors.js';
import type { VmFolder } from '../folders.js';
import type { HealthReport, MethodPolicy, RetentionReport, SynthesizeFullOptions } from '../plan/types.js';
import type { Repository } from '../repository.js';
import type { RestorePointInfo } from '../restore-point.js';

const notYet = (what: string) => new BulwarkError(`${what} is not implemented yet`, { kind: 'internal' });

export async function applyRetention(_f: VmFolder, _job: string, _vm: string, _policy: MethodPolicy, _now: Date, _password?: string): Promise<RetentionReport> {
  throw notYet('applyRetention');
}

export async function synthesizeFull(_repo: Repository, _f: VmFolder, _job: string, _vm: string, _opts: SynthesizeFullOptions): Promise<RestorePointInfo> {
  throw notYet('synthesizeFull');
}

export async function compactFull(_f: VmFolder, _chain?: string): Promise<{ file: string; bytesBefore: number; bytesAfter: number }> {
  throw notYet('compactFull');
}

export async function healthCheck(_repo: Repository, _f: VmFolder, _job: string, _vm: string, _opts: { wholeChain?: boolean; password?: string }): Promise<HealthReport> {
  throw notYet('healthCheck');
}
