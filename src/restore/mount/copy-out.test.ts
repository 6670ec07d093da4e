// copyOut on plain folders (no mounts needed): what it keeps, what it skips, when it refuses.
import { chmod, lstat, mkdir, mkdtemp, readFile, readlink, rm, symlink, utimes, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { copyOut } from './copy-out.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bulwark-copyout-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('copyOut', () => {
  it('keeps modes (set-id too), times of files and folders, symlinks as links; skips sockets', async () => {
    const src = join(dir, 'src folder');
    await mkdir(join(src, 'sub dir'), { recursive: true });
    await writeFile(join(src, 'sub dir', 'a file.txt'), 'abc');
    await chmod(join(src, 'sub dir', 'a file.txt'), 0o4751);
    await symlink('../nowhere', join(src, 'dangling link'));
    const sock = createServer();
    await new Promise<void>((r) => sock.listen(join(src, 'sock'), r));
    const t = new Date('2020-02-02T02:02:02Z');
    await utimes(join(src, 'sub dir', 'a file.txt'), t, t);
    await utimes(join(src, 'sub dir'), t, t);
    await chmod(join(src, 'sub dir'), 0o2750);

    const out = join(dir, 'out');
    const report = await copyOut([src], out);
    await new Promise<void>((r) => sock.close(() => r()));
    expect(report).toMatchObject({ files: 1, directories: 2, symlinks: 1, bytes: 3 });
    expect(report.skipped.map((s) => s.path)).toEqual([join(src, 'sock')]);

    const f = await lstat(join(out, 'src folder', 'sub dir', 'a file.txt'));
    expect(f.mode & 0o7777).toBe(0o4751);
    expect(f.mtime.toISOString()).toBe(t.toISOString());
    expect(await readFile(join(out, 'src folder', 'sub dir', 'a file.txt'), 'utf8')).toBe('abc');
    const d = await lstat(join(out, 'src folder', 'sub dir'));
    expect(d.mode & 0o7777).toBe(0o2750);
    expect(d.mtime.toISOString()).toBe(t.toISOString());
    expect(await readlink(join(out, 'src folder', 'dangling link'))).toBe('../nowhere');
  });

  it('refuses to replace existing files unless asked, and names a missing source', async () => {
    const a = join(dir, 'a');
    await writeFile(a, 'new');
    const out = join(dir, 'out');
    await mkdir(out);
    await writeFile(join(out, 'a'), 'old');
    await expect(copyOut([a], out)).rejects.toMatchObject({ kind: 'conflict', message: expect.stringMatching(/out\/a already exists/) });
    expect(await readFile(join(out, 'a'), 'utf8')).toBe('old');
    await copyOut([a], out, { overwrite: true });
    expect(await readFile(join(out, 'a'), 'utf8')).toBe('new');
    await expect(copyOut([join(dir, 'missing')], out)).rejects.toMatchObject({ kind: 'not-found' });
  });

  it('never writes through a link already at the destination (a guest link from an earlier restore into the same folder)', async () => {
    // Outside the restore folder: what a guest's links point at.
    const victim = join(dir, 'victim');
    await mkdir(victim);
    await writeFile(join(victim, 'shadow'), 'host secret');
    const out = join(dir, 'out');
    // First restore of guest folder `x`: its `etc` is a link to the victim folder, `passwd` a link to a victim file.
    const first = join(dir, 'p1', 'x');
    await mkdir(first, { recursive: true });
    await symlink(victim, join(first, 'etc'));
    await symlink(join(victim, 'shadow'), join(first, 'passwd'));
    await copyOut([first], out);
    // A later point of the same guest folder: `etc` is a folder, `passwd` a file.
    const second = join(dir, 'p2', 'x');
    await mkdir(join(second, 'etc'), { recursive: true });
    await writeFile(join(second, 'etc', 'shadow'), 'from the guest');
    await writeFile(join(second, 'etc', 'cron-job'), 'from the guest');
    await writeFile(join(second, 'passwd'), 'from the guest');
    // Without overwrite: refused, and nothing written through the links.
    await expect(copyOut([second], out)).rejects.toMatchObject({ kind: 'conflict' });
    // With overwrite: the links are replaced by what the point holds.
    await copyOut([second], out, { overwrite: true });
    expect(await readFile(join(victim, 'shadow'), 'utf8')).toBe('host secret');
    await expect(lstat(join(victim, 'cron-job'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect((await lstat(join(out, 'x', 'etc'))).isDirectory()).toBe(true);
    expect(await readFile(join(out, 'x', 'etc', 'shadow'), 'utf8')).toBe('from the guest');
    expect((await lstat(join(out, 'x', 'passwd'))).isFile()).toBe(true);
    expect(await readFile(join(out, 'x', 'passwd'), 'utf8')).toBe('from the guest');
  });
});
