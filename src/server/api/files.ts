// File-level restore routes (the mount server role; in the server process on the one-host
// install): mount a restore point for browsing (held by the console, or detached), list and
// unmount mounts, copy guest paths out to a host folder or back into the running VM through its
// guest agent, build a point's guest file index, and search the indexes.
import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Value } from '@sinclair/typebox/value';
import type { FastifyPluginAsync } from 'fastify';
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { HypervisorConnection } from '../../hypervisor/index.js';
import { findGuestAgent } from '../../hypervisor/qga/connect.js';
import type { GuestAgent } from '../../hypervisor/qga/guest-agent.js';
import { openSharedRepository, type Repository } from '../../repository/index.js';
import { unlockChain, type ChainKeys } from '../../repository/chain-keys.js';
import { fileIndexPath, indexRestorePoint, mergeSearchResults, searchIndexes, type IndexResult, type SearchablePoint, type SearchResult } from '../../restore/catalog/catalog.js';
import type { IndexUnlock } from '../../restore/catalog/sealed-index.js';
import { mountRestorePoint } from '../../restore/mount/point-mount.js';
import { restoreFilesToDir, restoreFilesToGuest, type RestoreFilesResult } from '../../restore/mount/restore-files.js';
import type { MountSessionInfo, MountSessions } from '../../restore/mount/sessions.js';
import type { TaskEvent } from '../../transport/agent-tasks.js';
import type { WireMountInfo, WireRestoreFilesResult } from '../../transport/mount-tasks.js';
import { HeldMount, MountInfo, type AgentMountsState } from './agent-mounts-state.js';
import type { AgentTaskBroker, AgentTaskHandle } from '../dispatch/broker.js';
import { RemoteRecovery } from '../dispatch/recovery.js';
import { isLocalRepository } from '../services/backup-methods.js';
import type { ServiceContext } from '../services/common.js';
import { getHost, getRepository, listHosts } from '../services/infrastructure.js';
import { passwordNeeded, pointPassword, type EncryptionKeys } from '../services/encryption.js';
import { checkRestoreTarget } from '../services/restore-targets.js';
import { appendLog, getRestorePoint, listRestorePoints, recordedRestore } from '../services/sessions.js';
import type { Principal } from '../services/users.js';

const log = logger('files-api');

/**
 * File work on in-process mounts (restore files, indexing) blocks a libuv thread per file call
 * until our own NBD server, which also needs a libuv thread to read the repository, answers.
 * At most two such jobs at once keep threads free for it (the pool has four by default).
 */
const MOUNT_IO_SLOTS = 2;
let mountIoBusy = 0;
const mountIoWaiting: Array<() => void> = [];
async function withMountIoSlot<T>(fn: () => Promise<T>): Promise<T> {
  if (mountIoBusy >= MOUNT_IO_SLOTS) await new Promise<void>((resolve) => mountIoWaiting.push(resolve));
  else mountIoBusy++;
  try {
    return await fn();
  } finally {
    const next = mountIoWaiting.shift();
    if (next) next();
    else mountIoBusy--;
  }
}

const IdParam = Type.Object({ id: Type.String({ minLength: 1 }) });

const MountBody = Type.Object(
  {
    point: Type.String({ minLength: 1, description: 'restore point id' }),
    at: Type.Optional(Type.String({ minLength: 1, description: 'absolute folder on the server host to mount under (new or empty)' })),
    detached: Type.Optional(Type.Boolean({ description: 'keep the mount until it is unmounted by id (default: held by the caller through /mounts/{id}/hold)' })),
    host: Type.Optional(Type.String({ minLength: 1, description: 'host whose agent mounts the point (default: the agent of the point\'s repository; `at` is on that host)' })),
    password: Type.Optional(Type.String({ minLength: 1, description: 'password of an encrypted point the server does not know the password of' })),
  },
  { additionalProperties: false },
);

const RestoreFilesBody = Type.Object(
  {
    paths: Type.Array(Type.String({ minLength: 1 }), { minItems: 1, description: 'guest paths (/etc/hostname) or NAME:/path (vdb2:/srv)' }),
    to: Type.Optional(Type.String({ minLength: 1, description: 'absolute folder on the server host to copy into' })),
    toGuest: Type.Optional(Type.Boolean({ description: 'write back into the running original VM through its guest agent' })),
    host: Type.Optional(Type.String({ minLength: 1, description: 'host whose agent mounts the point and writes the files (default: the repository\'s agent for to, the VM\'s host for toGuest); to is a folder on that host' })),
    overwrite: Type.Optional(Type.Boolean({ description: 'with to: replace existing files' })),
    conflict: Type.Optional(Type.Union([Type.Literal('overwrite'), Type.Literal('keep-both'), Type.Literal('fail')], { description: 'with toGuest: what to do when a path exists (default fail)' })),
    password: Type.Optional(Type.String({ minLength: 1, description: 'password of an encrypted point the server does not know the password of' })),
  },
  { additionalProperties: false },
);

const RestoreFilesReply = Type.Object({
  point: Type.String(),
  vm: Type.String(),
  target: Type.String({ description: 'the host folder, or "guest VM"' }),
  agent: Type.Optional(Type.String({ description: 'the agent that mounted the point and wrote the files (absent: the server process)' })),
  items: Type.Array(Type.Object({ path: Type.String(), filesystem: Type.String(), inside: Type.String(), to: Type.String() })),
  files: Type.Integer(),
  directories: Type.Integer(),
  symlinks: Type.Integer(),
  bytes: Type.Number(),
  skipped: Type.Array(Type.Object({ path: Type.String(), reason: Type.String() })),
});

