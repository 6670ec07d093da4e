// The backup server process: opens the configuration database, makes the first administrator,
// loads the PKI, starts the job runner and the daily configuration backup, and serves the REST
// API on the unix socket `<data>/bulwark.sock` (local administrator) and on TLS TCP (`--listen`).
// Start-up failures are BulwarkErrors that name the thing and what to do, with nothing changed.
import { constants } from 'node:fs';
import { access, chmod, mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import type { FastifyPluginAsync } from 'fastify';
import { BulwarkError, describeError } from '../common/errors.js';
import { logger } from '../common/log.js';
import { LocalDataPathExecutor, type ExportVmOptions, type ExportVmResult, type LocalDataPathOptions } from '../agent/backup/executor.js';
import { runLocalAgent } from '../agent/local.js';
import type { HypervisorConnection } from '../hypervisor/index.js';
import { socketAnswers } from '../hypervisor/socket.js';
import { agentLinkPlugin, agentLinkTlsOptions, createEnrollmentToken } from './api/agent-link.js';
import { createDispatch, type DispatchOptions } from './dispatch/index.js';
import { buildApi, type ConfigBackupApi } from './api/app.js';
import { restorePlugin } from './api/restore.js';
import { backupPlugin } from './api/backup.js';
import { sweepExpired, syncVmPoints } from './services/backup-methods.js';
import { resourcesPlugin } from './api/resources.js';
import { DatabaseTaskSlots } from './resources/database-slots.js';
import { recoveryPlugin, startRecoveryService } from './api/recovery.js';
import { RemoteRecovery } from './dispatch/recovery.js';
import { openDatabase, type ConfigDatabase } from './db/connect.js';
import { dataFiles } from './data-dir.js';
import { ensureServerPki } from './pki/index.js';
import { JobEngine } from './jobs/engine.js';
import { FakeDiskResolver, FakeTaskExecutor } from './jobs/fake-executor.js';
import type { DiskResolver, TaskExecutor } from './jobs/ports.js';
import { systemClock, type Clock } from './scheduler/clock.js';
import { validateSchedule } from './scheduler/schedule.js';
import { Scheduler } from './scheduler/scheduler.js';
import type { ServiceContext } from './services/common.js';
import { DatabaseAgentLinkStore, DatabaseJobEngineStore, DatabaseSchedulerStore, EngineJobRunner } from './services/engine-stores.js';
import { setScheduleValidator } from './services/jobs.js';
import { backupConfiguration, configBackupDir, pruneConfigBackups, restoreConfiguration } from './services/config-backup.js';
import { createRepository, getRepository, listHosts, listRepositories } from './services/infrastructure.js';
import { announceSessionsOn, recordRestorePoint, RunningRestores, SessionEvents } from './services/sessions.js';
import { ensureInitialAdmin } from './services/users.js';
import { AgentMountsState } from './api/agent-mounts-state.js';
import { vmsPlugin } from './api/vms.js';
import { filesPlugin, indexAfterBackup, readoptAgentMounts } from './api/files.js';
import { encryptionPlugin } from './api/encryption.js';
import { EncryptionKeys } from './services/encryption.js';
import { MountSessions } from '../restore/mount/sessions.js';
import { sweepStaleMounts } from '../restore/mount/mount.js';

const log = logger('server');

export const defaultListen = '127.0.0.1:9392';

export interface StartServerOptions {
  dataDir: string;
  /** `HOST:PORT` (IPv6 as `[::1]:PORT`) for the TLS API; default 127.0.0.1:9392; `none` = socket only. */
  listen?: string | undefined;
  /** `postgres://…` to use PostgreSQL; default SQLite at `<data>/bulwark.db`. */
  db?: string | undefined;
  /** Extra DNS names / addresses for the server certificate (the listen host is always in it). */
  hostnames?: string[] | undefined;
  /** Where the one-time first-start message goes (default: stdout). */
  print?: ((line: string) => void) | undefined;
  /** Daily configuration backup time `HH:MM` (server time zone; default 03:30); `false` = off. */
  configBackupAt?: string | false | undefined;
  /** Time for the services, the job engine and the scheduler (tests pass a ManualClock). */
  clock?: Clock | undefined;
  /** Extra plugins registered under /api/v1 on both transports. */
  plugins?: FastifyPluginAsync[] | undefined;
  /** The data path's task executor and disk resolver; default: the one-host data path. */
  executor?: TaskExecutor | undefined;
  disks?: DiskResolver | undefined;
  /**
   * Simulation mode: jobs run the fake executor and move no data (for trying the console and for
   * its tests). Default: the environment variable BULWARK_SIMULATE_DATA_PATH=1.
   */
  simulate?: boolean | undefined;
  /** Time zone of schedules and windows that name none (default: the server's). */
  timeZone?: string | undefined;
  /** First start of the one-host install: create repository `default` at `<data>/repository` (default true). */
  defaultRepository?: boolean | undefined;
  /**
   * Run the one-host install's local agent (`local`, in `<data>/agent/`) inside this process; it
   * enrolls and sends heartbeats over the TLS port like any agent (default true; needs `listen`).
   */
  localAgent?: boolean | undefined;
  /** Task dispatch to agents: agent-lost timeout, data-stream resume window, throttling rules. */
  dispatch?: DispatchOptions | undefined;
}

export interface RunningServer {
  dataDir: string;
  /** The unix socket path (`<data>/bulwark.sock`, mode 0600). */
  socketPath: string;
  /** `https://HOST:PORT` of the TLS API, or undefined with `listen: 'none'`. */
  url: string | undefined;
  tcp: { host: string; port: number } | undefined;
  /** The CA certificate clients trust (`<data>/pki/ca.crt`) and its SHA-256 fingerprint. */
  caCertPem: string;
  caFingerprint: string;
  /** Set on the first start only: the generated password of `admin`. */
  initialAdminPassword: string | undefined;
  database: { engine: 'sqlite' | 'postgres'; location: string };
  /** For tests and the one-host install: the services' context. */
  context: ServiceContext;
  close(): Promise<void>;
}

export function parseListen(listen: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(listen) ?? /^()()(\d{1,5})$/.exec(listen);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) {
    throw new BulwarkError(`--listen "${listen}" is not HOST:PORT`, { kind: 'invalid', context: { field: 'listen' }, hint: 'e.g. 127.0.0.1:9392, 0.0.0.0:9392 or [::1]:9392' });
  }
  const host = m[1] || m[2] || '127.0.0.1';
  return { host, port };
}

