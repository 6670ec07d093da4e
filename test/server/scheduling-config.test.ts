// The scheduling configuration on both database engines: server settings with versions, agent
// and repository task limits with their defaults, and what the resource scheduler reads from them
// (loadResourceConfig): proxies with their hosts and online state, repository limits and rates.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadResourceConfig, MB } from '../../src/server/resources/database-slots.js';
import type { ServiceContext } from '../../src/server/services/common.js';
import * as infra from '../../src/server/services/infrastructure.js';
import { getSettings, updateSettings } from '../../src/server/services/settings.js';
import { bulwarkRejection, engines, openTestContext } from './engines.js';

const rejection = bulwarkRejection;

describe.each(engines)('scheduling configuration on %s', (engine) => {
  let t: Awaited<ReturnType<typeof openTestContext>>;
  let ctx: ServiceContext;
  beforeAll(async () => {
    t = await openTestContext(engine);
    ctx = t.ctx;
  });
  afterAll(async () => {
    await t?.close();
  });

  it('settings: defaults at version 1, edits bump the version, a stale edit is refused', async () => {
    expect(await getSettings(ctx)).toEqual({ processing: 'parallel', restoreFolders: [], version: 1, updatedAt: null });
    expect(await updateSettings(ctx, { version: 1, processing: 'sequential' })).toMatchObject({ processing: 'sequential', version: 2 });
    expect((await rejection(updateSettings(ctx, { version: 1, processing: 'parallel' }))).kind).toBe('conflict');
    expect(await updateSettings(ctx, { version: 2, processing: 'parallel' })).toMatchObject({ processing: 'parallel', version: 3 });
    // Restore folders (decision 0009): stored normalized, once each; the other setting is kept.
    expect(await updateSettings(ctx, { version: 3, restoreFolders: ['/srv/restore/', '/srv/x/../restore', '/var/lib/libvirt/images'] })).toMatchObject({
      processing: 'parallel',
      restoreFolders: ['/srv/restore', '/var/lib/libvirt/images'],
      version: 4,
    });
    expect(await updateSettings(ctx, { version: 4, processing: 'sequential' })).toMatchObject({ processing: 'sequential', restoreFolders: ['/srv/restore', '/var/lib/libvirt/images'] });
    expect(await updateSettings(ctx, { version: 5, processing: 'parallel', restoreFolders: [] })).toMatchObject({ processing: 'parallel', restoreFolders: [] });
  });

  it('task limits default to the CPU cores (agent) and to the cores of its agent (repository)', async () => {
    await infra.registerAgent(ctx, { name: 'p1', hostname: 'p1.example', agentVersion: '0', cores: 6, certFingerprint: null });
    await infra.registerAgent(ctx, { name: 'p2', hostname: 'p2.example', agentVersion: '0', cores: 3, certFingerprint: null });
    expect(await infra.getAgent(ctx, 'p1')).toMatchObject({ maxTasks: 6, maxTasksSetting: null });
    const edited = await infra.updateAgent(ctx, 'p1', { version: 1, maxTasks: 2 });
    expect(edited).toMatchObject({ maxTasks: 2, maxTasksSetting: 2, version: 2 });
    await infra.createHost(ctx, { name: 'h1', kind: 'qemu', uri: '/run/h1/*.qmp', agent: 'p1' });
    const repo = await infra.createRepository(ctx, { name: 'r1', path: '/srv/r1', agent: 'p2', writeRateMBps: 300 });
    expect(repo).toMatchObject({ maxTasks: 3, maxTasksSetting: null });
    expect(await infra.updateRepository(ctx, 'r1', { version: 1, maxTasks: 5 })).toMatchObject({ maxTasks: 5, maxTasksSetting: 5 });
    expect(await infra.updateRepository(ctx, 'r1', { version: 2, maxTasks: null })).toMatchObject({ maxTasks: 3, maxTasksSetting: null });

    const c = await loadResourceConfig(ctx, { name: 'local', cores: 4, inProcess: true });
    expect(c.mode).toBe('parallel');
    expect(c.proxies).toEqual([
      { name: 'p1', host: 'p1.example', hosts: ['h1', 'agent:p1'], online: true, maxTasks: 2, reaches: [] },
      { name: 'p2', host: 'p2.example', hosts: ['agent:p2'], online: true, maxTasks: 3, reaches: [] },
      // Not enrolled: the server's own data path, on hosts without an agent and unknown hosts.
      { name: 'local', host: '', hosts: ['agent:local', ''], online: true, maxTasks: 4, reaches: [] },
    ]);
    expect(c.repositories).toEqual([{ name: 'r1', maxTasks: 3, rateLimit: 300 * MB }]);
    expect(c.hostByUri.get('/run/h1/*.qmp')).toBe('h1');

    // An agent silent for more than 90 s is offline; a revoked one too.
    t.clock.advance(91_000);
    await infra.updateAgent(ctx, 'p2', { version: 1, state: 'revoked' });
    const later = await loadResourceConfig(ctx, { name: 'local', cores: 4, inProcess: true });
    expect(later.proxies.map((p) => [p.name, p.online])).toEqual([
      ['p1', false],
      ['p2', false],
      ['local', true],
    ]);
  });
});
