// Full VM restore and instant VM recovery, served by the one-host install's server process (its
// local agent's role, docs/decisions/0003): `POST /restore-points/{id}/restore-vm` runs a restore
// in the background with progress (`GET /vm-restores/{id}`); `/instant-recoveries` starts, lists,
// migrates and stops VMs that run straight from a restore point. Instant recovery sessions live in
// this process: they end when the server stops, and a start sweeps what a killed server left in
// `<data>/ir/`. See docs/restore-vm.md and docs/instant-recovery.md.
import { Type, type Static, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { FastifyPluginAsync } from 'fastify';
import { randomBytes } from 'node:crypto';
import { readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { decodePointMetadata } from '../../agent/backup/point-metadata.js';
import { QmpClient } from '../../hypervisor/qmp/client.js';
import { openRepository, type Repository } from '../../repository/index.js';
import { InstantRecoverySessions, type InstantSessionInfo } from '../../restore/instant/index.js';
import { globMatches, processesHolding, restoreVm, type RestoreVmHost, type RestoreVmResult } from '../../restore/vm/index.js';
import type { ServiceContext } from '../services/common.js';
import { getHost, getRepository, listHosts } from '../services/infrastructure.js';
import { pointPassword, type EncryptionKeys } from '../services/encryption.js';
import { getRestorePoint } from '../services/sessions.js';

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
  },
  { additionalProperties: false },
);

const RestoredDisk = Type.Object({ name: Type.String(), path: Type.String(), format: Type.String(), size: Type.Number(), sha256: Type.String() });

const VmRestore = Type.Object({
  id: Type.String(),
  point: Type.String(),
  sourceVm: Type.String(),
  vm: Type.String({ description: 'the restored VM\'s name' }),
  host: Type.String(),
  toOriginal: Type.Boolean(),
  state: Type.Union([Type.Literal('running'), Type.Literal('success'), Type.Literal('failed')]),
  startedAt: Type.String(),
  endedAt: Type.Union([Type.String(), Type.Null()]),
  progress: Type.Object({ bytesDone: Type.Number(), total: Type.Number(), percent: Type.Number(), disk: Type.Union([Type.String(), Type.Null()]) }),
  result: Type.Union([
    Type.Object({
      hypervisor: Type.String(),
      disks: Type.Array(RestoredDisk),
      vmDir: Type.Optional(Type.String()),
      startScript: Type.Optional(Type.String()),
      qmpSocket: Type.Optional(Type.String()),
      uuid: Type.Optional(Type.String()),
      poweredOn: Type.Boolean(),
      warnings: Type.Array(Type.String()),
      durationMs: Type.Number(),
    }),
    Type.Null(),
  ]),
  error: Type.Union([ErrorInfo, Type.Null()]),
});
export type VmRestore = Static<typeof VmRestore>;

const InstantRecovery = Type.Object({
  id: Type.String(),
  name: Type.String(),
  vm: Type.String(),
  point: Type.String(),
  state: Type.Union([Type.Literal('running-from-backup'), Type.Literal('migrating'), Type.Literal('migrated'), Type.Literal('stopped')]),
  runningFromBackup: Type.Boolean(),
  startedAt: Type.String(),
  pid: Type.Union([Type.Integer(), Type.Null()]),
  dir: Type.String(),
  qmpSocket: Type.String(),
  agentSocket: Type.String(),
  consoleLog: Type.String(),
  disks: Type.Array(Type.Object({ name: Type.String(), size: Type.Number(), overlay: Type.String(), target: Type.Union([Type.String(), Type.Null()]) })),
});
export type InstantRecovery = Static<typeof InstantRecovery>;

const StartInstantBody = Type.Object(
  {
    point: Type.String({ minLength: 1, description: 'restore point id' }),
    name: Type.Optional(Type.String({ minLength: 1, description: 'name of the recovered VM (default: VM-ir)' })),
    password: Type.Optional(Type.String({ minLength: 1, description: 'password of an encrypted point the server does not know the password of' })),
  },
  { additionalProperties: false },
);
const MigrateBody = Type.Object(
  { storage: Type.Optional(Type.String({ minLength: 1, description: 'absolute folder for the VM\'s own disks (default <data>/vms/NAME)' })) },
  { additionalProperties: false },
);

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
}

