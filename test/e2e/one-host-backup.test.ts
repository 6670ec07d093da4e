// The one-host install end to end, as a user runs it: a real `bulwark server` (real data path, no
// simulation), a running test guest (TCG) added as a qemu host, a job run twice with
// `bulwark job run --wait` (full, then incremental after guest writes), `restore-point list`
// showing both, and `bulwark restore disk` of each: identical, byte for byte, to the guest's disk at
// the instant of its backup, e2fsck clean, the guest's files right, the file written between the
// runs absent from the first point and present in the second.
// The disk's state at each backup's instant: the guest remounts its root (the disk's only file
// system) read-only before the run, which writes back and flushes everything (QEMU writes its qcow2
// metadata out on the guest's flush), so the image file holds exactly what the guest sees; a copy
// of it (`qemu-img convert -U`) is the reference, and the disk cannot change until the guest
// remounts it read-write after the run. The backup still quiesces the guest (freezing a read-only
// file system succeeds), so the run is the same as any other.
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { promisify } from 'node:util';
import { assertIdenticalImages, e2fsckClean, sha256InImage, startTestGuest, type TestGuest } from '../fixtures/guest.js';
import { bulwark, ensureBuilt, startServerProcess, type ServerProcess } from './program.js';

let tmp: string;
let server: ServerProcess;
let guest: TestGuest;
let env: Record<string, string>;
const VM = 'e2e-guest';

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'bulwark-e2e-onehost-'));
  await ensureBuilt();
  guest = await startTestGuest({ name: VM });
  await guest.waitForAgent();
  server = await startServerProcess(join(tmp, 'data'), { simulate: false });
  env = { BULWARK_DATA: server.dataDir, BULWARK_CONFIG: join(tmp, 'config'), HOME: tmp };
}, 300_000);

