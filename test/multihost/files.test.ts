// File-level restore through agents (the mount server role), in network namespaces this test
// creates (and always deletes): the server, src1 next to a VM (a QEMU with no guest, serving an
// ext4 disk made here with mkfs.ext4 -d), the repository agent repo1, and dst1, the agent of host
// kvm-b. One backup into repo1's repository serves every case:
// (a) `restore files --host kvm-b`: dst1 mounts the point, reading it through the data mover from
//     repo1, and copies the files out: contents, modes, owners, times, symlinks and names with
//     spaces as in the disk (a tree of lstat facts and hashes); no mount is left in dst1's
//     namespace; without --host, repo1 (the repository's mount server) does it from its folder;
// (b) `mount --host kvm-b --at DIR`: held by dst1, listed with its agent, readable in dst1's
//     mount namespace, undone by `unmount`;
// (c) `restore files --to-guest` into the test guest running under the point's VM name on kvm-b:
//     dst1 is found as the agent of the VM's host, mounts the point (read from repo1) and writes
//     through the guest agent: contents, modes, owners, times, symlinks; fail and keep-both;
// (d) the server is killed and restarted while dst1 cannot reach it (connections refused) until
//     repo1's adoption window and its serve task's next report have passed: the mount is listed at
//     once from the server's state file (<data>/agent-mounts.json), repo1's serve task is taken
//     back from it (not stopped as unknown), and once dst1 is back the mount is still mounted past
//     its window, readable (blocks never read before, from repo1), unmounted by `unmount`; restores
//     through both agents work again.
// (e) a host whose agent is gone: refused, naming the agent.
// One guest boot (for (c), overlapped with (a) and (b)). Agents run in their own mount namespaces (`ip netns exec`), so their mounts are
// looked at through /proc/PID/mounts and /proc/PID/root.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chownSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, utimesSync, writeFileSync, chmodSync, lutimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestGuest, type TestGuest } from '../fixtures/guest.js';
import { MultiHost, multiHostSkipReason as skipReason, logText, run } from './netns/hosts.js';

const VM = 'mhfiles-vm';
let h: MultiHost;
let dst: Awaited<ReturnType<MultiHost['addAgent']>>;
let src = '';
let pointId = '';
/** The test guest, running as the point's VM on kvm-b (dst1's host) for --to-guest. */
let guest: TestGuest | undefined;
const started = Date.now();

/** Every entry under `root`: type, permission bits, owner, mtime (s), and contents' hash or link target. */
function tree(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir).sort()) {
      const p = path.join(dir, name);
      const st = lstatSync(p);
      const rel = path.relative(root, p);
      const meta = `${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid} ${Math.floor(st.mtimeMs / 1000)}`;
      if (st.isSymbolicLink()) out[rel] = `link -> ${readlinkSync(p)} ${st.uid}:${st.gid}`;
      else if (st.isDirectory()) {
        out[rel] = `dir ${meta}`;
        walk(p);
      } else out[rel] = `file ${meta} ${createHash('sha256').update(readFileSync(p)).digest('hex')}`;
    }
  };
  walk(root);
  return out;
}

/**
 * Loop and FUSE mounts under this test's folder in a process's mount namespace (the agent's own,
 * under `ip netns exec`). The harness gives every process a run dir there; mounts elsewhere are
 * other tests' (the host namespace's propagate into the agents').
 */
function mountsOf(pid: number): string[] {
  return readFileSync(`/proc/${pid}/mounts`, 'utf8')
    .split('\n')
    .filter((l) => /^\/dev\/loop|fuse|nbdfuse/.test(l) && l.split(' ')[1]?.startsWith(h.tmp + '/') === true);
}

async function refused(method: string, route: string, body: unknown): Promise<string> {
  try {
    await h.api(method, route, body);
  } catch (err) {
    return (err as Error).message;
  }
  throw new Error(`${method} ${route} was not refused`);
}

