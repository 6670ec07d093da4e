// File-level restore routes (the mount server role; in the server process on the one-host
// install): mount a restore point for browsing (held by the console, or detached), list and
// unmount mounts, copy guest paths out to a host folder or back into the running VM through its
// guest agent, build a point's guest file index, and search the indexes.
import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { FastifyPluginAsync } from 'fastify';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { ToolError } from '../../common/process.js';
import { logger } from '../../common/log.js';
import { QemuHypervisor } from '../../hypervisor/qemu/adapter.js';
import { findAgentSocket } from '../../hypervisor/qemu/discovery.js';
import { QgaClient } from '../../hypervisor/qga/client.js';
import type { GuestAgent } from '../../hypervisor/qga/guest-agent.js';
import { connectLibvirtGuestAgent } from '../../hypervisor/qga/libvirt.js';
import { QmpClient } from '../../hypervisor/qmp/client.js';
import { openRepository, type Repository } from '../../repository/index.js';
import { unlockChain, type ChainKeys } from '../../repository/chain-keys.js';
import { fileIndexPath, indexRestorePoint, mergeSearchResults, searchIndexes, type IndexResult, type SearchablePoint, type SearchResult } from '../../restore/catalog/catalog.js';
import type { IndexUnlock } from '../../restore/catalog/sealed-index.js';
import { mountRestorePoint } from '../../restore/mount/point-mount.js';
import { restoreFilesToDir, restoreFilesToGuest, type RestoreFilesResult } from '../../restore/mount/restore-files.js';
import type { MountSessions } from '../../restore/mount/sessions.js';
import type { AgentTaskBroker } from '../dispatch/broker.js';
import type { ServiceContext } from '../services/common.js';
import { getRepository, listHosts } from '../services/infrastructure.js';
import { passwordNeeded, pointPassword, type EncryptionKeys } from '../services/encryption.js';
import { appendLog, getRestorePoint, listRestorePoints } from '../services/sessions.js';

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

const FileSystemView = Type.Object({
  name: Type.String({ description: 'device-like name: vda (whole disk) or vdb2 (partition 2 of vdb)' }),
  disk: Type.String(),
  partition: Type.Union([Type.Integer(), Type.Null()]),
  type: Type.String(),
  label: Type.Optional(Type.String()),
  uuid: Type.Optional(Type.String()),
  path: Type.String({ description: 'host folder where it is mounted read-only' }),
  mountpoint: Type.Optional(Type.String({ description: 'where the guest mounts it (root, or its /etc/fstab)' })),
});

const MountInfo = Type.Object({
  id: Type.String(),
  point: Type.String(),
  vm: Type.String(),
  time: Type.String(),
  at: Type.String(),
  detached: Type.Boolean(),
  createdAt: Type.String(),
  filesystems: Type.Array(FileSystemView),
  skipped: Type.Array(Type.Object({ name: Type.String(), type: Type.String(), reason: Type.String() })),
  warnings: Type.Array(Type.String()),
  notes: Type.Array(Type.String()),
});

const MountBody = Type.Object(
  {
    point: Type.String({ minLength: 1, description: 'restore point id' }),
    at: Type.Optional(Type.String({ minLength: 1, description: 'absolute folder on the server host to mount under (new or empty)' })),
    detached: Type.Optional(Type.Boolean({ description: 'keep the mount until it is unmounted by id (default: held by the caller through /mounts/{id}/hold)' })),
    password: Type.Optional(Type.String({ minLength: 1, description: 'password of an encrypted point the server does not know the password of' })),
  },
  { additionalProperties: false },
);

