// Backup methods through the product (issue 6): a real server in this process (real data path,
// real database) and the console as a user types it, on one running test guest with a second
// disk. Disk exclusion (no task, the log says so, the point lacks the disk), `backup quick`
// (an incremental of one VM in its job's chain; clear errors when the VM is in no job or in
// several), `export` (a standalone full in its own folder, restorable, importable into another
// repository with `repo rescan`, deleted by the server's sweep once expired), and the health
// check (a flipped byte is named by `job health-check`; the next run repairs it and that point
// restores bit-exact).
import { cp, mkdtemp, open, readdir, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inProcessConsole } from '../fixtures/console.js';
import { openRepository } from '../../src/repository/index.js';
import { startServer, type RunningServer } from '../../src/server/main.js';
import { systemClock, type Clock } from '../../src/server/scheduler/clock.js';
import { sweepExpired } from '../../src/server/services/backup-methods.js';
import { e2fsckClean, sha256InImage, startTestGuest, type TestGuest } from '../fixtures/guest.js';

const VM = 'methods-vm';
let tmp: string;
let guest: TestGuest;
let server: RunningServer;
let offsetMs = 0;
const clock: Clock = { now: () => new Date(Date.now() + offsetMs), setTimer: (ms, fn) => systemClock.setTimer(ms, fn) };

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'bulwark-methods-e2e-'));
  guest = await startTestGuest({ name: VM, extraDisks: [{ name: 'vdb', size: 16 << 20 }] });
  await guest.waitForAgent();
  server = await startServer({ dataDir: path.join(tmp, 'data'), listen: 'none', print: () => undefined, configBackupAt: false, clock, simulate: false });
}, 300_000);

afterAll(async () => {
  await server?.close();
  await guest?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

const cli = inProcessConsole(() => ({ env: { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: path.join(tmp, 'cli') } }));
const bw = cli.run;
const bwJson = cli.json;

interface SessionJson {
  id: string;
  state: string;
  tasks: Array<{ vm: string; disk: string; state: string; progress: { step?: { name: string; bytesDone: number; bytesTotal: number } } }>;
  log: Array<{ level: string; message: string }>;
}
interface PointJson {
  id: string;
  vm: string;
  type: string;
  time: string;
  job: string | null;
  repository: string;
  disks: Array<{ name: string; size: number }>;
  state: string;
}

const logText = (s: SessionJson): string => s.log.map((l) => `${l.level}: ${l.message}`).join('\n');

async function guestWrite(file: string, kib: number): Promise<string> {
  const out = await guest.sh(`mkdir -p /srv/m && dd if=/dev/urandom of=${file} bs=1k count=${kib} 2>/dev/null && sync && sha256sum ${file}`);
  return out.split(' ')[0]!;
}

async function restoreTo(point: string, name: string): Promise<{ path: string; sha256: string }> {
  const to = path.join(tmp, `${name}.raw`);
  const r = await bwJson<{ sha256: string }>('restore', 'disk', point, '--disk', 'vda', '--to', to, '--overwrite', '--digest');
  return { path: to, sha256: r.sha256 };
}

async function* walk(dir: string): AsyncGenerator<string> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    if (e.isDirectory()) yield* walk(path.join(dir, e.name));
    else yield path.join(dir, e.name);
  }
}

