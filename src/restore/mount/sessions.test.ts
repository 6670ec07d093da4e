// MountSessions with mounts held by another process (an agent's mount server, adopted by the
// server): listed, held and undone through the close function they were adopted with; forgotten
// without an unmount when they ended by themselves. No mounts are made here.
import { describe, expect, it } from 'vitest';
import { MountSessions, type MountSessionInfo } from './sessions.js';

const info = (id: string, detached: boolean): MountSessionInfo => ({
  id,
  point: 'p1',
  vm: 'web01',
  time: '2026-11-26T00:00:00.000Z',
  at: `/srv/mnt/${id}`,
  detached,
  createdAt: '2026-11-26T01:00:00.000Z',
  filesystems: [],
  skipped: [],
  warnings: [],
  notes: [],
  agent: 'dst1',
});

describe('MountSessions with adopted mounts', () => {
  it('lists an adopted mount, undoes it through its close function once, and forgets one that ended by itself', async () => {
    const s = new MountSessions({ defaultRoot: '/nonexistent-root', graceMs: 60_000 });
    let closed = 0;
    s.adopt(info('aaaaaaaa-1', true), async () => void closed++);
    s.adopt(info('bbbbbbbb-2', true), async () => {
      throw new Error('must not be called');
    });
    expect(s.list().map((m) => [m.id, m.agent])).toEqual([['aaaaaaaa-1', 'dst1'], ['bbbbbbbb-2', 'dst1']]);
    expect(() => s.pointMount('aaaaaaaa-1')).toThrow(/held by agent dst1/);
    await Promise.all([s.close('aaaaaaaa'), s.close('aaaaaaaa-1')]);
    expect(closed).toBe(1);
    s.forget('bbbbbbbb-2');
    expect(s.list()).toEqual([]);
    expect(() => s.get('bbbbbbbb-2')).toThrow(/no mount bbbbbbbb-2/);
  });

  it('a held adopted mount is undone when its last holder lets go; one nobody holds, after the grace time', async () => {
    const s = new MountSessions({ defaultRoot: '/nonexistent-root', graceMs: 50 });
    const closed: string[] = [];
    s.adopt(info('held-0001', false), async () => void closed.push('held'));
    s.adopt(info('nobody-01', false), async () => void closed.push('nobody'));
    const release = s.hold('held-0001');
    await new Promise((r) => setTimeout(r, 120));
    expect(closed).toEqual(['nobody']);
    release();
    await new Promise((r) => setTimeout(r, 10));
    expect(closed).toEqual(['nobody', 'held']);
    expect(s.list()).toEqual([]);
  });

  it('an unmount that fails leaves the mount listed, and unmount tries again', async () => {
    const s = new MountSessions({ defaultRoot: '/nonexistent-root', graceMs: 60_000 });
    let calls = 0;
    s.adopt(info('cccccccc-3', true), async () => {
      if (++calls === 1) throw new Error('umount: target is busy');
    });
    await expect(s.close('cccccccc-3')).rejects.toThrow(/busy/);
    expect(s.list().map((m) => m.id)).toEqual(['cccccccc-3']);
    await s.close('cccccccc');
    expect(calls).toBe(2);
    expect(s.list()).toEqual([]);
  });
});
