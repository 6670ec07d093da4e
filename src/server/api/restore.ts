// Restore routes of the one-host install: the server's local agent restores a disk of a restore
// point from the repository to a path on this host. (Remote agents will take these as tasks over
// the data-mover protocol.)
import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { FastifyPluginAsync } from 'fastify';
import path from 'node:path';
import { BulwarkError } from '../../common/errors.js';
import { openRepository } from '../../repository/index.js';
import { restoreDisk } from '../../restore/disk/restore-disk.js';
import type { ServiceContext } from '../services/common.js';
import { getRepository } from '../services/infrastructure.js';
import { getRestorePoint } from '../services/sessions.js';

const RestoreDiskBody = Type.Object(
  {
    disk: Type.String({ minLength: 1, description: 'name of the disk in the restore point (e.g. vda)' }),
    to: Type.String({ minLength: 1, description: 'absolute path of the image to write, on the server host' }),
    format: Type.Optional(Type.Union([Type.Literal('raw'), Type.Literal('qcow2')])),
    overwrite: Type.Optional(Type.Boolean()),
  },
  { additionalProperties: false },
);

const RestoreDiskReply = Type.Object({
  point: Type.String(),
  disk: Type.String(),
  path: Type.String(),
  format: Type.Union([Type.Literal('raw'), Type.Literal('qcow2')]),
  size: Type.Number(),
  sha256: Type.String(),
  bytesWritten: Type.Number(),
  durationMs: Type.Number(),
});

export function restorePlugin(ctx: ServiceContext): FastifyPluginAsync {
  return async (api) => {
    const r = api.withTypeProvider<TypeBoxTypeProvider>();
    r.post(
      '/restore-points/:id/restore-disk',
      {
        config: { permission: 'restore' },
        schema: { tags: ['restore'], params: Type.Object({ id: Type.String() }), body: RestoreDiskBody, response: { 200: RestoreDiskReply } },
      },
      async (req) => {
        const { disk, to, format, overwrite } = req.body;
        if (!path.isAbsolute(to)) {
          throw new BulwarkError(`to: ${to} is not an absolute path`, { kind: 'invalid', hint: 'give the full path of the image to write on the server host' });
        }
        const point = await getRestorePoint(ctx, req.params.id);
        if (!point.disks.some((d) => d.name === disk)) {
          throw new BulwarkError(`disk: restore point ${point.id} has no disk ${disk} (it has ${point.disks.map((d) => d.name).join(', ')})`, { kind: 'not-found' });
        }
        const repo = await getRepository(ctx, point.repository);
        const repository = await openRepository(repo.path);
        const result = await restoreDisk({ repository, pointId: point.id, disk, to, ...(format ? { format } : {}), ...(overwrite ? { overwrite } : {}) });
        return { point: point.id, disk, path: result.path, format: result.format, size: result.size, sha256: result.sha256, bytesWritten: result.bytesWritten, durationMs: result.durationMs };
      },
    );
  };
}
