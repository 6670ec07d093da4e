// restoreFilesToGuest's order of work, with a stand-in guest agent that runs the guest's shell and
// file commands on this host (guest paths are under a temp folder here). The real agent is used
// by test/e2e/files.test.ts and test/e2e/recovery-libvirt.test.ts; this checks what a failure
// halfway leaves behind, which those cannot provoke: a write that fails must not leave the guest's
// own files truncated or half-restored.
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestAgent } from '../../hypervisor/qga/guest-agent.js';
import type { MountedFileSystem } from './mount.js';
import type { PointIdentity, PointMount } from './point-mount.js';
import { copyOut } from './copy-out.js';
import { restoreFilesToDir, restoreFilesToGuest } from './restore-files.js';

/** Runs guest-exec and the guest-file commands here; fails writes to files whose name matches `failOn`. */
class LocalGuestAgent extends GuestAgent {
  readonly label = 'local stand-in';
  readonly timeoutMs = 10_000;
  override readonly maxWriteBytes = 4096;
  readonly #files = new Map<number, { fd: number; path: string; written: number }>();
  readonly #done = new Map<number, { exitcode: number; out: string; err: string }>();
  #next = 1;
  constructor(readonly failOn?: RegExp) {
    super();
  }
  async execute<T = unknown>(command: string, args: Record<string, unknown> = {}): Promise<T> {
    const id = this.#next++;
    switch (command) {
      case 'guest-exec': {
        const r = spawnSync(args.path as string, args.arg as string[], { encoding: 'buffer' });
        this.#done.set(id, { exitcode: r.status ?? -1, out: r.stdout.toString('base64'), err: r.stderr.toString('base64') });
        return { pid: id } as T;
      }
      case 'guest-exec-status': {
        const r = this.#done.get(args.pid as number)!;
        return { exited: true, exitcode: r.exitcode, 'out-data': r.out, 'err-data': r.err } as T;
      }
      case 'guest-file-open':
        this.#files.set(id, { fd: openSync(args.path as string, (args.mode as string) === 'w' ? 'w' : 'r'), path: args.path as string, written: 0 });
        return id as T;
      case 'guest-file-write': {
        const f = this.#files.get(args.handle as number)!;
        const data = Buffer.from(args['buf-b64'] as string, 'base64');
        if (this.failOn?.test(f.path) && f.written > 0) throw new Error(`guest-file-write to ${f.path}: the agent did not answer`);
        f.written += writeSync(f.fd, data);
        return { count: data.length, eof: false } as T;
      }
      case 'guest-file-flush':
        return {} as T;
      case 'guest-file-close': {
        const f = this.#files.get(args.handle as number);
        if (f) closeSync(f.fd);
        this.#files.delete(args.handle as number);
        return {} as T;
      }
      default:
        throw new Error(`the stand-in does not know ${command}`);
    }
  }
  async close(): Promise<void> {}
}

let dir: string;
let host: string;
let guestRoot: string;
let m: PointMount<PointIdentity>;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bulwark-to-guest-'));
  host = join(dir, 'point'); // the mounted restore point
  guestRoot = join(dir, 'guest'); // the running guest's /srv
  await mkdir(join(host, 'x'), { recursive: true });
  await writeFile(join(host, 'x', 'a.txt'), 'restored a\n');
  await writeFile(join(host, 'x', 'b.bin'), Buffer.alloc(3 * 4096 + 5, 7));
  await mkdir(join(guestRoot, 'x'), { recursive: true });
  await writeFile(join(guestRoot, 'x', 'a.txt'), 'guest a\n');
  await writeFile(join(guestRoot, 'x', 'b.bin'), 'guest b\n');
  const fs = { disk: 'vda', partition: 1, type: 'ext4', path: host, offset: 0, size: 1 } as MountedFileSystem;
  m = {
    point: { id: 'p1', vm: 'g', time: new Date('2026-11-25T10:00:00Z') },
    mount: { at: dir, filesystems: [fs], skipped: [], warnings: [], volumes: [fs], readFailures: [], mountVolumes: async () => [], copyOut: (paths: readonly string[], to: string) => copyOut(paths, to), unmount: async () => undefined },
    layout: { root: null, mounts: [{ mountpoint: guestRoot, fs }], notes: [] },
    close: async () => undefined,
  };
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('restoreFilesToGuest', () => {
  it('overwrite: the files land in place with their contents', async () => {
    const r = await restoreFilesToGuest(m, [join(guestRoot, 'x')], new LocalGuestAgent(), { conflict: 'overwrite' });
    expect(r.files).toBe(2);
    expect(await readFile(join(guestRoot, 'x', 'a.txt'), 'utf8')).toBe('restored a\n');
    expect((await readFile(join(guestRoot, 'x', 'b.bin'))).equals(Buffer.alloc(3 * 4096 + 5, 7))).toBe(true);
    expect((await readdir(join(guestRoot, 'x'))).sort()).toEqual(['a.txt', 'b.bin']);
  });

  it('a write that fails halfway leaves every guest file as it was, and no partial copy', async () => {
    await expect(restoreFilesToGuest(m, [join(guestRoot, 'x')], new LocalGuestAgent(/b\.bin/), { conflict: 'overwrite' })).rejects.toThrow(/b\.bin/);
    expect(await readFile(join(guestRoot, 'x', 'a.txt'), 'utf8')).toBe('guest a\n');
    expect(await readFile(join(guestRoot, 'x', 'b.bin'), 'utf8')).toBe('guest b\n');
    expect((await readdir(join(guestRoot, 'x'))).sort()).toEqual(['a.txt', 'b.bin']);
  });

  it('a guest path through a guest link that leaves its file system is refused: it would read this host\'s files', async () => {
    // The guest's srv/data is a link to an absolute path: inside the guest it is the guest's /etc,
    // on this host it is this host's folder of that name.
    const hostSecrets = join(dir, 'host-etc');
    await mkdir(hostSecrets);
    await writeFile(join(hostSecrets, 'shadow'), 'host secret');
    await symlink(hostSecrets, join(host, 'data'));
    const out = join(dir, 'out');
    const tried = restoreFilesToDir(m, [join(guestRoot, 'data', 'shadow')], out);
    await expect(tried).rejects.toMatchObject({ kind: 'invalid' });
    await expect(tried).rejects.toThrow(/passes through a link in the guest that points outside its file system/);
    await expect(readdir(out)).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(restoreFilesToGuest(m, [join(guestRoot, 'data', 'shadow')], new LocalGuestAgent(), { conflict: 'overwrite' })).rejects.toThrow(/points outside its file system/);
    // The link itself is restored as a link, never followed.
    const r = await restoreFilesToDir(m, [join(guestRoot, 'data')], join(dir, 'links'));
    expect(r.symlinks).toBe(1);
    expect(await readFile(join(guestRoot, 'x', 'a.txt'), 'utf8')).toBe('guest a\n');
  });
});
