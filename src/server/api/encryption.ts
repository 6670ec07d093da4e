// Routes of the encryption passwords the server keeps (docs/encryption.md): a job's encryption
// (on with a password and hint, off, shown), and the password list (`bulwark password list|add|
// remove`). No route ever answers a password.
import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { FastifyPluginAsync } from 'fastify';
import type { EncryptionKeys } from '../services/encryption.js';

const NameParam = Type.Object({ name: Type.String() });
const IdParam = Type.Object({ id: Type.String() });

const JobEncryption = Type.Object({
  job: Type.String(),
  encrypted: Type.Boolean({ description: 'new chains of the job are encrypted' }),
  hint: Type.Union([Type.String(), Type.Null()]),
  keyId: Type.Union([Type.String(), Type.Null()]),
  since: Type.Union([Type.String(), Type.Null()]),
});

const SetJobEncryption = Type.Object(
  {
    password: Type.String({ minLength: 8, maxLength: 1024, description: 'the chain password; kept sealed by the server, never shown again' }),
    hint: Type.String({ maxLength: 200, description: 'shown when a wrong password is given; never the password itself' }),
  },
  { additionalProperties: false },
);

const EncryptionKey = Type.Object({
  id: Type.String(),
  hint: Type.String(),
  job: Type.Union([Type.String(), Type.Null()]),
  active: Type.Boolean(),
  createdAt: Type.String(),
  retiredAt: Type.Union([Type.String(), Type.Null()]),
  chains: Type.Integer({ description: 'encrypted chains in the catalog this password opens' }),
});

export function encryptionPlugin(keys: EncryptionKeys): FastifyPluginAsync {
  return async (api) => {
    const r = api.withTypeProvider<TypeBoxTypeProvider>();
    r.get('/jobs/:name/encryption', { config: { permission: 'read' }, schema: { tags: ['encryption'], params: NameParam, response: { 200: JobEncryption } } }, async (req) =>
      keys.jobEncryption(req.params.name),
    );
    r.post(
      '/jobs/:name/encryption',
      {
        config: { permission: 'configure' },
        schema: {
          tags: ['encryption'],
          params: NameParam,
          body: SetJobEncryption,
          response: { 200: JobEncryption },
          description: 'Encrypts the job\'s new chains (from its next full) with this password; a previous password is kept to open older chains.',
        },
      },
      async (req) => keys.setJobPassword(req.params.name, req.body.password, req.body.hint),
    );
    r.delete(
      '/jobs/:name/encryption',
      { config: { permission: 'configure' }, schema: { tags: ['encryption'], params: NameParam, response: { 200: JobEncryption } } },
      async (req) => keys.clearJobPassword(req.params.name),
    );
    r.get('/encryption-keys', { config: { permission: 'configure' }, schema: { tags: ['encryption'], response: { 200: Type.Object({ items: Type.Array(EncryptionKey) }) } } }, async () => ({
      items: await keys.list(),
    }));
    r.post(
      '/encryption-keys',
      {
        config: { permission: 'configure' },
        schema: {
          tags: ['encryption'],
          body: SetJobEncryption,
          response: { 201: EncryptionKey },
          description: 'A password the server tries on encrypted restore points it has no password for (imported repositories, exports).',
        },
      },
      async (req, reply) => {
        const k = await keys.add(req.body.password, req.body.hint);
        // Encrypted chains the catalog has no password for yet may open with this one.
        await keys.matchUnknownChains();
        return reply.status(201).send(await keys.get(k.id));
      },
    );
    r.delete(
      '/encryption-keys/:id',
      {
        config: { permission: 'configure' },
        schema: { tags: ['encryption'], params: IdParam, querystring: Type.Object({ force: Type.Optional(Type.Boolean()) }), response: { 204: Type.Null() } },
      },
      async (req, reply) => {
        await keys.remove(req.params.id, req.query.force === true);
        return reply.status(204).send(null);
      },
    );
  };
}