const IndexBody = Type.Object({ password: Type.Optional(Type.String({ minLength: 1, description: 'password of an encrypted point the server does not know the password of' })) }, { additionalProperties: false });

const IndexReply = Type.Object({
  point: Type.String(),
  file: Type.String(),
  entries: Type.Integer(),
  filesystems: Type.Integer(),
  sealed: Type.Boolean({ description: 'written sealed with the chain\'s keys (the point is encrypted)' }),
  agent: Type.Optional(Type.String({ description: 'the repository\'s agent that built it (repositories on other agents\' hosts)' })),
  durationMs: Type.Number(),
});

const PointRef = { id: Type.String(), time: Type.String() };
const SearchReply = Type.Object({
  pattern: Type.String(),
  matches: Type.Array(
    Type.Object({
      vm: Type.String(),
      path: Type.String(),
      versions: Type.Array(
        Type.Object({
          type: Type.Union([Type.Literal('f'), Type.Literal('d'), Type.Literal('l'), Type.Literal('o')]),
          size: Type.Number(),
          mtime: Type.String(),
          points: Type.Array(Type.Object(PointRef)),
        }),
      ),
    }),
  ),
  pointsSearched: Type.Integer(),
  pointsWithoutIndex: Type.Array(Type.Object({ ...PointRef, vm: Type.String(), reason: Type.String() })),
  pointsLocked: Type.Array(Type.Object({ ...PointRef, vm: Type.String(), reason: Type.String() }), {
    description: 'points of encrypted chains whose password the server does not know: their sealed index was not searched',
  }),
  truncated: Type.Boolean(),
});

/**
 * A point the last health check found damaged (`corrupt`) is restorable all the same: every block
 * read is CRC-checked, so a file on a damaged block fails naming the block and everything else reads
 * as backed up (as `restore disk` of such a point always did). Refusing it made the files of every
 * point that inherits one damaged block unreachable. Logged, so the damage is on record.
 */
function warnIfDamaged(point: Awaited<ReturnType<typeof getRestorePoint>>): void {
  if (point.state === 'corrupt') {
    log.warn({ point: point.id, vm: point.vm }, `restore point ${point.id} of VM ${point.vm} is marked corrupt (a health check found damage): files on damaged blocks fail to read, naming the block; the rest reads as backed up`);
  }
}

/**
 * The repository of a point and the password option to open it with (the server's for its
 * encrypted jobs, else `given`, checked: docs/encryption.md).
 */
async function repositoryOfPoint(ctx: ServiceContext, pointId: string, keys?: EncryptionKeys, given?: string): Promise<{ repository: Repository; vm: string; password: { password?: string } }> {
  const point = await getRestorePoint(ctx, pointId);
  warnIfDamaged(point);
  const repo = await getRepository(ctx, point.repository);
  const repository = await openSharedRepository(repo.path);
  return { repository, vm: point.vm, password: await pointPassword(keys, repository, point, given) };
}

type CatalogHost = Awaited<ReturnType<typeof listHosts>>[number];

function isLocalAgent(agents: FileIndexAgents | undefined, agent: string | null): boolean {
  return agent === null || agent === (agents?.localAgent ?? 'local');
}

function connectionOf(h: CatalogHost): HypervisorConnection {
  return h.kind === 'qemu' ? { kind: 'qemu', qmpGlob: h.uri } : { kind: 'libvirt', uri: h.uri };
}

/** The guest agent of a running VM on the server's own hosts (`only`: that host alone). */
async function connectGuestAgent(ctx: ServiceContext, vm: string, agents?: FileIndexAgents, only?: CatalogHost): Promise<GuestAgent> {
  const hosts = only ? [only] : await listHosts(ctx);
  const skipped: string[] = [];
  const mine = hosts.filter((h) => {
    if (isLocalAgent(agents, h.agent)) return true;
    // Its URI or socket glob is on that agent's host, not reachable from here.
    skipped.push(`host ${h.name} is served by agent ${h.agent}: --to-guest reaches only hosts of the server's own agent`);
    return false;
  });
  return findGuestAgent(mine, vm, 'configured host', skipped);
}

/** Where `restore files` or `mount` runs: the server process, or an agent (the mount server). */
type MountServer = { readonly agent: undefined; readonly host?: CatalogHost | undefined } | { readonly agent: string; readonly host?: CatalogHost | undefined; readonly guestHosts?: readonly HypervisorConnection[] | undefined };

/**
 * The agent of the host running VM `vm` among the hosts of other agents (`--to-guest` without
 * --host, when no host of the server's own has it): each connected agent is asked with a
 * `resolve-disks` task (10 s each at most); the first that finds it, with its hosts.
 */
