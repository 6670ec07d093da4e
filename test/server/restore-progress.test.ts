// `bulwark restore disk` shows its session's progress while it runs, and `bulwark session stop`
// stops it, in the server's process and on the repository's agent. A real server (startServer:
// its socket, TLS agent link, routes, session events and stop wiring), a real agent enrolled over
// TLS (in this process), the console in this process (non-terminal output), real repositories
// with a 256 MiB point.
// BULWARK_TEST_RESTORE_PACE_MS slows each 2 MiB batch of the restore a little, so it runs long
// enough (about 2 s) to be watched and stopped; nothing here waits for a time, only for states.
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DiskBlock } from '../../src/disk/types.js';
import { openRepository } from '../../src/repository/index.js';
import { runAgent, type RunningAgent } from '../../src/agent/main.js';
import { startServer, type RunningServer } from '../../src/server/main.js';
import { getRepository } from '../../src/server/services/infrastructure.js';
import type { Session } from '../../src/server/services/model.js';
import { createRestoreSession, getSession, listSessions, recordRestorePoint, updateRestoreSession } from '../../src/server/services/sessions.js';
import { inProcessConsole, type InProcessConsole } from '../fixtures/console.js';

const BS = 1 << 20;
const BLOCKS = 256;
const SIZE = BLOCKS * BS;
/** ms before each 2 MiB batch: 128 batches, about 2 s a restore. */
const PACE = '15';
let dir: string;
let server: RunningServer;
let bulwark: InProcessConsole;
let pointId: string;
let agent: RunningAgent | undefined;
const expectedSha = createHash('sha256');

function block(i: number): Buffer {
  // Every block different (no dedup), none zero.
  const data = Buffer.alloc(BS, (i % 251) + 1);
  data.writeUInt32LE(i, 0);
  return data;
}

/** Writes a 256 MiB point of VM `vm` into repository `name` of the catalog; returns its id. */
async function writePoint(name: string, vm: string, sha?: ReturnType<typeof createHash>): Promise<string> {
  const ctx = server.context;
  const repository = await getRepository(ctx, name);
  const repo = await openRepository(repository.path, { create: true });
  const w = await repo.startRestorePoint({ job: 'j', vm, kind: 'full', blockSize: BS, compression: 'none', disks: [{ name: 'vda', size: SIZE }] });
  async function* blocks(): AsyncGenerator<DiskBlock> {
    for (let i = 0; i < BLOCKS; i++) {
      const data = block(i);
      sha?.update(data);
      yield { index: i, data };
    }
  }
  await w.writeDisk('vda', blocks());
  const p = await w.commit();
  await recordRestorePoint(ctx, { id: p.id, vm, disks: [{ name: 'vda', size: SIZE }], time: p.time.toISOString(), type: 'full', chainId: p.chainId, size: p.fileBytes, repositoryId: repository.id, jobId: null });
  return p.id;
}

beforeAll(async () => {
  process.env.BULWARK_TEST_RESTORE_PACE_MS = PACE;
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-restore-progress-'));
  server = await startServer({ dataDir: path.join(dir, 'data'), listen: '127.0.0.1:0', localAgent: false, configBackupAt: false, simulate: true, print: () => undefined });
  bulwark = inProcessConsole({ env: {}, prefix: ['--server', `unix:${server.socketPath}`] });
  pointId = await writePoint('default', 'vm1', expectedSha);
}, 120_000);

