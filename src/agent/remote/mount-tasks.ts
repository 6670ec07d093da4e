// The `mount` task (docs/formats/agent-link.md, "Mount tasks"): this agent as mount server. It
// mounts a restore point's guest file systems on this host — the point read from a repository
// folder here, or through the data mover from the repository's agent (RemotePoint, random access)
// — and copies guest paths out to a folder here or into a running VM of this agent's hosts
// through its guest agent (`restore-files`), or holds the mount for browsing until the server
// cancels the task (`open`). Every mount is undone when its task ends, failed or not.
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { findGuestAgent } from '../../hypervisor/qga/connect.js';
import type { GuestAgent } from '../../hypervisor/qga/guest-agent.js';
import type { Repository } from '../../repository/index.js';
import { sweepStaleMounts } from '../../restore/mount/mount.js';
import { mountPoint, openRepositoryPoint, type MountablePoint, type PointIdentity } from '../../restore/mount/point-mount.js';
import { restoreFilesToDir, restoreFilesToGuest } from '../../restore/mount/restore-files.js';
import { MountSessions } from '../../restore/mount/sessions.js';
import type { TaskEvent } from '../../transport/agent-tasks.js';
import type { TlsIdentity } from '../../transport/index.js';
import type { MountOpenTask, MountRestoreFilesTask, MountTask, WireHeldMount, WireRestoreFilesResult } from '../../transport/mount-tasks.js';
import type { WireRestoreSource } from '../../transport/restore-tasks.js';
import { RemotePoint } from './restore-reader.js';

const log = logger('mount-tasks');

export interface MountTaskContext {
  /** This agent's name (its certificate's CN). */
  readonly name: string;
  readonly tls: TlsIdentity;
  /** The agent's data folder: mounts go under `<data>/mounts/`. */
  readonly dataDir: string;
  repository(path: string): Promise<Repository>;
  emit(taskId: string, e: TaskEvent): void;
}

/** How often an `open` task reports (and so learns whether the server still knows it). */
const ALIVE_MS = 10_000;
/** Repository blocks a remote disk keeps (an LRU per disk; 32 MiB at 1 MiB blocks). */
const REMOTE_CACHE_BLOCKS = 32;
/**
 * Copies out of in-process mounts run at most two at a time: each file call blocks a libuv thread
 * until this process's own NBD server (which needs one too, for a repository here) answers.
 */
const COPY_SLOTS = 2;

export class MountTasks {
  readonly #c: MountTaskContext;
  readonly #sessions: MountSessions;
  /** open task id -> mount id and the restore-serve task it reads from. */
  readonly #held = new Map<string, { mountId: string; detached: boolean; serve: { agent: string; taskId: string } | undefined }>();
  #swept: Promise<void> | undefined;
  #busy = 0;
  readonly #waiting: Array<() => void> = [];

  constructor(context: MountTaskContext) {
    this.#c = context;
    this.#sessions = new MountSessions({ defaultRoot: path.join(context.dataDir, 'mounts') });
  }

  run(task: MountTask, signal: AbortSignal): Promise<unknown> {
    switch (task.action) {
      case 'restore-files':
        return this.#restoreFiles(task);
      case 'open':
        return this.#openMount(task, signal);
      case 'list':
        return Promise.resolve({ mounts: this.#list() });
    }
  }

  /** Agent shutdown: every mount is undone. */
  async close(): Promise<void> {
    await this.#sessions.closeAll();
  }

  /** Mounts a crashed agent left behind (state files of dead processes), undone once before the first mount. */
  #sweep(): Promise<void> {
    this.#swept ??= sweepStaleMounts()
      .then((swept) => {
        if (swept.length > 0) log.warn({ mounts: swept.length }, 'undid file-restore mounts a previous agent process left');
      })
      .catch((err: unknown) => log.warn({ err: describeError(err) }, 'sweeping stale file-restore mounts failed'));
    return this.#swept;
  }

  #list(): WireHeldMount[] {
    const byMount = new Map([...this.#held].map(([taskId, h]) => [h.mountId, { taskId, ...h }]));
    return this.#sessions.list().flatMap((i) => {
      const held = byMount.get(i.id);
      return held === undefined ? [] : [{ ...i, detached: held.detached, taskId: held.taskId, ...(held.serve ? { serve: held.serve } : {}) }];
    });
  }