/** Restores and instant recovery sessions of this server process. */
export class RecoveryService {
  readonly #ctx: ServiceContext;
  readonly #dataDir: string;
  readonly #keys: EncryptionKeys | undefined;
  readonly #instant = new InstantRecoverySessions();
  readonly #restores = new Map<string, VmRestore>();
  readonly #running = new Set<Promise<unknown>>();
  readonly #abort = new AbortController();
  readonly #repositories = new Map<string, Promise<Repository>>();

  constructor(o: RecoveryServiceOptions) {
    this.#ctx = o.ctx;
    this.#dataDir = o.dataDir;
    this.#keys = o.keys;
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
    let r = this.#repositories.get(p);
    if (!r) {
      r = openRepository(p);
      r.catch(() => this.#repositories.delete(p));
      this.#repositories.set(p, r);
    }
    return r;
  }

  /** The point's repository and the password option to open it with (docs/encryption.md). */
  async #pointRepository(pointId: string, given?: string): Promise<{ repository: Repository; vm: string; password: { password?: string } }> {
    const point = await getRestorePoint(this.#ctx, pointId);
    if (point.state !== 'ready') throw new BulwarkError(`restore point ${pointId} is ${point.state}`, { kind: 'conflict' });
    const repo = await getRepository(this.#ctx, point.repository);
    const repository = await this.#repository(repo.path);
    return { repository, vm: point.vm, password: await pointPassword(this.#keys, repository, point, given) };
  }

  /** The host a restore goes to: the named one, or the one whose QMP glob covers the original VM. */
  async #host(repository: Repository, pointId: string, name: string | undefined, password: { password?: string }): Promise<{ name: string; host: RestoreVmHost }> {
    const toHost = (h: { name: string; kind: 'qemu' | 'libvirt'; uri: string }) => ({
      name: h.name,
      host: h.kind === 'qemu' ? { kind: 'qemu' as const, qmpGlob: h.uri } : { kind: 'libvirt' as const, uri: h.uri },
    });
    if (name) return toHost(await getHost(this.#ctx, name));
    const point = await repository.openRestorePoint(pointId, password);
    let meta;
    try {
      meta = decodePointMetadata(point.vmConfig);
    } finally {
      await point.close();
    }
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

  /**
   * Starts a full VM restore. Resolves with the restore once its disks are being written (checks
   * that fail first, such as a running original VM, reject here with their reason).
   */
  async startRestoreVm(pointId: string, body: Static<typeof RestoreVmBody>): Promise<VmRestore> {
    if (body.storage) absolute('storage', body.storage);
    const { repository, vm, password } = await this.#pointRepository(pointId, body.password);
    const host = await this.#host(repository, pointId, body.host, password);
    const id = `vr-${randomBytes(4).toString('hex')}`;
    const task: VmRestore = {
      id,
      point: pointId,
      sourceVm: vm,
      vm: body.name ?? vm,
      host: host.name,
      toOriginal: body.name === undefined || body.name === vm,
      state: 'running',
      startedAt: new Date().toISOString(),
      endedAt: null,
      progress: { bytesDone: 0, total: 0, percent: 0, disk: null },
      result: null,
      error: null,
    };
    let moving: () => void = () => undefined;
    const firstProgress = new Promise<void>((r) => (moving = r));
    const work = restoreVm({
      repository,
      pointId,
      host: host.host,
      ...(body.name ? { name: body.name } : {}),
      ...(body.storage ? { storage: body.storage } : {}),
      ...(body.format ? { format: body.format } : {}),
      ...(body.powerOn ? { powerOn: true } : {}),
      ...password,
      defaultVmRoot: path.join(this.#dataDir, 'vms'),
      signal: this.#abort.signal,
      onProgress: (p) => {
        task.progress = { bytesDone: p.bytesDone, total: p.total, percent: p.total > 0 ? Math.min(100, (100 * p.bytesDone) / p.total) : 0, disk: p.disk };
        moving();
      },
    });
    const settled = work.then(
      (r: RestoreVmResult) => {
        task.result = {
          hypervisor: r.hypervisor,
          disks: r.disks.map((d) => ({ ...d })),
          ...(r.vmDir ? { vmDir: r.vmDir } : {}),
          ...(r.startScript ? { startScript: r.startScript } : {}),
          ...(r.qmpSocket ? { qmpSocket: r.qmpSocket } : {}),
          ...(r.uuid ? { uuid: r.uuid } : {}),
          poweredOn: r.poweredOn,
          warnings: [...r.warnings],
          durationMs: r.durationMs,
        };
        task.state = 'success';
        task.progress = { ...task.progress, percent: 100 };
      },
      (err: unknown) => {
        task.error = errorInfo(err);
        task.state = 'failed';
        log.warn({ restore: id, point: pointId, err: describeError(err) }, 'VM restore failed');
      },
    ).finally(() => {
      task.endedAt = new Date().toISOString();
      this.#running.delete(settled);
    });
    this.#running.add(settled);
    // Refusals (VM running, name taken, bad format) come before any data moves: answer them directly.
    const first = await Promise.race([work.then(() => 'done' as const, (err: unknown) => ({ err })), firstProgress.then(() => 'moving' as const)]);
    if (typeof first === 'object') throw first.err;
    this.#restores.set(id, task);
    return task;
  }

  getRestore(id: string): VmRestore {
    const t = this.#restores.get(id);
    if (!t) throw new BulwarkError(`no VM restore ${id}`, { kind: 'not-found' });
    return t;
  }

  listRestores(): VmRestore[] {
    return [...this.#restores.values()].reverse();
  }

  #instantInfo(i: InstantSessionInfo): InstantRecovery {
    return {
      id: i.id,
      name: i.name,
      vm: i.vm,
      point: i.pointId,
      state: i.state,
      runningFromBackup: i.runningFromBackup,
      startedAt: i.startedAt.toISOString(),
      pid: i.pid ?? null,
      dir: i.dir,
      qmpSocket: i.qmpSocket,
      agentSocket: i.agentSocket,
      consoleLog: i.consoleLog,
      disks: i.disks.map((d) => ({ ...d })),
    };
  }

  async startInstant(body: Static<typeof StartInstantBody>): Promise<InstantRecovery> {
    const { repository, vm, password } = await this.#pointRepository(body.point, body.password);
    const name = body.name ?? `${vm}-ir`;
    const info = await this.#instant.start({ repository, pointId: body.point, workDir: this.instantDir, name, ...password });
    return this.#instantInfo(info);
  }

  listInstant(): InstantRecovery[] {
    return this.#instant.list().map((i) => this.#instantInfo(i));
  }

  getInstant(id: string): InstantRecovery {
    return this.#instantInfo(this.#instant.info(id));
  }

  async migrateInstant(id: string, storage: string | undefined): Promise<InstantRecovery> {
    const info = this.#instant.info(id);
    await this.#instant.migrate(id, storage ? absolute('storage', storage) : path.join(this.#dataDir, 'vms', info.name));
    return this.getInstant(id);
  }

  async stopInstant(id: string): Promise<void> {
    await this.#instant.stop(id);
  }

  /** Server shutdown: every instant recovery VM is stopped, running restores are aborted. */
  async close(): Promise<void> {
    this.#abort.abort(new BulwarkError('the server is stopping', { kind: 'unavailable' }));
    await Promise.allSettled([...this.#running]);
    await this.#instant.stopAll();
  }
}

/** Creates the service and sweeps leftovers of a previous server run. */
export async function startRecoveryService(o: RecoveryServiceOptions): Promise<RecoveryService> {
  const s = new RecoveryService(o);
  await s.sweep();
  return s;
}

export function recoveryPlugin(service: RecoveryService): FastifyPluginAsync {
  return async (api) => {
    const r = api.withTypeProvider<TypeBoxTypeProvider>();
    const IdParam = Type.Object({ id: Type.String() });
    r.post(
      '/restore-points/:id/restore-vm',
      { config: { permission: 'restore' }, schema: { tags: ['restore'], params: IdParam, body: RestoreVmBody, response: { 202: VmRestore } } },
      async (req, reply) => reply.status(202).send(await service.startRestoreVm(req.params.id, req.body)),
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
      async () => ({ items: service.listInstant() }),
    );
    r.get('/instant-recoveries/:id', { config: { permission: 'read-restore-points' }, schema: { tags: ['restore'], params: IdParam, response: { 200: InstantRecovery } } }, async (req) =>
      service.getInstant(req.params.id),
    );
    r.post(
      '/instant-recoveries/:id/migrate',
      { config: { permission: 'restore' }, schema: { tags: ['restore'], params: IdParam, body: Type.Optional(MigrateBody), response: { 200: InstantRecovery } } },
      async (req) => service.migrateInstant(req.params.id, req.body?.storage),
    );
    r.post(
      '/instant-recoveries/:id/stop',
      { config: { permission: 'restore' }, schema: { tags: ['restore'], params: IdParam, response: { 204: Type.Null() } } },
      async (req, reply) => {
        await service.stopInstant(req.params.id);
        return reply.status(204).send(null);
      },
    );
  };
}
