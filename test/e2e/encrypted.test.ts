// Encrypted backups through the product (docs/encryption.md), as a user runs them: a real
// `bulwark server`, one test guest (TCG), the console. A job created with `--encrypt
// --password-hint` (password from a file, kept sealed by the server) backs the guest up twice; its
// repository files hold no plain guest data (a marker written into the guest is not found in them,
// with compression off so it would be); both points restore with no password typed, bit-exact
// (each against a plain export taken of the same frozen disk: the guest's vCPUs are paused for
// the backup and its reference); `mount` and `restore files` of the encrypted point work; an
// encrypted export (its password not kept by the server) restores with `--password-file` (disk,
// files, whole VM; instant recovery of the job's point starts with none), asks
// for it otherwise, and a wrong one is answered "wrong password … (hint: …)"; the database holds
// no password in clear text; `password add` makes the server remember the export's password.
// The job has the guest file index on: its indexes are sealed (no path name in clear) and search
// finds files with the server's password; the export's index (built with --password-file) is
// listed as not searched, with its hint, until `password add`.
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { e2fsckClean, sha256InImage, startTestGuest, type TestGuest } from '../fixtures/guest.js';
import { bulwark, ensureBuilt, startServerProcess, type ServerProcess } from './program.js';

const run = promisify(execFile);
const VM = 'enc-guest';
const JOB_PASSWORD = 'job-Pa55word-7f3a';
const EXPORT_PASSWORD = 'export-Pa55word-c21e';
const MARKER = 'BULWARK-SECURE-E2E-MARKER-4d1f0c';

let tmp: string;
let server: ServerProcess;
let guest: TestGuest;
let env: Record<string, string>;

interface PointJson {
  id: string;
  type: string;
  job: string | null;
  encrypted?: boolean;
  keyKnown?: boolean;
  passwordHint?: string;
}

interface SearchJson {
  matches: Array<{ path: string; versions: Array<{ points: Array<{ id: string }> }> }>;
  pointsLocked: Array<{ id: string; reason: string }>;
}

/** The points holding /srv/enc/two.txt in a search answer. */
const pointsOf = (r: SearchJson): string[] => r.matches.filter((m) => m.path === '/srv/enc/two.txt').flatMap((m) => m.versions.flatMap((v) => v.points.map((p) => p.id)));

async function bw(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return bulwark(args, env);
}

async function bwJson<T>(args: string[]): Promise<T> {
  const r = await bw([...args, '--json']);
  expect(r.code, `${args.join(' ')}: ${r.stderr}${r.stdout}`).toBe(0);
  return JSON.parse(r.stdout) as T;
}

/** Runs `fn` with the guest's vCPUs paused: its disks do not change meanwhile. */
async function paused<T>(fn: () => Promise<T>): Promise<T> {
  const qmp = await guest.control();
  try {
    await qmp.execute('stop');
    try {
      return await fn();
    } finally {
      await qmp.execute('cont');
    }
  } finally {
    await qmp.close();
  }
}

async function restoreDisk(point: string, name: string, ...extra: string[]): Promise<{ path: string; sha256: string }> {
  const to = join(tmp, `${name}.raw`);
  const r = await bwJson<{ sha256: string }>(['restore', 'disk', point, '--disk', 'vda', '--to', to, '--overwrite', '--digest', ...extra]);
  return { path: to, sha256: r.sha256 };
}

async function sha256Of(file: string): Promise<string> {
  const { stdout } = await run('sha256sum', [file]);
  return stdout.split(' ')[0]!;
}

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'bulwark-e2e-enc-'));
  await ensureBuilt();
  guest = await startTestGuest({ name: VM });
  await guest.waitForAgent();
  server = await startServerProcess(join(tmp, 'data'), { simulate: false });
  env = { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: join(tmp, 'config'), HOME: tmp };
  await writeFile(join(tmp, 'job.pw'), `${JOB_PASSWORD}\n`, { mode: 0o600 });
  await writeFile(join(tmp, 'export.pw'), `${EXPORT_PASSWORD}\n`, { mode: 0o600 });
  await writeFile(join(tmp, 'wrong.pw'), 'not-the-password\n', { mode: 0o600 });
  expect((await bw(['host', 'add', 'kvm1', '--qemu', guest.qmpSocket])).code).toBe(0);
}, 300_000);

