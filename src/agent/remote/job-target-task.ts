// The repository agent's end of a per-job backup (docs/formats/agent-link.md, "Per-job storage on
// an agent's repository"): ONE restore point holding every VM of a job, in its `_all` folder,
// written by one writer (JobPointTarget, the one the one-host path uses) while each VM's source
// agent sends its VM on a transfer of its own (`<task id>/<vm>`). Each VM's BEGIN_POINT registers
// it with the writer, each VM's COMMIT waits for the others, then the point is committed once; any
// VM's failure aborts the writer (every VM or none, decision 0007). Around it, the chain steps of
// the `_all` chain (plan before, retention and maintenance after: chain-run.ts).
import { deferred } from '../../common/deferred.js';
import { BulwarkError, describeError } from '../../common/errors.js';
import { ALL_VMS, catalogPoints, type Repository, type RestorePointInfo } from '../../repository/index.js';
import type { BackupTargetResult, BackupTargetTask, TaskEvent, WirePrevious } from '../../transport/agent-tasks.js';
import type { TransferReceiver, TransferSink, TransferTaskGrant } from '../../transport/index.js';
import { methodSettings } from '../backup/chain-policy.js';
import { maintainAfterBackup, planVmBackup, runPasswords, transformStepProgress, type ChainRunContext } from '../backup/chain-run.js';
import { isCompression, isNumber } from '../backup/job-settings.js';
import { jobPointFailed, JobPointTarget } from '../backup/job-target.js';
import { pointToWire, RepositorySink, type SinkDiskStats } from './repository-sink.js';

/** What the task loop lends a per-job target (task-runner.ts). */
export interface JobTargetContext {
  /** This agent's name (log lines). */
  readonly name: string;
  /** Host name or address sources use to reach the listener (default: the address the server sees). */
  readonly dataAdvertise?: string | undefined;
  repository(path: string): Promise<Repository>;
  listener(): Promise<TransferReceiver>;
  /** Grants (or, with undefined, withdraws) a transfer id on the data-mover listener. */
  grant(transferId: string, grant: TransferTaskGrant | undefined): void;
  emit(taskId: string, e: TaskEvent): void;
}

/** The transfer id a VM of a per-job target is sent on. */
export function jobTransferId(taskId: string, vm: string): string {
  return `${taskId}/${vm}`;
}

