// Users, roles, login tokens and agent enrollment tokens. Passwords are argon2id hashes; tokens
// are 32 random bytes given to the client once and stored only as SHA-256 hashes.
import { createHash, randomBytes } from 'node:crypto';
import { hash as argonHash, verify as argonVerify } from '@node-rs/argon2';
import type { Selectable } from 'kysely';
import { BulwarkError } from '../../common/errors.js';
import type { UserTable } from '../db/schema.js';
import { configFields, duplicate, findByNameOrId, isUniqueViolation, newId, notFound, nowIso, updateVersioned, type ServiceContext } from './common.js';
import { checkName } from './infrastructure.js';
import type { Role, User, UserCreate, UserPatch } from './model.js';

/** How long a login token lives. */
export const tokenLifetimeMs = 12 * 3600 * 1000;

export const hashToken = (token: string): string => createHash('sha256').update(token).digest('hex');
export const newToken = (): string => randomBytes(32).toString('base64url');

function toUser(r: Selectable<UserTable>): User {
  return { ...configFields(r), role: r.role };
}

export async function listUsers(ctx: ServiceContext): Promise<User[]> {
  return (await ctx.db.selectFrom('users').selectAll().orderBy('name').execute()).map(toUser);
}

export async function getUser(ctx: ServiceContext, name: string): Promise<User> {
  const r = await findByNameOrId(ctx, 'users', name);
  if (!r) throw notFound('user', name);
  return toUser(r);
}

export async function createUser(ctx: ServiceContext, input: UserCreate): Promise<User> {
  checkName(input.name);
  const now = nowIso(ctx);
  const password_hash = await argonHash(input.password);
  try {
    await ctx.db
      .insertInto('users')
      .values({ id: newId(), name: input.name, version: 1, created_at: now, updated_at: now, password_hash, role: input.role })
      .execute();
  } catch (err) {
    if (isUniqueViolation(err)) throw duplicate('user', input.name);
    throw err;
  }
  return getUser(ctx, input.name);
}

async function administratorCount(ctx: ServiceContext): Promise<number> {
  const r = await ctx.db.selectFrom('users').select((eb) => eb.fn.countAll<number>().as('n')).where('role', '=', 'administrator').executeTakeFirstOrThrow();
  return Number(r.n);
}

export async function updateUser(ctx: ServiceContext, name: string, patch: UserPatch): Promise<User> {
  const r = await findByNameOrId(ctx, 'users', name);
  if (!r) throw notFound('user', name);
  const values: Partial<UserTable> = {};
  if (patch.role !== undefined && patch.role !== r.role) {
    if (r.role === 'administrator' && (await administratorCount(ctx)) <= 1) {
      throw new BulwarkError(`user "${r.name}" is the last administrator: make another administrator first`, { kind: 'conflict', context: { user: r.name } });
    }
    values.role = patch.role;
  }
  if (patch.password !== undefined) values.password_hash = await argonHash(patch.password);
  await updateVersioned(ctx, 'users', 'user', r, patch.version, values);
  if (patch.password !== undefined) await ctx.db.deleteFrom('api_tokens').where('user_id', '=', r.id).execute();
  return getUser(ctx, r.id);
}

export async function deleteUser(ctx: ServiceContext, name: string): Promise<void> {
  const r = await findByNameOrId(ctx, 'users', name);
  if (!r) throw notFound('user', name);
  if (r.role === 'administrator' && (await administratorCount(ctx)) <= 1) {
    throw new BulwarkError(`user "${r.name}" is the last administrator and cannot be deleted`, { kind: 'conflict', context: { user: r.name } });
  }
  await ctx.db.deleteFrom('users').where('id', '=', r.id).execute();
}

/** First start: when no user exists, creates `admin` with a random password and returns it. */
export async function ensureInitialAdmin(ctx: ServiceContext): Promise<string | null> {
  const any = await ctx.db.selectFrom('users').select('id').limit(1).executeTakeFirst();
  if (any) return null;
  const password = randomBytes(18).toString('base64url');
  await createUser(ctx, { name: 'admin', password, role: 'administrator' });
  return password;
}

export interface LoginResult {
  token: string;
  expiresAt: string;
  user: string;
  role: Role;
}

const badLogin = () =>
  new BulwarkError('wrong user name or password', { kind: 'unauthorized', hint: 'check the user name and password' });

export async function login(ctx: ServiceContext, user: string, password: string): Promise<LoginResult> {
  const r = await ctx.db.selectFrom('users').selectAll().where('name', '=', user).executeTakeFirst();
  if (!r) {
    // Same work as a real check, so timing does not tell which user names exist.
    await argonVerify('$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0rS8bF9KFRw0yl9y8W4p5Ii9Syv6yQcQ3pX7mo6m+Ow', password).catch(() => false);
    throw badLogin();
  }
  if (!(await argonVerify(r.password_hash, password))) throw badLogin();
  const token = newToken();
  const expiresAt = new Date(ctx.clock.now().getTime() + tokenLifetimeMs).toISOString();
  await ctx.db
    .insertInto('api_tokens')
    .values({ id: newId(), token_hash: hashToken(token), user_id: r.id, expires_at: expiresAt, created_at: nowIso(ctx) })
    .execute();
  // Sweep expired tokens while we are here.
  await ctx.db.deleteFrom('api_tokens').where('expires_at', '<', nowIso(ctx)).execute();
  return { token, expiresAt, user: r.name, role: r.role };
}

export interface Principal {
  user: string;
  role: Role;
  /** How the caller got in: a token over TCP, or the local unix socket. */
  via: 'token' | 'socket';
  tokenHash?: string;
}

export async function authenticate(ctx: ServiceContext, token: string): Promise<Principal> {
  const h = hashToken(token);
  const r = await ctx.db
    .selectFrom('api_tokens as t')
    .innerJoin('users as u', 'u.id', 't.user_id')
    .select(['u.name', 'u.role', 't.expires_at'])
    .where('t.token_hash', '=', h)
    .executeTakeFirst();
  if (!r) throw new BulwarkError('the token is not valid', { kind: 'unauthorized', hint: 'log in again: bulwark login URL' });
  if (r.expires_at < nowIso(ctx)) throw new BulwarkError('the token has expired', { kind: 'unauthorized', hint: 'log in again: bulwark login URL' });
  return { user: r.name, role: r.role, via: 'token', tokenHash: h };
}

export async function logout(ctx: ServiceContext, tokenHash: string): Promise<void> {
  await ctx.db.deleteFrom('api_tokens').where('token_hash', '=', tokenHash).execute();
}

// ---- roles
export type Permission = 'read' | 'read-restore-points' | 'run-jobs' | 'restore' | 'configure';

const rolePermissions: Record<Role, readonly Permission[]> = {
  administrator: ['read', 'read-restore-points', 'run-jobs', 'restore', 'configure'],
  operator: ['read', 'read-restore-points', 'run-jobs', 'restore'],
  'restore-operator': ['read-restore-points', 'restore'],
  viewer: ['read', 'read-restore-points'],
};

export function can(role: Role, p: Permission): boolean {
  return rolePermissions[role].includes(p);
}