afterAll(async () => {
  if (server) await server.stop();
  await guest?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('encrypted job, restores and export', () => {
  const points: Record<string, string> = {};
  const refs: Record<string, string> = {};
  const markers: Record<string, string> = {};

  it('an encrypted job backs up twice; the repository holds no plain guest data', async () => {
    const created = await bw(['job', 'create', 'secure', '--vm', VM, '--repo', 'default', '--compress', 'none', '--retries', '0', '--file-index', '--encrypt', '--password-hint', 'the usual one', '--password-file', join(tmp, 'job.pw')]);
    expect(created.code, created.stderr).toBe(0);
    expect(created.stdout).toMatch(/encrypted/);
    expect((await bw(['job', 'show', 'secure'])).stdout).toMatch(/encryption:\s+on \(hint: the usual one/);

    for (const [i, name] of ['one', 'two'].entries()) {
      markers[name] = (await guest.sh(`mkdir -p /srv/enc && for i in $(seq 1 2000); do echo "${MARKER} ${name} $i"; done > /srv/enc/${name}.txt && sync && sha256sum /srv/enc/${name}.txt`)).split(' ')[0]!;
      await paused(async () => {
        const s = await bwJson<{ state: string; log: Array<{ message: string }> }>(['job', 'run', 'secure', '--wait']);
        expect(s.state, s.log.map((l) => l.message).join('\n')).toMatch(/success|warning/);
        const list = (await bwJson<PointJson[]>(['restore-point', 'list', '--vm', VM])).filter((p) => p.job === 'secure');
        expect(list).toHaveLength(i + 1);
        points[name] = list[0]!.id;
        // The reference: a plain export of the same frozen disk.
        const ref = await bwJson<{ pointId: string }>(['export', VM, '--repo', 'default', '--compress', 'none']);
        refs[name] = (await restoreDisk(ref.pointId, `ref-${name}`)).sha256;
        if (name === 'two') {
          const enc = await bwJson<{ pointId: string; encrypted: boolean }>(['export', VM, '--repo', 'default', '--compress', 'none', '--encrypt', '--password-file', join(tmp, 'export.pw'), '--password-hint', 'the export one']);
          expect(enc.encrypted).toBe(true);
          points.export = enc.pointId;
        }
      });
    }
    const list = await bwJson<PointJson[]>(['restore-point', 'list', '--vm', VM]);
    const byId = new Map(list.map((p) => [p.id, p]));
    expect(byId.get(points.one!)).toMatchObject({ type: 'full', job: 'secure', encrypted: true, keyKnown: true, passwordHint: 'the usual one' });
    expect(byId.get(points.two!)).toMatchObject({ type: 'incremental', job: 'secure', encrypted: true, keyKnown: true });
    expect(byId.get(points.export!)).toMatchObject({ job: null, encrypted: true, keyKnown: false, passwordHint: 'the export one' });
    expect(list.filter((p) => !p.encrypted)).toHaveLength(2); // the plain references
    expect((await bw(['restore-point', 'list', '--vm', VM])).stdout).toMatch(/yes, password needed/);

    // The marker is in the guest disk (a plain export stores it in clear, compression off) but in
    // no file of the encrypted job's folder nor of the encrypted export's.
    const repo = join(server.dataDir, 'repository');
    const folders = await readdir(repo);
    const plainExport = folders.find((f) => f.startsWith('_export-'))!;
    expect((await run('grep', ['-rlF', MARKER, join(repo, plainExport)])).stdout).not.toBe('');
    const encrypted = ['secure'];
    for (const f of folders.filter((x) => x.startsWith('_export-'))) {
      const vbm = await readFile(join(repo, f, VM, `${VM}.vbm`));
      if (vbm.includes(Buffer.from(points.export!))) encrypted.push(f);
    }
    expect(encrypted).toHaveLength(2);
    // The hints travel with the chains (their .vbm), for a repository imported elsewhere.
    expect((await readFile(join(repo, 'secure', VM, `${VM}.vbm`))).includes(Buffer.from('the usual one'))).toBe(true);
    expect((await readFile(join(repo, encrypted[1]!, VM, `${VM}.vbm`))).includes(Buffer.from('the export one'))).toBe(true);
    for (const f of encrypted) {
      const grep = await run('grep', ['-rlF', MARKER, join(repo, f)]).then(
        (r) => ({ code: 0, out: r.stdout }),
        (e: { code?: number; stdout?: string }) => ({ code: e.code ?? -1, out: e.stdout ?? '' }),
      );
      expect(grep, `plain guest data in ${f}`).toEqual({ code: 1, out: '' });
    }
    // The job's guest file indexes are sealed (docs/formats/file-index.md): no guest path name in
    // clear, yet search finds the file in both points with the password the server keeps.
    const secure = join(repo, 'secure', VM);
    expect((await readdir(secure)).filter((n) => n.endsWith('.files.gz')).sort()).toEqual([`${points.one}.files.gz`, `${points.two}.files.gz`].sort());
    // (a clear index is a gzip stream, where a name need not appear literally: check the form too)
    for (const id of [points.one!, points.two!]) {
      const index = await readFile(join(secure, `${id}.files.gz`));
      expect(index.subarray(0, 2).equals(Buffer.from([0x1f, 0x8b])), `${id}.files.gz is a clear gzip index`).toBe(false);
      expect(() => gunzipSync(index)).toThrow();
    }
    const names = await run('grep', ['-rlF', 'random-3m.bin', join(repo, 'secure')]).then(
      (r) => r.stdout,
      (e: { code?: number; stdout?: string }) => (e.code === 1 ? '' : `grep failed: ${e.code}`),
    );
    expect(names, 'a guest file name in clear in the encrypted job folder').toBe('');
    const found = await bwJson<{ matches: Array<{ path: string; versions: Array<{ points: Array<{ id: string }> }> }>; pointsLocked: unknown[] }>(['search', 'one.txt', '--vm', VM]);
    expect(found.pointsLocked).toEqual([]);
    expect(found.matches.map((m) => [m.path, m.versions.flatMap((v) => v.points.map((p) => p.id))])).toEqual([['/srv/enc/one.txt', [points.one, points.two]]]);
  });

  it('both points of the job restore bit-exact with no password typed', async () => {
    const one = await restoreDisk(points.one!, 'one');
    const two = await restoreDisk(points.two!, 'two');
    expect(one.sha256).toBe(refs.one);
    expect(two.sha256).toBe(refs.two);
    expect(await sha256Of(two.path)).toBe(two.sha256);
    await e2fsckClean(two.path);
    expect(await sha256InImage(one.path, '/srv/enc/one.txt')).toBe(markers.one);
    expect(await sha256InImage(one.path, '/srv/enc/two.txt')).toBeUndefined();
    expect(await sha256InImage(two.path, '/srv/enc/two.txt')).toBe(markers.two);
  });

  it('mount and restore files of the encrypted point work with no password typed', async () => {
    const out = join(tmp, 'files');
    const r = await bwJson<{ files: number }>(['restore', 'files', points.two!, '--path', '/srv/enc', '--to', out]);
    expect(r.files).toBe(2);
    expect(await sha256Of(join(out, 'enc', 'one.txt'))).toBe(markers.one);
    expect(await sha256Of(join(out, 'enc', 'two.txt'))).toBe(markers.two);

    const m = await bwJson<{ id: string; filesystems: Array<{ path: string; mountpoint?: string }> }>(['mount', points.two!, '--detach']);
    try {
      const root = m.filesystems.find((f) => f.mountpoint === '/') ?? m.filesystems[0]!;
      expect(await sha256Of(join(root.path, 'srv', 'enc', 'two.txt'))).toBe(markers.two);
    } finally {
      expect((await bw(['mount', 'unmount', m.id])).code).toBe(0);
    }
  });

  it('an encrypted export restores with --password-file; without it the hint is shown; a wrong one is "wrong password (hint: …)"', async () => {
    const none = await bw(['restore', 'disk', points.export!, '--disk', 'vda', '--to', join(tmp, 'x.raw')]);
    expect(none.code).toBe(1);
    expect(none.stderr).toContain(`restore point ${points.export} is encrypted and this server does not know its password (hint: the export one)`);
    expect(none.stderr).toMatch(/--password-file/);

    const wrong = await bw(['restore', 'disk', points.export!, '--disk', 'vda', '--to', join(tmp, 'x.raw'), '--password-file', join(tmp, 'wrong.pw')]);
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toContain(`wrong password for restore point ${points.export} (hint: the export one)`);
    expect(wrong.stderr).not.toMatch(/corrupt|damaged/i);
    const wrongJob = await bw(['mount', points.one!, '--detach', '--password-file', join(tmp, 'wrong.pw')]);
    expect(wrongJob.code).toBe(1);
    expect(wrongJob.stderr).toContain(`wrong password for restore point ${points.one} (hint: the usual one)`);

    const ok = await restoreDisk(points.export!, 'export', '--password-file', join(tmp, 'export.pw'));
    expect(ok.sha256).toBe(refs.two);
    const files = await bwJson<{ files: number }>(['restore', 'files', points.export!, '--path', '/srv/enc/two.txt', '--to', join(tmp, 'export-files'), '--password-file', join(tmp, 'export.pw')]);
    expect(files.files).toBe(1);
    expect(await sha256Of(join(tmp, 'export-files', 'two.txt'))).toBe(markers.two);

    // Its guest file index, built with the password given, is sealed; search cannot open it (the
    // server does not know the password) and names the point with the hint instead.
    expect(await bwJson<{ sealed: boolean }>(['index', points.export!, '--password-file', join(tmp, 'export.pw')])).toMatchObject({ sealed: true });
    const locked = await bwJson<SearchJson>(['search', 'two.txt', '--vm', VM]);
    expect(locked.pointsLocked).toEqual([expect.objectContaining({ id: points.export, reason: expect.stringContaining('(hint: the export one)') })]);
    expect(pointsOf(locked)).toEqual([points.two]);
    expect((await bw(['search', 'two.txt', '--vm', VM])).stdout).toContain(`not searched: ${VM} ${points.export}`);
  });

  it('restore vm and instant recovery of encrypted points: the job\'s with no password, the export\'s with --password-file', async () => {
    const vmr = await bwJson<{ state: string; result: { disks: Array<{ name: string; sha256: string }> } }>(['restore', 'vm', points.two!, '--name', 'enc-copy', '--format', 'raw', '--storage', join(tmp, 'enc-copy'), '--digest']);
    expect(vmr.state).toBe('success');
    expect(vmr.result.disks).toEqual([expect.objectContaining({ name: 'vda', sha256: refs.two })]);
    const none = await bw(['restore', 'vm', points.export!, '--name', 'enc-copy2', '--format', 'raw', '--storage', join(tmp, 'enc-copy2')]);
    expect(none.code).toBe(1);
    expect(none.stderr).toContain('(hint: the export one)');
    const vme = await bwJson<{ state: string; result: { disks: Array<{ sha256: string }> } }>(['restore', 'vm', points.export!, '--name', 'enc-copy2', '--format', 'raw', '--storage', join(tmp, 'enc-copy2'), '--password-file', join(tmp, 'export.pw'), '--digest']);
    expect(vme.result.disks[0]!.sha256).toBe(refs.two);

    const ir = await bwJson<{ id: string; runningFromBackup: boolean; point: string }>(['instant-recovery', 'start', points.one!, '--name', 'enc-ir']);
    try {
      expect(ir).toMatchObject({ runningFromBackup: true, point: points.one });
    } finally {
      expect((await bw(['instant-recovery', 'stop', ir.id])).code).toBe(0);
    }
    const irWrong = await bw(['instant-recovery', 'start', points.export!, '--name', 'enc-ir2', '--password-file', join(tmp, 'wrong.pw')]);
    expect(irWrong.code).toBe(1);
    expect(irWrong.stderr).toContain(`wrong password for restore point ${points.export} (hint: the export one)`);
  });

  it('the server keeps no password in clear text: database and server key file', async () => {
    const data = server.dataDir;
    expect((await stat(join(data, 'secret.key'))).mode & 0o777).toBe(0o600);
    for (const f of (await readdir(data)).filter((n) => n.startsWith('bulwark.db'))) {
      const bytes = await readFile(join(data, f));
      for (const p of [JOB_PASSWORD, EXPORT_PASSWORD]) expect(bytes.includes(Buffer.from(p)), `${p} in ${f}`).toBe(false);
    }
    const keys = await bwJson<Array<{ hint: string; job: string | null; active: boolean; chains: number }>>(['password', 'list']);
    expect(keys).toEqual([expect.objectContaining({ hint: 'the usual one', job: 'secure', active: true, chains: 1 })]);
  });

  it('password add: the server remembers the export\'s password and restores it with none typed', async () => {
    const added = await bwJson<{ id: string; chains: number }>(['password', 'add', '--hint', 'the export one', '--password-file', join(tmp, 'export.pw')]);
    expect(added.chains).toBe(1);
    const p = (await bwJson<PointJson[]>(['restore-point', 'list', '--vm', VM])).find((x) => x.id === points.export);
    expect(p).toMatchObject({ encrypted: true, keyKnown: true });
    expect((await restoreDisk(points.export!, 'export-known')).sha256).toBe(refs.two);
    const found = await bwJson<SearchJson>(['search', 'two.txt', '--vm', VM]);
    expect(found.pointsLocked).toEqual([]);
    expect(pointsOf(found).sort()).toEqual([points.two, points.export].sort());
    const removed = await bw(['password', 'remove', added.id]);
    expect(removed.code).toBe(1);
    expect(removed.stderr).toMatch(/opens 1 encrypted chain/);
  });
});
