// Routes of the backup methods (issue 6) beyond the job CRUD: a quick backup of one VM inside its
// job's chain, a health check of a job as a session, and exports (standalone fulls outside any
// job, with an expiry). Quick backup and health check are sessions of the job engine; an export
// runs in the request (the one-host install's local data path) and answers with the point.
import { Type, type Static, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { FastifyPluginAsync } from 'fastify';
import { BulwarkError } from '../../common/errors.js';
import type { ExportVmOptions, ExportVmResult } from '../../agent/backup/executor.js';
import type { HypervisorConnection } from '../../hypervisor/index.js';
import type { RunOptions, RunResult } from '../jobs/engine.js';
import { deleteExportFolder, isLocalRepository, jobForQuickBackup, parseDeleteAfter, recordExport, type ExportRecord } from '../services/backup-methods.js';
import type { ServiceContext } from '../services/common.js';
import type { EncryptionKeys } from '../services/encryption.js';
import { getRepository, listHosts } from '../services/infrastructure.js';
import { getJob } from '../services/jobs.js';
import { setSessionKind } from '../services/sessions.js';

export interface BackupApiOptions {
  ctx: ServiceContext;
  /** The job engine (or anything that starts sessions the same way). */
  engine: { runNow(job: string, opts?: RunOptions): Promise<RunResult> };
  /** The one-host data path's export; absent: exports answer 503. */
  exportVm?: ((o: ExportVmOptions) => Promise<ExportVmResult>) | undefined;
  /** The server's encryption passwords: an encrypted export is recorded with its hint, its password is not kept. */
  keys?: EncryptionKeys | undefined;
}

const QuickBody = Type.Object(
  { vm: Type.String({ minLength: 1 }), job: Type.Optional(Type.String({ minLength: 1, description: 'the job whose chain to continue, when the VM is in several' })) },
  { additionalProperties: false },
);
const HealthBody = Type.Object({ wholeChain: Type.Optional(Type.Boolean({ description: 'verify every point of the chain, not only the latest' })) }, { additionalProperties: false });
const Started = Type.Object({ sessionId: Type.String(), job: Type.String() });
const ExportBody = Type.Object(
  {
    vm: Type.String({ minLength: 1 }),
    repository: Type.String({ minLength: 1 }),
    password: Type.Optional(Type.String({ minLength: 1, description: 'encrypt the export with a key derived from this password (not kept by the server: restores of the export ask for it)' })),
    passwordHint: Type.Optional(Type.String({ maxLength: 200, description: 'with password: shown when a wrong password is given' })),
    deleteAfter: Type.Optional(Type.String({ description: 'e.g. 30d, 12h, 2w: the server deletes the export after this long' })),
    compression: Type.Optional(Type.Union([Type.Literal('zstd'), Type.Literal('lz4'), Type.Literal('none')])),
  },
  { additionalProperties: false },
);
const Export = Type.Object({
  id: Type.String(),
  vm: Type.String(),
  repository: Type.String(),
  folder: Type.String({ description: 'relative to the repository folder' }),
  pointId: Type.String(),
  encrypted: Type.Boolean(),
  createdAt: Type.String(),
  expiresAt: Type.Union([Type.String(), Type.Null()]),
});
type ExportT = Static<typeof Export>;

async function listExports(ctx: ServiceContext): Promise<ExportRecord[]> {
  const rows = await ctx.db
    .selectFrom('exports as e')
    .innerJoin('repositories as r', 'r.id', 'e.repository_id')
    .selectAll('e')
    .select('r.name as repo_name')
    .orderBy('e.created_at', 'desc')
    .execute();
  return rows.map((e) => ({
    id: e.id,
    vm: e.vm,
    repository: e.repo_name,
    folder: e.folder,
    pointId: e.point_id,
    encrypted: e.encrypted === 1,
    createdAt: e.created_at,
    expiresAt: e.expires_at,
  }));
}

export function backupPlugin(o: BackupApiOptions): FastifyPluginAsync {
  const { ctx } = o;
  return async (api) => {
    const r = api.withTypeProvider<TypeBoxTypeProvider>();
    r.post(
      '/backup/quick',
      { config: { permission: 'run-jobs' }, schema: { tags: ['jobs'], body: QuickBody, response: { 202: Started } } },
      async (req, reply) => {
        const job = await jobForQuickBackup(ctx, req.body.vm, req.body.job);
        const { sessionId } = await o.engine.runNow(job.id, { trigger: 'manual', vms: [req.body.vm], settings: { operation: 'quick' } });
        return reply.status(202).send({ sessionId, job: job.name });
      },
    );
    r.post(
      '/jobs/:name/health-check',
      { config: { permission: 'run-jobs' }, schema: { tags: ['jobs'], params: Type.Object({ name: Type.String() }), body: Type.Optional(HealthBody), response: { 202: Started } } },
      async (req, reply) => {
        const job = await getJob(ctx, req.params.name);
        // A repository on another agent is checked there (a health-check task, src/server/dispatch).
        const { sessionId } = await o.engine.runNow(job.id, { trigger: 'manual', settings: { operation: 'health-check', wholeChain: req.body?.wholeChain === true }, noRetries: true });
        await setSessionKind(ctx, sessionId, 'health-check');
        return reply.status(202).send({ sessionId, job: job.name });
      },
    );
    r.get('/exports', { config: { permission: 'read-restore-points' }, schema: { tags: ['exports'], response: { 200: Type.Object({ items: Type.Array(Export) }) } } }, async () => ({
      items: await listExports(ctx),
    }));
    r.post(
      '/exports',
      { config: { permission: 'run-jobs' }, schema: { tags: ['exports'], body: ExportBody, response: { 201: Export } } },
      async (req, reply) => {
        if (!o.exportVm) throw new BulwarkError('exports are not available on this server (no local data path)', { kind: 'unavailable' });
        const deleteAfterMs = req.body.deleteAfter === undefined ? undefined : parseDeleteAfter(req.body.deleteAfter);
        const repo = await getRepository(ctx, req.body.repository);
        if (!isLocalRepository(repo)) {
          throw new BulwarkError(`repository ${repo.name} is on agent ${repo.agent ?? ''}: exports are written into repositories on this server's host only for now`, {
            kind: 'invalid',
            context: { field: 'repository' },
            hint: 'export into a repository of the server\'s host (e.g. default), then copy the _export-… folder',
          });
        }
        const hosts = (await listHosts(ctx)).map((h): HypervisorConnection => (h.kind === 'qemu' ? { kind: 'qemu', qmpGlob: h.uri } : { kind: 'libvirt', uri: h.uri }));
        const result = await o.exportVm({
          hosts,
          repositoryPath: repo.path,
          vm: req.body.vm,
          ...(req.body.password !== undefined ? { password: req.body.password, ...(req.body.passwordHint ? { passwordHint: req.body.passwordHint } : {}) } : {}),
          ...(req.body.compression !== undefined ? { compression: req.body.compression } : {}),
          now: ctx.clock.now(),
        });
        if (result.summary.point.encrypted) await o.keys?.recordChain(result.summary.point.chainId, req.body.passwordHint ?? '', null);
        const rec: ExportT = await recordExport(ctx, {
          repository: repo.id,
          vm: result.summary.vm,
          folder: result.folder,
          point: result.summary.point,
          encrypted: req.body.password !== undefined,
          deleteAfterMs,
        });
        return reply.status(201).send(rec);
      },
    );
    r.delete(
      '/exports/:id',
      { config: { permission: 'configure' }, schema: { tags: ['exports'], params: Type.Object({ id: Type.String() }), response: { 204: Type.Null() } } },
      async (req, reply) => {
        const e = await ctx.db.selectFrom('exports').selectAll().where((eb) => eb.or([eb('id', '=', req.params.id), eb('folder', '=', req.params.id)])).executeTakeFirst();
        if (!e) throw new BulwarkError(`export "${req.params.id}" not found`, { kind: 'not-found', context: { export: req.params.id } });
        const repo = await getRepository(ctx, e.repository_id);
        await deleteExportFolder(repo.path, e.folder);
        await ctx.db.deleteFrom('restore_points').where('id', '=', e.point_id).execute();
        await ctx.db.deleteFrom('exports').where('id', '=', e.id).execute();
        return reply.status(204).send(null);
      },
    );
  };
}