afterAll(async () => {
  delete process.env.BULWARK_TEST_RESTORE_PACE_MS;
  await agent?.close();
  await server?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** Ids of the restore-disk sessions so far. */
async function restoreSessions(): Promise<Set<string>> {
  return new Set((await listSessions(server.context, { kind: 'restore-disk' })).map((s) => s.id));
}

/** The new restore-disk session (not in `before`) once it has restored something (undefined if the restore ended first). */
async function runningWithProgress(before: Set<string>): Promise<Session | undefined> {
  for (let i = 0; i < 3000; i++) {
    const s = (await listSessions(server.context, { kind: 'restore-disk' })).find((x) => !before.has(x.id));
    if (s && s.state !== 'running') return undefined;
    if (s && s.progress.bytesRead > 0) return s;
    await new Promise((r) => setTimeout(r, 10));
  }
  return undefined;
}

describe('restore disk progress', () => {
  it('the session shows intermediate progress and the console prints progress lines (not a terminal)', async () => {
    const out = path.join(dir, 'progress');
    await mkdir(out);
    const to = path.join(out, 'vda.raw');
    const before = await restoreSessions();
    const restoring = bulwark.run('restore', 'disk', pointId, '--disk', 'vda', '--to', to);
    // Seen through the API (as `session show ID` reads it) while the restore runs.
    const seen: Session[] = [];
    for (let s = await runningWithProgress(before); s !== undefined && s.state === 'running'; s = await getSession(server.context, s.id)) {
      if (seen.at(-1)?.progress.bytesRead !== s.progress.bytesRead) seen.push(s);
      await new Promise((r) => setTimeout(r, 20));
    }
    const r = await restoring;
    expect(r.code, r.err).toBe(0);
    const intermediate = seen.filter((s) => s.progress.percent > 0 && s.progress.percent < 100);
    expect(intermediate.length, 'progress updates seen while running').toBeGreaterThanOrEqual(2);
    for (const s of intermediate) {
      expect(s.progress.bytesRead).toBeGreaterThan(0);
      expect(s.progress.bytesRead).toBeLessThan(SIZE);
      expect(s.progress.percent).toBeCloseTo((s.progress.bytesRead * 100) / SIZE, 6);
    }
    // The rate counts from the first report.
    for (const s of intermediate.slice(1)) expect(s.progress.processingRate).toBeGreaterThan(0);
    const id = seen[0]!.id;
    // The console: the session's id, then lines with bytes of the total, rate and ETA, then the result.
    expect(r.out).toContain(`session ${id} (stop it with: bulwark session stop ${id})`);
    const lines = r.out.split('\n').filter((l) => /restoring {2}\d+% \(/.test(l));
    expect(lines.length, r.out).toBeGreaterThanOrEqual(1);
    expect(lines.length, 'no line per update').toBeLessThanOrEqual(12);
    for (const l of lines) expect(l).toMatch(/restoring {2}(\d{1,2}|100)% \([\d.]+ (B|KiB|MiB) of 256 MiB\)(, [\d.]+ (B|KiB|MiB|GiB)\/s)?, ETA \S+$/);
    expect(lines.some((l) => /\/s, ETA \d/.test(l)), 'a line with the rate and the time left').toBe(true);
    expect(r.out.indexOf(lines[0]!)).toBeLessThan(r.out.indexOf('written to'));
    expect(r.out).toMatch(new RegExp(`session\\s+${id}`));
    // The image is whole, and the session ended at 100 %.
    expect(createHash('sha256').update(await readFile(to)).digest('hex')).toBe(expectedSha.copy().digest('hex'));
    const ended = await bulwark.json<Session>('session', 'show', id);
    expect(ended).toMatchObject({ kind: 'restore-disk', state: 'success', progress: { percent: 100, bytesRead: SIZE, bytesStored: SIZE } });
  }, 60_000);

  it('--json prints only the result', async () => {
    delete process.env.BULWARK_TEST_RESTORE_PACE_MS; // nothing to watch here
    const to = path.join(dir, 'json.raw');
    const r = await bulwark.run('restore', 'disk', pointId, '--disk', 'vda', '--to', to, '--json');
    expect(r.code, r.err).toBe(0);
    process.env.BULWARK_TEST_RESTORE_PACE_MS = PACE;
    expect(JSON.parse(r.out)).toMatchObject({ point: pointId, disk: 'vda', path: to, format: 'raw', size: SIZE, bytesWritten: SIZE });
  }, 60_000);
});

describe('session stop of a running restore disk', () => {
  it('stops it: no image and no temporary left, the session ends stopped saying who, the waiting console exits 1', async () => {
    const out = path.join(dir, 'stop');
    await mkdir(out);
    const to = path.join(out, 'vda.raw');
    const before = await restoreSessions();
    const restoring = bulwark.run('restore', 'disk', pointId, '--disk', 'vda', '--to', to);
    const running = await runningWithProgress(before);
    expect(running, 'the restore was still running').toBeDefined();
    const id = running!.id;
    const stop = await bulwark.run('session', 'stop', id);
    expect(stop.code, stop.err).toBe(0);
    expect(stop.out).toBe(`session ${id}: stopped (stopped by local-administrator)\n`);
    const r = await restoring;
    expect(r.code).toBe(1);
    expect(r.err).toMatch(new RegExp(`the restore of disk vda of restore point ${pointId} to ${to} was stopped by local-administrator \\(bulwark session stop ${id}\\)`));
    expect(existsSync(to)).toBe(false);
    expect(await readdir(out)).toEqual([]);
    const s = await bulwark.json<Session>('session', 'show', id);
    expect(s).toMatchObject({ state: 'stopped', reason: 'stopped by local-administrator' });
    expect(s.endedAt).toBeDefined();
    expect(s.log.some((l) => l.level === 'warning' && /was stopped by local-administrator/.test(l.message))).toBe(true);
    // Stopping it again: not running.
    const again = await bulwark.run('session', 'stop', id);
    expect(again.code).toBe(1);
    expect(again.err).toMatch(/is not running \(it is stopped\)/);
  }, 60_000);

  it('an instant recovery is refused, naming its own command', async () => {
    const id = await createRestoreSession(server.context, { kind: 'instant-recovery', vm: 'vm1-ir', point: pointId, ref: 'ir-test', status: 'running-from-backup' });
    const r = await bulwark.run('session', 'stop', id);
    expect(r.code).toBe(1);
    expect(r.err).toContain('is an instant recovery');
    expect(r.err).toContain('bulwark instant-recovery stop ir-test');
    expect((await getSession(server.context, id)).state).toBe('running');
  }, 30_000);
});

describe('session show --follow of the other restore kinds', () => {
  it('ends when the session ends: their changes are announced on the session events too', async () => {
    const id = await createRestoreSession(server.context, { kind: 'restore-vm', vm: 'vm1-new', point: pointId, ref: 'vr-test', message: 'restore of VM vm1 started' });
    const following = bulwark.run('session', 'show', id, '--follow');
    // Let the console subscribe first (else it reads the end at once and proves nothing).
    await new Promise((r) => setTimeout(r, 1000));
    await updateRestoreSession(server.context, id, { state: 'success', log: { level: 'info', message: 'VM vm1-new restored' } });
    const r = await following;
    expect(r.code, r.err).toBe(0);
    expect(r.out).toContain('VM vm1-new restored');
  }, 30_000);
});

describe("a restore on the repository's agent", () => {
  it('reports its progress to the session from the agent task, and session stop cancels it there', async () => {
    const { token } = await bulwark.json<{ token: string }>('agent', 'token', '--name', 'repo1');
    agent = await runAgent({ serverUrl: server.url!, dataDir: path.join(dir, 'agent1'), enrollToken: token, name: 'repo1' });
    const r1 = await bulwark.run('repo', 'add', 'r1', '--path', path.join(dir, 'agent-repo'), '--agent', 'repo1');
    expect(r1.code, r1.err).toBe(0);
    const point = await writePoint('r1', 'vm2');
    const out = path.join(dir, 'agent-out');
    await mkdir(out);
    const to = path.join(out, 'vda.raw');
    const before = await restoreSessions();
    const restoring = bulwark.run('restore', 'disk', point, '--disk', 'vda', '--to', to);
    const running = await runningWithProgress(before);
    expect(running, 'the restore was still running').toBeDefined();
    expect(running).toMatchObject({ agent: 'repo1', vm: 'vm2' });
    expect(running!.progress.bytesRead).toBeLessThan(SIZE);
    const stop = await bulwark.run('session', 'stop', running!.id);
    expect(stop.code, stop.err).toBe(0);
    const r = await restoring;
    expect(r.code).toBe(1);
    expect(r.err).toContain(`was stopped by local-administrator (bulwark session stop ${running!.id})`);
    expect(await getSession(server.context, running!.id)).toMatchObject({ state: 'stopped', reason: 'stopped by local-administrator' });
    // The agent's task removes its temporary on its way out (it may still be doing so as the server answers).
    for (let i = 0; i < 500 && (await readdir(out)).length > 0; i++) await new Promise((res) => setTimeout(res, 10));
    expect(await readdir(out)).toEqual([]);
  }, 60_000);
});