async function agentRunningVm(ctx: ServiceContext, agents: FileIndexAgents, vm: string, localReason: string | undefined): Promise<{ agent: string; hosts: HypervisorConnection[] }> {
  const byAgent = new Map<string, CatalogHost[]>();
  for (const h of await listHosts(ctx)) if (!isLocalAgent(agents, h.agent)) byAgent.set(h.agent!, [...(byAgent.get(h.agent!) ?? []), h]);
  const reasons = localReason !== undefined ? [localReason] : [];
  const found = await Promise.all(
    [...byAgent].map(async ([agent, hosts]) => {
      if (!agents.broker.isConnected(agent)) {
        reasons.push(`agent ${agent} (hosts ${hosts.map((h) => h.name).join(', ')}) is not connected`);
        return undefined;
      }
      const connections = hosts.map(connectionOf);
      const handle = agents.broker.run(agent, { kind: 'resolve-disks', hosts: connections, vm });
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), 10_000)));
      try {
        const r = await Promise.race([handle.result.then(() => 'found' as const), late]);
        if (r === 'late') {
          handle.cancel('no answer in time');
          reasons.push(`agent ${agent} did not answer within 10 s`);
          return undefined;
        }
        return { agent, hosts: connections };
      } catch (err) {
        reasons.push(err instanceof BulwarkError && err.kind === 'not-found' ? `not on the hosts of agent ${agent} (${hosts.map((h) => h.name).join(', ')})` : `agent ${agent}: ${describeError(err)}`);
        return undefined;
      } finally {
        clearTimeout(timer);
      }
    }),
  );
  const hit = found.find((f) => f !== undefined);
  if (hit) return hit;
  throw new BulwarkError(`VM ${vm} is not running on any configured host (${reasons.join('; ')})`, {
    kind: 'not-found',
    context: { vm },
    hint: 'add its host with `bulwark host add`, name it with --host, or restore to a folder with --to',
  });
}

/**
 * Picks the mount server (docs/formats/agent-link.md, "Mount tasks"): the named host's agent;
 * without one, the repository's agent (where the blocks are), or for --to-guest the agent of the
 * host the VM runs on. Undefined agent: this process (the server's own host and repository).
 */
async function mountServer(ctx: ServiceContext, agents: FileIndexAgents | undefined, repositoryAgent: string | null, o: { host?: string | undefined; guestVm?: string | undefined }): Promise<MountServer> {
  if (!agents) return { agent: undefined };
  if (o.host !== undefined) {
    const host = await getHost(ctx, o.host);
    if (isLocalAgent(agents, host.agent) && isLocalAgent(agents, repositoryAgent)) return { agent: undefined, host };
    return { agent: host.agent ?? agents.localAgent ?? 'local', host, ...(o.guestVm !== undefined ? { guestHosts: [connectionOf(host)] } : {}) };
  }
  if (o.guestVm !== undefined) {
    // The VM's host decides: the server's own hosts first (as on the one-host install).
    const own = (await listHosts(ctx)).filter((h) => isLocalAgent(agents, h.agent));
    try {
      const qga = await findGuestAgent(own, o.guestVm, 'host of the server\'s own agent');
      await qga.close();
    } catch (err) {
      if (!(err instanceof BulwarkError && err.kind === 'not-found')) throw err;
      const found = await agentRunningVm(ctx, agents, o.guestVm, own.length > 0 ? `none of the server's own hosts (${own.map((h) => h.name).join(', ')}) runs it` : undefined);
      return { agent: found.agent, guestHosts: found.hosts };
    }
    if (isLocalAgent(agents, repositoryAgent)) return { agent: undefined };
    return { agent: agents.localAgent ?? 'local', guestHosts: own.map(connectionOf) };
  }
  if (isLocalAgent(agents, repositoryAgent)) return { agent: undefined };
  return { agent: repositoryAgent! };
}

/** The point's password as the agents get it (docs/encryption.md): the server's for its jobs, else `given`. */
async function agentPassword(ctx: ServiceContext, point: Awaited<ReturnType<typeof getRestorePoint>>, repo: { path: string; agent: string | null }, agents: FileIndexAgents, keys: EncryptionKeys | undefined, given: string | undefined): Promise<string | undefined> {
  if (isLocalAgent(agents, repo.agent)) return (await pointPassword(keys, await openSharedRepository(repo.path), point, given)).password;
  return keys ? keys.remotePassword(point, given) : given;
}

/** Refuses at once when the mount server is not connected (rather than after the pickup time). */
function assertConnected(agents: FileIndexAgents, agent: string, what: string): void {
  if (agents.broker.isConnected(agent)) return;
  throw new BulwarkError(`agent ${agent} (${what}) is not connected`, {
    kind: 'unavailable',
    context: { agent },
    hint: 'check `bulwark agent list` and that agent\'s host; or name another host with --host',
  });
}

/** A task's result, failing at once (and cancelling the task) when the serve task it reads from fails. */
async function withServe<T>(handle: AgentTaskHandle, serve: AgentTaskHandle | undefined): Promise<T> {
  if (!serve) return (await handle.result) as T;
  const serveFailed = serve.result.then(
    () => new Promise<never>(() => undefined),
    (err: unknown) => {
      handle.cancel('the repository agent stopped serving the point');
      throw new BulwarkError(`repository agent ${serve.agent} stopped serving the restore point: ${describeError(err)}`, { kind: 'unavailable', context: { agent: serve.agent }, cause: err });
    },
  );
  return (await Promise.race([handle.result, serveFailed])) as T;
}

