import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AgentMountsState, type AgentMountEntry } from './agent-mounts-state.js';

const mount = (id: string, serve?: { agent: string; taskId: string }): AgentMountEntry['mount'] => ({
  id,
  point: 'p1',
  vm: 'web1',
  time: '2026-11-26T09:00:00.000Z',
  at: `/srv/restore/${id}`,
  detached: true,
  createdAt: '2026-11-26T09:10:00.000Z',
  filesystems: [{ name: 'vda1', disk: 'vda', partition: 1, type: 'ext4', path: `/srv/restore/${id}/vda1` }],
  skipped: [],
  warnings: [],
  notes: [],
  taskId: `task-${id}`,
  ...(serve ? { serve } : {}),
});

describe('AgentMountsState (docs/formats/agent-mounts.md)', () => {
  let dir: string;
  let file: string;
  beforeEach(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'bulwark-agent-mounts-'));
    file = path.join(dir, 'agent-mounts.json');
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('writes every change whole (mode 0600) and a new process reads back what is held', async () => {
    const s = new AgentMountsState(file);
    expect(await s.load()).toEqual([]);
    await s.add({ agent: 'dst1', host: 'kvm-b', mount: mount('m1', { agent: 'repo1', taskId: 'serve-1' }) });
    await s.add({ agent: 'repo1', mount: mount('m2') });
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const onDisk = JSON.parse(readFileSync(file, 'utf8')) as { format: string; mounts: AgentMountEntry[] };
    expect(onDisk.format).toBe('bulwark agent mounts v1');
    expect(onDisk.mounts.map((m) => [m.agent, m.host, m.mount.id, m.mount.serve?.taskId])).toEqual([
      ['dst1', 'kvm-b', 'm1', 'serve-1'],
      ['repo1', undefined, 'm2', undefined],
    ]);
    await s.remove('m1');
    await s.remove('no-such-mount');
    const next = new AgentMountsState(file);
    expect((await next.load()).map((e) => e.mount.id)).toEqual(['m2']);
    expect(next.list().map((e) => e.mount.id)).toEqual(['m2']);
  });

  it('changes made one after another without waiting land in order (the last one wins on disk)', async () => {
    const s = new AgentMountsState(file);
    const writes = [s.add({ agent: 'a', mount: mount('x') }), s.add({ agent: 'a', mount: mount('y') }), s.remove('x')];
    await Promise.all(writes);
    expect((await new AgentMountsState(file).load()).map((e) => e.mount.id)).toEqual(['y']);
  });

  it.each([
    ['not JSON', '{"format": "bulwark agent mounts v1", "mounts": ['],
    ['another format', JSON.stringify({ format: 'bulwark agent mounts v2', mounts: [] })],
    ['an entry without its task', JSON.stringify({ format: 'bulwark agent mounts v1', mounts: [{ agent: 'dst1', mount: { ...mount('m1'), taskId: undefined } }] })],
    ['a serve task without its id', JSON.stringify({ format: 'bulwark agent mounts v1', mounts: [{ agent: 'dst1', mount: mount('m1', { agent: 'repo1', taskId: '' }) }] })],
  ])('a file with %s is ignored (nothing adopted from it), and the next change rewrites it', async (_what, text) => {
    writeFileSync(file, text);
    const s = new AgentMountsState(file);
    expect(await s.load()).toEqual([]);
    await s.add({ agent: 'dst1', mount: mount('m3') });
    expect((await new AgentMountsState(file).load()).map((e) => e.mount.id)).toEqual(['m3']);
  });
});