const RestoreFilesBody = Type.Object(
  {
    paths: Type.Array(Type.String({ minLength: 1 }), { minItems: 1, description: 'guest paths (/etc/hostname) or NAME:/path (vdb2:/srv)' }),
    to: Type.Optional(Type.String({ minLength: 1, description: 'absolute folder on the server host to copy into' })),
    toGuest: Type.Optional(Type.Boolean({ description: 'write back into the running original VM through its guest agent' })),
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
 * The repository of a ready point and the password option to open it with (the server's for its
 * encrypted jobs, else `given`, checked: docs/encryption.md).
 */
async function repositoryOfPoint(ctx: ServiceContext, pointId: string, keys?: EncryptionKeys, given?: string): Promise<{ repository: Repository; vm: string; password: { password?: string } }> {
  const point = await getRestorePoint(ctx, pointId);
  if (point.state !== 'ready') throw new BulwarkError(`restore point ${point.id} is ${point.state}, not ready`, { kind: 'conflict', context: { point: point.id } });
  const repo = await getRepository(ctx, point.repository);
  const repository = await openRepository(repo.path);
  return { repository, vm: point.vm, password: await pointPassword(keys, repository, point, given) };
}

/**
 * Connects to the guest agent of a running VM, found on the configured hosts: on a QEMU host
 * through the agent's own socket (found through QMP), on a libvirt host through libvirt
 * (`virsh qemu-agent-command`: libvirtd holds the socket).
 */
async function connectGuestAgent(ctx: ServiceContext, vm: string, agents?: FileIndexAgents): Promise<GuestAgent> {
  const hosts = await listHosts(ctx);
  const reasons: string[] = [];
  for (const h of hosts) {
    if (h.agent !== null && h.agent !== (agents?.localAgent ?? 'local')) {
      // Its URI or socket glob is on that agent's host, not reachable from here.
      reasons.push(`host ${h.name} is served by agent ${h.agent}: --to-guest reaches only hosts of the server's own agent`);
      continue;
    }
    if (h.kind === 'libvirt') {
      let agent;
      try {
        agent = await connectLibvirtGuestAgent({ uri: h.uri, domain: vm, host: h.name, timeoutMs: 30_000 });
      } catch (err) {
        // libvirt itself did not answer (daemon down): the VM may be on another host.
        if (!(err instanceof ToolError)) throw err;
        reasons.push(`host ${h.name}: ${describeError(err)}`);
        continue;
      }
      if (agent) return agent;
      continue;
    }
    const hv = new QemuHypervisor({ qmpGlob: h.uri });
    try {
      const info = await hv.getVm(vm).catch(() => undefined);
      if (!info) continue;
      if (info.state !== 'running') throw new BulwarkError(`VM ${vm} is ${info.state}, not running`, { kind: 'conflict', context: { vm }, hint: 'start the VM, or restore to a folder with --to' });
      const qmp = await QmpClient.connect({ endpoint: { socketPath: info.id }, label: vm });
      let socket: string | undefined;
      try {
        socket = await findAgentSocket(qmp);
      } finally {
        await qmp.close();
      }
      if (!socket) throw new BulwarkError(`VM ${vm} has no guest agent channel (org.qemu.guest_agent.0)`, { kind: 'unavailable', context: { vm } });
      const qga = await QgaClient.connect({ socketPath: socket, label: vm, timeoutMs: 30_000 });
      try {
        await qga.ping({ timeoutMs: 5000 });
      } catch (err) {
        await qga.close();
        throw new BulwarkError(`the guest agent of VM ${vm} does not answer`, { kind: 'unavailable', context: { vm }, cause: err, hint: 'is qemu-guest-agent running in the guest?' });
      }
      return qga;
    } finally {
      await hv.close();
    }
  }
  throw new BulwarkError(`VM ${vm} is not running on any configured host${reasons.length ? ` (${reasons.join('; ')})` : ''}`, {
    kind: 'not-found',
    context: { vm },
    hint: hosts.length ? `it is on none of the hosts ${hosts.map((h) => h.name).join(', ')}: add its host with \`bulwark host add\`, or restore to a folder with --to` : 'add its host with `bulwark host add`, or restore to a folder with --to',
  });
}

/** Restores guest paths of a point to a host folder or into the running VM (a private mount for the duration). */
export async function restoreFiles(
  ctx: ServiceContext,
  pointId: string,
  body: {
    paths: string[];
    to?: string | undefined;
    toGuest?: boolean | undefined;
    overwrite?: boolean | undefined;
    conflict?: 'overwrite' | 'keep-both' | 'fail' | undefined;
    password?: string | undefined;
  },
  runDir?: string,
  keys?: EncryptionKeys,
  agents?: FileIndexAgents,
): Promise<RestoreFilesResult & { point: string; vm: string; target: string }> {
  if ((body.to === undefined) === (body.toGuest !== true)) {
    throw new BulwarkError('say where to restore: either to (a folder) or toGuest', { kind: 'invalid', hint: 'bulwark restore files POINT --path P --to DIR, or --to-guest' });
  }
  if (body.to !== undefined && !path.isAbsolute(body.to)) throw new BulwarkError(`to: ${body.to} is not an absolute path`, { kind: 'invalid' });
  const { repository, vm, password } = await repositoryOfPoint(ctx, pointId, keys, body.password);
  const qga = body.toGuest ? await connectGuestAgent(ctx, vm, agents) : undefined;
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

/**
 * Repositories on other agents' hosts: their points are indexed and searched by that agent
 * (`file-index` task), where the repository folder is.
 */
export interface FileIndexAgents {
  /** The dispatch broker (runs a task on an agent). */
  readonly broker: Pick<AgentTaskBroker, 'run'>;
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
    if (point.state !== 'ready') throw new BulwarkError(`restore point ${point.id} is ${point.state}, not ready`, { kind: 'conflict', context: { point: point.id } });
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
      const repository = await openRepository(repo.path);
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
      async (req) => restoreFiles(ctx, req.params.id, req.body, opts.runDir, opts.keys, opts.agents),
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