/** A backup-target task with `vms`: receives every VM of the job into one `_all` point. */
export async function runJobBackupTarget(c: JobTargetContext, task: BackupTargetTask, signal: AbortSignal): Promise<BackupTargetResult> {
  const vms = task.vms ?? [];
  const { job } = task;
  if (vms.length === 0) throw new BulwarkError(`job ${job}: a per-job backup target needs the job's VMs`, { kind: 'invalid', context: { job } });
  const say = (level: 'info' | 'warning' | 'error', message: string) => c.emit(task.taskId, { type: 'log', level, message });
  const repository = await c.repository(task.repositoryPath);
  const settings = methodSettings(task.settings ?? {});
  if (settings.operation === 'quick') {
    throw new BulwarkError(`job ${job} keeps all its VMs in one restore point (storage per-job), so a quick backup of one VM is not written`, {
      kind: 'invalid',
      context: { job },
      hint: `run the whole job instead: bulwark job run ${job}`,
    });
  }
  const now = task.now === undefined ? new Date() : new Date(task.now);
  const { password, chainPassword } = await runPasswords(repository, job, ALL_VMS, task.password, task.passwords ?? [], say);
  say('info', `job ${job} keeps its VMs in one restore point (storage per-job): ${vms.map((v) => `${v.vm} (from agent ${v.sourceAgent})`).join(', ')}; agent ${c.name} writes it`);
  const chain: ChainRunContext = {
    repository, job, vm: ALL_VMS, settings, now, password: chainPassword, newChainPassword: password, say,
    progress: (p) => c.emit(task.taskId, { type: 'progress', progress: { maintenance: p } }),
  };
  const { plan, repair } = await planVmBackup(chain, task.fullRequested === true);
  const parent = plan.kind === 'full' ? undefined : (await repository.listRestorePoints({ job, vm: ALL_VMS })).find((p) => p.id === plan.parent);
  if (plan.kind !== 'full' && !parent) {
    throw new BulwarkError(`job ${job}: the point ${plan.parent ?? '(none)'} this run continues is not in repository ${task.repositoryPath}`, { kind: 'conflict', context: { job } });
  }
  const blockSize = isNumber(task.settings?.blockSize) ? task.settings.blockSize : undefined;
  const compression = isCompression(task.settings?.compression) ? task.settings.compression : undefined;
  const target = new JobPointTarget({
    repository,
    job,
    vms: vms.map((v) => v.vm),
    kind: plan.kind === 'full' ? 'full' : parent!.method === 'reverse' ? 'reverse' : 'incremental',
    parent,
    chainMethod: plan.chainMethod,
    blockSize,
    compression,
    ...(password !== undefined ? { encryption: { password } } : {}),
    password: chainPassword,
    time: now,
    // A reverse injection's commit step (inject) is a maintenance step too.
    onTransformProgress: (p) => chain.progress?.(transformStepProgress(p)),
  });
  const previous: Record<string, WirePrevious | null> = {};
  for (const v of vms) {
    const p = await target.previousCheckpoint(job, v.vm, v.chainId);
    previous[v.vm] = p ? { point: pointToWire(p.point), checkpoint: p.checkpoint as unknown as Record<string, unknown> } : null;
  }

  // The point once committed (every VM's commit resolves with it), or the first failure.
  const committed = deferred<RestorePointInfo>();
  let failedVm: string | null = null;
  const fail = (err: unknown, vm?: string): void => {
    // The VM whose transfer ended first is where it began (the others fail because of it): told
    // to the server as `progress { failedVm }` before the result, so the session names it.
    if (vm !== undefined && failedVm === null && !committed.settled) {
      failedVm = vm;
      c.emit(task.taskId, { type: 'progress', progress: { failedVm: vm } });
    }
    void target.abort(err);
    committed.reject(jobPointFailed(job, err));
  };
  const disks: SinkDiskStats[] = [];
  const receiver = await c.listener();
  const transfers = vms.map((v) => jobTransferId(task.taskId, v.vm));
  for (const v of vms) {
    c.grant(jobTransferId(task.taskId, v.vm), {
      secret: task.secret,
      openSink: async ({ peerCertificate }) => {
        const cn = peerCertificate.subject?.CN;
        const peer = Array.isArray(cn) ? cn[0] : cn;
        if (peer !== v.sourceAgent) {
          throw new BulwarkError(`agent ${String(peer)} may not send VM ${v.vm} of job ${job} (task ${task.taskId} gave it to agent ${v.sourceAgent})`, { kind: 'forbidden', context: { job, vm: v.vm } });
        }
        const sink = new RepositorySink({
          repository,
          job,
          vm: v.vm,
          // The VM's part of the one writer: the point's kind, parent and block size are the job's.
          open: async (p) => {
            const part = await target.startRestorePoint({ job, vm: v.vm, kind: p.kind, disks: p.disks, vmConfig: Buffer.from(p.vmConfig, 'base64') });
            return {
              writeDisk: (name, blocks, o) => part.writeDisk(name, blocks, o),
              commit: async () => {
                const point = await part.commit();
                committed.resolve(point);
                return point;
              },
              abort: () => part.abort(),
            };
          },
          onDisk: (st) => disks.push({ ...st, name: `${v.vm}/${st.name}` }),
        });
        // A VM's transfer that ends without its commit fails the job's point (named by the VM).
        const named: TransferSink = {
          beginPoint: (p) => sink.beginPoint(p),
          openDisk: (d) => sink.openDisk(d),
          writeBlock: (b) => sink.writeBlock(b),
          writeZeroRun: (r) => sink.writeZeroRun(r),
          endDisk: (d) => sink.endDisk(d),
          commit: () => sink.commit(),
          abort: async (reason) => {
            fail(new BulwarkError(`VM ${v.vm} (agent ${v.sourceAgent}): ${reason}`, { kind: 'unavailable', context: { job, vm: v.vm } }), v.vm);
            await sink.abort(reason);
          },
        };
        return named;
      },
    });
  }
  try {
    const plannedWire = { ...plan, repair };
    c.emit(task.taskId, {
      type: 'ready',
      port: receiver.address.port,
      ...(c.dataAdvertise ? { host: c.dataAdvertise } : {}),
      previous: null,
      plan: plannedWire,
      vms: previous,
      ...(parent ? { blockSize: parent.blockSize } : {}),
    });
    const onAbort = (): void => {
      const why = describeError(signal.reason ?? 'stopped by the server');
      for (const t of transfers) receiver.abortTask(t, why);
      fail(new BulwarkError(`stopped by the server: ${why}`, { kind: 'unavailable', context: { job } }));
    };
    if (signal.aborted) onAbort();
    signal.addEventListener('abort', onAbort, { once: true });
    let point: RestorePointInfo;
    try {
      point = await committed.promise;
    } finally {
      signal.removeEventListener('abort', onAbort);
    }
    const slices = catalogPoints([point]).map((p) => p.vm);
    say('info', `restore point ${point.id} of job ${job} committed in ${task.repositoryPath}: ${slices.length} VM(s), ${slices.join(', ')}`);
    // After the commit: the point is safe whatever happens below; a failed step is a warning.
    const warnings = await maintainAfterBackup(chain, plan, point.id);
    const all = await repository.listRestorePoints({ job, vm: ALL_VMS });
    // The catalog follows each VM: its slices of the `_all` points and its own folder's points.
    const folders = new Set([...vms.map((v) => v.vm), ...catalogPoints(all).map((p) => p.vm)]);
    const own: RestorePointInfo[] = [];
    for (const vm of folders) own.push(...(await repository.listRestorePoints({ job, vm })));
    return { point: pointToWire(all.find((p) => p.id === point.id) ?? point), disks, points: [...all, ...own].map(pointToWire), warnings };
  } catch (err) {
    await target.abort(err);
    throw err;
  } finally {
    for (const t of transfers) c.grant(t, undefined);
  }
}
