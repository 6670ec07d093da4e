import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fsName, guestLayout, matchFstabSpec, parseFstab, resolveGuestPath } from './guest-paths.js';
import type { MountedFileSystem } from './mount.js';
import { keepBothName, shq } from './restore-files.js';

const fs = (disk: string, partition: number | null, extra: Partial<MountedFileSystem> = {}): MountedFileSystem => ({
  disk,
  partition,
  type: 'ext4',
  path: `/nonexistent/${disk}${partition ?? ''}`,
  offset: 0,
  size: 1,
  ...extra,
});

describe('fstab', () => {
  it('parses entries, skips comments and decodes octal escapes', () => {
    expect(parseFstab('# c\n\nUUID=ab-cd /  ext4 defaults 0 1\nLABEL=My\\040Data /srv/my\\040data xfs ro 0 2\nproc /proc proc defaults 0 0\nbad\n')).toEqual([
      { spec: 'UUID=ab-cd', mountpoint: '/', type: 'ext4' },
      { spec: 'LABEL=My Data', mountpoint: '/srv/my data', type: 'xfs' },
      { spec: 'proc', mountpoint: '/proc', type: 'proc' },
    ]);
  });

  it('matches UUID, LABEL, by-uuid/by-label links and device names (also across sd/vd naming)', () => {
    const a = fs('vda', 1, { uuid: 'AB-CD', label: 'root' });
    const b = fs('vdb', null, { uuid: '1111', label: 'data' });
    const all = [a, b];
    expect(matchFstabSpec('UUID=ab-cd', all)).toBe(a);
    expect(matchFstabSpec('LABEL="data"', all)).toBe(b);
    expect(matchFstabSpec('/dev/disk/by-uuid/1111', all)).toBe(b);
    expect(matchFstabSpec('/dev/disk/by-label/root', all)).toBe(a);
    expect(matchFstabSpec('/dev/vda1', all)).toBe(a);
    expect(matchFstabSpec('/dev/sda1', all)).toBe(a);
    expect(matchFstabSpec('/dev/sdb', all)).toBe(b);
    expect(matchFstabSpec('/dev/vda2', all)).toBeUndefined();
    expect(matchFstabSpec('PARTUUID=x', all)).toBeUndefined();
  });
});

describe('LVM logical volumes', () => {
  it('are named like /dev/mapper and matched by /dev/mapper/VG-LV and /dev/VG/LV, never as a whole disk', () => {
    const root = fs('vda', null, { lv: { vg: 'rhel', name: 'root' } });
    const data = fs('vdb', null, { lv: { vg: 'my-vg', name: 'my+data' } });
    const whole = fs('vdc', null);
    const all = [root, data, whole];
    expect(all.map(fsName)).toEqual(['rhel-root', 'my--vg-my+data', 'vdc']);
    expect(matchFstabSpec('/dev/mapper/rhel-root', all)).toBe(root);
    expect(matchFstabSpec('/dev/rhel/root', all)).toBe(root);
    expect(matchFstabSpec('/dev/mapper/my--vg-my+data', all)).toBe(data);
    expect(matchFstabSpec('/dev/my-vg/my+data', all)).toBe(data);
    expect(matchFstabSpec('/dev/mapper/rhel-swap', all)).toBeUndefined();
    // The LV's first disk is vda, but /dev/vda is not the LV.
    expect(matchFstabSpec('/dev/vda', all)).toBeUndefined();
    expect(matchFstabSpec('/dev/sdc', all)).toBe(whole);
  });

  it('take explicit NAME:/path with their /dev/mapper name', async () => {
    const data = fs('vdb', null, { lv: { vg: 'my-vg', name: 'my+data' } });
    const layout = await guestLayout([data]);
    expect(resolveGuestPath(layout, [data], 'my--vg-my+data:/a b')).toMatchObject({ inside: '/a b', guestPath: '/a b' });
  });
});

describe('guest paths without a recognised root', () => {
  it('asks for FS:/path and resolves explicit names', async () => {
    const a = fs('vdb', 1);
    const layout = await guestLayout([a]);
    expect(layout.root).toBeNull();
    expect(() => resolveGuestPath(layout, [a], '/data/x')).toThrow(/root file system was not recognised/);
    expect(resolveGuestPath(layout, [a], 'vdb1:/data/../x y')).toMatchObject({ inside: '/x y', guestPath: '/x y', hostPath: '/nonexistent/vdb1/x y' });
  });
});

describe('restore-files helpers', () => {
  it('quotes for the shell and names keep-both copies by the point time', () => {
    expect(shq("it's a \"file\" $HOME")).toBe(`'it'\\''s a "file" $HOME'`);
    const t = new Date('2026-11-25T14:55:00.123Z');
    expect(keepBothName('/etc/hosts', t)).toBe('/etc/hosts.restored-20261125T145500Z');
    expect(keepBothName('/etc/hosts', t, 2)).toBe('/etc/hosts.restored-20261125T145500Z-2');
  });
});

describe('guest fstab behind a link', () => {
  it('an /etc/fstab (or /etc) that is a link leaving the file system is not read: it would be this host\'s file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'bulwark-fstab-link-'));
    try {
      // A file on "this host" with fstab-like lines (what a crafted guest link would point at).
      const hostFile = join(dir, 'host-secret');
      await writeFile(hostFile, '/dev/vda1 / ext4 defaults 0 1\nhost-secret-spec /host-secret-path ext4 defaults 0 0\n');
      const a = join(dir, 'a');
      await mkdir(join(a, 'etc'), { recursive: true });
      await symlink(hostFile, join(a, 'etc', 'fstab'));
      const b = join(dir, 'b');
      await mkdir(b);
      await mkdir(join(dir, 'host-etc'));
      await writeFile(join(dir, 'host-etc', 'fstab'), '/dev/vdb1 / ext4 defaults 0 1\nhost-secret-spec2 /host-secret-path2 ext4 defaults 0 0\n');
      await symlink(join(dir, 'host-etc'), join(b, 'etc'));
      const layout = await guestLayout([fs('vda', 1, { path: a }), fs('vdb', 1, { path: b })]);
      expect(JSON.stringify(layout)).not.toMatch(/host-secret/);
      expect(layout.notes.join('\n')).toMatch(/vda1: \/etc\/fstab is a link .* not read/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