/** Restores guest paths of a point to a host folder or into the running VM (a private mount for the duration). */
export async function restoreFiles(
  ctx: ServiceContext,
  pointId: string,
  body: {
    paths: string[];
    to?: string | undefined;
    toGuest?: boolean | undefined;
    host?: string | undefined;
    overwrite?: boolean | undefined;
    conflict?: 'overwrite' | 'keep-both' | 'fail' | undefined;
    password?: string | undefined;
  },
  runDir?: string,
  keys?: EncryptionKeys,
  agents?: FileIndexAgents,
  principal?: Principal,
): Promise<RestoreFilesResult & { point: string; vm: string; target: string; agent?: string }> {
  if ((body.to === undefined) === (body.toGuest !== true)) {
    throw new BulwarkError('say where to restore: either to (a folder) or toGuest', { kind: 'invalid', hint: 'bulwark restore files POINT --path P --to DIR, or --to-guest' });
  }
  if (body.to !== undefined && !path.isAbsolute(body.to)) throw new BulwarkError(`to: ${body.to} is not an absolute path`, { kind: 'invalid' });
  const point = await getRestorePoint(ctx, pointId);
  const repo = await getRepository(ctx, point.repository);
  const server = await mountServer(ctx, agents, repo.agent, { host: body.host, ...(body.toGuest ? { guestVm: point.vm } : {}) });
  // Users who are not administrators write only below the restore folders (decision 0009).
  if (body.to !== undefined) await checkRestoreTarget(ctx, principal, body.to, 'restore files --to', { local: server.agent === undefined });
  if (server.agent !== undefined && agents) return restoreFilesOnAgent(ctx, agents, server, point, repo, body, keys);
  const onlyHost = body.host !== undefined ? server.host : undefined;
  const { repository, vm, password } = await repositoryOfPoint(ctx, pointId, keys, body.password);
  const qga = body.toGuest ? await connectGuestAgent(ctx, vm, agents, onlyHost) : undefined;
  const work = await mkdtemp(path.join(tmpdir(), 'bulwark-restore-files-'));
  try {
    return await withMountIoSlot(async () => {
      const m = await mountRestorePoint({ repository, pointId, at: path.join(work, 'mnt'), ...(runDir !== undefined ? { runDir } : {}), ...password, paths: body.paths, placeInGuest: qga !== undefined });
      try {
        const result = qga
          ? await restoreFilesToGuest(m, body.paths, qga, { conflict: body.conflict ?? 'fail' })
          : await restoreFilesToDir(m, body.paths, body.to!, { overwrite: body.overwrite ?? false });
        return { ...result, point: m.point.id, vm, target: qga ? `guest ${vm}` : body.to! };
      } finally {
        await m.close();
      }
    });
  } finally {
    await qga?.close();
    await rm(work, { recursive: true, force: true }).catch(() => undefined);
  }
}

/** `restore files` on the mount server agent: it reads the point here or from the repository's agent. */
async function restoreFilesOnAgent(
  ctx: ServiceContext,
  agents: FileIndexAgents,
  server: Extract<MountServer, { agent: string }>,
  point: Awaited<ReturnType<typeof getRestorePoint>>,
  repo: { path: string; agent: string | null },
  body: { paths: string[]; to?: string | undefined; toGuest?: boolean | undefined; overwrite?: boolean | undefined; conflict?: 'overwrite' | 'keep-both' | 'fail' | undefined; password?: string | undefined },
  keys: EncryptionKeys | undefined,
): Promise<RestoreFilesResult & { point: string; vm: string; target: string; agent: string }> {
  const agent = server.agent;
  assertConnected(agents, agent, server.host ? `the mount server of host ${server.host.name}` : body.toGuest ? `the agent of VM ${point.vm}'s host` : 'the mount server of the point\'s repository');
  warnIfDamaged(point);
  const password = await agentPassword(ctx, point, repo, agents, keys, body.password);
  const remote = new RemoteRecovery(agents.broker, agents.localAgent);
  const { source, serve } = await remote.plan(repo, agent, point.id, password, () => remote.pointConfig(repo, point.id, password));
  try {
    const handle = agents.broker.run(agent, {
      kind: 'mount',
      action: 'restore-files',
      pointId: point.id,
      point: { vm: point.vm, time: point.time },
      source,
      paths: body.paths,
      ...(body.toGuest ? { guest: { hosts: server.guestHosts ?? [], vm: point.vm, conflict: body.conflict ?? 'fail' } } : { to: body.to, overwrite: body.overwrite ?? false }),
    });
    const r = await withServe<WireRestoreFilesResult>(handle, serve);
    log.info({ point: point.id, agent, files: r.files, bytes: r.bytes, target: r.target }, 'files restored by an agent');
    return { ...r, target: body.toGuest ? r.target : `${r.target} (on agent ${agent}'s host)` };
  } finally {
    serve?.cancel('the file restore ended');
  }
}

/**
 * `mount` on the mount server agent: an `open` task holds it there; the server lists it (and
 * holds it for the console) through `mounts.adopt`; unmount cancels the task.
 */