const since = (t: number): string => `${((Date.now() - t) / 1000).toFixed(1)} s`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** netns/server.ts: adoptWindowMs; src/agent/remote/restore-tasks.ts: SERVE_PROGRESS_MS. */
const ADOPT_WINDOW_MS = 6000;
const SERVE_REPORT_MS = 10_000;

describe.skipIf(skipReason !== '')('file-level restore through agents', () => {
  beforeAll(async () => {
    const work = mkdtempSync(path.join(tmpdir(), 'bulwark-mh-files-'));
    src = path.join(work, 'root');
    try {
      // What the guest disk holds: modes (set-id too), owners, times, symlinks (one dangling), names with spaces.
      mkdirSync(path.join(src, 'data/sub dir'), { recursive: true });
      mkdirSync(path.join(src, 'My Docs'), { recursive: true });
      writeFileSync(path.join(src, 'data/report.txt'), 'quarterly numbers\n');
      writeFileSync(path.join(src, 'data/sub dir/odd name (1).bin'), Buffer.from(Array.from({ length: 70_001 }, (_, i) => (i * 7) % 251)));
      writeFileSync(path.join(src, 'data/tool.sh'), '#!/bin/sh\necho hi\n');
      chmodSync(path.join(src, 'data/tool.sh'), 0o4750);
      writeFileSync(path.join(src, 'data/secret'), 'only owner\n');
      chmodSync(path.join(src, 'data/secret'), 0o600);
      chownSync(path.join(src, 'data/secret'), 1234, 2345);
      symlinkSync('report.txt', path.join(src, 'data/latest'));
      symlinkSync('/nowhere/at/all', path.join(src, 'data/dangling'));
      writeFileSync(path.join(src, 'My Docs/letter to bank.txt'), 'Dear bank,\n');
      // Read only after a server restart in (d): its blocks come from repo1's re-adopted serve task.
      mkdirSync(path.join(src, 'big'));
      writeFileSync(path.join(src, 'big/big.bin'), Buffer.from(Array.from({ length: 6 * 1024 * 1024 + 4321 }, (_, i) => (i * 31 + (i >> 12)) % 256)));
      // A root file system (its fstab mounts itself on /): guest paths (/data) place into the guest.
      mkdirSync(path.join(src, 'etc'));
      writeFileSync(path.join(src, 'etc/fstab'), 'LABEL=mhfiles / ext4 defaults 0 1\n');
      let t = 1_600_000_000;
      for (const p of ['data/report.txt', 'data/sub dir/odd name (1).bin', 'data/tool.sh', 'data/secret', 'My Docs/letter to bank.txt', 'data/sub dir', 'My Docs', 'data']) utimesSync(path.join(src, p), t, (t += 86_400));
      lutimesSync(path.join(src, 'data/latest'), t, t);
      const image = path.join(work, 'disk.raw');
      execFileSync('truncate', ['-s', '32M', image]);
      execFileSync('mkfs.ext4', ['-q', '-F', '-L', 'mhfiles', '-d', src, image]);
      h = await MultiHost.start({ vm: VM, disk: readFileSync(image) });
    } catch (err) {
      rmSync(work, { recursive: true, force: true });
      throw err;
    }
    dst = await h.addAgent('dst1', 'd');
    await h.api('POST', '/hosts', { name: 'kvm-b', kind: 'qemu', uri: path.join(h.tmp, 'b-vms', '*', 'qmp.sock'), agent: 'dst1' });
    await h.api('POST', '/jobs', { name: 'mhfiles', vms: [VM], repository: 'remote-repo', retries: { count: 0, waitMinutes: 0 } });
    const s = await h.runJob('mhfiles');
    expect(s.state, logText(s)).toMatch(/success|warning/); // warning: the VM has no guest agent to freeze
    pointId = (await h.api<{ items: Array<{ id: string; vm: string }> }>('GET', `/restore-points?vm=${VM}`)).items.find((p) => p.vm === VM)!.id;
    // The backed-up VM goes; the test guest runs under its name on kvm-b for --to-guest (booting
    // while (a) and (b) run).
    process.kill(Number(readFileSync(path.join(h.vmDir, 'qemu.pid'), 'utf8')), 'SIGKILL');
    const gDir = path.join(h.tmp, 'b-vms', VM);
    mkdirSync(gDir, { recursive: true });
    guest = await startTestGuest({ name: VM, dir: gDir, netns: dst.ns });
    console.log(`files.test: set-up (namespaces, agents, backup) ${since(started)}`);
  }, 180_000);

  afterAll(async () => {
    await guest?.stop();
    if (src) rmSync(path.dirname(src), { recursive: true, force: true });
    if (h) expect(h.close()).toBe('');
    console.log(`files.test: whole file ${since(started)}`);
  });

  it('(a) restore files through the agent of another host, and through the repository\'s agent: everything preserved, no mount left', async () => {
    const t0 = Date.now();
    const before = mountsOf(dst.child.pid!);
    const to = path.join(h.tmp, 'restored-b');
    const r = await h.api<{ agent?: string; target: string; files: number; symlinks: number; directories: number; items: Array<{ path: string; to: string }> }>('POST', `/restore-points/${pointId}/restore-files`, {
      paths: ['vda:/data', 'vda:/My Docs'],
      to,
      host: 'kvm-b',
    });
    expect(r).toMatchObject({ agent: 'dst1', files: 5, symlinks: 2, directories: 3 });
    expect(r.target).toContain('dst1');
    expect(r.items.map((i) => i.to)).toEqual([path.join(to, 'data'), path.join(to, 'My Docs')]);
    expect(tree(to)).toEqual({ ...prefixed(tree(path.join(src, 'data')), 'data'), ...prefixed(tree(path.join(src, 'My Docs')), 'My Docs'), data: entry(src, 'data'), 'My Docs': entry(src, 'My Docs') });
    expect(mountsOf(dst.child.pid!)).toEqual(before);
    expect(readdirSync(path.join(dst.dataDir, 'mounts')).filter((n) => n.startsWith('.restore-'))).toEqual([]);
    console.log(`files.test: (a) restore files via dst1 reading from repo1 ${since(t0)}`);

    // No --host: the repository's mount server (repo1) reads its own folder.
    const t1 = Date.now();
    const repoBefore = mountsOf(h.repoAgent!.pid!);
    const to2 = path.join(h.tmp, 'restored-r');
    const r2 = await h.api<{ agent?: string; files: number }>('POST', `/restore-points/${pointId}/restore-files`, { paths: ['vda:/My Docs/letter to bank.txt'], to: to2 });
    expect(r2).toMatchObject({ agent: 'repo1', files: 1 });
    expect(tree(to2)).toEqual({ 'letter to bank.txt': entry(src, 'My Docs/letter to bank.txt') });
    expect(mountsOf(h.repoAgent!.pid!)).toEqual(repoBefore);
    // A path the point does not hold: refused with the path named, and still nothing left mounted.
    expect(await refused('POST', `/restore-points/${pointId}/restore-files`, { paths: ['vda:/no such file'], to: to2, host: 'kvm-b' })).toMatch(/404.*vda:\/no such file does not exist in the restore point/);
    expect(mountsOf(dst.child.pid!)).toEqual(before);
    console.log(`files.test: (a) restore files via repo1 + refusal ${since(t1)}`);

    // The console: `restore files --host` says which agent did it.
    const t2 = Date.now();
    const to3 = path.join(h.tmp, 'restored-cli');
    const out = execFileSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'restore', 'files', pointId, '--path', '/My Docs/letter to bank.txt', '--to', to3, '--host', 'kvm-b'], {
      cwd: path.resolve(import.meta.dirname, '../..'),
      env: { ...process.env, BULWARK_SERVER: `unix:${h.socketPath}` },
      encoding: 'utf8',
    });
    expect(out, out).toMatch(/^by agent: +dst1$/m);
    expect(out, out).toContain(`/My Docs/letter to bank.txt  (vda:/My Docs/letter to bank.txt)  ->  ${path.join(to3, 'letter to bank.txt')}`);
    expect(readFileSync(path.join(to3, 'letter to bank.txt'), 'utf8')).toBe('Dear bank,\n');
    console.log(`files.test: (a) the console's restore files --host ${since(t2)}`);
  }, 120_000);

  it('(b) mount --host kvm-b: held by dst1, listed, readable there, undone by unmount', async () => {
    const t0 = Date.now();
    const pid = dst.child.pid!;
    const before = mountsOf(pid);
    const at = path.join(h.tmp, 'browse');
    const m = await h.api<{ id: string; agent?: string; host?: string; at: string; filesystems: Array<{ name: string; type: string; path: string }> }>('POST', '/mounts', { point: pointId, host: 'kvm-b', at, detached: true });
    expect(m).toMatchObject({ agent: 'dst1', host: 'kvm-b', at });
    expect(m.filesystems).toEqual([expect.objectContaining({ name: 'vda', type: 'ext4' })]);
    const fs = m.filesystems[0]!.path;
    // The mount is in dst1's mount namespace: seen through its root.
    expect(tree(`/proc/${pid}/root${fs}/data`)).toEqual(tree(path.join(src, 'data')));
    expect(mountsOf(pid).some((l) => l.includes(fs))).toBe(true);
    const listed = await h.api<{ items: Array<{ id: string; agent?: string }> }>('GET', '/mounts');
    expect(listed.items).toEqual([expect.objectContaining({ id: m.id, agent: 'dst1' })]);
    const agentList = await h.api<{ items: Array<{ id: string }> }>('GET', `/mounts/${m.id}`);
    expect(agentList).toMatchObject({ id: m.id, agent: 'dst1' });
    await h.api('DELETE', `/mounts/${m.id}`);
    expect(mountsOf(pid)).toEqual(before);
    expect((await h.api<{ items: unknown[] }>('GET', '/mounts')).items).toEqual([]);
    console.log(`files.test: (b) mount, browse, unmount ${since(t0)}`);

  }, 120_000);

  it('(c) --to-guest into the VM running on kvm-b: dst1 mounts the point (read from repo1) and writes through the guest agent', async () => {
    const t0 = Date.now();
    await guest!.waitForAgent();
    console.log(`files.test: (c) guest agent answered ${since(started)} after the start`);
    const t1 = Date.now();
    const pid = dst.child.pid!;
    const before = mountsOf(pid);
    const r = await h.api<{ agent?: string; target: string; files: number; symlinks: number; items: Array<{ to: string }> }>('POST', `/restore-points/${pointId}/restore-files`, {
      paths: ['/data', '/My Docs/letter to bank.txt'],
      toGuest: true,
    });
    expect(r).toMatchObject({ agent: 'dst1', target: `guest ${VM}`, files: 5, symlinks: 2 });
    expect(r.items.map((i) => i.to)).toEqual(['/data', '/My Docs/letter to bank.txt']);
    const inGuest = async (p: string): Promise<string> => (await guest!.sh(`stat -c '%a %u:%g %Y' '${p}'`)).trim();
    for (const p of ['data', 'data/report.txt', 'data/tool.sh', 'data/secret', 'data/sub dir', 'data/sub dir/odd name (1).bin', 'My Docs/letter to bank.txt']) {
      const st = lstatSync(path.join(src, p));
      expect(await inGuest(`/${p}`), p).toBe(`${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid} ${Math.floor(st.mtimeMs / 1000)}`);
    }
    const sums = await guest!.sh("cd /data && sha256sum report.txt tool.sh secret 'sub dir/odd name (1).bin'");
    for (const p of ['report.txt', 'tool.sh', 'secret', 'sub dir/odd name (1).bin']) {
      expect(sums).toContain(`${createHash('sha256').update(readFileSync(path.join(src, 'data', p))).digest('hex')}  ${p}`);
    }
    expect(await guest!.sh('readlink /data/latest; readlink /data/dangling')).toBe('report.txt\n/nowhere/at/all\n');
    expect(mountsOf(pid)).toEqual(before);
    console.log(`files.test: (c) --to-guest via dst1 ${since(t1)}`);

    // The path exists now: fail (the default) refuses, keep-both writes beside it.
    expect(await refused('POST', `/restore-points/${pointId}/restore-files`, { paths: ['/My Docs/letter to bank.txt'], toGuest: true })).toMatch(/409.*letter to bank\.txt/);
    await guest!.sh("echo changed > '/My Docs/letter to bank.txt'");
    const kb = await h.api<{ agent?: string; items: Array<{ to: string }> }>('POST', `/restore-points/${pointId}/restore-files`, { paths: ['/My Docs/letter to bank.txt'], toGuest: true, conflict: 'keep-both', host: 'kvm-b' });
    expect(kb.agent).toBe('dst1');
    expect(kb.items[0]!.to).toMatch(/^\/My Docs\/letter to bank\.txt\.restored-\d{8}T\d{6}Z$/);
    expect(await guest!.sh(`cat '/My Docs/letter to bank.txt' '${kb.items[0]!.to}'`)).toBe('changed\nDear bank,\n');
    expect(mountsOf(pid)).toEqual(before);
    console.log(`files.test: (c) whole case ${since(t0)}`);
  }, 300_000);

  it('(d) the server restarts while dst1 is away: the mount is listed from the state file, repo1\'s serve task kept; once dst1 is back it is still mounted, readable, and unmounted as before', async () => {
    const pid = dst.child.pid!;
    const before = mountsOf(pid);
    const t1 = Date.now();
    const m2 = await h.api<{ id: string; filesystems: Array<{ path: string }> }>('POST', '/mounts', { point: pointId, host: 'kvm-b', detached: true });
    const fs = m2.filesystems[0]!.path;
    expect(mountsOf(pid).some((l) => l.includes(fs))).toBe(true);
    // dst1's link to the server stays down (connections reset) over the restart.
    const nft = (...args: string[]): string => run('ip', ['netns', 'exec', h.ns.server, 'nft', ...args]);
    nft('add', 'table', 'inet', 'bwfiles');
    nft('add', 'chain', 'inet', 'bwfiles', 'in', '{ type filter hook input priority 0; }');
    nft('add', 'rule', 'inet', 'bwfiles', 'in', 'ip', 'saddr', dst.ip, 'tcp', 'dport', '9392', 'reject', 'with', 'tcp', 'reset');
    let blocked = true;
    let serverLog = (): string => '';
    try {
      const server = h.children[0]!;
      server.kill('SIGKILL');
      await new Promise<void>((r) => (server.exitCode !== null || server.signalCode !== null ? r() : server.once('exit', () => r())));
      // The new server waits for an agent that has not polled it up to its adoption window plus
      // the agent-lost time: the production default here, for dst1's 20-40 s away (3 s would end its mount first).
      const again = await h.startInNs('server', h.ns.server, 'server.ts', [path.join(h.tmp, 'server'), `${h.ip.server}:9392`], { BULWARK_TEST_AGENT_LOST_MS: '60000', BULWARK_LOG_LEVEL: 'info' });
      const restarted = Date.now();
      h.socketPath = again.info.socket as string;
      serverLog = () => (h.stderrOf.get(again.child) ?? []).join('');
      // Listed at once, dst1 unreachable: from the state file.
      const early = (await h.api<{ items: Array<{ id: string; agent?: string; host?: string; detached: boolean }> }>('GET', '/mounts')).items;
      expect(early).toEqual([expect.objectContaining({ id: m2.id, agent: 'dst1', host: 'kvm-b', detached: true })]);
      console.log(`files.test: (d) mount listed ${since(restarted)} after the restart (dst1 unreachable)`);
      type Agents = { items: Array<{ name: string; state: string; lastSeenAt?: string | null }> };
      const back = async (names: string[]): Promise<boolean> => {
        const agents = (await h.api<Agents>('GET', '/agents')).items;
        return names.every((n) => agents.some((a) => a.name === n && a.state === 'online' && a.lastSeenAt && Date.parse(a.lastSeenAt) >= restarted - 1000));
      };
      for (let i = 0; i < 600 && !(await back(['repo1'])); i++) await sleep(100);
      expect(await back(['repo1']), 'repo1 polled the new server').toBe(true);
      // Past repo1's adoption window and its serve task's next report: an unadopted serve task is stopped by now.
      await sleep(ADOPT_WINDOW_MS + SERVE_REPORT_MS + 3000);
      expect(await back(['dst1']), 'dst1 could not reach the new server').toBe(false);
      nft('delete', 'table', 'inet', 'bwfiles');
      blocked = false;
      for (let i = 0; i < 600 && !(await back(['dst1'])); i++) await sleep(100);
      expect(await back(['dst1']), 'dst1 polled the new server').toBe(true);
      // Past dst1's window too (an unadopted open task would be stopped by now).
      await sleep(ADOPT_WINDOW_MS + 1000);
    } finally {
      if (blocked) nft('delete', 'table', 'inet', 'bwfiles');
    }
    expect((await h.api<{ items: Array<{ id: string }> }>('GET', '/mounts')).items, serverLog()).toEqual([expect.objectContaining({ id: m2.id, agent: 'dst1' })]);
    expect(mountsOf(pid).some((l) => l.includes(fs))).toBe(true);
    // Blocks never read before the restart, read through repo1's serve task.
    const big = readFileSync(`/proc/${pid}/root${fs}/big/big.bin`);
    expect(createHash('sha256').update(big).digest('hex')).toBe(createHash('sha256').update(readFileSync(path.join(src, 'big/big.bin'))).digest('hex'));
    await h.api('DELETE', `/mounts/${m2.id}`);
    expect(mountsOf(pid)).toEqual(before);
    expect((await h.api<{ items: unknown[] }>('GET', '/mounts')).items).toEqual([]);
    expect(JSON.parse(readFileSync(path.join(h.tmp, 'server', 'agent-mounts.json'), 'utf8'))).toMatchObject({ mounts: [] });
    console.log(`files.test: (d) restart, adopted mount read and unmounted ${since(t1)}`);
    // Restores through both agents work with the new server.
    const r = await h.api<{ agent?: string; files: number }>('POST', `/restore-points/${pointId}/restore-files`, { paths: ['/data/report.txt'], to: path.join(h.tmp, 'after-restart'), host: 'kvm-b' });
    expect(r).toMatchObject({ agent: 'dst1', files: 1 });
    expect(mountsOf(pid)).toEqual(before);
  }, 150_000);

  it('(e) a host whose agent is gone: refused, naming the agent', async () => {
    dst.child.kill('SIGKILL');
    await new Promise<void>((r) => (dst.child.exitCode !== null || dst.child.signalCode !== null ? r() : dst.child.once('exit', () => r())));
    const msg = await refused('POST', `/restore-points/${pointId}/restore-files`, { paths: ['vda:/data'], to: path.join(h.tmp, 'restored-gone'), host: 'kvm-b' });
    expect(msg).toMatch(/dst1/);
    expect(msg).toMatch(/not connected|did not pick up|lost agent/);
    const msg2 = await refused('POST', '/mounts', { point: pointId, host: 'kvm-b', detached: true });
    expect(msg2).toMatch(/dst1.*(not connected|did not pick up|lost agent)/);
  }, 60_000);
});

function prefixed(t: Record<string, string>, prefix: string): Record<string, string> {
  return Object.fromEntries(Object.entries(t).map(([k, v]) => [path.join(prefix, k), v]));
}

/** One entry of tree() for a path inside `root`. */
function entry(root: string, rel: string): string {
  const p = path.join(root, rel);
  const st = lstatSync(p);
  const meta = `${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid} ${Math.floor(st.mtimeMs / 1000)}`;
  return st.isDirectory() ? `dir ${meta}` : `file ${meta} ${createHash('sha256').update(readFileSync(p)).digest('hex')}`;
}
