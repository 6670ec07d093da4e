import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../common/errors.js';
import { openSharedRepository } from './open-shared.js';

const dir = await mkdtemp(path.join(tmpdir(), 'bulwark-open-shared-'));
afterAll(async () => rm(dir, { recursive: true, force: true }));

describe('openSharedRepository', () => {
  it('opens a folder once per process, by its absolute path', async () => {
    const root = path.join(dir, 'a');
    const first = await openSharedRepository(root, { create: true });
    expect(await openSharedRepository(root)).toBe(first);
    expect(await openSharedRepository(path.join(dir, 'x', '..', 'a'))).toBe(first);
    expect(await openSharedRepository(path.join(dir, 'b'), { create: true })).not.toBe(first);
  });

  it('does not keep a failed open, and opens a folder that went away again (naming it)', async () => {
    const root = path.join(dir, 'c');
    const missing = await openSharedRepository(root).catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(BulwarkError);
    expect((missing as BulwarkError).kind).toBe('not-found');
    await mkdir(root);
    const opened = await openSharedRepository(root);
    await rm(root, { recursive: true });
    const gone = await openSharedRepository(root).catch((e: unknown) => e);
    expect((gone as BulwarkError).message).toContain(`repository folder ${root} does not exist`);
    await mkdir(root);
    const again = await openSharedRepository(root);
    expect(again).not.toBe(opened);
    expect(again.root).toBe(root);
  });
});