export async function mountOnAgent(
  ctx: ServiceContext,
  agents: FileIndexAgents,
  mounts: MountSessions,
  pointId: string,
  body: { at?: string | undefined; detached?: boolean | undefined; host?: string | undefined; password?: string | undefined },
  keys: EncryptionKeys | undefined,
): Promise<MountSessionInfo | undefined> {
  const point = await getRestorePoint(ctx, pointId);
  const repo = await getRepository(ctx, point.repository);
  const server = await mountServer(ctx, agents, repo.agent, { host: body.host });
  if (server.agent === undefined) return undefined;
  warnIfDamaged(point);
  const agent = server.agent;
  assertConnected(agents, agent, server.host ? `the mount server of host ${server.host.name}` : 'the mount server of the point\'s repository');
  const password = await agentPassword(ctx, point, repo, agents, keys, body.password);
  const remote = new RemoteRecovery(agents.broker, agents.localAgent);
  const { source, serve } = await remote.plan(repo, agent, point.id, password, () => remote.pointConfig(repo, point.id, password));
  const mountId = randomUUID();
  let mounted: ((info: WireMountInfo) => void) | undefined;
  const mountedEvent = new Promise<WireMountInfo>((resolve) => (mounted = resolve));
  const handle = agents.broker.run(
    agent,
    { kind: 'mount', action: 'open', mountId, pointId: point.id, point: { vm: point.vm, time: point.time }, source, detached: body.detached ?? false, ...(body.at !== undefined ? { at: body.at } : {}) },
    (e: TaskEvent) => {
      if (e.type === 'progress' && typeof e.progress.mounted === 'object' && e.progress.mounted !== null) mounted?.(e.progress.mounted as WireMountInfo);
    },
  );
  const ended = endsWithTask(mounts, mountId, agent, handle, serve, agents.mountState);
  let info: WireMountInfo;
  try {
    info = await Promise.race([
      mountedEvent,
      withServe<unknown>(handle, serve).then(() => {
        throw new BulwarkError(`agent ${agent} ended the mount of restore point ${point.id} before it was mounted`, { kind: 'internal', context: { agent, point: point.id } });
      }),
    ]);
  } catch (err) {
    handle.cancel('the mount failed');
    serve?.cancel('the mount failed');
    throw err;
  }
  log.info({ mount: mountId, point: point.id, agent, at: info.at }, 'restore point mounted by an agent');
  const held = adoptAgentMount(mounts, { ...info, detached: body.detached ?? false }, agent, server.host?.name, handle, ended);
  // Kept in the state file while held (a restarted server takes it back from there).
  await agents.mountState?.add({
    agent,
    ...(server.host ? { host: server.host.name } : {}),
    mount: { ...info, detached: body.detached ?? false, taskId: handle.taskId, ...(serve ? { serve: { agent: serve.agent, taskId: serve.taskId } } : {}) },
  });
  return held;
}

/** The mount ends with its `open` task (unmounted, or the agent gone); so does the serve task it reads from. */
function endsWithTask(mounts: MountSessions, mountId: string, agent: string, handle: AgentTaskHandle, serve: AgentTaskHandle | undefined, state: AgentMountsState | undefined): Promise<unknown> {
  const ended = handle.result.finally(async () => {
    serve?.cancel('the mount ended');
    mounts.forget(mountId);
    // Out of the state file before an unmount answers (a write never fails this: it is logged).
    await state?.remove(mountId);
  });
  ended.catch((err: unknown) => log.warn({ mount: mountId, agent, err: describeError(err) }, 'a mount held by an agent ended'));
  void serve?.result.catch(() => handle.cancel('the repository agent stopped serving the point'));
  return ended;
}

/** Lists an agent's mount here (held like the server's own); unmounting cancels its `open` task. */
function adoptAgentMount(mounts: MountSessions, info: WireMountInfo, agent: string, host: string | undefined, handle: AgentTaskHandle, ended: Promise<unknown>): MountSessionInfo {
  const session: MountSessionInfo = {
    id: info.id,
    point: info.point,
    vm: info.vm,
    time: info.time,
    at: info.at,
    detached: info.detached,
    createdAt: info.createdAt,
    filesystems: info.filesystems.map((f) => ({ ...f })),
    skipped: info.skipped.map((x) => ({ ...x })),
    warnings: [...info.warnings],
    notes: [...info.notes],
    agent,
    ...(host !== undefined ? { host } : {}),
  };
  return mounts.adopt(session, async () => {
    handle.cancel('unmounted');
    // An agent that went away cannot answer: its mount ends with it (the agent-lost time).
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([ended.catch(() => undefined), new Promise<void>((resolve) => (timer = setTimeout(resolve, 15_000)))]);
    clearTimeout(timer);
  });
}

/**
 * After a server (re)start: the mounts agents still hold are adopted again (listed, held, unmounted
 * as before the restart) instead of being stopped as unknown tasks. First those of the state file
 * (docs/formats/agent-mounts.md), at once, with the serve tasks they read through; then, when an
 * agent first polls, it is asked for its mounts (`mount list`), again every 2 s until it answers or
 * its adoption window ends (docs/formats/agent-link.md, "Mount tasks"); the broker stops none of its
 * tasks meanwhile. Resolves (once the file's mounts are listed) with a function that stops asking.
 */