async function readVersion(): Promise<string> {
  try {
    const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? '0.0.0';
  } catch {
    return '0.0.0';
  }
}

async function ensureDataDir(dir: string): Promise<void> {
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await access(dir, constants.W_OK | constants.X_OK);
    const probe = join(dir, `.write-test-${process.pid}`);
    await writeFile(probe, '');
    await rm(probe);
  } catch (cause) {
    throw new BulwarkError(`data directory ${dir} is not writable`, {
      kind: 'unavailable',
      context: { file: dir },
      cause,
      hint: 'create it and give this user write access, or choose another with --data DIR or $BULWARK_DATA',
    });
  }
}

/** Fails early (before anything is created) when the TCP port is taken. */
async function probePort(host: string, port: number): Promise<void> {
  if (port === 0) return;
  await new Promise<void>((resolve, reject) => {
    const srv = createServer();
    srv.once('error', (cause: NodeJS.ErrnoException) => {
      const what = `${host.includes(':') ? `[${host}]` : host}:${port}`;
      reject(
        cause.code === 'EADDRINUSE'
          ? new BulwarkError(`port ${what} is in use`, { kind: 'unavailable', context: { listen: what }, cause, hint: 'stop the program using it, or choose another address with --listen HOST:PORT' })
          : new BulwarkError(`cannot listen on ${what}`, { kind: 'unavailable', context: { listen: what }, cause, hint: 'choose another address with --listen HOST:PORT' }),
      );
    });
    srv.listen({ host, port, exclusive: true }, () => srv.close(() => resolve()));
  });
}

