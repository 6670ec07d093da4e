// The instant recovery state file (docs/formats/instant-recoveries.md) over the real broker, with
// the agents played by the test: a restarted server lists the sessions it names at once (their
// agent not back yet) and takes their serve tasks back, so the repository agent is not told to
// stop them after its adoption window; stop updates the file; a damaged file is ignored.
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { AgentTask } from '../../transport/agent-tasks.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import { AgentTaskBroker } from '../dispatch/broker.js';
import { RemoteRecovery } from '../dispatch/recovery.js';
import { systemClock, type ServiceContext } from '../services/common.js';
import { startRecoveryService, type RecoveryService } from './recovery.js';

const session = {
  id: 'ir-1',
  name: 'web1-ir',
  vm: 'web1',
  pointId: 'p1',
  state: 'running-from-backup',
  runningFromBackup: true,
  startedAt: '2026-11-26T06:00:00.000Z',
  pid: 4242,
  dir: '/var/lib/bulwark/ir/web1-ir',
  qmpSocket: '/var/lib/bulwark/ir/web1-ir/qmp.sock',
  agentSocket: '/var/lib/bulwark/ir/web1-ir/qga.sock',
  consoleLog: '/var/lib/bulwark/ir/web1-ir/console.log',
  disks: [{ name: 'vda', size: 1 << 20, overlay: '/var/lib/bulwark/ir/web1-ir/vda.overlay.qcow2', target: null }],
  serve: { agent: 'repo1', taskId: 't-serve' },
  host: 'kvm-b',
};
const FORMAT = 'bulwark instant recoveries v1';

let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let broker: AgentTaskBroker;
let service: RecoveryService | undefined;

beforeEach(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-recovery-state-'));
  cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  broker = new AgentTaskBroker({ pollWaitMs: 50, agentLostMs: 5000, adoptWindowMs: 200 });
});

afterEach(async () => {
  await service?.close();
  service = undefined;
  broker.close();
  await cdb.close();
  await rm(dir, { recursive: true, force: true });
});

const poll = (agent: string, running: string[] = []) => broker.poll(agent, { bootId: `boot-${agent}`, running }, new Promise(() => undefined));
const stateFile = (): string => path.join(dir, 'data', 'instant-recoveries.json');

/**
 * repo1 polls for `ms` with `running`, answering the server's `instant-recovery list` with no
 * sessions (while the server is still asking, it stops none of repo1's unknown tasks).
 */
async function repoAnswers(running: string[], ms: number): Promise<void> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    for (const t of (await poll('repo1', running)).tasks) {
      if (t.kind === 'instant-recovery' && t.action === 'list') broker.events('repo1', t.taskId, [{ type: 'result', ok: true, value: { sessions: [] } }]);
    }
  }
}

describe('instant recovery state file', () => {
  it('a restarted server lists the sessions it names at once and takes their serve tasks back; stop empties it', async () => {
    await writeFile(path.join(await mkdtempData(), 'instant-recoveries.json'), JSON.stringify({ format: FORMAT, sessions: [{ agent: 'dst1', host: 'kvm-b', serve: session.serve, session }] }));
    service = await startRecoveryService({ ctx, dataDir: path.join(dir, 'data'), remote: new RemoteRecovery(broker) });
    // dst1 has not polled this server: the session is listed as the file has it.
    expect(await service.listInstant()).toEqual([expect.objectContaining({ id: 'ir-1', agent: 'dst1', host: 'kvm-b', state: 'running-from-backup', pid: 4242 })]);
    // repo1 still runs the serve task (and one the server never knew): past its adoption window,
    // the serve task's report is answered "go on", the unknown one "stop".
    await repoAnswers(['t-serve', 't-other'], 400);
    expect(broker.events('repo1', 't-serve', [{ type: 'progress', progress: { streams: 2, blocks: 9 } }])).toMatchObject({ cancel: false });
    expect(broker.events('repo1', 't-other', [{ type: 'progress', progress: {} }])).toMatchObject({ cancel: true });

    // dst1 comes back: its list names the session; stop goes to it, then the serve task is cancelled.
    const answer = (tasks: readonly AgentTask[]): void => {
      for (const t of tasks) {
        if (t.kind !== 'instant-recovery') continue;
        const value = t.action === 'list' ? { sessions: [session] } : t.action === 'stop' ? { stopped: t.session } : session;
        broker.events('dst1', t.taskId, [{ type: 'result', ok: true, value }]);
      }
    };
    answer((await poll('dst1')).tasks);
    const stopped = service.stopInstant('ir-1');
    for (let i = 0; i < 50 && (await Promise.race([stopped.then(() => true), new Promise<false>((r) => setTimeout(() => r(false), 10))])) === false; i++) answer((await poll('dst1')).tasks);
    await stopped;
    expect((await poll('repo1', ['t-serve'])).cancel).toEqual([expect.objectContaining({ taskId: 't-serve', reason: 'instant recovery stopped' })]);
    expect(JSON.parse(await readFile(stateFile(), 'utf8'))).toEqual({ format: FORMAT, sessions: [] });
  });

  it('a damaged state file is ignored (logged): the server starts, sessions are found by listing agents', async () => {
    await writeFile(path.join(await mkdtempData(), 'instant-recoveries.json'), JSON.stringify({ format: FORMAT, sessions: [{ agent: 'dst1', session: { ...session, state: 'running' } }] }));
    service = await startRecoveryService({ ctx, dataDir: path.join(dir, 'data'), remote: new RemoteRecovery(broker) });
    expect(await service.listInstant()).toEqual([]);
    await repoAnswers(['t-serve'], 400);
    expect(broker.events('repo1', 't-serve', [{ type: 'progress', progress: {} }])).toMatchObject({ cancel: true });
  });
});

async function mkdtempData(): Promise<string> {
  const d = path.join(dir, 'data');
  await mkdir(d, { recursive: true });
  return d;
}