export async function readoptAgentMounts(agents: FileIndexAgents, mounts: MountSessions): Promise<() => void> {
  const adopted = new Set<string>();
  let stopped = false;
  const take = (agent: string, host: string | undefined, m: HeldMount, from: string): void => {
    adopted.add(m.taskId);
    const open = agents.broker.adopt(agent, m.taskId, 'mount');
    const serve = m.serve ? agents.broker.adopt(m.serve.agent, m.serve.taskId, 'restore-serve') : undefined;
    adoptAgentMount(mounts, m, agent, host, open, endsWithTask(mounts, m.id, agent, open, serve, agents.mountState));
    log.info({ mount: m.id, agent, at: m.at, serve: m.serve, from }, 'a mount an agent still holds was adopted after the server started');
  };
  for (const e of (await agents.mountState?.load()) ?? []) take(e.agent, e.host, e.mount, 'the state file');
  const ask = async (agent: string): Promise<boolean> => {
    const handle = agents.broker.run(agent, { kind: 'mount', action: 'list' });
    let t: NodeJS.Timeout | undefined;
    const late = new Promise<undefined>((resolve) => (t = setTimeout(() => resolve(undefined), 5000)));
    const listed = await Promise.race([handle.result.then((v) => v, () => undefined), late]);
    clearTimeout(t);
    if (listed === undefined) {
      handle.cancel('the mount list was not answered in time');
      return false;
    }
    const reply = Type.Object({ mounts: Type.Array(HeldMount) });
    if (!Value.Check(reply, listed)) {
      // Asking again would get the same answer: its mounts are left to the broker (stopped once the window ends).
      const first = Value.Errors(reply, listed).First();
      log.error({ agent, field: first?.path, err: first?.message }, 'an agent answered its mount list in another shape (not the server\'s version): its mounts are not adopted');
      return true;
    }
    for (const m of listed.mounts) {
      if (adopted.has(m.taskId) || mounts.list().some((x) => x.id === m.id)) continue;
      take(agent, undefined, m, 'its mount list');
      await agents.mountState?.add({ agent, mount: m });
    }
    return true;
  };
  // The broker keeps the agent's unknown tasks while this promise is pending (an answer that comes
  // in at the end of the window is still adopted, not stopped first).
  agents.broker.onAgentSeen(async (agent) => {
    while (!stopped && Date.now() <= agents.broker.adoptableUntil(agent)) {
      const done = await ask(agent).catch((err: unknown) => {
        log.warn({ agent, err: describeError(err) }, 'asking an agent for its mounts failed');
        return false;
      });
      if (done) return;
      await new Promise((r) => setTimeout(r, 2000).unref());
    }
  });
  return () => {
    stopped = true;
  };
}

/**
 * Repositories on other agents' hosts: their points are indexed and searched by that agent
 * (`file-index` task), where the repository folder is.
 */
export interface FileIndexAgents {
  /** The dispatch broker (runs a task on an agent). */
  readonly broker: AgentTaskBroker;
  /** The mounts agents hold, kept for a restarted server (absent: not kept). */
  readonly mountState?: AgentMountsState | undefined;
  /** The server's own agent (its repositories are indexed in this process). Default `local`. */
  readonly localAgent?: string | undefined;
}

/** The agent that indexes a repository's points, or undefined for this process. */
function indexingAgent(agents: FileIndexAgents | undefined, repositoryAgent: string | null): string | undefined {
  if (!agents || repositoryAgent === null || repositoryAgent === (agents.localAgent ?? 'local')) return undefined;
  return repositoryAgent;
}

/** Builds (or rebuilds) the file index of one restore point (on the repository's agent when it has one). */
export async function indexPoint(ctx: ServiceContext, pointId: string, runDir?: string, keys?: EncryptionKeys, given?: string, agents?: FileIndexAgents): Promise<IndexResult & { agent?: string }> {
  const point = await getRestorePoint(ctx, pointId);
  const repo = await getRepository(ctx, point.repository);
  const agent = indexingAgent(agents, repo.agent);
  if (agent && agents) {
    warnIfDamaged(point);
    const password = point.encrypted && keys ? await keys.remotePassword(point, given) : given;
    const handle = agents.broker.run(agent, { kind: 'file-index', action: 'build', repositoryPath: repo.path, pointId, password });
    const r = (await handle.result) as IndexResult;
    return { ...r, agent };
  }
  const { repository, password } = await repositoryOfPoint(ctx, pointId, keys, given);
  return withMountIoSlot(() => indexRestorePoint({ repository, pointId, ...(runDir !== undefined ? { runDir } : {}), ...password }));
}

/**
 * The executor's hook after a point is committed and recorded, for jobs with `fileIndex` on:
 * builds the point's guest file index and logs the outcome in the session. Never throws: a
 * backup whose index failed is still a good backup (the session gets a warning).
 */
export async function indexAfterBackup(ctx: ServiceContext, pointId: string, sessionId: string | undefined, runDir?: string, keys?: EncryptionKeys, agents?: FileIndexAgents): Promise<void> {
  try {
    const r = await indexPoint(ctx, pointId, runDir, keys, undefined, agents);
    const where = r.agent !== undefined ? ` (built by agent ${r.agent})` : '';
    if (sessionId) await appendLog(ctx, sessionId, 'info', `guest file index of restore point ${pointId}${where}: ${r.entries} entries from ${r.filesystems} file systems${r.sealed ? ', sealed' : ''}`);
  } catch (err) {
    log.warn({ point: pointId, err: describeError(err) }, 'guest file index failed');
    if (sessionId) await appendLog(ctx, sessionId, 'warning', `guest file index of restore point ${pointId} failed: ${describeError(err)} (search will not find its files; rebuild with \`bulwark index ${pointId}\`)`).catch(() => undefined);
  }
}

