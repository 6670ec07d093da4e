// `VM@latest` / `VM@<time>` in the console when a health check marked points corrupt, through a
// real server (SQLite, the repository folder, `repo rescan`) and the real console commands. The
// damage marks are made by the repository's own health check after a flipped byte, and reach the
// catalog through `repo rescan` (before: a rescan imported every point as `ready`). `VM@latest`
// passes over newer corrupt points saying so (before: silently an older point), and a VM whose
// points are all corrupt is named as such (before: "no restore point of VM … exists").
import { mkdtempSync, rmSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackupFile } from '../../src/repository/backup-file.js';
import { openRepository, type Repository } from '../../src/repository/index.js';
import { DiskModel, iterate } from '../../src/repository/test-helpers.js';
import { startServer, type RunningServer } from '../../src/server/main.js';
import { inProcessConsole } from '../fixtures/console.js';

const BS = 262144;
let tmp: string;
let server: RunningServer;
const bulwark = inProcessConsole(() => ({ env: { BULWARK_CONFIG: join(tmp, 'cli') }, prefix: ['--server', `unix:${server.socketPath}`] }));

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'bulwark-point-names-'));
  server = await startServer({ dataDir: join(tmp, 'data'), listen: 'none', simulate: true, configBackupAt: false, print: () => undefined });
});

afterAll(async () => {
  await server?.close();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

/** Flips one byte in the middle of the stored record of `block` of vda in `file`. */
async function flip(file: string, block: number): Promise<void> {
  const f = await BackupFile.open(file);
  const e = await f.entry('vda', block);
  await f.close();
  if (e.kind !== 'stored') throw new Error(`block ${block} of ${file} is not stored`);
  const h = await open(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    const at = e.recordOffset + 32 + Math.floor(e.storedLength / 2);
    await h.read(b, 0, 1, at);
    b[0] = b[0]! ^ 0x10;
    await h.write(b, 0, 1, at);
  } finally {
    await h.close();
  }
}

interface Listed {
  id: string;
  time: string;
  state: string;
}

describe('VM@latest with points a health check marked corrupt', () => {
  it('passes over newer corrupt points with a note, and names an all-corrupt VM as such', async () => {
    const repoPath = join(server.dataDir, 'repository');
    const repo: Repository = await openRepository(repoPath);
    const m = new DiskModel(4 * BS + 100, BS);
    const points: Array<{ id: string; file: string; bytes: Buffer }> = [];
    for (const [kind, change] of [
      ['full', [[0, 'data'], [1, 'data']]],
      ['incremental', [[2, 'data', 5]]],
      ['incremental', [[3, 'data', 9]]],
    ] as const) {
      const w = await repo.startRestorePoint({ job: 'nightly', vm: 'web', kind, blockSize: BS, disks: [{ name: 'vda', size: m.size }], threads: 0 });
      await w.writeDisk('vda', iterate(m.change(change.map((c) => [...c]))));
      const p = await w.commit();
      points.push({ id: p.id, file: p.file, bytes: Buffer.from(m.bytes) });
    }
    const [p1, p2, p3] = points as [(typeof points)[0], (typeof points)[0], (typeof points)[0]];

    // The newest point's own block damaged: its health check marks it (alone) corrupt.
    await flip(p3.file, 3);
    expect((await repo.healthCheck('nightly', 'web', { wholeChain: true })).ok).toBe(false);
    expect((await bulwark.run('repo', 'rescan', 'default')).code).toBe(0);
    const listed = await bulwark.json<Listed[]>('restore-point', 'list', '--vm', 'web');
    expect(Object.fromEntries(listed.map((p) => [p.id, p.state]))).toEqual({ [p1.id]: 'ready', [p2.id]: 'ready', [p3.id]: 'corrupt' });

    const to = join(tmp, 'latest.raw');
    const r = await bulwark.run('restore', 'disk', 'web@latest', '--disk', 'vda', '--to', to, '--json');
    expect(r.code, r.err).toBe(0);
    expect((JSON.parse(r.out) as { point: string }).point).toBe(p2.id);
    const p2Time = listed.find((p) => p.id === p2.id)!.time;
    expect(r.err).toBe(`note: web@latest is ${p2.id} (${p2Time}): the newer ${p3.id} is marked corrupt by a health check (give an id to restore from one)\n`);
    expect((await readFile(to)).equals(p2.bytes)).toBe(true);

    // The full's block every point inherits: all three corrupt.
    await flip(p1.file, 0);
    expect((await repo.healthCheck('nightly', 'web', { wholeChain: true })).ok).toBe(false);
    expect((await bulwark.run('repo', 'rescan', 'default')).code).toBe(0);
    expect((await bulwark.json<Listed[]>('restore-point', 'list', '--vm', 'web')).map((p) => p.state)).toEqual(['corrupt', 'corrupt', 'corrupt']);
    const none = await bulwark.run('restore', 'disk', 'web@latest', '--disk', 'vda', '--to', join(tmp, 'none.raw'));
    expect(none.code).toBe(1);
    expect(none.err).toContain(`no intact restore point of VM web: its 3 point(s) there are marked corrupt by a health check (newest: ${p3.id}`);
    expect(none.err).toMatch(/restore from one by its id/);
    // A VM with no points at all, and a time before the first point, are still "no restore point".
    expect((await bulwark.run('restore', 'disk', 'nosuchvm@latest', '--disk', 'vda', '--to', join(tmp, 'x.raw'))).err).toMatch(/no restore point of VM nosuchvm exists/);
    expect((await bulwark.run('restore', 'disk', 'web@2000-01-01T00:00:00Z', '--disk', 'vda', '--to', join(tmp, 'x.raw'))).err).toMatch(
      new RegExp(`no restore point of VM web at or before 2000-01-01T00:00:00Z exists[\\s\\S]*its oldest point is ${p1.id}`),
    );
  });
});