describe('backup methods through the console', () => {
  const files: Record<string, string> = {};

  it('excluded disks get no task, are named in the log and are not in the point', async () => {
    expect((await bw('host', 'add', 'kvm1', '--qemu', path.join(guest.dir, 'qmp.sock'))).code).toBe(0);
    const created = await bw('job', 'create', 'j1', '--vm', VM, '--repo', 'default', '--keep', '5', '--retries', '0', '--exclude-disk', `${VM}:vdb`);
    expect(created.code, created.err).toBe(0);
    const shown = await bw('job', 'show', 'j1');
    expect(shown.out).toMatch(/excluded disks:\s+methods-vm:vdb/);
    files.a = await guestWrite('/srv/m/a.bin', 512);
    const s = await bwJson<SessionJson>('job', 'run', 'j1', '--wait');
    expect(s.state, logText(s)).toBe('success');
    expect(s.tasks.map((t) => t.disk)).toEqual(['vda']);
    expect(logText(s)).toMatch(/disk\(s\) vdb of VM methods-vm excluded by the job/);
    const points = await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM);
    expect(points.map((p) => [p.type, p.disks.map((d) => d.name)])).toEqual([['full', ['vda']]]);
  });

  it('backup quick: an incremental of the one VM in its job\'s chain; clear errors otherwise', async () => {
    files.b = await guestWrite('/srv/m/b.bin', 256);
    const s = await bwJson<SessionJson>('backup', 'quick', VM, '--wait');
    expect(s.state, logText(s)).toBe('success');
    expect(logText(s)).toMatch(/quick backup of VM methods-vm: an incremental in job j1's chain/);
    expect(logText(s)).toMatch(/this run: incremental/);
    const points = await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM);
    expect(points.map((p) => [p.type, p.job])).toEqual([
      ['incremental', 'j1'],
      ['full', 'j1'],
    ]);
    const r = await restoreTo(points[0]!.id, 'quick');
    await e2fsckClean(r.path);
    expect(await sha256InImage(r.path, '/srv/m/b.bin')).toBe(files.b);

    const none = await bw('backup', 'quick', 'no-such-vm');
    expect(none.code).toBe(1);
    expect(none.err).toMatch(/VM no-such-vm is in no job/);
    expect(none.err).toMatch(/hint: add it to a job/);
    expect((await bw('job', 'create', 'j2', '--vm', VM, '--repo', 'default')).code).toBe(0);
    const two = await bw('backup', 'quick', VM);
    expect(two.code).toBe(2);
    expect(two.err).toMatch(/is in 2 jobs \(j1, j2\)/);
    expect(two.err).toMatch(/--job/);
    const wrong = await bw('backup', 'quick', VM, '--job', 'nope');
    expect(wrong.code).toBe(1);
    expect((await bw('job', 'delete', 'j2')).code).toBe(0);
  });

  it('export: a standalone full in its own folder, restorable, importable elsewhere with repo rescan, deleted when expired', async () => {
    const e = await bwJson<{ folder: string; pointId: string; expiresAt: string | null; repository: string }>('export', VM, '--repo', 'default', '--delete-after', '2h');
    expect(e.folder).toMatch(/^_export-methods-vm-\d{8}T\d{6}Z$/);
    expect(e.expiresAt).not.toBeNull();
    const repoPath = path.join(server.dataDir, 'repository');
    const exportFiles = [];
    for await (const f of walk(path.join(repoPath, e.folder))) if (!f.endsWith('writer.lock')) exportFiles.push(path.relative(repoPath, f));
    expect(exportFiles.map((f) => f.replace(/\d{8}T\d{6}Z-[0-9a-f]{8}/, 'T-ID')).sort()).toEqual([
      `${e.folder}/${VM}/${VM}.vbm`,
      `${e.folder}/${VM}/T-ID.vbk`,
    ].sort());
    // Outside the job: its point has no job, and the job's chain is unchanged.
    const points = await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM);
    expect(points.find((p) => p.id === e.pointId)).toMatchObject({ type: 'full', job: null });
    expect(points.filter((p) => p.job === 'j1')).toHaveLength(2);
    const restored = await restoreTo(e.pointId, 'export');
    await e2fsckClean(restored.path);
    expect(await sha256InImage(restored.path, '/srv/m/a.bin')).toBe(files.a);
    expect(await sha256InImage(restored.path, '/srv/m/b.bin')).toBe(files.b);
    // No change tracking left behind: the job's next run is still an incremental.
    const next = await bwJson<SessionJson>('job', 'run', 'j1', '--wait');
    expect(logText(next)).toMatch(/this run: incremental/);
    expect(logText(next)).not.toMatch(/full read|read in full/i);

    const listed = await bwJson<Array<{ folder: string }>>('exports', 'list');
    expect(listed.map((x) => x.folder)).toEqual([e.folder]);
    const other = path.join(tmp, 'other-repo');
    await cp(path.join(repoPath, e.folder), path.join(other, e.folder), { recursive: true });

    // Expired: the server's sweep deletes the folder and the catalog entry.
    offsetMs = 3 * 3600 * 1000;
    const swept = await sweepExpired(server.context);
    offsetMs = 0;
    expect(swept.exportsDeleted).toEqual([e.folder]);
    await expect(stat(path.join(repoPath, e.folder))).rejects.toThrow(/ENOENT/);
    expect(await bwJson<Array<unknown>>('exports')).toEqual([]);
    expect((await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM)).find((p) => p.id === e.pointId)).toBeUndefined();

    // Importable anywhere: the copy of the folder in another repository, found by a rescan.
    expect((await bw('repo', 'add', 'other', '--path', other)).code).toBe(0);
    const rescan = await bwJson<{ added: number; points: number }>('repo', 'rescan', 'other');
    expect(rescan).toMatchObject({ points: 1, added: 1 });
    expect((await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM)).find((p) => p.id === e.pointId)).toMatchObject({ repository: 'other', job: null, type: 'full' });
    expect((await restoreTo(e.pointId, 'imported')).sha256).toBe(restored.sha256);
  });

  it('retention through the product: points merged away disappear from restore-point list', async () => {
    const read = await bwJson<{ version: number }>('job', 'show', 'j1');
    expect(read.version).toBeGreaterThan(0);
    expect((await bw('job', 'edit', 'j1', '--keep', '2')).code).toBe(0);
    const s = await bwJson<SessionJson>('job', 'run', 'j1', '--wait');
    expect(logText(s), logText(s)).toMatch(/retention: merged increment/);
    // The merge was the committing task's live maintenance step; its last report stays recorded:
    // every disk byte of the increment gone through.
    const steps = s.tasks.flatMap((t) => (t.progress.step ? [t.progress.step] : []));
    expect(steps, JSON.stringify(s.tasks)).toHaveLength(1);
    expect(steps[0]!.name).toBe('merge');
    expect(steps[0]!.bytesDone).toBe(steps[0]!.bytesTotal);
    const shown = await bw('session', 'show', s.id);
    expect(shown.out).toMatch(/merge 100% \(\S+ \S+ of \S+ \S+\)/);
    const points = (await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM)).filter((p) => p.job === 'j1');
    // The merged increment's disks, every byte (the full now holds that point).
    const merged = points.find((p) => p.type === 'full')!;
    expect(steps[0]!.bytesTotal).toBe(merged.disks.reduce((sum, d) => sum + d.size, 0));
    expect(points.map((p) => p.type)).toEqual(['incremental', 'full']);
    const repository = await openRepository(path.join(server.dataDir, 'repository'));
    expect((await repository.listRestorePoints({ job: 'j1', vm: VM })).map((p) => p.id).sort()).toEqual(points.map((p) => p.id).sort());
  });

  it('health check names a flipped byte; the next run repairs it and that point restores bit-exact', async () => {
    // Keep every point from here on: a merge of the damaged increment into the full would refuse it.
    expect((await bw('job', 'edit', 'j1', '--keep', '10')).code).toBe(0);
    const points = await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM);
    const latest = points.filter((p) => p.job === 'j1')[0]!;
    // Flip one byte inside the data of the latest point's backup file (past its header page).
    const repoPath = path.join(server.dataDir, 'repository');
    let file = '';
    for await (const f of walk(path.join(repoPath, 'j1'))) if (f.includes(latest.id.slice(0, 8))) file = f;
    expect(file).not.toBe('');
    const size = (await stat(file)).size;
    const h = await open(file, 'r+');
    try {
      const at = 4096 + Math.floor((size - 8192) / 3);
      const b = Buffer.alloc(1);
      await h.read(b, 0, 1, at);
      b[0] = b[0]! ^ 0xff;
      await h.write(b, 0, 1, at);
    } finally {
      await h.close();
    }
    const check = await bwJson<SessionJson>('job', 'health-check', 'j1', '--wait');
    expect(check.state, logText(check)).toBe('warning');
    expect(logText(check)).toMatch(/damaged block \d+ of disk vda/);
    expect(logText(check)).toMatch(/next run re-reads these blocks/);
    // The catalog shows the damaged point as corrupt until a check reads it clean or it is deleted.
    const marked = (await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM)).filter((p) => p.job === 'j1');
    expect(marked.find((p) => p.id === latest.id)?.state).toBe('corrupt');

    const repaired = await bwJson<SessionJson>('job', 'run', 'j1', '--wait');
    expect(repaired.state, logText(repaired)).toMatch(/success|warning/);
    expect(logText(repaired)).toMatch(/repair: re-reading vda blocks/);
    const after = (await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM)).filter((p) => p.job === 'j1');
    expect(after[0]!.state).toBe('ready');
    expect(after.find((p) => p.id === latest.id)?.state).toBe('corrupt');
    const r = await restoreTo(after[0]!.id, 'repaired');
    await e2fsckClean(r.path);
    expect(await sha256InImage(r.path, '/srv/m/a.bin')).toBe(files.a);
    expect(await sha256InImage(r.path, '/srv/m/b.bin')).toBe(files.b);
    const clean = await bwJson<SessionJson>('job', 'health-check', 'j1', '--wait');
    expect(clean.state, logText(clean)).toBe('success');
  });

  it('a VM removed from its job keeps its points for removedVmRetentionDays after its last one, then the sweep deletes them', async () => {
    expect((await bw('job', 'edit', 'j1', '--vm', 'some-other-vm', '--removed-vm-retention', '2', '--exclude-disk', 'none')).code).toBe(0);
    const before = (await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM)).filter((p) => p.job === 'j1');
    expect(before.length).toBeGreaterThan(1);
    offsetMs = 1 * 86_400_000;
    expect((await sweepExpired(server.context)).removedVmPoints).toEqual([]);
    expect((await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM)).filter((p) => p.job === 'j1')).toHaveLength(before.length);
    offsetMs = 3 * 86_400_000;
    const swept = await sweepExpired(server.context);
    offsetMs = 0;
    expect(swept.errors).toEqual([]);
    expect(swept.removedVmPoints.sort()).toEqual(before.map((p) => p.id).sort());
    expect((await bwJson<PointJson[]>('restore-point', 'list', '--vm', VM)).filter((p) => p.job === 'j1')).toEqual([]);
    const repository = await openRepository(path.join(server.dataDir, 'repository'));
    expect(await repository.listRestorePoints({ job: 'j1', vm: VM })).toEqual([]);
  });
});
