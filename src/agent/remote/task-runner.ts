// The agent's task loop (docs/formats/agent-link.md, "Tasks"): long-polls the server for tasks
// over the mutually authenticated link, runs them, and posts their events back (progress with
// stage times, log lines, readiness, the result). The kinds: list a VM's disks; receive a backup
// into a repository on this host (the data-mover listener, repository-sink.ts) with the chain
// steps around it (chain-run.ts: plan, retention, maintenance; this agent owns the folder); read a
// VM next to this agent and send it to a repository agent (remote-target.ts); health-check a VM's
// chain here; restore a disk here. A task the server cancels is stopped through its abort signal.
import { randomBytes } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type https from 'node:https';
import { setTimeout as sleep } from 'node:timers/promises';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { openHypervisor, type HypervisorConnection } from '../../hypervisor/index.js';
import type { Checkpoint, Hypervisor, VmInfo } from '../../hypervisor/types.js';
import { openSharedRepository, type Repository, type TransformProgress } from '../../repository/index.js';
import { restoreDisk } from '../../restore/disk/restore-disk.js';
import type { NamedLimit } from '../../transport/throttle.js';
import type {
  AgentTask, BackupSourceTask, BackupTargetResult, BackupTargetTask, EventsReply, HealthCheckResult, HealthCheckTask, PollReply, RemovedVmSweepResult, RemovedVmSweepTask, ResolveDisksTask,
  RestoreDiskTask, TaskEvent, WireDisk, WirePrevious, WireRestoredDisk, WireRunPlan,
} from '../../transport/agent-tasks.js';
import { SharedLimiters, StageTimes, TransferReceiver, type TlsIdentity, type TransferTaskGrant } from '../../transport/index.js';
import { methodSettings, splitDisks } from '../backup/chain-policy.js';
import { healthCheckSession, maintainAfterBackup, planVmBackup, runPasswords, sweepRemovedVms, transformStepProgress, type ChainRunContext, type VmBackupPlan } from '../backup/chain-run.js';
import { backupVm, previousCheckpoint } from '../backup/disk-backup.js';
import { runFileIndexTask } from './index-task.js';
import { listVmsOnHosts } from './list-vms.js';
import { runJobBackupTarget, type JobTargetContext } from './job-target-task.js';
import { MountTasks } from './mount-tasks.js';
import { backupVmByDisks, RemoteRestorePointTarget } from './remote-target.js';
import { RestoreTasks } from './restore-tasks.js';
import { pointFromWire, pointToWire, RepositorySink } from './repository-sink.js';

const log = logger('agent-tasks');

/** How the task loop talks to the server: the agent's JSON request over its TLS agent. */
export type LinkRequest = <T>(method: 'POST', route: string, body: unknown, agent: https.Agent, timeoutMs: number) => Promise<T>;

export interface AgentTaskRunnerOptions {
  readonly name: string;
  readonly tls: TlsIdentity;
  /** An https.Agent with the agent's client certificate, for the poll and event requests. */
  readonly httpsAgent: https.Agent;
  readonly request: LinkRequest;
  /** Where the data-mover listener binds when this agent receives a backup (default 0.0.0.0, any free port). */
  readonly dataListen?: { readonly host: string; readonly port: number } | undefined;
  /** Host name or address sources use to reach the listener (default: the address the server sees). */
  readonly dataAdvertise?: string | undefined;
  readonly resumeWindowMs?: number | undefined;
  /** The agent's data folder (restored VMs, instant recovery sessions; default a folder in the temp dir). */
  readonly dataDir?: string | undefined;
}

interface RunningTask {
  readonly task: AgentTask;
  readonly abort: AbortController;
  readonly outbox: TaskEvent[];
  progress: TaskEvent | undefined;
  /** The result is queued: the task leaves `running` once it is delivered. */
  ended: boolean;
  /** backup-source: the rate limits the server says apply now. */
  limits: readonly NamedLimit[] | undefined;
  /** backup-source with diskTasks: the disks the server let go so far. */
  disks?: readonly string[] | undefined;
}