/**
 * Searches the file indexes of every ready point (of one VM): those of the server's own
 * repositories here, those of repositories on other agents' hosts by that agent (one `file-index`
 * search task per repository), joined. Sealed indexes (encrypted chains) open with the password
 * the server keeps for the chain; points whose password it does not know are listed as locked,
 * with the hint.
 */
export async function searchFiles(ctx: ServiceContext, pattern: string, vm?: string, limit?: number, keys?: EncryptionKeys, agents?: FileIndexAgents): Promise<SearchResult> {
  const max = limit ?? 1000;
  const points = (await listRestorePoints(ctx, vm !== undefined ? { vm } : {})).filter((p) => p.state === 'ready');
  const byRepository = new Map<string, typeof points>();
  for (const p of points) byRepository.set(p.repository, [...(byRepository.get(p.repository) ?? []), p]);
  const local: typeof points = [];
  const files = new Map<string, string>();
  const repositories = new Map<string, Repository>();
  const remote: Array<Promise<SearchResult>> = [];
  for (const [repoName, its] of byRepository) {
    let repo;
    try {
      repo = await getRepository(ctx, repoName);
    } catch (err) {
      log.warn({ repository: repoName, err: describeError(err) }, 'repository cannot be read for a search');
      local.push(...its);
      continue;
    }
    const agent = indexingAgent(agents, repo.agent);
    if (agent && agents) {
      remote.push(searchOnAgent(agents, agent, repo.path, its, pattern, max, keys));
      continue;
    }
    local.push(...its);
    try {
      const repository = await openSharedRepository(repo.path);
      repositories.set(repoName, repository);
      for (const p of await repository.listRestorePoints()) files.set(p.id, fileIndexPath(p));
    } catch (err) {
      log.warn({ repository: repoName, err: describeError(err) }, 'repository cannot be read for a search');
    }
  }
  // One key derivation per chain (scrypt), whatever the number of its points.
  const chainKeys = new Map<string, Promise<ChainKeys>>();
  const unlockFor = (p: (typeof points)[number]): IndexUnlock => async (kdf) => {
    const salt = kdf.salt.toString('hex');
    let k = chainKeys.get(salt);
    if (!k) {
      k = (async () => {
        const ref = { id: p.id, job: p.job, chainId: p.chainId };
        const repository = repositories.get(p.repository);
        if (!keys || !repository) throw passwordNeeded(p.id, p.passwordHint);
        const known = await keys.remotePassword(ref);
        if (known !== undefined) {
          try {
            return await unlockChain(known, kdf, { point: p.id });
          } catch {
            // not this chain's password (the job's password changed since): try them all below
          }
        }
        const password = await keys.unlock(repository, ref);
        if (password === undefined) throw passwordNeeded(p.id, p.passwordHint);
        return unlockChain(password, kdf, { point: p.id });
      })();
      chainKeys.set(salt, k);
    }
    return k;
  };
  const searchable: SearchablePoint[] = local.map((p) => ({ id: p.id, time: p.time, vm: p.vm, indexFile: files.get(p.id) ?? null, unlock: unlockFor(p) }));
  const results = [await searchIndexes(searchable, pattern, { limit: max }), ...(await Promise.all(remote))];
  return mergeSearchResults(pattern, results, max);
}

/** One repository's points searched by its agent; an agent that fails leaves them listed as not searched, with the reason. */
async function searchOnAgent(
  agents: FileIndexAgents,
  agent: string,
  repositoryPath: string,
  points: ReadonlyArray<{ id: string; time: string; vm: string; job: string | null; chainId: string; encrypted?: boolean; passwordHint?: string }>,
  pattern: string,
  limit: number,
  keys: EncryptionKeys | undefined,
): Promise<SearchResult> {
  try {
    const wire = [];
    for (const p of points) {
      const password = p.encrypted && keys ? await keys.remotePassword(p) : undefined;
      wire.push({ id: p.id, time: p.time, vm: p.vm, ...(password !== undefined ? { password } : {}) });
    }
    const r = (await agents.broker.run(agent, { kind: 'file-index', action: 'search', repositoryPath, pattern, limit, points: wire }).result) as SearchResult;
    // The agent knows no hints: name the point as the server's own search does.
    const hints = new Map(points.map((p) => [p.id, p.passwordHint]));
    return { ...r, pointsLocked: r.pointsLocked.map((l) => ({ ...l, reason: passwordNeeded(l.id, hints.get(l.id)).message })) };
  } catch (err) {
    log.warn({ agent, repository: repositoryPath, err: describeError(err) }, 'search on a repository agent failed');
    const reason = `repository agent ${agent} could not search: ${describeError(err)}`;
    return { pattern, matches: [], pointsSearched: 0, pointsWithoutIndex: points.map((p) => ({ id: p.id, time: p.time, vm: p.vm, reason })), pointsLocked: [], truncated: false };
  }
}

