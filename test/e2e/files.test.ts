// File-level restore end to end, as a user runs it: a real `bulwark server` (real data path), one
// running test guest (TCG) with its ext4 root (vda) plus two data disks filled before the
// backups: vdb with an MBR table (ext4 + xfs), vdc with a GPT table (ext4 + vfat + btrfs), and
// vdd (MBR) + vde (GPT) whose partitions are the two PVs of one LVM volume group (an ext4 LV in two
// segments, an xfs LV, an ext4 LV striped over both disks), made by LVM's tools without device-mapper.
// A job with the guest file index on runs three times (a file changes between runs); then, all
// through the console: `search` finds the file across the three points and names the points of
// each version; `restore files` copies from the ext4 root by guest path and from the MBR and GPT
// partitions by FS:/path (contents, modes, times, symlinks, names with spaces); `mount` holds a
// read-only view until SIGINT, `mount --detach` until `mount unmount`; `restore files
// --to-guest` writes back into the running guest (fail / overwrite / keep-both).
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestGuest, type TestGuest } from '../fixtures/guest.js';
import { describeTree, makeGptDisk, makeMbrDisk, makeSourceTree, MiB, mountsUnder, type TreeEntry } from '../restore/fixtures.js';
import { makeLvmDisks, type LvmDisks } from '../restore/lvm-fixtures.js';
import { bulwark, ensureBuilt, program, startServerProcess, type ServerProcess } from './program.js';

const run = promisify(execFile);
let tmp: string;
let server: ServerProcess;
let guest: TestGuest;
let env: Record<string, string>;
let sourceTree: Record<string, TreeEntry>;
const VM = 'files-guest';
const points: Array<{ id: string; time: string }> = [];

const sha = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'bulwark-e2e-files-'));
  const src = join(tmp, 'src');
  await mkdir(src);
  await makeSourceTree(src);
  sourceTree = await describeTree(src);
  const mbr = join(tmp, 'mbr.raw');
  const gpt = join(tmp, 'gpt.raw');
  let lvm: LvmDisks | undefined;
  await Promise.all([ensureBuilt(), makeMbrDisk(mbr, src, tmp), makeGptDisk(gpt, src, tmp), makeLvmDisks(tmp, src, src).then((l) => (lvm = l))]);
  // The GPT disk's ESP (vfat, p2 at 33 MiB) gets files too: read with mtools where the kernel has no vfat.
  await run('mcopy', ['-s', '-p', '-m', '-i', `${gpt}@@${33 * MiB}`, join(src, 'dir with spaces'), '::/'], { env: { ...process.env, MTOOLS_SKIP_CHECK: '1' } });
  guest = await startTestGuest({
    name: VM,
    extraDisks: [
      { name: 'vdb', size: 400 * MiB, format: 'raw' },
      { name: 'vdc', size: 200 * MiB, format: 'raw' },
      { name: 'vdd', size: 120 * MiB, format: 'raw' },
      { name: 'vde', size: 40 * MiB, format: 'raw' },
    ],
  });
  // The data disks are filled in place before the guest looks at them (it never mounts them).
  for (const [name, image] of [['vdb', mbr], ['vdc', gpt], ['vdd', lvm!.mbr], ['vde', lvm!.gpt]] as const) {
    const disk = guest.disks.find((d) => d.name === name)!;
    await run('dd', [`if=${image}`, `of=${disk.path}`, 'bs=1M', 'conv=sparse,notrunc', 'status=none']);
  }
  await guest.waitForAgent();
  server = await startServerProcess(join(tmp, 'data'), { simulate: false });
  env = { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: join(tmp, 'config'), HOME: tmp };
}, 300_000);

afterAll(async () => {
  if (server) await server.stop();
  await guest?.stop();
  const leaked = tmp ? await mountsUnder(tmp) : [];
  for (const p of leaked.reverse()) await run('umount', ['-l', p]).catch(() => undefined);
  if (tmp) rmSync(tmp, { recursive: true, force: true });
  expect(leaked).toEqual([]);
});

