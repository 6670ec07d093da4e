// Per-job storage into a repository on ANOTHER host (network namespaces, fixture netns/hosts.ts;
// docs/formats/agent-link.md, "Per-job storage on an agent's repository"): a job of two VMs on two
// hosts, each next to its own source agent (QEMU with no guest, `-machine none`, one qcow2 drive
// each; writes by qemu-io inside QEMU, so the dirty bitmaps count them), into a repository of a
// third agent. Checked: 3 runs with retention 2 leave ONE .vbk + ONE .vib in the job's `_all`
// folder (the repository agent wrote one point per run and merged), no VM folders; the catalog has
// one record per VM per kept point (its slice); every kept point of every VM restores bit-exact
// (read from the folder, and the newest restored by the repository agent through the server). A
// VM whose disk goes away mid-transfer (its NBD export deleted in QEMU while a throttling rule
// holds its stream) fails the run: nothing is written (files, points and catalog as before), every
// task fails naming that VM; the next run continues the chain with an incremental holding both
// VMs, bit-exact. Reverse incremental per job: the repository agent injects each run into the
// full holding both VMs and keeps a .vrb behind it; forward with a synthetic full on the server's
// next day builds it from the `_all` chain there. A health-check session of the job checks the `_all` chain on the repository
// agent and names a flipped byte as VM/DISK; the next run re-reads that block from that VM's source
// agent and restores bit-exact. Needs root (ip netns).
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readdirSync, writeFileSync } from 'node:fs';
import { open, rm } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ALL_VMS, catalogPoints, openRepository, type RestorePointInfo } from '../../src/repository/index.js';
import { RECORD_HEADER_SIZE } from '../../src/format/record.js';
import { restoreDisk } from '../../src/restore/disk/restore-disk.js';
import { logText, MultiHost, multiHostSkipReason as skipReason, run, type SessionJson } from './netns/hosts.js';

const A = 'pja-vm';
const B = 'pjb-vm';
const MiB = 1 << 20;
// Not a multiple of the block size (256 KiB): the short last block.
const SIZE = 4 * MiB + 1536;
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

let h: MultiHost;
let bDir = '';
let bNs = '';
let bIp = '';
/** B's disk as the test wrote it. */
let bExpected: Buffer;
/** Each VM slice's expected SHA-256 (catalog id -> sha). */
const shaOf = new Map<string, string>();

/** A QMP command on B's control socket (its adapter has the other one); the reply's `return`. */
function qmpB(execute: string, args?: Record<string, unknown>): unknown {
  const script = `{"execute":"qmp_capabilities"}\n${JSON.stringify({ execute, ...(args ? { arguments: args } : {}) })}\n`;
  const out = run('sh', ['-c', `printf '%s' '${script}' | socat -t 2 - UNIX-CONNECT:${path.join(bDir, 'control.sock')}`]);
  const replies = out.split('\n').filter((l) => l.startsWith('{"return"') || l.startsWith('{"error"'));
  const last = JSON.parse(replies.at(-1) ?? '{}') as { return?: unknown; error?: { desc: string } };
  if (last.error) throw new Error(`QMP ${execute} on VM ${B}: ${last.error.desc}`);
  return last.return;
}

/** B's "guest" writes `data` at `offset` (qemu-io inside B's QEMU, from a file). */
function writeB(offset: number, data: Buffer): void {
  const file = path.join(bDir, `w-${offset}.bin`);
  writeFileSync(file, data);
  const r = qmpB('human-monitor-command', { 'command-line': `qemu-io vda0 "write -s ${file} ${offset} ${data.length}"` });
  expect(r).toBe('');
  data.copy(bExpected, offset);
}

async function writeBoth(k: number): Promise<void> {
  await h.write(MiB + k * 300_000, 70_000, 0x10 + k);
  await h.write(SIZE - 8192, 4096, 0x40 + k); // into the short last block
  writeB(2 * MiB + k * 200_000, randomBytes(100_000));
}

async function allPoints(job = 'pj'): Promise<RestorePointInfo[]> {
  return (await openRepository(h.repoDir)).listRestorePoints({ job, vm: ALL_VMS });
}

/** The job folder's backup files, as `folder:ext`. */
function jobFiles(job = 'pj'): string[] {
  const root = path.join(h.repoDir, job);
  return readdirSync(root, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && /\.(vbk|vib|vrb|vbm)$/.test(e.name))
    .map((e) => path.relative(root, path.join(e.parentPath, e.name)))
    .sort();
}

