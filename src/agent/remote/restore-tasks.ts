// The restore task kinds an agent runs (docs/formats/agent-link.md, "Restore tasks"): read a
// point's stored VM configuration; serve a point to another agent's reader streams; restore a
// whole VM onto a host of this agent (restoreVm, reading the point here or from the repository's
// agent); and instant recovery sessions of VMs that run on this agent's host from a backup.
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import type { Repository } from '../../repository/index.js';
import { InstantRecoverySessions, type InstantSessionInfo } from '../../restore/instant/index.js';
import { repositoryPointSource, restoreVm, type RestoreVmResult, type VmPointSource } from '../../restore/vm/index.js';
import type { TaskEvent } from '../../transport/agent-tasks.js';
import type { TlsIdentity, TransferReceiver, TransferTaskGrant } from '../../transport/index.js';
import type {
  InstantRecoveryTask, RestorePointConfigTask, RestoreServeTask, RestoreTask, RestoreVmTask, WireInstantSession, WirePointConfig, WireRestoreSource,
} from '../../transport/restore-tasks.js';
import { pointRestoreSource, RemotePoint } from './restore-reader.js';

/** What the restore tasks need from the agent's task runner. */
export interface RestoreTaskContext {
  /** This agent's name (its certificate's CN). */
  readonly name: string;
  readonly tls: TlsIdentity;
  /** The agent's data folder: restored plain-QEMU VMs (`vms/`) and instant recovery sessions (`ir/`). */
  readonly dataDir: string;
  /** Address readers use to reach the data-mover listener (default: the one the server sees). */
  readonly dataAdvertise?: string | undefined;
  repository(path: string): Promise<Repository>;
  listener(): Promise<TransferReceiver>;
  grant(taskId: string, grant: TransferTaskGrant | undefined): void;
  emit(taskId: string, e: TaskEvent): void;
}

/** How often a restore-serve task reports (and learns whether the server still wants it). */
const SERVE_PROGRESS_MS = 10_000;

export function wireSession(i: InstantSessionInfo): WireInstantSession {
  return { ...i, startedAt: i.startedAt.toISOString(), pid: i.pid ?? null, disks: i.disks.map((d) => ({ ...d })) };
}

export class RestoreTasks {
  readonly #c: RestoreTaskContext;
  /** Migrated VMs are recorded in `<agent data>/instant-recovery-vms.json` and listed again after a restart. */
  readonly #instant: InstantRecoverySessions;
  readonly #loaded: Promise<unknown>;
  /** Instant recovery session -> the restore-serve task it reads from (listed, so a restarted server re-adopts it). */
  readonly #serves = new Map<string, { agent: string; taskId: string }>();
  /** Instant recovery session -> the server's name of its host (as the start named it). */
  readonly #hosts = new Map<string, string>();

  constructor(context: RestoreTaskContext) {
    this.#c = context;
    this.#instant = new InstantRecoverySessions({ stateFile: path.join(context.dataDir, 'instant-recovery-vms.json') });
    this.#loaded = this.#instant.load();
  }

  run(task: RestoreTask, signal: AbortSignal): Promise<unknown> {
    switch (task.kind) {
      case 'restore-point-config':
        return this.#pointConfig(task);
      case 'restore-serve':
        return this.#serve(task, signal);
      case 'restore-vm':
        return this.#restoreVm(task, signal);
      case 'instant-recovery':
        return this.#instantRecovery(task);
    }
  }

  /** Agent shutdown: instant recovery VMs that run from the backup are stopped (their backup side goes with the agent); migrated ones run on. */
  async close(): Promise<void> {
    await this.#loaded;
    await this.#instant.stopAll();
  }