afterAll(async () => {
  if (server) await server.stop();
  await guest?.stop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

const exec = promisify(execFile);

/**
 * Runs `job run --wait` with the guest's disk still (root remounted read-only) and returns the run
 * and a raw copy of the disk as it was during the run: the reference a restore must match.
 */
async function runWithReference(args: string[], reference: string): Promise<Awaited<ReturnType<typeof bulwark>>> {
  await guest.sh('sync && mount -o remount,ro /');
  try {
    const disk = guest.disks[0]!;
    await exec('qemu-img', ['convert', '-U', '-f', disk.format, '-O', 'raw', disk.path, reference]);
    return await bulwark(args, env);
  } finally {
    await guest.sh('mount -o remount,rw /');
  }
}

interface PointJson {
  id: string;
  vm: string;
  type: 'full' | 'incremental';
  time: string;
  disks: Array<{ name: string; size: number }>;
}

describe('one-host install: back up a running VM and restore its disk', () => {
  it('runs full + incremental with job run --wait and restores each point', async () => {
    const host = await bulwark(['host', 'add', 'kvm1', '--qemu', join(guest.dir, 'qmp.sock')], env);
    expect(host.stderr).toBe('');
    expect(host.code).toBe(0);
    const job = await bulwark(['job', 'create', 'guests', '--vm', VM, '--repo', 'default'], env);
    expect(job.code, job.stderr).toBe(0);

    const references = [join(tmp, 'at-full.raw'), join(tmp, 'at-incremental.raw')];
    const first = await runWithReference(['job', 'run', 'guests', '--wait'], references[0]!);
    expect(first.code, first.stdout + first.stderr).toBe(0);

    const between = '/srv/between-runs.bin';
    const out = await guest.sh(`dd if=/dev/urandom of=${between} bs=1k count=700 2>/dev/null && sync && sha256sum ${between}`);
    const betweenSum = out.split(' ')[0]!;

    const second = await runWithReference(['job', 'run', 'guests', '--wait'], references[1]!);
    expect(second.code, second.stdout + second.stderr).toBe(0);

    // An incremental reads a fraction of the disk; a finished session still shows 100%.
    const sessions = JSON.parse((await bulwark(['session', 'list', '--job', 'guests', '--json'], env)).stdout) as Array<{ id: string; state: string; progress: { percent: number } }>;
    expect(sessions.map((x) => [x.state, x.progress.percent])).toEqual([
      ['success', 100],
      ['success', 100],
    ]);

    // Bottleneck statistics of the in-process data path: the stages are measured per task (no
    // timing thresholds: present, none busier than the task ran), and session show names the busiest.
    for (const { id } of sessions) {
      type Stages = { busyMs: Record<string, number>; bottleneck: string | null; summary: string };
      const shown = JSON.parse((await bulwark(['session', 'show', id, '--json'], env)).stdout) as { stages?: Stages; tasks: Array<{ startedAt: string; endedAt: string; stages?: Stages }> };
      expect(shown.stages?.bottleneck, JSON.stringify(shown.stages)).toMatch(/^(source|proxy|target|throttling)$/);
      for (const t of shown.tasks) {
        const busy = t.stages!.busyMs;
        expect(busy.source, JSON.stringify(busy)).toBeGreaterThan(0);
        const ran = Date.parse(t.endedAt) - Date.parse(t.startedAt) + 50;
        for (const v of Object.values(busy)) expect(v).toBeLessThanOrEqual(ran);
      }
      expect((await bulwark(['session', 'show', id], env)).stdout).toMatch(/stages:\s+Source \d+% > Proxy \d+% > Network \d+% > Target \d+%.*; bottleneck: (Source|Proxy|Target|Throttling)\n/);
    }
    // What each run backed up (newest first), and why the first read in full: nobody asked for a
    // full, it is the chain's first backup.
    const shownText = await Promise.all(sessions.map(async ({ id }) => (await bulwark(['session', 'show', id], env)).stdout));
    expect(shownText.map((t) => /^backup:\s+(.*)$/m.exec(t)?.[1])).toEqual(['incremental', 'full']);
    expect(shownText[1]).toMatch(/vda: full read \(no-checkpoint: first backup of the chain\)/);
    expect(shownText.join('\n')).not.toMatch(/full-requested|^full:/m);

    const list = await bulwark(['restore-point', 'list', '--vm', VM, '--json'], env);
    expect(list.code).toBe(0);
    const points = (JSON.parse(list.stdout) as PointJson[]).sort((a, b) => a.time.localeCompare(b.time));

    // `vm list`: the running guest on kvm1 (the server's own host), its disk, the job naming it and its newest point.
    const vms = await bulwark(['vm', 'list', '--json'], env);
    expect(vms.code, vms.stderr).toBe(0);
    const inventory = JSON.parse(vms.stdout) as { items: Array<{ name: string; host: string; agent: string | null; state: string; disks: Array<{ name: string; sizeBytes: number; image: string }>; jobs: string[]; lastPoint: { id: string; type: string } | null }>; unreachable: unknown[] };
    expect(inventory.unreachable).toEqual([]);
    expect(inventory.items).toEqual([expect.objectContaining({ name: VM, host: 'kvm1', agent: null, state: 'running', jobs: ['guests'], lastPoint: expect.objectContaining({ id: points[1]!.id, type: 'incremental' }) })]);
    expect(inventory.items[0]!.disks.map((d) => [d.name, d.sizeBytes])).toEqual(points[1]!.disks.map((d) => [d.name, d.size]));
    expect((await bulwark(['vm', 'list', '--host', 'kvm1'], env)).stdout).toMatch(new RegExp(`^${VM} +kvm1 +running +\\S+ [\\d.]+ \\S+ +guests +\\S`, 'm'));
    expect(points.map((p) => p.type)).toEqual(['full', 'incremental']);
    const disk = points[0]!.disks[0]!.name;

    const images: string[] = [];
    for (const [i, p] of points.entries()) {
      const to = join(tmp, `point-${i}.raw`);
      const r = await bulwark(['restore', 'disk', p.id, '--disk', disk, '--to', to, '--json'], env);
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ point: p.id, disk, path: to, format: 'raw' });
      await assertIdenticalImages(to, references[i]!);
      await e2fsckClean(to);
      for (const [file, sum] of Object.entries(guest.image.manifest.testdata)) {
        expect(await sha256InImage(to, `${guest.image.manifest.testdataDir}/${file}`), file).toBe(sum);
      }
      images.push(to);
    }
    expect(await sha256InImage(images[0]!, between)).toBeUndefined();
    expect(await sha256InImage(images[1]!, between)).toBe(betweenSum);

    // VM@latest names the newest point; an existing file is not overwritten without --overwrite.
    const latest = await bulwark(['restore', 'disk', `${VM}@latest`, '--disk', disk, '--to', images[1]!], env);
    expect(latest.code).toBe(1);
    expect(latest.stderr).toMatch(/exists|overwrite/i);
    const again = await bulwark(['restore', 'disk', `${VM}@latest`, '--disk', disk, '--to', images[1]!, '--overwrite', '--json'], env);
    expect(again.code, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject({ point: points[1]!.id });
  });
});