/** A run of the job; on success remembers each VM's slice of the new point with the disks' SHA-256 now. */
async function runJob(job = 'pj'): Promise<SessionJson> {
  const s = await h.runJob(job);
  if (s.state === 'success' || s.state === 'warning') {
    const newest = (await allPoints(job)).sort((a, b) => a.time.getTime() - b.time.getTime()).at(-1)!;
    for (const slice of catalogPoints([newest])) shaOf.set(slice.id, slice.vm === A ? h.expectedSha() : sha256(bExpected));
  }
  return s;
}

/** Every kept slice restores bit-exact from the agent's folder (the shared file system here). */
async function everySliceBitExact(job = 'pj'): Promise<number> {
  const repository = await openRepository(h.repoDir);
  const slices = catalogPoints(await allPoints(job));
  for (const p of slices) {
    const to = path.join(h.tmp, `slice-${p.id}.raw`);
    try {
      const r = await restoreDisk({ repository, pointId: p.id, disk: 'vda', to, imageDigest: true });
      expect(r.size).toBe(SIZE);
      expect(r.sha256, `VM ${p.vm} in point ${p.id} (${p.kind}, ${p.time.toISOString()})`).toBe(shaOf.get(p.id));
    } finally {
      await rm(to, { force: true });
    }
  }
  return slices.length;
}

/** The catalog's points of the job, by VM. */
async function catalog(): Promise<Map<string, string[]>> {
  const out = new Map<string, string[]>();
  for (const vm of [A, B]) {
    const items = (await h.api<{ items: Array<{ id: string; job: string | null }> }>('GET', `/restore-points?vm=${vm}`)).items.filter((p) => p.job === 'pj');
    out.set(vm, items.map((p) => p.id).sort());
  }
  return out;
}