  /** A session as JSON, with its host's name and the serve task it reads from while it runs from the backup. */
  #wire(i: InstantSessionInfo): WireInstantSession {
    const serve = i.runningFromBackup ? this.#serves.get(i.id) : undefined;
    const host = this.#hosts.get(i.id) ?? i.host;
    return { ...wireSession(i), ...(serve ? { serve } : {}), ...(host !== undefined ? { host } : {}) };
  }

  async #pointConfig(task: RestorePointConfigTask): Promise<WirePointConfig> {
    const repository = await this.#c.repository(task.repositoryPath);
    const point = await repository.openRestorePoint(task.pointId, task.password === undefined ? {} : { password: task.password });
    try {
      return { vm: point.info.vm, config: point.vmConfig.toString('base64'), disks: point.disks.map((d) => ({ name: d.name, size: d.size })) };
    } finally {
      await point.close();
    }
  }

  /** Serves the point to the reader agent's streams until the server cancels the task. */
  async #serve(task: RestoreServeTask, signal: AbortSignal): Promise<{ streams: number; blocks: number }> {
    const repository = await this.#c.repository(task.repositoryPath);
    // Open it once first: a missing point or a wrong password fails the task before `ready`.
    await (await pointRestoreSource(repository, task.pointId, task.password)).close();
    const receiver = await this.#c.listener();
    let streams = 0;
    let blocks = 0;
    // Once the task ends, its readers' open streams read no more (a stopped serve task stops
    // serving, not only new streams): each source is closed once, here or by its stream.
    let ended = false;
    const open = new Set<() => Promise<void>>();
    this.#c.grant(task.taskId, {
      secret: task.secret,
      openSource: async ({ peerCertificate }) => {
        const cn = peerCertificate.subject?.CN;
        const peer = Array.isArray(cn) ? cn[0] : cn;
        if (peer !== task.readerAgent) {
          throw new BulwarkError(`agent ${String(peer)} may not read restore point ${task.pointId} (task ${task.taskId} was given to ${task.readerAgent})`, { kind: 'forbidden' });
        }
        streams++;
        const source = await pointRestoreSource(repository, task.pointId, task.password);
        let closing: Promise<void> | undefined;
        const close = (): Promise<void> => {
          open.delete(close);
          return (closing ??= source.close());
        };
        open.add(close);
        if (ended) await close();
        return {
          disks: source.disks,
          readBlock: async (disk, index) => {
            if (ended) {
              throw new BulwarkError(`restore point ${task.pointId} is no longer served: task ${task.taskId} ended (${describeError(signal.reason)})`, {
                kind: 'unavailable',
                context: { point: task.pointId, task: task.taskId },
              });
            }
            blocks++;
            return source.readBlock(disk, index);
          },
          close,
        };
      },
    });
    // A progress event now and then: the server's reply says `cancel` once it no longer knows the
    // task (it restarted), so a serve task whose server forgot it does not serve forever.
    const alive = setInterval(() => this.#c.emit(task.taskId, { type: 'progress', progress: { streams, blocks } }), SERVE_PROGRESS_MS);
    try {
      this.#c.emit(task.taskId, { type: 'ready', port: receiver.address.port, ...(this.#c.dataAdvertise ? { host: this.#c.dataAdvertise } : {}), previous: null });
      if (!signal.aborted) await new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
      return { streams, blocks };
    } finally {
      clearInterval(alive);
      this.#c.grant(task.taskId, undefined);
      ended = true;
      await Promise.allSettled([...open].map((close) => close()));
    }
  }

  /** The point as the task's source says: a repository here, or the repository agent's serve task. */
  async #remote(pointId: string, source: Extract<WireRestoreSource, { kind: 'agent' }>, streams: number): Promise<RemotePoint> {
    return RemotePoint.open(pointId, source, this.#c.tls, streams);
  }

  async #restoreVm(task: RestoreVmTask, signal: AbortSignal): Promise<RestoreVmResult> {
    let remote: RemotePoint | undefined;
    let source: VmPointSource;
    const s = task.source;
    if (s.kind === 'repository') {
      source = repositoryPointSource(await this.#c.repository(s.repositoryPath), task.pointId, s.password);
    } else {
      remote = await this.#remote(task.pointId, s, 4);
      source = remote;
      this.#c.emit(task.taskId, { type: 'log', level: 'info', message: `reading restore point ${task.pointId} from repository agent ${s.agent} (${s.host}:${s.port})` });
    }
    try {
      return await restoreVm({
        source,
        pointId: task.pointId,
        host: task.hypervisor.kind === 'qemu' ? { kind: 'qemu', qmpGlob: task.hypervisor.qmpGlob } : { kind: 'libvirt', uri: task.hypervisor.uri ?? 'qemu:///system' },
        ...(task.name !== undefined ? { name: task.name } : {}),
        ...(task.storage !== undefined ? { storage: task.storage } : {}),
        ...(task.format !== undefined ? { format: task.format } : {}),
        ...(task.powerOn ? { powerOn: true } : {}),
        ...(task.digest ? { imageDigest: true } : {}),
        defaultVmRoot: path.join(this.#c.dataDir, 'vms'),
        signal,
        onProgress: (p) => this.#c.emit(task.taskId, { type: 'progress', progress: { disk: p.disk, bytesDone: p.bytesDone, total: p.total } }),
        onLog: (message) => this.#c.emit(task.taskId, { type: 'log', level: 'info', message: `agent ${this.#c.name}: ${message}` }),
      });
    } finally {
      await remote?.close();
    }
  }

  async #instantRecovery(task: InstantRecoveryTask): Promise<unknown> {
    await this.#loaded;
    switch (task.action) {
      case 'start': {
        const workDir = path.join(this.#c.dataDir, 'ir');
        const s = task.source;
        if (s.kind === 'repository') {
          const repository = await this.#c.repository(s.repositoryPath);
          const session = await this.#instant.start({ repository, pointId: task.pointId, workDir, name: task.name, ...(s.password !== undefined ? { password: s.password } : {}), ...(task.cacheBytes ? { cacheBytes: task.cacheBytes } : {}), ...(task.network ? { network: task.network } : {}) });
          if (task.host !== undefined) this.#hosts.set(session.id, task.host);
          return this.#wire(session);
        }
        // On-demand reads of a booting VM: a couple of streams are plenty.
        const remote = await this.#remote(task.pointId, s, 2);
        try {
          const session = await this.#instant.start({ source: remote, workDir, name: task.name, ...(task.cacheBytes ? { cacheBytes: task.cacheBytes } : {}), ...(task.network ? { network: task.network } : {}) });
          this.#serves.set(session.id, { agent: s.agent, taskId: s.transferId });
          if (task.host !== undefined) this.#hosts.set(session.id, task.host);
          return this.#wire(session);
        } catch (err) {
          await remote.close();
          throw err;
        }
      }
      case 'show':
        return this.#wire(this.#instant.info(task.session));
      case 'list':
        return { sessions: this.#instant.list().map((i) => this.#wire(i)) };
      case 'migrate': {
        const info = this.#instant.info(task.session);
        // A VM of its own on this host afterwards: its folder and QMP socket where the server's host glob finds it.
        const vmDir = task.vmDir ?? path.join(this.#c.dataDir, 'vms', info.name);
        await this.#instant.migrate(task.session, task.storage ?? vmDir, { vmDir, qmpSocket: task.qmpSocket, host: this.#hosts.get(task.session) });
        // It reads its own disks now: the server stops the serve task.
        this.#serves.delete(task.session);
        return this.#wire(this.#instant.info(task.session));
      }
      case 'stop':
        if (task.forget) await this.#instant.forget(task.session);
        else await this.#instant.stop(task.session);
        this.#serves.delete(task.session);
        this.#hosts.delete(task.session);
        return { stopped: task.session };
    }
  }
}
