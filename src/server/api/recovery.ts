// Full VM restore and instant VM recovery: `POST /restore-points/{id}/restore-vm` runs a restore
// in the background with progress (`GET /vm-restores/{id}`); `/instant-recoveries` starts, lists,
// migrates and stops VMs that run straight from a restore point. When the point's repository and
// the host are this server's own, the work runs in this process (the one-host install's local
// agent role, docs/decisions/0003): its instant recovery sessions end when the server stops, and a
// start sweeps what a killed server left in `<data>/ir/`. Otherwise the host's agent does it
// (src/server/dispatch/recovery.ts, docs/formats/agent-link.md "Restore tasks"). See
// docs/restore-vm.md and docs/instant-recovery.md.
import { Type, type Static, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Value } from '@sinclair/typebox/value';
import type { FastifyPluginAsync } from 'fastify';
import { randomBytes } from 'node:crypto';
import { readdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { decodePointMetadata, type PointMetadata } from '../../agent/backup/point-metadata.js';
import type { HypervisorConnection } from '../../hypervisor/index.js';
import { instantSessionFields, WireInstantSessionSchema, type WireInstantSession } from '../../transport/restore-tasks.js';
import { writeFileAtomic } from '../../storage/local-fs.js';
import type { AgentTaskHandle } from '../dispatch/broker.js';
import type { RemoteRecovery } from '../dispatch/recovery.js';
import { QmpClient } from '../../hypervisor/qmp/client.js';
import { openSharedRepository, type Repository } from '../../repository/index.js';
import { InstantRecoverySessions, type InstantSessionInfo } from '../../restore/instant/index.js';
import { globMatches, processesHolding, qmpSocketFor, restoreVm, type RestoreVmHost, type RestoreVmResult } from '../../restore/vm/index.js';
import type { ServiceContext } from '../services/common.js';
import { getHost, getRepository, listHosts } from '../services/infrastructure.js';
import { pointPassword, type EncryptionKeys } from '../services/encryption.js';
import { checkRestoreTarget } from '../services/restore-targets.js';
import { createRestoreSession, getRestorePoint, openRestoreSessions, sessionIdByRef, updateRestoreSession, type NewRestoreSession, type RestoreSessionChange } from '../services/sessions.js';
import type { Principal } from '../services/users.js';

const log = logger('recovery');

const ErrorInfo = Type.Object({ kind: Type.String(), message: Type.String(), hint: Type.Optional(Type.String()) });

const RestoreVmBody = Type.Object(
  {
    name: Type.Optional(Type.String({ minLength: 1, description: 'a new VM with this name; absent: restore over the original VM (it must be off)' })),
    host: Type.Optional(Type.String({ minLength: 1, description: 'host to restore to (default: the host the original VM is on)' })),
    storage: Type.Optional(Type.String({ minLength: 1, description: 'absolute folder for the new VM\'s disks' })),
    format: Type.Optional(Type.Union([Type.Literal('raw'), Type.Literal('qcow2')])),
    powerOn: Type.Optional(Type.Boolean()),
    password: Type.Optional(Type.String({ minLength: 1, description: 'password of an encrypted point the server does not know the password of' })),
    digest: Type.Optional(Type.Boolean({ description: "report each restored disk's SHA-256 (reads every image back; slower)" })),
  },
  { additionalProperties: false },
);

const RestoredDisk = Type.Object({ name: Type.String(), path: Type.String(), format: Type.Union([Type.Literal('raw'), Type.Literal('qcow2')]), size: Type.Number(), sha256: Type.Optional(Type.String()) });

/** What a host agent answers a restore-vm task with: RestoreVmResult as JSON, checked before use. */
const RemoteRestoreVmResult = Type.Object({
  point: Type.String(),
  vm: Type.String(),
  toOriginal: Type.Boolean(),
  hypervisor: Type.Union([Type.Literal('qemu'), Type.Literal('libvirt')]),
  disks: Type.Array(RestoredDisk),
  vmDir: Type.Optional(Type.String()),
  startScript: Type.Optional(Type.String()),
  qmpSocket: Type.Optional(Type.String()),
  uuid: Type.Optional(Type.String()),
  firmware: Type.Optional(Type.Object({ code: Type.String(), nvram: Type.Optional(Type.String()) })),
  poweredOn: Type.Boolean(),
  warnings: Type.Array(Type.String()),
  durationMs: Type.Number(),
});

const VmRestore = Type.Object({
  id: Type.String(),
  point: Type.String(),
  sourceVm: Type.String(),
  vm: Type.String({ description: 'the restored VM\'s name' }),
  host: Type.String(),
  agent: Type.Optional(Type.String({ description: 'the agent that wrote the VM (absent: this server\'s process)' })),
  toOriginal: Type.Boolean(),
  state: Type.Union([Type.Literal('running'), Type.Literal('success'), Type.Literal('failed')]),
  startedAt: Type.String(),
  endedAt: Type.Union([Type.String(), Type.Null()]),
  progress: Type.Object({ bytesDone: Type.Number(), total: Type.Number(), percent: Type.Number(), disk: Type.Union([Type.String(), Type.Null()]) }),
  result: Type.Union([Type.Omit(RemoteRestoreVmResult, ['point', 'vm', 'toOriginal']), Type.Null()]),
  error: Type.Union([ErrorInfo, Type.Null()]),
  log: Type.Optional(Type.Array(Type.Object({ time: Type.String(), level: Type.String(), message: Type.String() }), { description: 'lines the restoring agent reported' })),
  sessionId: Type.Optional(Type.String({ description: 'the session (`GET /sessions/{id}`, kind restore-vm) that records it' })),
});
export type VmRestore = Static<typeof VmRestore>;

const InstantRecovery = Type.Object({
  id: Type.String(),
  name: Type.String(),
  vm: Type.String(),
  point: Type.String(),
  ...instantSessionFields,
  agent: Type.Optional(Type.String({ description: 'the agent whose host runs the VM (absent: this server\'s process)' })),
  host: Type.Optional(Type.String()),
  sessionId: Type.Optional(Type.String({ description: 'start only: the session (`GET /sessions/{id}`, kind instant-recovery) that records it' })),
});
export type InstantRecovery = Static<typeof InstantRecovery>;

const StartInstantBody = Type.Object(
  {
    point: Type.String({ minLength: 1, description: 'restore point id' }),
    name: Type.Optional(Type.String({ minLength: 1, description: 'name of the recovered VM (default: VM-ir)' })),
    host: Type.Optional(Type.String({ minLength: 1, description: 'host whose agent runs the VM (default: this server\'s process, or the repository\'s agent)' })),
    password: Type.Optional(Type.String({ minLength: 1, description: 'password of an encrypted point the server does not know the password of' })),
    network: Type.Optional(
      Type.Union([Type.Literal('disconnected'), Type.Literal('recorded')], {
        description: "the NICs (recorded model and MAC): 'disconnected' (default: no network backend, link down; the original VM may still be on its network) or 'recorded' (each on the network backend it had; refused naming a NIC whose network cannot be recreated)",
      }),
    ),
  },
  { additionalProperties: false },
);
const MigrateBody = Type.Object(
  { storage: Type.Optional(Type.String({ minLength: 1, description: 'absolute folder for the VM\'s own disks (default <data>/vms/NAME)' })) },
  { additionalProperties: false },
);

/**
 * The result of a VM restore an agent reports, or an error naming the agent, the point and the
 * first field that is not as expected (an agent of another version, a damaged reply).
 */
export function remoteRestoreVmResult(raw: unknown, agent: string, pointId: string): RestoreVmResult {
  if (Value.Check(RemoteRestoreVmResult, raw)) return raw;
  const first = Value.Errors(RemoteRestoreVmResult, raw).First();
  const where = first ? `${first.path || 'the result'}: ${first.message}` : 'unexpected shape';
  throw new BulwarkError(`agent ${agent} reported the restore of point ${pointId} with a result this server cannot read (${where})`, {
    kind: 'internal',
    context: { agent, point: pointId },
    hint: 'the agent may run another Bulwark version than the server: update it',
  });
}

function errorInfo(err: unknown): Static<typeof ErrorInfo> {
  if (err instanceof BulwarkError) return { kind: err.kind, message: err.message, ...(err.hint ? { hint: err.hint } : {}) };
  return { kind: 'internal', message: describeError(err) };
}

function absolute(field: string, p: string): string {
  if (!path.isAbsolute(p)) throw new BulwarkError(`${field}: ${p} is not an absolute path`, { kind: 'invalid', context: { field } });
  return p;
}

export interface RecoveryServiceOptions {
  readonly ctx: ServiceContext;
  readonly dataDir: string;
  /** The server's encryption passwords (points of encrypted jobs need none typed). */
  readonly keys?: EncryptionKeys | undefined;
  /** Restores and instant recovery on agents' hosts (docs/formats/agent-link.md, "Restore tasks"). */
  readonly remote?: RemoteRecovery | undefined;
  /** VM restore records kept for `GET /vm-restores` (default 200): the oldest finished ones go first. */
  readonly keepRestores?: number | undefined;
}

/** An instant recovery session on an agent's host, as this server knows it. */
interface RemoteInstant {
  readonly agent: string;
  readonly host: string | undefined;
  serve: AgentTaskHandle | undefined;
  last: WireInstantSession;
}

/**
 * `<data>/instant-recoveries.json` (docs/formats/instant-recoveries.md): the sessions on agents
 * this server knows and the serve tasks they read from, so a restarted server takes the serve
 * tasks back as soon as their repository agents poll (not only once the host's agent lists the
 * session: it may come back after the repository agent's adoption window).
 */
const STATE_FORMAT = 'bulwark instant recoveries v1';
const StateRecord = Type.Object({
  agent: Type.String(),
  host: Type.Optional(Type.String()),
  serve: Type.Optional(Type.Object({ agent: Type.String(), taskId: Type.String() })),
  session: WireInstantSessionSchema,
});
const StateFile = Type.Object({ format: Type.Literal(STATE_FORMAT), sessions: Type.Array(StateRecord) });

/**
 * The session (kind restore-vm, instant-recovery, …) recording one restore: created at once, its
 * changes written in order; a failed write is logged and the restore goes on.
 */
class RecordedSession {
  readonly id: Promise<string | undefined>;
  #chain: Promise<unknown>;
  readonly #ctx: ServiceContext;

  constructor(ctx: ServiceContext, s: NewRestoreSession) {
    this.#ctx = ctx;
    this.id = createRestoreSession(ctx, s).catch((err: unknown) => {
      log.error({ kind: s.kind, vm: s.vm, err: describeError(err) }, 'could not record a restore session');
      return undefined;
    });
    this.#chain = this.id;
  }

  update(c: RestoreSessionChange): Promise<unknown> {
    this.#chain = this.#chain
      .then(async () => {
        const id = await this.id;
        if (id) await updateRestoreSession(this.#ctx, id, c);
      })
      .catch((err: unknown) => log.error({ err: describeError(err) }, 'could not update a restore session'));
    return this.#chain;
  }
}

/** Restores and instant recovery sessions of this server process. */
export class RecoveryService {
  readonly #ctx: ServiceContext;
  readonly #dataDir: string;
  readonly #keys: EncryptionKeys | undefined;
  /** This process's sessions; migrated ones recorded in `<data>/instant-recovery-vms.json`, so they outlive it. */
  readonly #instant: InstantRecoverySessions;
  readonly #restores = new Map<string, VmRestore>();
  readonly #running = new Set<Promise<unknown>>();
  readonly #abort = new AbortController();
  readonly #remote: RemoteRecovery | undefined;
  readonly #remoteInstant = new Map<string, RemoteInstant>();
  readonly #keepRestores: number;
  /** Writes of the state file, one after another. */
  #saving: Promise<void> = Promise.resolve();

  constructor(o: RecoveryServiceOptions) {
    this.#ctx = o.ctx;
    this.#dataDir = o.dataDir;
    this.#keys = o.keys;
    this.#remote = o.remote;
    this.#keepRestores = o.keepRestores ?? 200;
    this.#instant = new InstantRecoverySessions({ stateFile: path.join(o.dataDir, 'instant-recovery-vms.json') });
  }

  /** After a (re)start: the migrated VMs a previous server process ran are listed again. */
  async loadOwn(): Promise<number> {
    return this.#instant.load();
  }

  get #stateFile(): string {
    return path.join(this.#dataDir, 'instant-recoveries.json');
  }

  /** Writes the sessions on agents to the state file (after every change; a failure is logged). */
  #save(): Promise<void> {
    const state: Static<typeof StateFile> = {
      format: STATE_FORMAT,
      sessions: [...this.#remoteInstant.values()].map((r) => ({
        agent: r.agent,
        ...(r.host !== undefined ? { host: r.host } : {}),
        ...(r.serve ? { serve: { agent: r.serve.agent, taskId: r.serve.taskId } } : {}),
        session: { ...r.last, disks: r.last.disks.map((d) => ({ ...d })) },
      })),
    };
    this.#saving = this.#saving
      .then(() => writeFileAtomic(this.#stateFile, `${JSON.stringify(state, null, 1)}\n`, { mode: 0o600 }))
      .catch((err: unknown) => log.error({ file: this.#stateFile, err: describeError(err) }, 'could not write the instant recovery state file'));
    return this.#saving;
  }

  /**
   * After a (re)start: the sessions on agents a previous server process knew, each with the serve
   * task it reads from taken over at once (the broker waits for that agent's first poll). A
   * session its agent no longer runs leaves the list once that agent answers a listing.
   */
  async #load(remote: RemoteRecovery): Promise<number> {
    let raw: unknown;
    try {
      raw = JSON.parse(await readFile(this.#stateFile, 'utf8'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') log.error({ file: this.#stateFile, err: describeError(err) }, 'instant recovery state file unreadable; sessions on agents are found by listing them');
      return 0;
    }
    if (!Value.Check(StateFile, raw)) {
      const first = Value.Errors(StateFile, raw).First();
      log.error({ file: this.#stateFile, field: first?.path, err: first?.message }, 'instant recovery state file not as expected; sessions on agents are found by listing them');
      return 0;
    }
    for (const r of raw.sessions) {
      if (this.#remoteInstant.has(r.session.id)) continue;
      this.#remoteInstant.set(r.session.id, { agent: r.agent, host: r.host, serve: r.serve ? remote.adoptServe(r.serve) : undefined, last: r.session });
    }
    log.info({ sessions: raw.sessions.length }, 'instant recovery sessions on agents taken over from the state file');
    return raw.sessions.length;
  }

  /** Where instant recovery sessions keep their sockets and overlays (short: socket paths ≤ 107 bytes). */
  get instantDir(): string {
    return path.join(this.#dataDir, 'ir');
  }

  /**
   * Removes what a server that did not stop cleanly left of its instant recovery sessions: the
   * QEMU still running from a dead NBD server is quit (or killed), the session folder removed.
   */
  async sweep(): Promise<number> {
    let entries: string[];
    try {
      entries = await readdir(this.instantDir);
    } catch {
      return 0;
    }
    for (const e of entries) {
      const dir = path.join(this.instantDir, e);
      try {
        const qmp = await QmpClient.connect({ endpoint: { socketPath: path.join(dir, 'qmp.sock') }, label: `leftover instant recovery ${e}`, connectTimeoutMs: 2000 }).catch(() => undefined);
        if (qmp) {
          await qmp.execute('quit', {}, { timeoutMs: 5000 }).catch(() => undefined);
          await qmp.close().catch(() => undefined);
        }
        const overlays = (await readdir(dir).catch(() => [] as string[])).filter((f) => f.endsWith('.overlay.qcow2')).map((f) => path.join(dir, f));
        for (const h of await processesHolding(overlays)) {
          try {
            process.kill(h.pid, 'SIGKILL');
          } catch {
            // gone already
          }
        }
        await rm(dir, { recursive: true, force: true });
        log.warn({ session: e, dir }, 'leftover instant recovery session swept');
      } catch (err) {
        log.error({ session: e, err: describeError(err) }, 'could not sweep a leftover instant recovery session');
      }
    }
    return entries.length;
  }

  #repository(p: string): Promise<Repository> {
    return openSharedRepository(p);
  }

  /**
   * The catalog's point and its repository (where it is, which agent owns it). A point the last
   * health check found damaged (`corrupt`) is restored all the same, as `restore disk`, `mount` and
   * `restore files` do: every block read is CRC-checked, so a read of a damaged block fails naming
   * it (a VM restore then fails; an instantly recovered VM gets an I/O error for that read) and
   * everything else reads as backed up. Logged, so the damage is on record.
   */
  async #point(pointId: string): Promise<{ point: Awaited<ReturnType<typeof getRestorePoint>>; repo: { name: string; path: string; agent: string | null } }> {
    const point = await getRestorePoint(this.#ctx, pointId);
    if (point.state === 'corrupt') {
      log.warn({ point: point.id, vm: point.vm }, `restore point ${point.id} of VM ${point.vm} is marked corrupt (a health check found damage): reads of damaged blocks fail, naming the block; the rest reads as backed up`);
    }
    const repo = await getRepository(this.#ctx, point.repository);
    return { point, repo: { name: repo.name, path: repo.path, agent: repo.agent } };
  }

  /** The point's repository and the password option to open it with (docs/encryption.md). */
  async #pointRepository(pointId: string, given?: string): Promise<{ repository: Repository; vm: string; password: { password?: string } }> {
    const { point, repo } = await this.#point(pointId);
    const repository = await this.#repository(repo.path);
    return { repository, vm: point.vm, password: await pointPassword(this.#keys, repository, point, given) };
  }

  /** The remote path's tools, or why this server cannot reach agents. */
  #remoteOrFail(what: string): RemoteRecovery {
    if (!this.#remote) throw new BulwarkError(`${what} needs an agent, and this server hands no tasks to agents`, { kind: 'unavailable' });
    return this.#remote;
  }

  /** The host a restore goes to: the named one, or the one whose QMP glob covers the original VM. */
  async #host(name: string | undefined, metadata: () => Promise<PointMetadata | null>, pointId: string): Promise<{ name: string; host: RestoreVmHost; agent: string | null }> {
    const toHost = (h: { name: string; kind: 'qemu' | 'libvirt'; uri: string; agent: string | null }) => ({
      name: h.name,
      agent: h.agent,
      host: h.kind === 'qemu' ? { kind: 'qemu' as const, qmpGlob: h.uri } : { kind: 'libvirt' as const, uri: h.uri },
    });
    if (name) return toHost(await getHost(this.#ctx, name));
    const meta = await metadata();
    if (!meta) throw new BulwarkError(`restore point ${pointId} stores no VM configuration`, { kind: 'invalid' });
    const hosts = (await listHosts(this.#ctx)).filter((h) => h.kind === meta.hypervisor);
    const match = meta.hypervisor === 'qemu' ? hosts.filter((h) => globMatches(h.uri, meta.vm.id)) : hosts;
    const pick = match.length === 1 ? match[0] : hosts.length === 1 ? hosts[0] : undefined;
    if (!pick) {
      throw new BulwarkError(`cannot tell which ${meta.hypervisor} host VM ${meta.vm.name} belongs to (${hosts.length} hosts of that kind)`, {
        kind: 'invalid',
        context: { field: 'host' },
        hint: 'name the host with --host',
      });
    }
    return toHost(pick);
  }

  /** The stored point metadata of a point in this server's repository. */
  async #localMetadata(repository: Repository, pointId: string, password: { password?: string }): Promise<PointMetadata | null> {
    const point = await repository.openRestorePoint(pointId, password);
    try {
      return decodePointMetadata(point.vmConfig);
    } finally {
      await point.close();
    }
  }

  /**
   * Starts a full VM restore. Resolves with the restore once its disks are being written (checks
   * that fail first, such as a running original VM, reject here with their reason). It runs in
   * this process when both the point's repository and the host are this server's own; otherwise
   * on the host's agent (src/server/dispatch/recovery.ts).
   */
  async startRestoreVm(pointId: string, body: Static<typeof RestoreVmBody>, principal?: Principal): Promise<VmRestore> {
    if (body.storage) absolute('storage', body.storage);
    const { point, repo } = await this.#point(pointId);
    const vm = point.vm;
    const remote = this.#remote;
    let host: { name: string; host: RestoreVmHost; agent: string | null };
    let work: (onProgress: (p: { disk: string; bytesDone: number; total: number }) => void, onLog: (level: string, message: string) => void) => Promise<RestoreVmResult>;
    if (remote === undefined || remote.isLocal(repo.agent)) {
      const repository = await this.#repository(repo.path);
      const password = await pointPassword(this.#keys, repository, point, body.password);
      host = await this.#host(body.host, () => this.#localMetadata(repository, pointId, password), pointId);
      if (remote === undefined || remote.isLocal(host.agent)) {
        work = (onProgress) =>
          restoreVm({
            repository,
            pointId,
            host: host.host,
            ...(body.name ? { name: body.name } : {}),
            ...(body.storage ? { storage: body.storage } : {}),
            ...(body.format ? { format: body.format } : {}),
            ...(body.powerOn ? { powerOn: true } : {}),
            ...(body.digest ? { imageDigest: true } : {}),
            ...password,
            defaultVmRoot: path.join(this.#dataDir, 'vms'),
            signal: this.#abort.signal,
            onProgress,
          });
      } else {
        work = this.#remoteRestore(remote, repo, host, pointId, body, password.password);
      }
    } else {
      const password = this.#keys ? await this.#keys.remotePassword(point, body.password) : body.password;
      host = await this.#host(body.host, async () => decodePointMetadata(Buffer.from((await remote.pointConfig(repo, pointId, password)).config, 'base64')), pointId);
      work = this.#remoteRestore(remote, repo, host, pointId, body, password);
    }
    const id = `vr-${randomBytes(4).toString('hex')}`;
    const agent = remote !== undefined && !(remote.isLocal(repo.agent) && remote.isLocal(host.agent)) ? remote.agentOf(host.agent) : undefined;
    // Users who are not administrators put a VM's disks only below the restore folders (decision 0009).
    if (body.storage) await checkRestoreTarget(this.#ctx, principal, body.storage, 'restore vm --storage', { local: agent === undefined });
    const task: VmRestore = {
      id,
      point: pointId,
      sourceVm: vm,
      vm: body.name ?? vm,
      host: host.name,
      ...(agent ? { agent, log: [] } : {}),
      toOriginal: body.name === undefined || body.name === vm,
      state: 'running',
      startedAt: new Date().toISOString(),
      endedAt: null,
      progress: { bytesDone: 0, total: 0, percent: 0, disk: null },
      result: null,
      error: null,
    };
    const session = new RecordedSession(this.#ctx, {
      kind: 'restore-vm',
      vm: task.vm,
      point: pointId,
      agent: agent ?? null,
      ref: id,
      message: `restore of point ${pointId} (VM ${vm}) ${task.toOriginal ? 'over the original VM' : `as new VM ${task.vm}`} on host ${host.name}${agent ? ` by agent ${agent}` : ''} started (${id})`,
    });
    let lastWrite = 0;
    let moving: () => void = () => undefined;
    const firstProgress = new Promise<void>((r) => (moving = r));
    const running = work(
      (p) => {
        task.progress = { bytesDone: p.bytesDone, total: p.total, percent: p.total > 0 ? Math.min(100, (100 * p.bytesDone) / p.total) : 0, disk: p.disk };
        moving();
        if (Date.now() - lastWrite >= 2000) {
          lastWrite = Date.now();
          void session.update({ progress: { percent: task.progress.percent, bytesRead: p.bytesDone } });
        }
      },
      (level, message) => {
        task.log?.push({ time: new Date().toISOString(), level, message });
        void session.update({ log: { level: level === 'error' ? 'error' : level === 'warn' || level === 'warning' ? 'warning' : 'info', message } });
      },
    );
    const settled = running.then(
      (r: RestoreVmResult) => {
        task.result = {
          hypervisor: r.hypervisor,
          disks: r.disks.map((d) => ({ ...d })),
          ...(r.vmDir ? { vmDir: r.vmDir } : {}),
          ...(r.startScript ? { startScript: r.startScript } : {}),
          ...(r.qmpSocket ? { qmpSocket: r.qmpSocket } : {}),
          ...(r.uuid ? { uuid: r.uuid } : {}),
          ...(r.firmware ? { firmware: { ...r.firmware } } : {}),
          poweredOn: r.poweredOn,
          warnings: [...r.warnings],
          durationMs: r.durationMs,
        };
        task.state = 'success';
        task.progress = { ...task.progress, percent: 100 };
        void session.update({
          state: r.warnings.length > 0 ? 'warning' : 'success',
          progress: { percent: 100, bytesRead: task.progress.bytesDone },
          log: { level: 'info', message: `VM ${task.vm} restored: ${r.disks.map((d) => `${d.name} → ${d.path}`).join(', ')}${r.poweredOn ? ', powered on' : ''}${r.warnings.length > 0 ? `; ${r.warnings.join('; ')}` : ''}` },
        });
      },
      (err: unknown) => {
        task.error = errorInfo(err);
        task.state = 'failed';
        log.warn({ restore: id, point: pointId, err: describeError(err) }, 'VM restore failed');
        void session.update({ state: 'failed', reason: describeError(err), log: { level: 'error', message: `restore failed: ${describeError(err)}` } });
      },
    ).finally(() => {
      task.endedAt = new Date().toISOString();
      this.#running.delete(settled);
    });
    this.#running.add(settled);
    // Refusals (VM running, name taken, bad format) come before any data moves: answer them directly.
    const first = await Promise.race([running.then(() => 'done' as const, (err: unknown) => ({ err })), firstProgress.then(() => 'moving' as const)]);
    if (typeof first === 'object') throw first.err;
    const sessionId = await session.id;
    if (sessionId) task.sessionId = sessionId;
    this.#restores.set(id, task);
    // Bounded: the oldest finished records (with their log lines) go; running ones stay.
    for (const [old, t] of this.#restores) {
      if (this.#restores.size <= this.#keepRestores) break;
      if (t.state !== 'running') this.#restores.delete(old);
    }
    return task;
  }

  /** The work of a restore on the host's agent: its progress and log lines come back as events. */
  #remoteRestore(
    remote: RemoteRecovery,
    repo: { path: string; agent: string | null },
    host: { name: string; host: RestoreVmHost; agent: string | null },
    pointId: string,
    body: Static<typeof RestoreVmBody>,
    password: string | undefined,
  ): (onProgress: (p: { disk: string; bytesDone: number; total: number }) => void, onLog: (level: string, message: string) => void) => Promise<RestoreVmResult> {
    const hypervisor: HypervisorConnection = host.host.kind === 'qemu' ? { kind: 'qemu', qmpGlob: host.host.qmpGlob } : { kind: 'libvirt', uri: host.host.uri };
    return async (onProgress, onLog) => {
      const raw = await remote.restoreVm({
        repository: repo,
        hostAgent: host.agent,
        hypervisor,
        pointId,
        password,
        name: body.name,
        storage: body.storage,
        format: body.format,
        powerOn: body.powerOn,
        digest: body.digest,
        signal: this.#abort.signal,
        onEvent: (e) => {
          switch (e.type) {
            case 'progress': {
              const p = e.progress as { disk?: unknown; bytesDone?: unknown; total?: unknown };
              if (typeof p.disk === 'string' && typeof p.bytesDone === 'number' && typeof p.total === 'number') onProgress({ disk: p.disk, bytesDone: p.bytesDone, total: p.total });
              break;
            }
            case 'log':
              onLog(e.level, e.message);
              break;
            case 'ready':
            case 'result':
              break;
          }
        },
      });
      return remoteRestoreVmResult(raw, remote.agentOf(host.agent), pointId);
    };
  }

  getRestore(id: string): VmRestore {
    const t = this.#restores.get(id);
    if (!t) throw new BulwarkError(`no VM restore ${id}`, { kind: 'not-found' });
    return t;
  }

  listRestores(): VmRestore[] {
    return [...this.#restores.values()].reverse();
  }

  #instantInfo(i: InstantSessionInfo | WireInstantSession, where?: { agent: string; host: string | undefined }): InstantRecovery {
    return {
      id: i.id,
      name: i.name,
      vm: i.vm,
      point: i.pointId,
      state: i.state,
      runningFromBackup: i.runningFromBackup,
      startedAt: typeof i.startedAt === 'string' ? i.startedAt : i.startedAt.toISOString(),
      pid: i.pid ?? null,
      dir: i.dir,
      qmpSocket: i.qmpSocket,
      agentSocket: i.agentSocket,
      consoleLog: i.consoleLog,
      disks: i.disks.map((d) => ({ ...d })),
      ...(where ? { agent: where.agent, ...(where.host ? { host: where.host } : {}) } : {}),
    };
  }

  /**
   * Starts instant recovery: in this process when the point's repository is this server's and no
   * host of another agent is named; else on the named host's agent (or the repository's agent),
   * which reads the point directly or through the data mover.
   */
  async startInstant(body: Static<typeof StartInstantBody>): Promise<InstantRecovery> {
    let r: InstantRecovery;
    try {
      r = await this.#startInstant(body);
    } catch (err) {
      // The attempt is on record too (kind instant-recovery, failed).
      await new RecordedSession(this.#ctx, {
        kind: 'instant-recovery',
        vm: body.name ?? '',
        point: body.point,
        state: 'failed',
        message: `instant recovery of restore point ${body.point}${body.host ? ` on host ${body.host}` : ''} did not start: ${describeError(err)}`,
      }).id;
      throw err;
    }
    const session = new RecordedSession(this.#ctx, {
      kind: 'instant-recovery',
      vm: r.name,
      point: r.point,
      agent: r.agent ?? null,
      status: r.state,
      ref: r.id,
      message: `VM ${r.name} (a recovery of VM ${r.vm}) runs from restore point ${r.point} ${r.agent ? `on agent ${r.agent}${r.host ? ` (host ${r.host})` : ''}` : "in this server's process"}, QEMU pid ${String(r.pid)} (${r.id})`,
    });
    const sessionId = await session.id;
    return { ...r, ...(sessionId ? { sessionId } : {}) };
  }

  /** A change of the session recording instant recovery `ref` (logged when it cannot be written). */
  async #irSession(ref: string, change: (current: { state: string; status: string | null }) => RestoreSessionChange): Promise<void> {
    try {
      const id = await sessionIdByRef(this.#ctx, 'instant-recovery', ref);
      if (!id) return;
      const row = await this.#ctx.db.selectFrom('sessions').select(['state', 'status']).where('id', '=', id).executeTakeFirstOrThrow();
      await updateRestoreSession(this.#ctx, id, change(row));
    } catch (err) {
      log.error({ session: ref, err: describeError(err) }, 'could not update the session of an instant recovery');
    }
  }

  /** The instant recovery's session: it ended (stopped), or only its VM did when it had migrated. */
  #irEnded(ref: string, message: string, level: 'info' | 'warning' = 'info'): Promise<void> {
    return this.#irSession(ref, (cur) => ({
      status: 'stopped',
      ...(cur.state === 'running' || cur.state === 'queued' ? { state: 'stopped' as const } : {}),
      log: { level, message },
    }));
  }

  async #startInstant(body: Static<typeof StartInstantBody>): Promise<InstantRecovery> {
    const { point, repo } = await this.#point(body.point);
    const name = body.name ?? `${point.vm}-ir`;
    const host = body.host ? await getHost(this.#ctx, body.host) : undefined;
    const remote = this.#remote;
    const hostAgent = host ? host.agent : repo.agent;
    if (remote === undefined || (remote.isLocal(repo.agent) && remote.isLocal(hostAgent))) {
      const { repository, password } = await this.#pointRepository(body.point, body.password);
      const info = await this.#instant.start({ repository, pointId: body.point, workDir: this.instantDir, name, ...password, ...(body.network ? { network: body.network } : {}) });
      return this.#instantInfo(info);
    }
    for (const r of this.#remoteInstant.values()) {
      if (r.last.name === name && r.last.state !== 'stopped') throw new BulwarkError(`an instant recovery named ${name} is already running (on agent ${r.agent})`, { kind: 'conflict' });
    }
    let password: string | undefined;
    if (remote.isLocal(repo.agent)) {
      const repository = await this.#repository(repo.path);
      password = (await pointPassword(this.#keys, repository, point, body.password)).password;
    } else {
      password = this.#keys ? await this.#keys.remotePassword(point, body.password) : body.password;
    }
    const started = await remote.instantStart({ repository: repo, hostAgent, pointId: body.point, name, password, host: host?.name, network: body.network });
    const entry: RemoteInstant = { agent: started.agent, host: host?.name, serve: started.serve, last: started.session };
    this.#remoteInstant.set(started.session.id, entry);
    await this.#save();
    // A serve task that ends while the VM reads from the backup: said in the log; the VM's reads fail.
    void started.serve?.result.catch((err: unknown) => {
      if (entry.serve) log.error({ session: started.session.id, err: describeError(err) }, 'the repository agent stopped serving an instant recovery session');
    });
    return this.#instantInfo(started.session, entry);
  }

  async #refresh(id: string, r: RemoteInstant): Promise<InstantRecovery> {
    try {
      r.last = await this.#remoteOrFail('instant recovery').instant(r.agent, { action: 'show', session: id });
    } catch (err) {
      if (err instanceof BulwarkError && err.kind === 'not-found') {
        // The agent no longer has it (it restarted): the session is over.
        r.last = { ...r.last, state: 'stopped', runningFromBackup: false, pid: null };
        r.serve?.cancel('the instant recovery session is gone');
        r.serve = undefined;
        await this.#save();
        await this.#irEnded(id, `agent ${r.agent} no longer runs VM ${r.last.name} (the agent restarted)`, 'warning');
      } else {
        log.warn({ session: id, agent: r.agent, err: describeError(err) }, 'could not refresh an instant recovery session on its agent');
      }
    }
    return this.#instantInfo(r.last, r);
  }

  /**
   * Every session: this process's, and those of the agents of the configured hosts (and of the
   * sessions this server started), asked once per agent; sessions an agent runs that this server
   * did not start (it restarted since) are listed too, so they can be stopped.
   */
  async listInstant(): Promise<InstantRecovery[]> {
    const remote = this.#remote;
    if (remote) {
      const agents = new Set<string>([...this.#remoteInstant.values()].map((r) => r.agent));
      for (const h of await listHosts(this.#ctx)) agents.add(remote.agentOf(h.agent));
      // Sessions on a repository's agent (started without --host) too.
      for (const a of remote.connectedAgents()) agents.add(a);
      let changed = false;
      await Promise.all(
        [...agents].map(async (agent) => {
          const sessions = await remote.sessionsOn(agent);
          if (!sessions) return; // not connected or no answer: keep what is known
          for (const s of sessions) {
            const known = this.#remoteInstant.get(s.id);
            if (known) known.last = s;
            else {
              // Not started by this server process (it restarted): adopt the serve task it reads from.
              this.#remoteInstant.set(s.id, { agent, host: s.host, serve: s.serve ? remote.adoptServe(s.serve) : undefined, last: s });
              changed = true;
            }
          }
          for (const [id, r] of this.#remoteInstant) {
            if (r.agent !== agent || sessions.some((s) => s.id === id)) continue;
            // The agent no longer runs it (it restarted): the session is over.
            r.serve?.cancel('the instant recovery session is gone');
            this.#remoteInstant.delete(id);
            changed = true;
            await this.#irEnded(id, `agent ${agent} no longer runs VM ${r.last.name} (the agent restarted)`, 'warning');
          }
        }),
      );
      if (changed) await this.#save();
    }
    return [...this.#instant.list().map((i) => this.#instantInfo(i)), ...[...this.#remoteInstant.values()].map((r) => this.#instantInfo(r.last, r))];
  }

  async getInstant(id: string): Promise<InstantRecovery> {
    const r = this.#remoteInstant.get(id);
    if (r) return this.#refresh(id, r);
    return this.#instantInfo(this.#instant.info(id));
  }

  async migrateInstant(id: string, storage: string | undefined, principal?: Principal): Promise<InstantRecovery> {
    let before: InstantRecovery | undefined;
    try {
      before = this.#remoteInstant.has(id) ? undefined : this.#instantInfo(this.#instant.info(id));
    } catch {
      // not found: #migrateInstant says so
    }
    const r0 = this.#remoteInstant.get(id)?.last;
    if (before || r0) await this.#irSession(id, () => ({ status: 'migrating', log: { level: 'info', message: `migrate of VM ${before?.name ?? r0?.name ?? id} started${storage ? ` (disks to ${storage})` : ''}` } }));
    let m: InstantRecovery;
    try {
      m = await this.#migrateInstant(id, storage, principal);
    } catch (err) {
      if (before || r0) await this.#irSession(id, () => ({ status: 'running-from-backup', log: { level: 'error', message: `migrate failed; the VM runs from the backup: ${describeError(err)}` } }));
      throw err;
    }
    await this.#irSession(id, () => ({
      status: m.state,
      ...(m.state === 'migrated' ? { state: 'success' as const } : {}),
      log: {
        level: 'info',
        message: `VM ${m.name} migrated: it runs on its own disks (${m.disks.map((d) => `${d.name} → ${String(d.target)}`).join(', ')}), folder ${m.dir}, QMP socket ${m.qmpSocket}; no longer from the backup`,
      },
    }));
    return m;
  }

  async #migrateInstant(id: string, storage: string | undefined, principal?: Principal): Promise<InstantRecovery> {
    if (storage) absolute('storage', storage);
    const r = this.#remoteInstant.get(id);
    if (storage) await checkRestoreTarget(this.#ctx, principal, storage, 'instant-recovery migrate --storage', { local: r === undefined });
    if (r) {
      const place = await this.#vmPlace(r.host, r.agent, r.last.name);
      r.last = await this.#remoteOrFail('instant recovery').instant(r.agent, { action: 'migrate', session: id, ...(storage ? { storage } : {}), ...place });
      // The VM runs on its own disks now: the repository agent stops serving the point.
      r.serve?.cancel('instant recovery migrated');
      r.serve = undefined;
      await this.#save();
      return this.#instantInfo(r.last, r);
    }
    const info = this.#instant.info(id);
    const place = await this.#vmPlace(undefined, null, info.name);
    const vmDir = place.vmDir ?? path.join(this.#dataDir, 'vms', info.name);
    await this.#instant.migrate(id, storage ?? vmDir, { vmDir, qmpSocket: place.qmpSocket });
    return this.getInstant(id);
  }

  /**
   * Where a migrated VM lives so that its host's discovery finds it (docs/instant-recovery.md,
   * "After migrate"), as `restore vm` places a new plain-QEMU VM: the QMP socket is the host's
   * glob with its `*` replaced by the VM's name, in the folder that makes (when the `*` names a
   * folder). The host is the one the start named, else the only qemu host of the agent that runs
   * the session (`agent` null: this server's own). No such host: nothing (the default folder
   * `<data>/vms/NAME` of the process that runs the VM), logged.
   */
  async #vmPlace(hostName: string | undefined, agent: string | null, name: string): Promise<{ vmDir?: string; qmpSocket?: string }> {
    const remote = this.#remote;
    const sameAgent = (a: string | null): boolean => (agent === null ? (remote ? remote.isLocal(a) : a === null) : remote !== undefined && remote.agentOf(a) === agent);
    const hosts = (await listHosts(this.#ctx)).filter((h) => h.kind === 'qemu');
    const candidates = hostName !== undefined ? hosts.filter((h) => h.name === hostName) : hosts.filter((h) => sameAgent(h.agent));
    const host = candidates.length === 1 ? candidates[0] : undefined;
    const qmpSocket = host ? qmpSocketFor(host.uri, name) : null;
    if (!host || !qmpSocket) {
      log.warn(
        { vm: name, agent: agent ?? 'this server', hosts: candidates.map((h) => h.name) },
        'the migrated VM is placed in the default folder <data>/vms/NAME: no single qemu host with a QMP glob containing * runs on that agent; add one (e.g. --qemu "<data>/vms/*/qmp.sock") so backup jobs find the VM',
      );
      return {};
    }
    const dir = path.dirname(qmpSocket);
    return { ...(dir !== path.dirname(host.uri) ? { vmDir: dir } : {}), qmpSocket };
  }

  /**
   * Stops a session. A migrated one is a production VM of its own: it is shut down only when
   * asked (`shutdownVm`), or forgotten (`forget`: it leaves the list and runs on); neither is
   * refused, naming the VM.
   */
  async stopInstant(id: string, o: { shutdownVm?: boolean | undefined; forget?: boolean | undefined } = {}): Promise<void> {
    const r = this.#remoteInstant.get(id);
    const info = r ? r.last : this.#instant.info(id);
    const migrated = info.state === 'migrated';
    if (o.forget && !migrated) {
      throw new BulwarkError(`instant recovery ${id} (VM ${info.name}) runs from the backup: only a migrated VM can be forgotten`, { kind: 'conflict', hint: `stop it with \`bulwark instant-recovery stop ${id}\`` });
    }
    if (migrated && !o.shutdownVm && !o.forget) {
      throw new BulwarkError(`instant recovery ${id} was migrated: VM ${info.name} runs on its own disks as a VM of its own (QMP ${info.qmpSocket}); stop would shut it down`, {
        kind: 'conflict',
        context: { session: id, vm: info.name },
        hint: `\`bulwark instant-recovery stop ${id} --shutdown-vm\` shuts the VM down; \`--forget\` leaves it running and removes it from this list`,
      });
    }
    await this.#stopInstant(id, o.forget === true);
    await this.#irEnded(id, o.forget ? `VM ${info.name} forgotten by instant-recovery stop ${id} --forget: it runs on as a VM of its own` : `VM ${info.name} ${migrated ? '(migrated) shut down' : 'stopped'} by instant-recovery stop ${id}`);
  }

  async #stopInstant(id: string, forget: boolean): Promise<void> {
    const r = this.#remoteInstant.get(id);
    if (r) {
      try {
        await this.#remoteOrFail('instant recovery').instant(r.agent, { action: 'stop', session: id, ...(forget ? { forget: true } : {}) });
      } catch (err) {
        if (!(err instanceof BulwarkError && err.kind === 'not-found')) throw err;
      }
      r.serve?.cancel('instant recovery stopped');
      this.#remoteInstant.delete(id);
      await this.#save();
      return;
    }
    if (forget) await this.#instant.forget(id);
    else await this.#instant.stop(id);
  }

  /** After a (re)start: the sessions on agents the state file names, their serve tasks taken over. */
  async takeOver(remote: RemoteRecovery): Promise<number> {
    return this.#load(remote);
  }

  /**
   * After a (re)start: when an agent first polls, its sessions are listed (retried every 2 s within
   * its adoption window), so the serve tasks they read from are adopted, not stopped (a VM running
   * from a backup must not lose its disk because the server restarted).
   */
  readoptAfterStart(remote: RemoteRecovery): void {
    // The broker stops none of the agent's unknown tasks while this promise is pending.
    remote.onAgentSeen(async (agent) => {
      while (!this.#abort.signal.aborted && Date.now() <= remote.adoptableUntil(agent)) {
        try {
          if ((await remote.sessionsOn(agent)) !== undefined) {
            await this.listInstant();
            return;
          }
        } catch (err) {
          log.warn({ agent, err: describeError(err) }, 'listing instant recovery sessions after the start failed');
        }
        await new Promise((r) => setTimeout(r, 2000).unref());
      }
    });
  }

  /** Server shutdown: instant recovery VMs that run from the backup are stopped (migrated ones run on), running restores are aborted. */
  async close(): Promise<void> {
    this.#abort.abort(new BulwarkError('the server is stopping', { kind: 'unavailable' }));
    await Promise.allSettled([...this.#running]);
    const fromBackup = this.#instant.list().filter((i) => i.state !== 'migrated');
    try {
      await this.#instant.stopAll();
    } finally {
      for (const i of fromBackup) await this.#irEnded(i.id, `the server stopped: VM ${i.name}, which ran from the backup in its process, was stopped`, 'warning');
    }
  }

  /**
   * After a (re)start: restore sessions a previous server process left open are settled: a VM
   * restore (or disk, files) failed; an instant recovery this process ran (swept at start) stopped.
   * Those on agents stay open until their agent's listing says (listInstant).
   */
  async settleSessions(): Promise<number> {
    let n = 0;
    for (const o of await openRestoreSessions(this.#ctx)) {
      if (o.kind === 'instant-recovery' && o.agent !== null) continue;
      const message = o.kind === 'instant-recovery' ? 'the server stopped while the VM ran from the backup in its process: the VM was stopped (swept at the next start)' : 'the server stopped while the restore ran';
      await updateRestoreSession(this.#ctx, o.id, {
        state: o.kind === 'instant-recovery' ? 'stopped' : 'failed',
        reason: message,
        ...(o.kind === 'instant-recovery' ? { status: 'stopped' } : {}),
        log: { level: 'warning', message },
      });
      n++;
    }
    return n;
  }
}

/** Creates the service and sweeps leftovers of a previous server run. */
export async function startRecoveryService(o: RecoveryServiceOptions): Promise<RecoveryService> {
  const s = new RecoveryService(o);
  await s.sweep();
  await s.loadOwn();
  await s.settleSessions().catch((err: unknown) => log.error({ err: describeError(err) }, 'could not settle the restore sessions of the previous server run'));
  if (o.remote) {
    await s.takeOver(o.remote);
    s.readoptAfterStart(o.remote);
  }
  return s;
}

export function recoveryPlugin(service: RecoveryService): FastifyPluginAsync {
  return async (api) => {
    const r = api.withTypeProvider<TypeBoxTypeProvider>();
    const IdParam = Type.Object({ id: Type.String() });
    r.post(
      '/restore-points/:id/restore-vm',
      { config: { permission: 'restore' }, schema: { tags: ['restore'], params: IdParam, body: RestoreVmBody, response: { 202: VmRestore } } },
      async (req, reply) => reply.status(202).send(await service.startRestoreVm(req.params.id, req.body, req.principal)),
    );
    r.get('/vm-restores', { config: { permission: 'read-restore-points' }, schema: { tags: ['restore'], response: { 200: Type.Object({ items: Type.Array(VmRestore) }) } } }, async () => ({
      items: service.listRestores(),
    }));
    r.get('/vm-restores/:id', { config: { permission: 'read-restore-points' }, schema: { tags: ['restore'], params: IdParam, response: { 200: VmRestore } } }, async (req) =>
      service.getRestore(req.params.id),
    );
    r.post(
      '/instant-recoveries',
      { config: { permission: 'restore' }, schema: { tags: ['restore'], body: StartInstantBody, response: { 201: InstantRecovery } } },
      async (req, reply) => reply.status(201).send(await service.startInstant(req.body)),
    );
    r.get(
      '/instant-recoveries',
      { config: { permission: 'read-restore-points' }, schema: { tags: ['restore'], response: { 200: Type.Object({ items: Type.Array(InstantRecovery) }) } } },
      async () => ({ items: await service.listInstant() }),
    );
    r.get('/instant-recoveries/:id', { config: { permission: 'read-restore-points' }, schema: { tags: ['restore'], params: IdParam, response: { 200: InstantRecovery } } }, async (req) =>
      service.getInstant(req.params.id),
    );
    r.post(
      '/instant-recoveries/:id/migrate',
      { config: { permission: 'restore' }, schema: { tags: ['restore'], params: IdParam, body: Type.Optional(MigrateBody), response: { 200: InstantRecovery } } },
      async (req) => service.migrateInstant(req.params.id, req.body?.storage, req.principal),
    );
    const StopBody = Type.Object(
      {
        shutdownVm: Type.Optional(Type.Boolean({ description: 'a migrated VM: shut it down (without this or forget, stopping a migrated VM is refused with 409)' })),
        forget: Type.Optional(Type.Boolean({ description: 'a migrated VM: remove it from the list and leave it running' })),
      },
      { additionalProperties: false },
    );
    r.post(
      '/instant-recoveries/:id/stop',
      { config: { permission: 'restore' }, schema: { tags: ['restore'], params: IdParam, body: Type.Optional(StopBody), response: { 204: Type.Null() } } },
      async (req, reply) => {
        await service.stopInstant(req.params.id, { shutdownVm: req.body?.shutdownVm, forget: req.body?.forget });
        return reply.status(204).send(null);
      },
    );
  };
}