async function ok(args: string[]): Promise<string> {
  const r = await bulwark(args, env);
  expect(r.code, `bulwark ${args.join(' ')}\n${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

/** What the guest says about a tree: relative path -> mode, mtime, type, sha256 / link target. */
async function guestTree(dir: string): Promise<Record<string, TreeEntry>> {
  const out = await guest.sh(
    `cd ${JSON.stringify(dir)} && find . -mindepth 1 | sort | while IFS= read -r p; do ` +
      `if [ -L "$p" ]; then printf '%s\\tsymlink\\t%s\\t%s\\t%s\\n' "$p" "$(stat -c %a "$p")" "$(stat -c %Y "$p")" "$(readlink "$p")"; ` +
      `elif [ -d "$p" ]; then printf '%s\\tdir\\t%s\\t%s\\t\\n' "$p" "$(stat -c %a "$p")" "$(stat -c %Y "$p")"; ` +
      `else printf '%s\\tfile\\t%s\\t%s\\t%s\\n' "$p" "$(stat -c %a "$p")" "$(stat -c %Y "$p")" "$(sha256sum "$p" | cut -d' ' -f1)"; fi; done`,
  );
  const tree: Record<string, TreeEntry> = {};
  for (const line of out.split('\n').filter(Boolean)) {
    const [p, type, mode, mtime, extra] = line.split('\t') as [string, TreeEntry['type'], string, string, string];
    const base = { type, mode: parseInt(mode, 8), mtime: Number(mtime) };
    tree[p.slice(2)] = type === 'symlink' ? { ...base, target: extra } : type === 'file' ? { ...base, sha256: extra } : base;
  }
  return tree;
}

/** Symlink modes differ by platform (0777 vs whatever lstat shows); compare links by target. */
function comparable(t: Record<string, TreeEntry>): Record<string, Partial<TreeEntry>> {
  return Object.fromEntries(Object.entries(t).map(([k, v]) => [k, v.type === 'symlink' ? { type: v.type, target: v.target, mtime: v.mtime } : v]));
}

describe('file-level restore through the console', () => {
  it('backs up three times with the file index on; search lists the points of each version', async () => {
    expect((await bulwark(['host', 'add', 'kvm1', '--qemu', join(guest.dir, 'qmp.sock')], env)).code).toBe(0);
    await ok(['job', 'create', 'files', '--vm', VM, '--repo', 'default', '--file-index']);
    const report = '/srv/notes/quarterly report.txt';
    await guest.sh(`mkdir -p /srv/notes && echo 'version one' > '${report}' && touch -d @1700000000 '${report}' && sync`);
    await ok(['job', 'run', 'files', '--wait']);
    await ok(['job', 'run', 'files', '--wait']);
    await guest.sh(`echo 'version two, longer' > '${report}' && touch -d @1710000000 '${report}' && sync`);
    await ok(['job', 'run', 'files', '--wait']);
    const list = JSON.parse(await ok(['restore-point', 'list', '--vm', VM, '--json'])) as Array<{ id: string; time: string }>;
    points.push(...list.sort((a, b) => a.time.localeCompare(b.time)));
    expect(points).toHaveLength(3);
    const sessions = JSON.parse(await ok(['session', 'list', '--job', 'files', '--json'])) as Array<{ id: string }>;
    const shown = await ok(['session', 'show', sessions[0]!.id]);
    expect(shown).toMatch(/guest file index of restore point \S+: \d+ entries from 9 file systems/);

    const found = JSON.parse(await ok(['search', 'QUARTERLY*.txt', '--vm', VM, '--json'])) as {
      matches: Array<{ vm: string; path: string; versions: Array<{ type: string; size: number; mtime: string; points: Array<{ id: string }> }> }>;
      pointsSearched: number;
      pointsWithoutIndex: unknown[];
    };
    expect(found.pointsWithoutIndex).toEqual([]);
    expect(found.pointsSearched).toBe(3);
    expect(found.matches.map((m) => [m.vm, m.path])).toEqual([[VM, report]]);
    expect(found.matches[0]!.versions.map((v) => ({ size: v.size, mtime: v.mtime, points: v.points.map((p) => p.id) }))).toEqual([
      { size: 12, mtime: new Date(1700000000_000).toISOString(), points: [points[0]!.id, points[1]!.id] },
      { size: 20, mtime: new Date(1710000000_000).toISOString(), points: [points[2]!.id] },
    ]);
    // The console's own rendering names the points; a path pattern matches on the whole path; the
    // MBR partitions (no guest mount point) are indexed as FS:/path.
    const text = await ok(['search', 'quarterly*']);
    expect(text).toContain(`${VM}: ${report}`);
    for (const p of points) expect(text).toContain(p.id);
    const byPath = JSON.parse(await ok(['search', '/srv/notes/*', '--json'])) as { matches: Array<{ path: string }> };
    expect(byPath.matches.map((m) => m.path)).toEqual([report]);
    const odd = JSON.parse(await ok(['search', 'odd.bin', '--vm', VM, '--json'])) as { matches: Array<{ path: string }> };
    expect(odd.matches.map((m) => m.path)).toEqual(
      expect.arrayContaining(['vdb1:/dir with spaces/nested dir/odd.bin', 'vdb2:/dir with spaces/nested dir/odd.bin', 'vdc1:/dir with spaces/nested dir/odd.bin', 'vgt-data:/dir with spaces/nested dir/odd.bin', 'vgt-striped:/dir with spaces/nested dir/odd.bin']),
    );
    expect((await ok(['search', 'no-such-file-*'])).trim()).toMatch(/^no match; 3 restore points searched$/);
  }, 900_000);

  it('restores guest paths from the ext4 root, the MBR disk and the GPT disk with modes, times, links and spaces', async () => {
    const latest = `${VM}@latest`;
    const out = join(tmp, 'out-root');
    const text = await ok(['restore', 'files', latest, '--path', '/srv/testdata', '--path', '/etc/hostname', '--to', out]);
    expect(text).toContain('/srv/testdata');
    expect(comparable(await describeTree(join(out, 'testdata')))).toEqual(comparable(await guestTree('/srv/testdata')));
    for (const [file, sum] of Object.entries(guest.image.manifest.testdata)) expect(sha(await readFile(join(out, 'testdata', file))), file).toBe(sum);
    expect(await readFile(join(out, 'hostname'), 'utf8')).toBe('bulwark-guest\n');

    // MBR: ext4 (vdb1) and xfs (vdb2); GPT: ext4 (vdc1) and btrfs (vdc3); LVM: ext4 striped over vdd
    // and vde (vgt-striped; every LV kind is restored in test/restore/lvm.test.ts). Each holds the source tree.
    for (const fs of ['vdb1', 'vdb2', 'vdc1', 'vdc3', 'vgt-striped']) {
      const to = join(tmp, `out-${fs}`);
      const r = JSON.parse(await ok(['restore', 'files', latest, '--path', `${fs}:/dir with spaces`, '--path', `${fs}:/private`, '--path', `${fs}:/link to file`, '--path', `${fs}:/big.bin`, '--to', to, '--json'])) as {
        items: Array<{ filesystem: string; to: string }>;
      };
      expect(r.items.map((i) => i.filesystem)).toEqual([fs, fs, fs, fs]);
      const got = await describeTree(to);
      for (const [k, v] of Object.entries(got)) {
        const want = sourceTree[k]!;
        // Folder times are not compared: populating the xfs/btrfs images by copying changed them.
        if (v.type === 'dir') expect({ ...v, mtime: 0 }, `${fs} ${k}`).toEqual({ ...want, mtime: 0 });
        else if (v.type === 'symlink') expect([v.type, v.target], `${fs} ${k}`).toEqual([want.type, want.target]);
        else expect(v, `${fs} ${k}`).toEqual(want);
      }
      expect(Object.keys(got).sort()).toEqual(Object.keys(sourceTree).filter((k) => /^(dir with spaces|private|link to file|big\.bin)/.test(k)).sort());
    }
    // The ESP (vfat): contents kept (FAT has no modes or links).
    const esp = join(tmp, 'out-vdc2');
    await ok(['restore', 'files', latest, '--path', 'vdc2:/dir with spaces', '--to', esp]);
    const name = 'dir with spaces/nested dir/odd.bin';
    expect((await describeTree(esp))[name]?.sha256).toBe(sourceTree[name]!.sha256);

    // An existing file is not replaced without --overwrite; a path that does not exist is named.
    const again = await bulwark(['restore', 'files', latest, '--path', '/etc/hostname', '--to', out], env);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/exist/i);
    const missing = await bulwark(['restore', 'files', latest, '--path', '/srv/no such thing', '--to', out], env);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain('/srv/no such thing');
  });

  it('mount holds a read-only view until Ctrl-C; --detach until mount unmount', async () => {
    const at = join(tmp, 'view');
    const child = spawn(process.execPath, [program, 'mount', `${VM}@latest`, '--at', at], { env: { PATH: process.env.PATH ?? '', BULWARK_LOG_LEVEL: 'warn', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (c: Buffer) => (output += c.toString()));
    child.stderr.on('data', (c: Buffer) => (output += c.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    try {
      await new Promise<void>((resolve, reject) => {
        const t = setInterval(() => {
          if (output.includes('Press Ctrl-C')) {
            clearInterval(t);
            resolve();
          } else if (child.exitCode !== null) {
            clearInterval(t);
            reject(new Error(`bulwark mount exited early:\n${output}`));
          }
        }, 100);
      });
      expect(output).toMatch(/vda\s+ext4\s+guestroot\s+\/\s/);
      expect(output).toMatch(/vdb2\s+xfs\s+srv/);
      expect(output).toMatch(/vdc3\s+btrfs\s+pool/);
      expect(output).toMatch(/vdc2\s+vfat\s+ESP/);
      expect(output).toMatch(/vgt-root\s+ext4\s+lvroot/);
      expect(output).toMatch(/vgt-data\s+xfs\s+lvdata/);
      expect(existsSync(join(at, 'lvm', 'vgt', 'striped-ext4', 'dir with spaces', 'file name with spaces.txt'))).toBe(true);
      const root = join(at, 'vda', 'whole-ext4');
      expect(sha(await readFile(join(root, 'srv/testdata/alpha.txt')))).toBe(guest.image.manifest.testdata['alpha.txt']);
      expect(existsSync(join(at, 'vdb', 'part2-xfs', 'dir with spaces', 'file name with spaces.txt'))).toBe(true);
      await expect(run('touch', [join(root, 'new-file')])).rejects.toThrow(/Read-only/);
      const listed = JSON.parse(await ok(['mount', 'list', '--json'])) as Array<{ at: string; detached: boolean }>;
      expect(listed.map((m) => [m.at, m.detached])).toEqual([[at, false]]);
      child.kill('SIGINT');
      expect(await exited).toBe(0);
      expect(output).toContain(`unmounted ${at}`);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
      await exited;
    }
    expect(await mountsUnder(at)).toEqual([]);
    expect(JSON.parse(await ok(['mount', 'list', '--json']))).toEqual([]);

    const detached = JSON.parse(await ok(['mount', points[0]!.id, '--detach', '--json'])) as { id: string; at: string };
    expect(await mountsUnder(detached.at)).not.toEqual([]);
    expect(await readFile(join(detached.at, 'vda', 'whole-ext4', 'srv/notes/quarterly report.txt'), 'utf8')).toBe('version one\n');
    expect(await ok(['mount', 'unmount', detached.id.slice(0, 8)])).toContain(`unmounted ${detached.at}`);
    expect(await mountsUnder(detached.at)).toEqual([]);

    // A console killed outright (no Ctrl-C handling) loses its hold stream: the server unmounts.
    const killedAt = join(tmp, 'view-killed');
    const killed = spawn(process.execPath, [program, 'mount', `${VM}@latest`, '--at', killedAt], { env: { PATH: process.env.PATH ?? '', BULWARK_LOG_LEVEL: 'warn', ...env }, stdio: ['ignore', 'pipe', 'ignore'] });
    const killedExit = new Promise<void>((resolve) => killed.once('exit', () => resolve()));
    let killedOut = '';
    killed.stdout.on('data', (c: Buffer) => (killedOut += c.toString()));
    for (let i = 0; i < 600 && !killedOut.includes('Press Ctrl-C') && killed.exitCode === null; i++) await new Promise((r) => setTimeout(r, 100));
    expect(killedOut).toContain('Press Ctrl-C');
    killed.kill('SIGKILL');
    await killedExit;
    let left: unknown[] = [null];
    for (let i = 0; i < 100 && left.length > 0; i++) {
      left = JSON.parse(await ok(['mount', 'list', '--json'])) as unknown[];
      if (left.length > 0) await new Promise((r) => setTimeout(r, 200));
    }
    expect(left).toEqual([]);
    expect(await mountsUnder(killedAt)).toEqual([]);

    // A detached mount left in place is undone when the server stops (afterAll checks no mount is left).
    await ok(['mount', points[1]!.id, '--detach']);
  });

  it('restores into the running guest through its agent: fail, overwrite, keep-both', async () => {
    const want = await guestTree('/srv/testdata/dir with spaces');
    await guest.sh(`rm -rf '/srv/testdata/dir with spaces' && echo changed > /srv/testdata/alpha.txt`);
    const conflict = await bulwark(['restore', 'files', `${VM}@latest`, '--path', '/srv/testdata/alpha.txt', '--to-guest'], env);
    expect(conflict.code).toBe(1);
    expect(conflict.stderr).toMatch(/alpha\.txt exists in the guest/);

    await ok(['restore', 'files', `${VM}@latest`, '--path', '/srv/testdata/alpha.txt', '--path', '/srv/testdata/dir with spaces', '--to-guest', '--conflict', 'overwrite']);
    expect(await guestTree('/srv/testdata/dir with spaces')).toEqual(want);
    const sums = await guest.sh('cd /srv/testdata && sha256sum -c SHA256SUMS');
    expect(sums).not.toMatch(/FAILED/);

    const latest = points[2]!;
    await guest.sh('echo newer > /srv/testdata/alpha.txt');
    const kept = JSON.parse(await ok(['restore', 'files', latest.id, '--path', '/srv/testdata/alpha.txt', '--to-guest', '--conflict', 'keep-both', '--json'])) as { items: Array<{ to: string }> };
    const stamp = new Date(latest.time).toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
    expect(kept.items.map((i) => i.to)).toEqual([`/srv/testdata/alpha.txt.restored-${stamp}`]);
    expect((await guest.sh('cat /srv/testdata/alpha.txt')).trim()).toBe('newer');
    expect((await guest.sh(`sha256sum '/srv/testdata/alpha.txt.restored-${stamp}'`)).split(' ')[0]).toBe(guest.image.manifest.testdata['alpha.txt']);
  });
});
