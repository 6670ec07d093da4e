// Routes the one-host install's local agent serves from the server process: restore a disk of a
// restore point to a path on this host, and rescan a repository folder into the restore-point
// catalog. (Remote agents will take these as tasks over the data-mover protocol.)
import { Type, type Static, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { FastifyPluginAsync } from 'fastify';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { catalogPoints, openRepository, openSharedRepository } from '../../repository/index.js';
import { restoreDisk } from '../../restore/disk/restore-disk.js';
import type { ServiceContext } from '../services/common.js';
import { isLocalRepository } from '../services/backup-methods.js';
import { getRepository } from '../services/infrastructure.js';
import { passwordNeeded, pointPassword, wrongPassword, type EncryptionKeys } from '../services/encryption.js';
import { checkRestoreTarget } from '../services/restore-targets.js';
import {
  deleteRestorePoint, getRestorePoint, recordedRestore, recordRestorePoint, type RestoreProgress, type RestoreSessionControl, type RunningRestores,
} from '../services/sessions.js';

const log = logger('restore-api');

const RestoreDiskBody = Type.Object(
  {
    disk: Type.String({ minLength: 1, description: 'name of the disk in the restore point (e.g. vda)' }),
    to: Type.String({ minLength: 1, description: 'absolute path of the image to write, on the server host' }),
    format: Type.Optional(Type.Union([Type.Literal('raw'), Type.Literal('qcow2')])),
    overwrite: Type.Optional(Type.Boolean()),
    digest: Type.Optional(
      Type.Boolean({
        description:
          'also compute the SHA-256 of the whole restored image (reply field sha256; costs about a core for the whole restore). Every block is checked either way (CRC32C).',
      }),
    ),
    password: Type.Optional(Type.String({ minLength: 1, description: 'password of an encrypted point the server does not know the password of (never needed for the points of its encrypted jobs)' })),
    session: Type.Optional(
      Type.String({
        pattern: '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$',
        description:
          'id for the restore\'s session (a new UUID the caller chose), so the caller can follow its progress (GET /sessions/{id}/events) and stop it (POST /sessions/{id}/stop) while this request runs; 409 when a session has it already',
      }),
    ),
  },
  { additionalProperties: false },
);

const RestoreDiskReply = Type.Object({
  point: Type.String(),
  disk: Type.String(),
  path: Type.String(),
  format: Type.Union([Type.Literal('raw'), Type.Literal('qcow2')]),
  size: Type.Number(),
  sha256: Type.Optional(Type.String({ description: 'SHA-256 (hex) of the raw image; only when the request asked for digest' })),
  bytesWritten: Type.Number(),
  durationMs: Type.Number(),
});

const RescanReply = Type.Object({
  repository: Type.String(),
  points: Type.Integer({ description: 'restore points found in the folder' }),
  added: Type.Integer({ description: 'points found that the catalog did not have' }),
  removed: Type.Integer({ description: 'catalog entries whose point is no longer in the folder (none while a folder is unreadable)' }),
  unreadable: Type.Optional(
    Type.Array(Type.Object({ file: Type.String(), problem: Type.String() }), {
      description: 'chain metadata files that cannot be read: their VMs\' points are neither added nor removed (check the folder with `bulwark repo verify`)',
    }),
  ),
  elsewhere: Type.Optional(
    Type.Array(Type.Object({ id: Type.String(), vm: Type.String(), repository: Type.String() }), {
      description: 'points found in the folder that the catalog already holds from another repository (a copied folder): not added; the catalog keeps them where they are',
    }),
  ),
});

/**
 * Brings the catalog in line with a repository folder, read from its chain metadata alone (the
 * folder may come from another server, or the database may have been restored from an older
 * configuration backup).
 */
export async function rescanRepository(ctx: ServiceContext, name: string, keys?: EncryptionKeys): Promise<Static<typeof RescanReply>> {
  const repo = await getRepository(ctx, name);
  // The folder is read on this host: a repository on another agent's host is not here (and a
  // folder of the same path here would replace its catalog with the wrong points).
  if (!isLocalRepository(repo)) {
    throw new BulwarkError(`repository ${repo.name} is on the host of agent ${repo.agent ?? ''}: rescan reads repository folders on this server's host only`, {
      kind: 'invalid',
      context: { repository: repo.name, agent: repo.agent ?? undefined },
      hint: `its catalog follows the agent's chain after every run of its jobs; to import a copied folder, add it as a repository of this host (bulwark repo add NAME --path DIR) and rescan that`,
    });
  }
  const repository = await openRepository(repo.path);
  // A single-file (per-job) point is one record per VM it holds (single-file.ts, catalogPoints).
  // A VM folder whose chain metadata cannot be read hides its points: they are not "gone", so
  // nothing is removed from the catalog while any folder is unreadable (the reply names them).
  const unreadable: Array<{ file: string; problem: string }> = [];
  const points = catalogPoints(await repository.listRestorePoints({}, { onUnreadable: (file, err) => unreadable.push({ file, problem: describeError(err) }) }));
  const knownRows = await ctx.db.selectFrom('restore_points').select(['id', 'state']).where('repository_id', '=', repo.id).execute();
  const known = new Set(knownRows.map((r) => r.id));
  const stateKnown = new Map(knownRows.map((r) => [r.id, r.state]));
  const jobIds = new Map((await ctx.db.selectFrom('jobs').select(['id', 'name']).execute()).map((j) => [j.name, j.id]));
  // A copy of a folder that is already in the catalog (an export copied elsewhere, a repository
  // copied offsite): its points keep their ids; the catalog keeps each once, where it already is.
  const elsewhere: Array<{ id: string; vm: string; repository: string }> = [];
  const inOther = new Map<string, string>();
  const ids = points.map((p) => p.id).filter((id) => !known.has(id));
  for (let i = 0; i < ids.length; i += 500) {
    const rows = await ctx.db
      .selectFrom('restore_points as p')
      .innerJoin('repositories as r', 'r.id', 'p.repository_id')
      .select(['p.id as id', 'r.name as repository'])
      .where('p.id', 'in', ids.slice(i, i + 500))
      .execute();
    for (const row of rows) inOther.set(row.id, row.repository);
  }
  let added = 0;
  // Encrypted chains enter the catalog with their hint; the password that opens one is found below
  // among the known ones (and remembered), or given at restore.
  for (const c of await repository.listChains()) if (c.encrypted) await keys?.recordChain(c.id, c.passwordHint ?? '', null);
  for (const p of points) {
    // The folder's health-check marks (.vbm damagedPoints) decide the state, as after a job's run.
    const state = p.damage ? 'corrupt' : 'ready';
    if (known.has(p.id)) {
      if (stateKnown.get(p.id) !== state) await ctx.db.updateTable('restore_points').set({ state }).where('id', '=', p.id).execute();
      continue;
    }
    const other = inOther.get(p.id);
    if (other !== undefined) {
      elsewhere.push({ id: p.id, vm: p.vm, repository: other });
      continue;
    }
    await recordRestorePoint(ctx, {
      id: p.id,
      vm: p.vm,
      disks: p.disks.map((d) => ({ name: d.name, size: d.size })),
      time: p.time.toISOString(),
      type: p.kind,
      chainId: p.chainId,
      size: p.fileBytes,
      repositoryId: repo.id,
      jobId: jobIds.get(p.job) ?? null,
      state,
    });
    added++;
  }
  const found = new Set(points.map((p) => p.id));
  let removed = 0;
  for (const id of known) {
    if (found.has(id) || unreadable.length > 0) continue;
    await deleteRestorePoint(ctx, id);
    removed++;
  }
  // Passwords the server knows (its jobs', added ones) may open the encrypted chains just found.
  await keys?.matchUnknownChains();
  if (elsewhere.length > 0) log.warn({ repository: repo.name, points: elsewhere.length, from: [...new Set(elsewhere.map((e) => e.repository))] }, 'rescan found points the catalog holds from another repository: not added');
  return { repository: repo.name, points: points.length, added, removed, ...(unreadable.length > 0 ? { unreadable } : {}), ...(elsewhere.length > 0 ? { elsewhere } : {}) };
}

/**
 * Restores a disk on the agent that owns a repository on another host (the dispatch's
 * `restoreDisk`); undefined when the repository is this server's own.
 */
export type RemoteDiskRestore = (
  repository: { readonly agent: string | null; readonly path: string },
  args: { pointId: string; disk: string; to: string; format?: 'raw' | 'qcow2' | undefined; overwrite?: boolean | undefined; digest?: boolean | undefined; password?: string | undefined },
  /** Aborted: the agent's task is cancelled (its restore stops and leaves no image). */
  signal?: AbortSignal,
  /** The agent's progress reports, for the restore's session. */
  onProgress?: (p: RestoreProgress) => void,
) => Promise<{ path: string; format: 'raw' | 'qcow2'; size: number; sha256?: string | undefined; bytesWritten: number; durationMs: number }> | undefined;

/**
 * The restore routes. `restores`: where a disk restore's session is found by `session stop` and
 * its progress announced (the server's one; absent: neither, as in tests of the route alone).
 */
export function restorePlugin(ctx: ServiceContext, remote?: RemoteDiskRestore, keys?: EncryptionKeys, restores?: RunningRestores): FastifyPluginAsync {
  return async (api) => {
    const r = api.withTypeProvider<TypeBoxTypeProvider>();
    r.post(
      '/repositories/:name/rescan',
      { config: { permission: 'configure' }, schema: { tags: ['repositories'], params: Type.Object({ name: Type.String() }), response: { 200: RescanReply } } },
      async (req) => rescanRepository(ctx, req.params.name, keys),
    );
    r.post(
      '/restore-points/:id/restore-disk',
      {
        config: { permission: 'restore' },
        schema: { tags: ['restore'], params: Type.Object({ id: Type.String() }), body: RestoreDiskBody, response: { 200: RestoreDiskReply } },
      },
      async (req, reply) => {
        const { disk, to, format, overwrite, digest, password: given, session: sessionId } = req.body;
        // The console that asked went away before the answer (Ctrl-C, killed): the restore stops
        // (here or on the repository's agent) and leaves no image, rather than finishing unseen.
        const asker = new AbortController();
        reply.raw.once('close', () => {
          if (!reply.raw.writableFinished) asker.abort(new BulwarkError(`the restore of disk ${disk} to ${to} was stopped: the console that asked for it went away (Ctrl-C or closed)`, { kind: 'unavailable', context: { disk, to } }));
        });
        if (!path.isAbsolute(to)) {
          throw new BulwarkError(`to: ${to} is not an absolute path`, { kind: 'invalid', hint: 'give the full path of the image to write on the server host' });
        }
        const point = await getRestorePoint(ctx, req.params.id);
        if (!point.disks.some((d) => d.name === disk)) {
          throw new BulwarkError(`disk: restore point ${point.id} has no disk ${disk} (it has ${point.disks.map((d) => d.name).join(', ')})`, { kind: 'not-found' });
        }
        const repo = await getRepository(ctx, point.repository);
        // Users who are not administrators write only below the restore folders (decision 0009).
        await checkRestoreTarget(ctx, req.principal, to, 'restore disk --to', { local: isLocalRepository(repo) });
        // A repository on another agent's host: that agent restores, to a path on its host.
        const remotePassword = repo.agent !== null && keys ? await keys.remotePassword(point, given) : given;
        type Restored = Awaited<NonNullable<ReturnType<RemoteDiskRestore>>>;
        const onAgent = (signal: AbortSignal, onProgress: (p: RestoreProgress) => void): Promise<Restored> | undefined =>
          remote?.(repo, { pointId: point.id, disk, to, format, overwrite, ...(digest ? { digest } : {}), ...(remotePassword !== undefined ? { password: remotePassword } : {}) }, signal, onProgress);
        const work = async (session: RestoreSessionControl): Promise<Restored> => {
          // Stopped by its console going away or by `session stop`, whichever comes first.
          const signal = AbortSignal.any([asker.signal, session.signal]);
          const started = onAgent(signal, (p) => session.progress(p));
          if (started) {
            try {
              return await started;
            } catch (err) {
              // The agent's repository says so as `unauthorized`: answer as on this host (403, field password, hint).
              if (!(err instanceof BulwarkError && err.kind === 'unauthorized' && keys)) throw err;
              const hint = await keys.chainHint(point.chainId);
              throw remotePassword === undefined ? passwordNeeded(point.id, hint) : wrongPassword(point.id, hint);
            }
          }
          const repository = await openSharedRepository(repo.path);
          const pw = await pointPassword(keys, repository, point, given);
          return restoreDisk({
            repository,
            pointId: point.id,
            disk,
            to,
            ...(format ? { format } : {}),
            ...(overwrite ? { overwrite } : {}),
            ...(digest ? { imageDigest: true } : {}),
            ...pw,
            signal,
            onProgress: (p) => session.progress(p),
          });
        };
        // Recorded as a session (kind restore-disk) with its outcome (docs/api.md, "Sessions of every kind").
        const result = await recordedRestore(
          ctx,
          {
            ...(sessionId !== undefined ? { id: sessionId } : {}),
            kind: 'restore-disk',
            vm: point.vm,
            point: point.id,
            agent: repo.agent,
            message: `restore of disk ${disk} of restore point ${point.id} (VM ${point.vm}) to ${to}${repo.agent !== null ? ` by agent ${repo.agent}` : ''} started`,
          },
          work,
          (r) => `disk ${disk} restored to ${r.path} (${r.format}, ${r.bytesWritten} bytes written)`,
          { running: restores, what: `the restore of disk ${disk} of restore point ${point.id} to ${to}` },
        );
        return {
          point: point.id,
          disk,
          path: result.path,
          format: result.format,
          size: result.size,
          ...(digest && result.sha256 !== undefined ? { sha256: result.sha256 } : {}),
          bytesWritten: result.bytesWritten,
          durationMs: result.durationMs,
        };
      },
    );
  };
}