export function filesPlugin(ctx: ServiceContext, mounts: MountSessions, opts: { runDir?: string; keys?: EncryptionKeys; agents?: FileIndexAgents } = {}): FastifyPluginAsync {
  return async (api) => {
    const r = api.withTypeProvider<TypeBoxTypeProvider>();
    r.post(
      '/mounts',
      { config: { permission: 'restore' }, schema: { tags: ['file restore'], body: MountBody, response: { 201: MountInfo } } },
      async (req, reply) => {
        const { point, at, detached } = req.body;
        if (at !== undefined && !path.isAbsolute(at)) throw new BulwarkError(`at: ${at} is not an absolute path`, { kind: 'invalid' });
        if (at !== undefined) {
          // Users who are not administrators mount only below the restore folders (decision 0009);
          // a mount on another agent's host is checked as written.
          const local = req.body.host === undefined && isLocalRepository(await getRepository(ctx, (await getRestorePoint(ctx, point)).repository));
          await checkRestoreTarget(ctx, req.principal, at, 'mount --at', { local });
        }
        // On an agent (the named host's, or the repository's): held there, listed here.
        const held = opts.agents ? await mountOnAgent(ctx, opts.agents, mounts, point, req.body, opts.keys) : undefined;
        if (held) return reply.code(201).send(held);
        if (req.body.host !== undefined && !opts.agents) throw new BulwarkError(`mount on host ${req.body.host} needs its agent, and this server hands no tasks to agents`, { kind: 'unavailable' });
        const { repository, password } = await repositoryOfPoint(ctx, point, opts.keys, req.body.password);
        const info = await mounts.open({ repository, pointId: point, ...(at !== undefined ? { at } : {}), detached: detached ?? false, ...password });
        return reply.code(201).send(info);
      },
    );
    r.get('/mounts', { config: { permission: 'read-restore-points' }, schema: { tags: ['file restore'], response: { 200: Type.Object({ items: Type.Array(MountInfo) }) } } }, async () => ({
      items: mounts.list(),
    }));
    r.get('/mounts/:id', { config: { permission: 'read-restore-points' }, schema: { tags: ['file restore'], params: IdParam, response: { 200: MountInfo } } }, async (req) =>
      mounts.get(req.params.id),
    );
    r.delete('/mounts/:id', { config: { permission: 'restore' }, schema: { tags: ['file restore'], params: IdParam, response: { 200: MountInfo } } }, async (req) =>
      mounts.close(req.params.id),
    );
    r.get(
      '/mounts/:id/hold',
      {
        config: { permission: 'restore' },
        schema: {
          tags: ['file restore'],
          params: IdParam,
          description: 'Server-sent events: `event: mount` (the mount) at once, then comments as keep-alive. A mount that is not detached is undone when the last such stream closes.',
          produces: ['text/event-stream'],
        },
      },
      async (req, reply) => {
        const info = mounts.get(req.params.id); // 404 before the stream starts
        const release = mounts.hold(info.id);
        reply.hijack();
        const res = reply.raw;
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
        res.write(`event: mount\ndata: ${JSON.stringify(info)}\n\n`);
        const keepAlive = setInterval(() => {
          // The mount may have been undone (unmount ID, server stop): end the stream then.
          if (!mounts.list().some((x) => x.id === info.id)) {
            res.write(`event: unmounted\ndata: ${JSON.stringify({ id: info.id })}\n\n`);
            res.end();
            return;
          }
          res.write(': held\n\n');
        }, 1000);
        res.on('close', () => {
          clearInterval(keepAlive);
          release();
        });
      },
    );
    r.post(
      '/restore-points/:id/restore-files',
      { config: { permission: 'restore' }, schema: { tags: ['file restore'], params: IdParam, body: RestoreFilesBody, response: { 200: RestoreFilesReply } } },
      async (req) => {
        // Recorded as a session (kind restore-files) with its outcome (docs/api.md, "Sessions of every kind").
        const point = await getRestorePoint(ctx, req.params.id);
        const where = req.body.toGuest ? 'into the running VM' : `to ${req.body.to ?? '?'}`;
        return recordedRestore(
          ctx,
          { kind: 'restore-files', vm: point.vm, point: point.id, message: `restore of ${req.body.paths.join(', ')} from restore point ${point.id} (VM ${point.vm}) ${where}${req.body.host ? ` on host ${req.body.host}` : ''} started` },
          () => restoreFiles(ctx, req.params.id, req.body, opts.runDir, opts.keys, opts.agents, req.principal),
          (r) => `restored ${r.items.length} item(s), ${r.files} file(s) to ${r.target}${r.agent ? ` by agent ${r.agent}` : ''}`,
        );
      },
    );
    r.post(
      '/restore-points/:id/file-index',
      { config: { permission: 'restore' }, schema: { tags: ['file restore'], params: IdParam, body: Type.Optional(IndexBody), response: { 200: IndexReply } } },
      async (req) => indexPoint(ctx, req.params.id, opts.runDir, opts.keys, req.body?.password, opts.agents),
    );
    r.get(
      '/file-index/search',
      {
        config: { permission: 'read-restore-points' },
        schema: {
          tags: ['file restore'],
          querystring: Type.Object({
            pattern: Type.String({ minLength: 1, description: 'glob on the file name, or on the whole path when it holds a /' }),
            vm: Type.Optional(Type.String()),
            limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 100000 })),
          }),
          response: { 200: SearchReply },
        },
      },
      async (req) => searchFiles(ctx, req.query.pattern, req.query.vm, req.query.limit, opts.keys, opts.agents),
    );
  };
}