/** Removes a stale socket file; refuses when a live server answers on it. */
async function claimSocket(path: string): Promise<void> {
  const st = await stat(path).catch(() => undefined);
  if (!st) return;
  if (await socketAnswers(path)) {
    throw new BulwarkError(`another server is listening on ${path}`, { kind: 'unavailable', context: { file: path }, hint: 'stop it first, or use another --data directory' });
  }
  await rm(path, { force: true });
}

/**
 * Starts the backup server. Resolves when both transports listen; rejects with a BulwarkError
 * (nothing left running) when the data directory, the database or the port is unusable.
 */
export async function startServer(opts: StartServerOptions): Promise<RunningServer> {
  const dataDir = opts.dataDir;
  const clock = opts.clock ?? systemClock;
  const listen = opts.listen === 'none' ? undefined : parseListen(opts.listen ?? defaultListen);
  await ensureDataDir(dataDir);
  if (listen) await probePort(listen.host, listen.port);
  const socketPath = join(dataDir, dataFiles.socket);

  const cleanups: Array<() => Promise<void>> = [];
  const cleanup = async () => {
    for (const c of cleanups.reverse()) await c().catch((err: unknown) => log.warn({ err: describeError(err) }, 'shutdown step failed'));
    cleanups.length = 0;
  };
  try {
    const cdb: ConfigDatabase = await openDatabase({ target: opts.db ?? join(dataDir, dataFiles.database) });
    cleanups.push(() => cdb.close());
    if (cdb.migrations.applied.length > 0) log.info({ applied: cdb.migrations.applied }, 'configuration database migrated');
    const ctx: ServiceContext = { db: cdb.db, engine: cdb.engine, clock };
    // Encryption passwords of jobs, sealed with <data>/secret.key (docs/encryption.md).
    const keys = await EncryptionKeys.open(ctx, dataDir);

    await claimSocket(socketPath);
    setScheduleValidator(validateSchedule);

    const pki = await ensureServerPki(dataDir, { hostnames: [...(listen ? [listen.host] : []), ...(opts.hostnames ?? [])].filter((h) => h !== '0.0.0.0' && h !== '::' && h !== '') });
    const version = await readVersion();
    const events = new SessionEvents();
    // Restore and instant recovery sessions announce their changes too (session show --follow).
    announceSessionsOn(ctx, events);

    // The job engine over the database, driving the one-host data path (the local agent's hypervisor
    // adapters and repositories, in this process). Simulation mode (opts.simulate or
    // BULWARK_SIMULATE_DATA_PATH=1) runs the fake executor instead, and every session says so.
    const simulated = opts.executor === undefined && (opts.simulate ?? process.env.BULWARK_SIMULATE_DATA_PATH === '1');
    let executor = opts.executor;
    let disks = opts.disks;
    // Tasks for agents (multi-host data path): agents long-poll the TLS listener for them.
    const dispatch = createDispatch(ctx, opts.dispatch);
    cleanups.push(async () => dispatch.close());
    // Points in repositories on other agents' hosts are indexed and searched by those agents.
    const fileIndexAgents = { broker: dispatch.broker, localAgent: opts.dispatch?.localAgent, mountState: new AgentMountsState(join(dataDir, 'agent-mounts.json')) };
    let exportVm: ((o: ExportVmOptions) => Promise<ExportVmResult>) | undefined;
    if (simulated) {
      executor = new FakeTaskExecutor({ clock, durationMs: 1000 });
      disks = new FakeDiskResolver();
    } else if (executor === undefined || disks === undefined) {
      const localOptions: LocalDataPathOptions = {
        // Hosts served by another agent are reached through that agent (dispatch), not from here.
        hosts: async () => (await listHosts(ctx)).filter((h) => h.agent === null || h.agent === 'local').map((h): HypervisorConnection => (h.kind === 'qemu' ? { kind: 'qemu', qmpGlob: h.uri } : { kind: 'libvirt', uri: h.uri })),
        repositoryPath: async (job) => (await getRepository(ctx, job.repository)).path,
        password: async (job) => keys.jobPassword(job.id),
        // A chain keeps the password it was created with: its increments use the one that opens it.
        passwords: async (job) => keys.jobPasswords(job.id),
        passwordHint: async (job) => keys.jobHint(job.id),
        now: () => clock.now(),
        // After retention, merges and synthetic fulls: the catalog follows the VM's folder.
        onVmPoints: async (job, task, points) => {
          const repository = await getRepository(ctx, job.repository);
          await syncVmPoints(ctx, { repositoryId: repository.id, jobId: job.id, job: job.name, vm: task.vm, points, sessionId: task.sessionId });
          events.changed(task.sessionId);
        },
        onRestorePoint: async (job, task, summary) => {
          const repository = await getRepository(ctx, job.repository);
          const p = summary.point;
          await recordRestorePoint(ctx, {
            id: p.id,
            vm: task.vm,
            disks: p.disks.map((d) => ({ name: d.name, size: d.size })),
            time: p.time.toISOString(),
            type: p.kind, // the point as the repository holds it (a reverse injection's point is the full)
            chainId: p.chainId,
            size: p.fileBytes,
            repositoryId: repository.id,
            jobId: job.id,
            sessionId: task.sessionId,
          });
          if (p.encrypted) await keys.recordJobChain(job.id, p.chainId, null);
          events.changed(task.sessionId);
          // Guest file index (job setting fileIndex): part of the job, never fails it.
          if (job.settings?.fileIndex === true) await indexAfterBackup(ctx, p.id, task.sessionId, undefined, keys, fileIndexAgents);
        },
      };
      const dataPath = new LocalDataPathExecutor(localOptions);
      cleanups.push(() => dataPath.close());
      exportVm = (o) => dataPath.exportVm(o);
      const dispatched = dispatch.executor(dataPath, localOptions.onRestorePoint, async (job, task, points) => localOptions.onVmPoints?.(job, task, points), async (job) => keys.jobPassword(job.id), async (job) => keys.jobPasswords(job.id));
      executor ??= dispatched;
      disks ??= dispatched;
    }
    // The resource scheduler: task slots per proxy and repository, processing mode and rate
    // shares from the configuration database (docs/resource-scheduling.md). The data path runs in
    // this process, so the local agent's slots are available whenever the server is.
    const slots = new DatabaseTaskSlots(ctx, { local: { name: 'local', cores: availableParallelism(), inProcess: true } });
    cleanups.push(async () => slots.close());
    await slots.refresh();
    const engine = new JobEngine({
      slots,
      sequential: () => slots.mode() === 'sequential',
      store: new DatabaseJobEngineStore(ctx, simulated ? 'simulated: no data moved (simulation mode: the fake task executor runs instead of the data path)' : undefined),
      executor,
      disks,
      clock,
      timeZone: opts.timeZone,
    });
    const unsubscribe = engine.subscribe((e) => events.changed(e.sessionId));
    cleanups.push(async () => unsubscribe());
    const interrupted = await engine.recoverInterruptedSessions();
    if (interrupted > 0) log.warn({ sessions: interrupted }, 'sessions left running by the previous server run were marked failed');
    const runner = new EngineJobRunner(engine);
    cleanups.push(() => runner.close());
    // Expired exports and the points of VMs removed from their jobs: at start, then every 10 minutes.
    const sweep = () => void sweepExpired(ctx, { remote: dispatch.sweepRemovedVms }).catch((err: unknown) => log.error({ err: describeError(err) }, 'backup-method sweep failed'));
    const sweepTimer = setInterval(sweep, 10 * 60 * 1000);
    sweepTimer.unref();
    cleanups.push(async () => clearInterval(sweepTimer));
    if (!simulated) sweep();
    const backupApi = backupPlugin({ ctx, engine, exportVm, keys });

    const backupOpts = { cdb, clock };
    const scheduler = new Scheduler({
      engine,
      store: new DatabaseSchedulerStore(ctx),
      clock,
      timeZone: opts.timeZone,
      ...(opts.configBackupAt === false
        ? {}
        : {
            configBackup: {
              at: opts.configBackupAt ?? '03:30',
              // Daily configuration backup into the first repository, keeping the newest 14.
              run: async () => {
                if ((await listRepositories(ctx)).length === 0) return;
                const { path } = await backupConfiguration(backupOpts);
                await pruneConfigBackups(join(path, '..'), 14);
                log.info({ path }, 'daily configuration backup written');
              },
            },
          }),
    });
    await scheduler.start();
    cleanups.push(async () => scheduler.stop());
    const reload = async () => {
      await scheduler.reload().catch((err: unknown) => log.error({ err: describeError(err) }, 'scheduler reload failed'));
    };

    const configBackup: ConfigBackupApi = {
      backup: (repository) => backupConfiguration(backupOpts, repository),
      restore: async (path) => {
        const r = await restoreConfiguration(backupOpts, path);
        // A backup taken while a job ran holds a "running" session no engine runs now.
        await engine.recoverInterruptedSessions();
        await reload();
        return r;
      },
    };
    const agentStore = new DatabaseAgentLinkStore(ctx);
    const enrollmentTokens = async (o: { name?: string | undefined; ttlSeconds?: number | undefined }) => {
      const t = await createEnrollmentToken(agentStore, pki, { ...o, now: clock.now() });
      return { token: t.token, expiresAt: t.expiresAt.toISOString(), ...(t.name ? { name: t.name } : {}) };
    };
    const resources = resourcesPlugin(ctx, () => slots.refresh(), () => slots.status());
    // Disk restores as sessions: their progress is announced on `events`, `session stop` reaches them.
    const restores = new RunningRestores({ events });
    const common = { ctx, runner, events, restores, version, configBackup, onJobsChanged: reload, createEnrollmentToken: enrollmentTokens };

    // File-level restore mounts (one-host install: in this process); a crashed run's are swept.
    await sweepStaleMounts().catch((err: unknown) => log.warn({ err: describeError(err) }, 'sweeping stale file-restore mounts failed'));
    const fileMounts = new MountSessions({ defaultRoot: join(dataDir, 'mounts') });
    cleanups.push(() => fileMounts.closeAll());
    // Mounts agents still hold after a restart are listed again, not stopped as unknown tasks.
    const stopMountReadoption = await readoptAgentMounts(fileIndexAgents, fileMounts);
    cleanups.push(async () => stopMountReadoption());

    // Full VM restore and instant recovery (one-host install: in this process; leftovers swept).
    const recovery = await startRecoveryService({ ctx, dataDir, keys, remote: new RemoteRecovery(dispatch.broker, opts.dispatch?.localAgent) });
    cleanups.push(() => recovery.close());

    const socketApp = await buildApi({ ...common, transport: 'socket', plugins: [restorePlugin(ctx, dispatch.restoreDisk, keys, restores), backupApi, resources, filesPlugin(ctx, fileMounts, { keys, agents: fileIndexAgents }), recoveryPlugin(recovery), vmsPlugin(ctx, fileIndexAgents), encryptionPlugin(keys), ...(opts.plugins ?? [])] });
    cleanups.push(() => socketApp.close());
    await socketApp.listen({ path: socketPath });
    await chmod(socketPath, 0o600);
    cleanups.push(() => rm(socketPath, { force: true }));

    let tcp: RunningServer['tcp'];
    if (listen) {
      const tcpApp = await buildApi({
        ...common,
        transport: 'tcp',
        // Agents enroll and send heartbeats over the TCP port with their client certificates.
        plugins: [agentLinkPlugin({ store: agentStore, pki, now: () => clock.now() }), dispatch.plugin(agentStore), restorePlugin(ctx, dispatch.restoreDisk, keys, restores), backupApi, resources, recoveryPlugin(recovery), filesPlugin(ctx, fileMounts, { keys, agents: fileIndexAgents }), vmsPlugin(ctx, fileIndexAgents), encryptionPlugin(keys), ...(opts.plugins ?? [])],
        https: agentLinkTlsOptions(pki),
      });
      cleanups.push(() => tcpApp.close());
      try {
        await tcpApp.listen({ host: listen.host, port: listen.port });
      } catch (cause) {
        throw new BulwarkError(`cannot listen on ${listen.host}:${listen.port}`, { kind: 'unavailable', cause, hint: 'choose another address with --listen HOST:PORT' });
      }
      const addr = tcpApp.server.address();
      tcp = { host: listen.host, port: typeof addr === 'object' && addr ? addr.port : listen.port };
    }

    // First start: an administrator with a random password, told once.
    const password = await ensureInitialAdmin(ctx);
    if (password && opts.defaultRepository !== false && (await listRepositories(ctx)).length === 0) {
      const path = join(dataDir, 'repository');
      await mkdir(path, { recursive: true, mode: 0o700 });
      await createRepository(ctx, { name: 'default', path });
      log.info({ path }, 'default repository created');
    }
    if (password) {
      const file = join(dataDir, dataFiles.initialAdminPassword);
      await writeFile(file, `${password}\n`, { mode: 0o600 });
      await chmod(file, 0o600);
      const where = tcp ? `https://${tcp.host.includes(':') ? `[${tcp.host}]` : tcp.host}:${tcp.port}` : 'this server';
      const print = opts.print ?? ((line: string) => process.stdout.write(`${line}\n`));
      print(
        [
          'Bulwark server: first start. An administrator was created:',
          `  user: admin   password: ${password}`,
          `  (also in ${file}, readable by this user only; change it with: bulwark user edit admin --password)`,
          `  local console: works as administrator through ${socketPath}`,
          ...(opts.defaultRepository !== false ? [`  repository "default": ${join(dataDir, 'repository')}`] : []),
          `  remote console: bulwark login ${where}   (CA fingerprint ${pki.caFingerprint})`,
        ].join('\n'),
      );
    }

    const url = tcp ? `https://${tcp.host.includes(':') ? `[${tcp.host}]` : tcp.host}:${tcp.port}` : undefined;
    if (url && opts.localAgent !== false) {
      // Not fatal: the server is useful without it, and the agent list shows it missing.
      try {
        const agent = await runLocalAgent({
          serverUrl: url.replace('://0.0.0.0:', '://127.0.0.1:').replace('://[::]:', '://[::1]:'),
          dataDir,
          createToken: async (name) => (await enrollmentTokens({ name, ttlSeconds: 600 })).token,
        });
        cleanups.push(() => agent.close());
      } catch (err) {
        log.error({ err: describeError(err) }, 'the local agent did not start');
      }
    }
    log.info({ socket: socketPath, url, database: cdb.location }, 'server started');
    let closing: Promise<void> | undefined;
    return {
      dataDir,
      socketPath,
      url,
      tcp,
      caCertPem: pki.caCertPem,
      caFingerprint: pki.caFingerprint,
      initialAdminPassword: password ?? undefined,
      database: { engine: cdb.engine, location: cdb.location },
      context: ctx,
      close: () => (closing ??= cleanup()),
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

export { configBackupDir };