describe.skipIf(skipReason !== '')(`per-job storage on a remote repository${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  beforeAll(async () => {
    const diskA = Buffer.alloc(SIZE);
    diskA.fill(0x5a, 0, MiB);
    randomBytes(MiB).copy(diskA, 2 * MiB);
    h = await MultiHost.start({ vm: A, disk: diskA });
    // VM B on another host, next to another source agent.
    const src2 = await h.addAgent('src2', 'b');
    bNs = src2.ns;
    bIp = src2.ip;
    bDir = path.join(h.tmp, 'vm-b');
    bExpected = Buffer.alloc(SIZE);
    randomBytes(MiB).copy(bExpected, MiB);
    run('mkdir', ['-p', bDir]);
    writeFileSync(path.join(bDir, 'disk.raw'), bExpected);
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(bDir, 'disk.raw'), path.join(bDir, 'disk.qcow2')]);
    await rm(path.join(bDir, 'disk.raw'));
    run('ip', [
      'netns', 'exec', bNs, 'qemu-system-x86_64', '-machine', 'none', '-nodefaults', '-display', 'none', '-name', B,
      '-drive', `if=none,id=vda,node-name=vda0,format=qcow2,file=${path.join(bDir, 'disk.qcow2')}`,
      '-qmp', `unix:${path.join(bDir, 'qmp.sock')},server=on,wait=off`,
      '-qmp', `unix:${path.join(bDir, 'control.sock')},server=on,wait=off`,
      '-pidfile', path.join(bDir, 'qemu.pid'), '-daemonize',
    ]);
    await h.api('POST', '/hosts', { name: 'kvm-b', kind: 'qemu', uri: path.join(bDir, 'qmp.sock'), agent: 'src2' });
    await h.api('POST', '/jobs', {
      name: 'pj', vms: [A, B], repository: 'remote-repo', storage: 'per-job', method: 'forever-forward', retention: { points: 2 },
      blockSize: 262144, retries: { count: 0, waitMinutes: 0 },
    });
  }, 120_000);

  afterAll(() => {
    try {
      spawnSync('sh', ['-c', `kill -9 $(cat ${path.join(bDir, 'qemu.pid')})`]);
    } catch {
      // not started
    }
    if (h) expect(h.close()).toBe('');
  });

  it('3 runs, retention 2: one .vbk + one .vib in _all, one record per VM per point, every kept point of every VM bit-exact', async () => {
    const logs: string[] = [];
    for (let k = 0; k < 3; k++) {
      if (k > 0) await writeBoth(k);
      const s = await runJob();
      expect(s.state, logText(s)).toMatch(/success|warning/);
      logs.push(logText(s));
    }
    expect(logs[0]).toMatch(/this run: full/);
    expect(logs[0]).toMatch(new RegExp(`job pj keeps its VMs in one restore point \\(storage per-job\\): ${A} \\(from agent src1\\), ${B} \\(from agent src2\\); agent repo1 writes it`));
    expect(logs[1]).toMatch(/this run: incremental/);
    expect(logs[2]).toMatch(/retention: merged increment/);
    expect(logs[2]).toMatch(new RegExp(`restore point \\S+ of job pj holds 2 VM\\(s\\): ${A} \\(\\S+\\), ${B} \\(\\S+\\)`));
    // One point per run for both VMs, written by the repository agent; no folder per VM.
    expect(jobFiles().map((f) => `${path.dirname(f)}:${path.extname(f)}`).sort()).toEqual(['_all:.vbk', '_all:.vbm', '_all:.vib']);
    const kept = await allPoints();
    expect(kept.map((p) => p.kind)).toEqual(['full', 'incremental']);
    expect(await everySliceBitExact()).toBe(4);
    // One catalog record per VM per kept point: its slice.
    const slices = catalogPoints(kept);
    const listed = await catalog();
    for (const vm of [A, B]) expect(listed.get(vm)).toEqual(slices.filter((p) => p.vm === vm).map((p) => p.id).sort());
    // The newest slice of each VM, restored by the repository agent through the server.
    for (const p of slices.filter((x) => x.base !== null)) expect(await h.restoredSha(p.id)).toBe(shaOf.get(p.id));
  }, 240_000);

  it('a VM failing mid-transfer writes nothing for any VM; the next run is an incremental holding both, bit-exact', async () => {
    const before = jobFiles();
    const pointsBefore = (await allPoints()).map((p) => p.id);
    const catalogBefore = await catalog();
    // B's stream is held to 4 Mbit/s while 2 MiB of random data wait in it: time to pull its disk away.
    await h.api('POST', '/throttling-rules', { name: 'slow-b', source: bIp, target: `${h.ip.repo}/32`, mbps: 4 });
    try {
      await h.write(MiB, 65536, 0x77);
      writeB(512 * 1024, randomBytes(2 * MiB));
      const { sessionId } = await h.api<{ sessionId: string }>('POST', '/jobs/pj/run', {});
      // Once B's backup view exports its disk, the export goes away (its NBD reads fail).
      let deleted = '';
      for (let i = 0; i < 600 && deleted === ''; i++) {
        const exports = qmpB('query-block-exports') as Array<{ id: string }>;
        if (exports.length > 0) {
          qmpB('block-export-del', { id: exports[0]!.id, mode: 'hard' });
          deleted = exports[0]!.id;
        } else await new Promise((r) => setTimeout(r, 50));
      }
      expect(deleted, 'B\'s backup view never exported its disk').not.toBe('');
      const failed = await h.waitSession(sessionId);
      expect(failed.state, logText(failed)).toBe('failed');
      // Every task of the job fails, naming the VM that failed; nothing of the run is visible.
      expect(failed.tasks.length).toBe(2);
      for (const t of failed.tasks) {
        expect(t.state, logText(failed)).toBe('failed');
        expect(t.message, logText(failed)).toMatch(new RegExp(`job pj's restore point \\(all its VMs in one\\) is not written: VM ${B} \\(agent src2\\)`));
      }
      expect(jobFiles()).toEqual(before);
      expect((await allPoints()).map((p) => p.id)).toEqual(pointsBefore);
      expect(await catalog()).toEqual(catalogBefore);
    } finally {
      await h.api('DELETE', '/throttling-rules/slow-b');
    }
    // The next run continues the chain (both VMs' change tracking was kept): an incremental, bit-exact.
    const next = await runJob();
    expect(next.state, logText(next)).toMatch(/success|warning/);
    expect(logText(next)).toMatch(/this run: incremental/);
    const kept = await allPoints();
    expect(kept.map((p) => p.kind)).toEqual(['full', 'incremental']);
    expect(jobFiles().map((f) => `${path.dirname(f)}:${path.extname(f)}`).sort()).toEqual(['_all:.vbk', '_all:.vbm', '_all:.vib']);
    expect(await everySliceBitExact()).toBe(4);
    for (const p of catalogPoints([kept.at(-1)!])) expect(await h.restoredSha(p.id)).toBe(shaOf.get(p.id));
  }, 240_000);

  it('reverse incremental per job on the agent: the newest point is the full holding both VMs, the one before a .vrb; both bit-exact', async () => {
    await h.api('POST', '/jobs', {
      name: 'pjr', vms: [A, B], repository: 'remote-repo', storage: 'per-job', method: 'reverse', retention: { points: 3 },
      blockSize: 262144, retries: { count: 0, waitMinutes: 0 },
    });
    const first = await runJob('pjr');
    expect(first.state, logText(first)).toMatch(/success|warning/);
    await writeBoth(5);
    const second = await runJob('pjr');
    expect(second.state, logText(second)).toMatch(/success|warning/);
    expect(logText(second)).toMatch(/this run: reverse/);
    const kept = (await allPoints('pjr')).sort((a, b) => a.time.getTime() - b.time.getTime());
    expect(kept.map((p) => p.kind)).toEqual(['reverse', 'full']);
    expect(jobFiles('pjr').map((f) => `${path.dirname(f)}:${path.extname(f)}`).sort()).toEqual(['_all:.vbk', '_all:.vbm', '_all:.vrb']);
    expect(await everySliceBitExact('pjr')).toBe(4);
  }, 240_000);

  it('a health-check session of the job checks the _all chain on the repository agent, names a flipped byte as VM/DISK; the next run re-reads it from that VM, bit-exact', async () => {
    // A block the latest point stored for B (written by the run after the failure).
    const latest = (await allPoints()).at(-1)!;
    const repository = await openRepository(h.repoDir);
    const opened = await repository.openRestorePoint(latest.id);
    const block = Math.floor((512 * 1024 + 4096) / 262144);
    const resolved = await opened.resolve(`${B}/vda`, block);
    await opened.close();
    expect(resolved.kind === 'stored' && resolved.file.path === latest.file, `block ${block} of ${B}/vda is in ${latest.file}`).toBe(true);
    const entry = (resolved as Extract<typeof resolved, { kind: 'stored' }>).entry;
    const f = await open(latest.file, 'r+');
    try {
      const at = entry.recordOffset + RECORD_HEADER_SIZE + Math.floor(entry.storedLength / 2);
      const b = Buffer.alloc(1);
      await f.read(b, 0, 1, at);
      b[0] = b[0]! ^ 0x5a;
      await f.write(b, 0, 1, at);
    } finally {
      await f.close();
    }
    const check = await h.waitSession((await h.api<{ sessionId: string }>('POST', '/jobs/pj/health-check', {})).sessionId);
    expect(check.state, logText(check)).toBe('warning');
    const named = /damaged block (\d+) of disk (\S+)\/vda \(disk offset \d+\) in (\S+), read by point/.exec(logText(check));
    expect(named, logText(check)).not.toBeNull();
    expect(named!.slice(1)).toEqual([String(block), B, latest.file]);
    // The catalog: B's part of that point is corrupt, A's (no damaged block of A) stays ready.
    const states = new Map((await h.api<{ items: Array<{ id: string; state: string }> }>('GET', '/restore-points')).items.map((p) => [p.id, p.state]));
    const [sliceA, sliceB] = [A, B].map((vm) => catalogPoints([latest]).find((p) => p.vm === vm)!.id);
    expect([states.get(sliceA!), states.get(sliceB!)]).toEqual(['ready', 'corrupt']);

    await writeBoth(7);
    const repaired = await runJob();
    expect(repaired.state, logText(repaired)).toMatch(/success|warning/);
    expect(logText(repaired)).toMatch(new RegExp(`repair: re-reading ${B}/vda blocks [0-9, ]*\\b${block}\\b`));
    expect(logText(repaired)).toMatch(/vda: re-reading \d+ block\(s\) a health check found damaged/);
    // The new point of each VM restores bit-exact through the repository agent (the damaged one before it stays damaged).
    for (const p of catalogPoints([(await allPoints()).at(-1)!])) expect(await h.restoredSha(p.id), `VM ${p.vm}`).toBe(shaOf.get(p.id));
  }, 240_000);

  // Last: it moves the server's clock a day on.
  it('forward per job with a synthetic full on the server\'s next day: built from the _all chain on the agent, nothing read again; bit-exact', async () => {
    const days = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];
    const tomorrow = days[(h.serverNow().getUTCDay() + 6 + 1) % 7]!;
    await h.api('POST', '/jobs', {
      name: 'pjf', vms: [A, B], repository: 'remote-repo', storage: 'per-job', method: 'forward', retention: { points: 7 }, syntheticFull: { weekdays: [tomorrow] },
      blockSize: 262144, retries: { count: 0, waitMinutes: 0 },
    });
    const first = await runJob('pjf');
    expect(first.state, logText(first)).toMatch(/success|warning/);
    await h.advanceDays(1);
    await writeBoth(8);
    const second = await runJob('pjf');
    expect(second.state, logText(second)).toMatch(/success|warning/);
    expect(logText(second)).toMatch(/this run: synthetic-full/);
    expect(logText(second)).toMatch(/synthetic full built from the chain: point \S+ is now a full \(\d+ bytes, nothing read from the source\); repository I\/O: [1-9]\d* bytes read, [1-9]\d* written/);
    expect((await allPoints('pjf')).map((p) => p.kind)).toEqual(['full', 'full']);
    expect(await everySliceBitExact('pjf')).toBe(4);
  }, 240_000);
});