  /** The point's disks as the task's source says: a repository here, or the repository agent's serve task. */
  async #source(pointId: string, point: PointIdentity, s: WireRestoreSource, taskId: string): Promise<MountablePoint> {
    if (s.kind === 'repository') {
      return openRepositoryPoint(await this.#c.repository(s.repositoryPath), pointId, s.password !== undefined ? { password: s.password } : {});
    }
    const remote = await RemotePoint.open(pointId, s, this.#c.tls, 2);
    this.#c.emit(taskId, { type: 'log', level: 'info', message: `agent ${this.#c.name}: reading restore point ${pointId} from repository agent ${s.agent} (${s.host}:${s.port})` });
    return {
      point,
      disks: remote.disks.map((d) => ({ name: d.name, disk: remote.openDisk(d.name, REMOTE_CACHE_BLOCKS) })),
      encryption: null,
      close: () => remote.close(),
    };
  }

  async #slot<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#busy >= COPY_SLOTS) await new Promise<void>((resolve) => this.#waiting.push(resolve));
    else this.#busy++;
    try {
      return await fn();
    } finally {
      const next = this.#waiting.shift();
      if (next) next();
      else this.#busy--;
    }
  }

  async #restoreFiles(task: MountRestoreFilesTask): Promise<WireRestoreFilesResult> {
    if ((task.to === undefined) === (task.guest === undefined)) {
      throw new BulwarkError(`restore-files task ${task.taskId}: exactly one of to and guest is needed`, { kind: 'invalid' });
    }
    if (task.to !== undefined && !path.isAbsolute(task.to)) throw new BulwarkError(`to: ${task.to} is not an absolute path`, { kind: 'invalid' });
    await this.#sweep();
    const point: PointIdentity = { id: task.pointId, vm: task.point.vm, time: new Date(task.point.time) };
    let qga: GuestAgent | undefined;
    if (task.guest) {
      const hosts = task.guest.hosts.map((h) => (h.kind === 'qemu' ? { kind: 'qemu' as const, uri: h.qmpGlob } : { kind: 'libvirt' as const, uri: h.uri ?? 'qemu:///system' }));
      qga = await findGuestAgent(hosts, task.guest.vm, `host of agent ${this.#c.name}`);
    }
    const work = path.join(this.#c.dataDir, 'mounts', `.restore-${task.taskId}`);
    try {
      await mkdir(work, { recursive: true, mode: 0o700 });
      return await this.#slot(async () => {
        const m = await mountPoint(await this.#source(task.pointId, point, task.source, task.taskId), { at: path.join(work, 'mnt'), paths: task.paths, placeInGuest: qga !== undefined });
        try {
          const result = qga
            ? await restoreFilesToGuest(m, task.paths, qga, { conflict: task.guest!.conflict })
            : await restoreFilesToDir(m, task.paths, task.to!, { overwrite: task.overwrite ?? false });
          log.info({ point: task.pointId, files: result.files, bytes: result.bytes, to: task.to ?? `guest ${point.vm}` }, 'files restored');
          return { ...result, point: task.pointId, vm: point.vm, target: qga ? `guest ${task.guest!.vm}` : task.to!, agent: this.#c.name };
        } finally {
          await m.close();
        }
      });
    } finally {
      await qga?.close().catch(() => undefined);
      await rm(work, { recursive: true, force: true }).catch((err: unknown) => log.warn({ dir: work, err: describeError(err) }, 'could not remove a restore folder'));
    }
  }

  /** Mounts the point and holds it until the task is cancelled; then unmounts. */
  async #openMount(task: MountOpenTask, signal: AbortSignal): Promise<{ unmounted: string; at: string }> {
    if (task.at !== undefined && !path.isAbsolute(task.at)) throw new BulwarkError(`at: ${task.at} is not an absolute path`, { kind: 'invalid' });
    await this.#sweep();
    const point: PointIdentity = { id: task.pointId, vm: task.point.vm, time: new Date(task.point.time) };
    const source = await this.#source(task.pointId, point, task.source, task.taskId);
    // Held by this task, not by a console: the session table here never undoes it by itself.
    const mountInfo = await this.#sessions.open({ pointId: task.pointId, source, id: task.mountId, detached: true, ...(task.at !== undefined ? { at: task.at } : {}) });
    const info = { ...mountInfo, detached: task.detached ?? false };
    const s = task.source;
    this.#held.set(task.taskId, { mountId: info.id, detached: info.detached, serve: s.kind === 'agent' ? { agent: s.agent, taskId: s.transferId } : undefined });
    const alive = setInterval(() => this.#c.emit(task.taskId, { type: 'progress', progress: { mountId: info.id } }), ALIVE_MS);
    try {
      this.#c.emit(task.taskId, { type: 'progress', progress: { mounted: { ...info, agent: this.#c.name } } });
      if (!signal.aborted) await new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
      return { unmounted: info.id, at: info.at };
    } finally {
      clearInterval(alive);
      this.#held.delete(task.taskId);
      await this.#sessions.close(info.id);
    }
  }
}