export class AgentTaskRunner {
  readonly #o: AgentTaskRunnerOptions;
  readonly #bootId = randomBytes(12).toString('hex');
  readonly #running = new Map<string, RunningTask>();
  readonly #grants = new Map<string, TransferTaskGrant>();
  readonly #targetEnds = new Map<string, (outcome: { ok: true } | { ok: false; reason: string }) => void>();
  readonly #limiters = new SharedLimiters();
  readonly #adapters = new Map<string, Hypervisor>();
  #receiver: Promise<TransferReceiver> | undefined;
  /** Restore tasks (restore-tasks.ts): VM restore, instant recovery, serving points to other agents. */
  readonly #restore: RestoreTasks;
  /** Mount tasks (mount-tasks.ts): this agent as mount server for file-level restore. */
  readonly #mounts: MountTasks;
  #closed = false;
  #loop: Promise<void> | undefined;
  #flusher: NodeJS.Timeout | undefined;
  #flushing: Promise<void> | undefined;

  /** What a per-job backup target borrows from this loop. */
  readonly #jobTargets: JobTargetContext;

  constructor(options: AgentTaskRunnerOptions) {
    this.#o = options;
    this.#jobTargets = {
      name: options.name,
      dataAdvertise: options.dataAdvertise,
      repository: (p) => this.#repository(p),
      listener: () => this.#listener(),
      grant: (id, grant) => (grant ? this.#grants.set(id, grant) : this.#grants.delete(id)),
      emit: (taskId, e) => this.#emit(taskId, e),
    };
    this.#restore = new RestoreTasks({
      name: options.name,
      tls: options.tls,
      dataDir: options.dataDir ?? path.join(tmpdir(), `bulwark-agent-${options.name}`),
      dataAdvertise: options.dataAdvertise,
      repository: (p) => this.#repository(p),
      listener: () => this.#listener(),
      grant: (taskId, grant) => (grant ? this.#grants.set(taskId, grant) : this.#grants.delete(taskId)),
      emit: (taskId, e) => this.#emit(taskId, e),
    });
    this.#mounts = new MountTasks({
      name: options.name,
      tls: options.tls,
      dataDir: options.dataDir ?? path.join(tmpdir(), `bulwark-agent-${options.name}`),
      repository: (p) => this.#repository(p),
      emit: (taskId, e) => this.#emit(taskId, e),
    });
  }

  start(): void {
    this.#loop = this.#pollLoop();
    this.#flusher = setInterval(() => void this.#flush(), 200);
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#flusher);
    for (const r of this.#running.values()) r.abort.abort(new BulwarkError('the agent is shutting down', { kind: 'unavailable' }));
    await this.#restore.close().catch((err: unknown) => log.warn({ err: describeError(err) }, 'stopping instant recovery sessions failed'));
    await this.#mounts.close().catch((err: unknown) => log.warn({ err: describeError(err) }, 'undoing file-restore mounts failed'));
    const receiver = await this.#receiver?.catch(() => undefined);
    await receiver?.close();
    await this.#flush().catch(() => undefined);
    await Promise.allSettled([...this.#adapters.values()].map((a) => a.close()));
    // The poll may be held open by the server for a while; the https agent's destroy ends it.
    void this.#loop;
  }

  // ---- the link ----

  async #pollLoop(): Promise<void> {
    let failures = 0;
    while (!this.#closed) {
      let reply: PollReply;
      try {
        reply = await this.#o.request<PollReply>('POST', '/api/v1/agents/tasks/poll', { bootId: this.#bootId, running: [...this.#running.keys()] }, this.#o.httpsAgent, 60_000);
        failures = 0;
      } catch (err) {
        if (this.#closed) return;
        failures++;
        log.warn({ err: describeError(err), failures }, 'task poll failed');
        await sleep(Math.min(10_000, 500 * 2 ** Math.min(failures, 5)));
        continue;
      }
      for (const c of reply.cancel) {
        const r = this.#running.get(c.taskId);
        if (r && !r.ended) {
          log.info({ task: c.taskId, reason: c.reason }, 'server stopped the task');
          r.abort.abort(new BulwarkError(`stopped by the server: ${c.reason}`, { kind: 'internal' }));
          this.#targetEnds.get(c.taskId)?.({ ok: false, reason: c.reason });
        }
      }
      for (const t of reply.tasks) this.#start(t);
    }
  }

  #emit(taskId: string, e: TaskEvent): void {
    const r = this.#running.get(taskId);
    if (!r) return;
    if (e.type === 'progress') r.progress = e;
    else {
      if (r.progress) {
        r.outbox.push(r.progress);
        r.progress = undefined;
      }
      r.outbox.push(e);
    }
    if (e.type === 'result' || e.type === 'ready') void this.#flush();
  }

  async #flush(): Promise<void> {
    if (this.#flushing) return this.#flushing;
    this.#flushing = (async () => {
      for (const [taskId, r] of [...this.#running]) {
        if (r.progress) {
          r.outbox.push(r.progress);
          r.progress = undefined;
        }
        if (r.outbox.length === 0) continue;
        const events = r.outbox.splice(0);
        try {
          const reply = await this.#o.request<EventsReply>('POST', `/api/v1/agents/tasks/${taskId}/events`, { events }, this.#o.httpsAgent, 30_000);
          if (reply.limits) r.limits = reply.limits;
          if (reply.disks) r.disks = reply.disks;
          if (reply.cancel && !r.ended && !r.abort.signal.aborted) r.abort.abort(new BulwarkError('stopped by the server', { kind: 'internal' }));
          if (events.some((e) => e.type === 'result')) this.#running.delete(taskId);
        } catch (err) {
          r.outbox.unshift(...events);
          log.warn({ task: taskId, err: describeError(err) }, 'could not send task events; will retry');
        }
      }
    })().finally(() => (this.#flushing = undefined));
    return this.#flushing;
  }

  // ---- tasks ----

  #start(task: AgentTask): void {
    if (this.#running.has(task.taskId)) return;
    const r: RunningTask = { task, abort: new AbortController(), outbox: [], progress: undefined, ended: false, limits: undefined };
    this.#running.set(task.taskId, r);
    log.info({ task: task.taskId, kind: task.kind }, 'task started');
    const run = async (): Promise<unknown> => {
      switch (task.kind) {
        case 'resolve-disks':
          return this.#resolveDisks(task);
        case 'list-vms':
          return { hosts: await listVmsOnHosts(task.hosts, (c) => this.#adapter(c)) };
        case 'backup-target':
          // Per-job storage: every VM of the job into one point (job-target-task.ts).
          return task.vms ? runJobBackupTarget(this.#jobTargets, task, r.abort.signal) : this.#backupTarget(task, r.abort.signal);
        case 'backup-source':
          return this.#backupSource(task, r.abort.signal);
        case 'restore-disk':
          return this.#restoreDisk(task, r.abort.signal);
        case 'health-check':
          return this.#healthCheck(task);
        case 'removed-vm-sweep':
          return this.#sweepRemovedVms(task);
        case 'restore-point-config':
        case 'restore-serve':
        case 'restore-vm':
        case 'instant-recovery':
          return this.#restore.run(task, r.abort.signal);
        case 'file-index':
          return runFileIndexTask({ repository: (p) => this.#repository(p) }, task);
        case 'mount':
          return this.#mounts.run(task, r.abort.signal);
      }
    };
    run().then(
      (value) => {
        r.ended = true;
        this.#emit(task.taskId, { type: 'result', ok: true, value });
      },
      (err: unknown) => {
        r.ended = true;
        const e = err instanceof BulwarkError ? err : new BulwarkError(describeError(err), { kind: 'internal', cause: err });
        log.warn({ task: task.taskId, kind: task.kind, err: describeError(e) }, 'task failed');
        this.#emit(task.taskId, { type: 'result', ok: false, error: { kind: e.kind, message: describeError(e), ...(e.hint ? { hint: e.hint } : {}) } });
      },
    );
  }

  #adapter(c: HypervisorConnection): Hypervisor {
    const key = JSON.stringify(c);
    let a = this.#adapters.get(key);
    if (!a) {
      a = openHypervisor(c);
      this.#adapters.set(key, a);
    }
    return a;
  }

  async #locate(hosts: readonly HypervisorConnection[], vm: string): Promise<{ hypervisor: Hypervisor; vm: VmInfo; connection: HypervisorConnection }> {
    for (const connection of hosts) {
      const hypervisor = this.#adapter(connection);
      try {
        return { hypervisor, vm: await hypervisor.getVm(vm), connection };
      } catch (err) {
        if (err instanceof BulwarkError && err.kind === 'not-found') continue;
        throw err;
      }
    }
    throw new BulwarkError(`VM ${vm} was not found on the hosts of agent ${this.#o.name}`, { kind: 'not-found', context: { vm, agent: this.#o.name } });
  }

  async #resolveDisks(task: ResolveDisksTask): Promise<WireDisk[]> {
    const { vm, connection } = await this.#locate(task.hosts, task.vm);
    return vm.disks.map((d) => ({
      name: d.name,
      sizeBytes: d.virtualSize,
      location: { hypervisor: connection.kind, vm: vm.id, image: d.imagePath, format: d.format, agent: this.#o.name, ...(d.nodeName ? { node: d.nodeName } : {}) },
    }));
  }

  #repository(path: string): Promise<Repository> {
    return openSharedRepository(path, { create: true });
  }

  #listener(): Promise<TransferReceiver> {
    this.#receiver ??= TransferReceiver.listen({
      tls: this.#o.tls,
      host: this.#o.dataListen?.host ?? '0.0.0.0',
      port: this.#o.dataListen?.port ?? 0,
      ...(this.#o.resumeWindowMs !== undefined ? { resumeWindowMs: this.#o.resumeWindowMs } : {}),
      grant: (taskId) => this.#grants.get(taskId),
      onSessionEnd: (info) => this.#targetEnds.get(info.taskId)?.(info.outcome === 'committed' ? { ok: true } : { ok: false, reason: info.reason ?? info.outcome }),
    });
    this.#receiver.catch(() => (this.#receiver = undefined));
    return this.#receiver;
  }

  /** The chain steps' view of a task's VM folder here; log lines go to the task's session. */
  #chain(task: BackupTargetTask | HealthCheckTask, repository: Repository, settings: Readonly<Record<string, unknown>>, chainPassword: string | undefined): ChainRunContext {
    return {
      repository,
      job: task.job,
      vm: task.vm,
      settings: methodSettings(settings),
      now: task.now === undefined ? new Date() : new Date(task.now),
      // The latest chain's own password (REMOTEJOB: runPasswords); a new chain gets the job's current one.
      password: chainPassword,
      newChainPassword: task.password,
      say: (level, message) => this.#emit(task.taskId, { type: 'log', level, message }),
      // Byte progress of the maintenance steps (REMOTEJOB): the server shows a health check's.
      progress: (p) => this.#emit(task.taskId, { type: 'progress', progress: { maintenance: p } }),
    };
  }

  /** The password the task's folder's latest chain keeps, among the job's current and known ones (said in the session log when not the current one). */
  async #chainPassword(task: BackupTargetTask | HealthCheckTask, repository: Repository): Promise<string | undefined> {
    const say = (level: 'info' | 'warning' | 'error', message: string) => this.#emit(task.taskId, { type: 'log', level, message });
    return (await runPasswords(repository, task.job, task.vm, task.password, task.passwords ?? [], say)).chainPassword;
  }

  /**
   * Receives one VM's restore point; resolves with the committed point once the source committed.
   * With the job's settings, plans the run first (sent in `ready`) and runs retention and the
   * maintenance due after the commit (chain-run.ts), as the one-host executor does.
   */
  async #backupTarget(task: BackupTargetTask, signal: AbortSignal): Promise<BackupTargetResult> {
    const repository = await this.#repository(task.repositoryPath);
    const chainPassword = await this.#chainPassword(task, repository);
    const chain = task.settings ? this.#chain(task, repository, task.settings, chainPassword) : undefined;
    const planned: VmBackupPlan | undefined = chain ? await planVmBackup(chain, task.fullRequested === true) : undefined;
    // A full starts a new chain: an old one it cannot read (its password unknown by now) does not stop it.
    const prev = await previousCheckpoint(repository, task.job, task.vm, task.chainId, chainPassword).catch((err: unknown) => {
      if (planned?.plan.kind === 'full') return null;
      throw err;
    });
    const receiver = await this.#listener();
    let sink: RepositorySink | undefined;
    const disks: Array<{ name: string; storedBytes: number; storedBlocks: number; unchangedBlocks: number }> = [];
    const ended = new Promise<{ ok: true } | { ok: false; reason: string }>((resolve) => this.#targetEnds.set(task.taskId, resolve));
    this.#grants.set(task.taskId, {
      secret: task.secret,
      openSink: async ({ peerCertificate }) => {
        const cn = peerCertificate.subject?.CN;
        const peer = Array.isArray(cn) ? cn[0] : cn;
        if (peer !== task.sourceAgent) {
          throw new BulwarkError(`agent ${String(peer)} may not send task ${task.taskId} (it was given to ${task.sourceAgent})`, { kind: 'forbidden' });
        }
        sink = new RepositorySink({
          repository,
          job: task.job,
          vm: task.vm,
          password: task.password,
          chainPassword,
          ...(chain ? { time: chain.now, onTransformProgress: (p: TransformProgress) => chain.progress?.(transformStepProgress(p)) } : {}),
          onDisk: (st) => disks.push({ name: st.name, storedBytes: st.storedBytes, storedBlocks: st.storedBlocks, unchangedBlocks: st.unchangedBlocks }),
        });
        return sink;
      },
    });
    try {
      const previous: WirePrevious | null = prev ? { point: pointToWire(prev.point), checkpoint: prev.checkpoint as unknown as Record<string, unknown> } : null;
      const plan: WireRunPlan | undefined = planned ? { ...planned.plan, repair: planned.repair } : undefined;
      this.#emit(task.taskId, { type: 'ready', port: receiver.address.port, ...(this.#o.dataAdvertise ? { host: this.#o.dataAdvertise } : {}), previous, ...(plan ? { plan } : {}) });
      const onAbort = (): void => {
        receiver.abortTask(task.taskId, 'stopped by the server');
        this.#targetEnds.get(task.taskId)?.({ ok: false, reason: 'stopped by the server' });
      };
      signal.addEventListener('abort', onAbort, { once: true });
      try {
        const outcome = await ended;
        if (!outcome.ok) throw new BulwarkError(`the backup was not committed: ${outcome.reason}`, { kind: 'unavailable', context: { task: task.taskId } });
      } finally {
        signal.removeEventListener('abort', onAbort);
      }
      if (!sink?.point) throw new BulwarkError('the session ended without a restore point', { kind: 'internal' });
      const point = sink.point;
      this.#emit(task.taskId, { type: 'log', level: 'info', message: `restore point ${point.id} committed in ${task.repositoryPath}` });
      if (!chain || !planned) return { point: pointToWire(point), disks };
      // After the commit: the point is safe whatever happens below; a failed step is a warning.
      const warnings = await maintainAfterBackup(chain, planned.plan, point.id);
      const points = await repository.listRestorePoints({ job: task.job, vm: task.vm });
      return { point: pointToWire(points.find((p) => p.id === point.id) ?? point), disks, points: points.map(pointToWire), warnings };
    } finally {
      this.#grants.delete(task.taskId);
      this.#targetEnds.delete(task.taskId);
    }
  }

  /** A health-check session's work on one VM whose folder is here. */
  async #healthCheck(task: HealthCheckTask): Promise<HealthCheckResult> {
    const repository = await this.#repository(task.repositoryPath);
    const warnings = await healthCheckSession(this.#chain(task, repository, task.settings, await this.#chainPassword(task, repository)));
    const points = await repository.listRestorePoints({ job: task.job, vm: task.vm });
    return { warnings, disks: points.at(-1)?.disks.map((d) => d.name) ?? [], points: points.map(pointToWire) };
  }

  /** The removed-VM sweep of one job's folder here (never creates the repository). */
  async #sweepRemovedVms(task: RemovedVmSweepTask): Promise<RemovedVmSweepResult> {
    if (!(await stat(task.repositoryPath).then((st) => st.isDirectory(), () => false))) return { vms: [] };
    const swept = await sweepRemovedVms(await this.#repository(task.repositoryPath), { job: task.job, method: task.method, vms: task.vms, days: task.days, now: new Date(task.now) });
    for (const v of swept) {
      log.info({ job: task.job, vm: v.vm, removed: v.removedPoints.length }, 'points of a VM removed from its job deleted');
    }
    return { vms: swept.map((v) => ({ vm: v.vm, removedPoints: v.removedPoints, points: v.points.map(pointToWire) })) };
  }

  /** Restores a disk from a repository on this host to a path on this host. */
  async #restoreDisk(task: RestoreDiskTask, signal: AbortSignal): Promise<WireRestoredDisk> {
    const repository = await this.#repository(task.repositoryPath);
    const r = await restoreDisk({
      repository,
      // Cancelled (the console went away, `session stop`): stops and leaves no image.
      signal,
      pointId: task.pointId,
      disk: task.disk,
      to: task.to,
      ...(task.format ? { format: task.format } : {}),
      ...(task.overwrite ? { overwrite: true } : {}),
      ...(task.digest ? { imageDigest: true } : {}),
      ...(task.password !== undefined ? { password: task.password } : {}),
      // To the restore's session (WireRestoreDiskProgress): the latest goes with each event flush.
      onProgress: (p) => this.#emit(task.taskId, { type: 'progress', progress: { bytesDone: p.bytesDone, bytesWritten: p.bytesWritten, size: p.size } }),
    });
    return { path: r.path, format: r.format, size: r.size, ...(r.sha256 !== undefined ? { sha256: r.sha256 } : {}), bytesWritten: r.bytesWritten, durationMs: r.durationMs };
  }

  /** Reads the VM here and sends it to the repository agent; resolves with the backup summary. */
  async #backupSource(task: BackupSourceTask, signal: AbortSignal): Promise<Record<string, unknown>> {
    const { hypervisor, vm } = await this.#locate(task.hosts, task.vm);
    const { included, excluded } = splitDisks(task.excludeDisks ?? [], task.vm, vm.disks.map((d) => d.name));
    if (excluded.length > 0) this.#emit(task.taskId, { type: 'log', level: 'info', message: `disk(s) ${excluded.join(', ')} of VM ${vm.name} excluded by the job (not backed up)` });
    if (included.length === 0) throw new BulwarkError(`every disk of VM ${vm.name} is excluded by job ${task.job}`, { kind: 'invalid', context: { vm: vm.name, job: task.job } });
    const stageTimes = new StageTimes();
    const limits = task.limits;
    // The server may change the limits while the task runs (a rule's hours, the repository share): re-read each second.
    const throttle = this.#limiters.throttleFor(() => this.#running.get(task.taskId)?.limits ?? limits, 1000);
    const corruptEvery = Number(process.env.BULWARK_TEST_CORRUPT_EVERY ?? 0);
    const previous = task.previous ? { point: pointFromWire(task.previous.point), checkpoint: task.previous.checkpoint as unknown as Checkpoint } : null;
    const target = new RemoteRestorePointTarget({
      previous,
      sender: {
        target: { host: task.target.host, port: task.target.port, servername: task.target.agent },
        tls: this.#o.tls,
        taskId: task.transferId,
        taskSecret: task.secret,
        streams: task.streams,
        resumeWindowMs: task.resumeWindowMs,
        stageTimes,
        throttle,
        // Test hook (multi-host tests): damage the first transmission of every Nth block on the wire.
        ...(corruptEvery > 0 ? { corruptInTransit: (b: { sequence: number; attempt: number }) => b.attempt === 1 && b.sequence % corruptEvery === 0 } : {}),
      },
    });
    if (limits.length > 0) this.#emit(task.taskId, { type: 'log', level: 'info', message: `data streams limited: ${limits.map((l) => `${l.name} ${((l.bytesPerSecond * 8) / 1e6).toFixed(1)} Mbit/s`).join(', ')}` });
    const started = performance.now();
    // One task per disk on the server: each disk waits for its task's go (INCR).
    const pacing = task.diskTasks
      ? { diskTasks: task.diskTasks, go: () => this.#running.get(task.taskId)?.disks ?? [], waiting: () => this.#emit(task.taskId, { type: 'progress', progress: {} }) }
      : null;
    const summary = await (pacing ? (o: Parameters<typeof backupVm>[0]) => backupVmByDisks(o, pacing) : backupVm)({
      hypervisor,
      target,
      job: task.job,
      vm: vm.id,
      full: task.full,
      ...(task.fullReason !== undefined ? { fullReason: task.fullReason } : {}),
      ...(task.chainMethod ? { chainMethod: task.chainMethod } : {}),
      ...(excluded.length > 0 ? { disks: included } : {}),
      ...(task.repair && task.repair.length > 0 ? { repair: task.repair } : {}),
      requireGuestProcessing: task.requireGuestProcessing ?? false,
      ...(task.mode ? { mode: task.mode } : {}),
      ...(task.blockSize !== undefined ? { blockSize: task.blockSize } : {}),
      ...(task.compression ? { compression: task.compression } : {}),
      ...(task.intoIncrement ? { intoIncrement: true } : {}),
      signal,
      onProgress: (progress) => this.#emit(task.taskId, { type: 'progress', progress: { ...progress }, stageTimes: stageTimes.snapshot() }),
      onLog: (level, message, disk) => this.#emit(task.taskId, { type: 'log', level, message, ...(disk ? { disk } : {}) }),
    });
    const stats = target.sender?.stats;
    if (stats) {
      this.#emit(task.taskId, {
        type: 'log',
        level: 'info',
        message:
          `transfer: sent ${stats.bytesSent} bytes in ${Math.round(target.transferMs)} ms over ${task.streams} stream(s) ` +
          `(on the wire for ${Math.round((stats.lastWrittenAt ?? 0) - (stats.firstTransmitAt ?? 0))} ms), ${stats.blocks} blocks, ${stats.reconnects} reconnects`,
      });
      if (stats.resends > 0) this.#emit(task.taskId, { type: 'log', level: 'info', message: `${stats.resends} block(s) arrived damaged at the repository agent (CRC) and were sent again` });
    }
    this.#emit(task.taskId, { type: 'log', level: 'info', message: `source agent ${this.#o.name}: peak RSS ${Math.round(process.resourceUsage().maxRSS / 1024)} MiB` });
    const elapsedMs = performance.now() - started;
    this.#emit(task.taskId, { type: 'progress', progress: {}, stageTimes: stageTimes.snapshot() });
    return {
      ...summary,
      point: pointToWire(summary.point),
      transfer: stats ? { bytesSent: stats.bytesSent, blocks: stats.blocks, resends: stats.resends, nacks: stats.nacks, reconnects: stats.reconnects, streams: task.streams } : undefined,
      stageTimes: stageTimes.snapshot(),
      elapsedMs,
      agentPeakRssBytes: process.resourceUsage().maxRSS * 1024,
    };
  }
}
