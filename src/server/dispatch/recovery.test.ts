// RemoteRecovery's routing over the real (in-memory) task broker, with the agents played by the
// test: which agent gets which restore task, what source the host's agent is told to read from,
// and that the repository agent's serve task is stopped when the restore ends either way.
import { afterEach, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import type { AgentTask } from '../../transport/agent-tasks.js';
import type { RestoreServeTask, RestoreVmTask } from '../../transport/restore-tasks.js';
import { AgentTaskBroker } from './broker.js';
import { RemoteRecovery } from './recovery.js';

const brokers: AgentTaskBroker[] = [];
afterEach(() => {
  for (const b of brokers.splice(0)) b.close();
});

function setup(): { broker: AgentTaskBroker; recovery: RemoteRecovery; poll: (agent: string, running?: string[]) => Promise<{ tasks: readonly AgentTask[]; cancel: readonly { taskId: string }[] }> } {
  const broker = new AgentTaskBroker({ pollWaitMs: 50, agentLostMs: 5000 });
  brokers.push(broker);
  const addresses: Record<string, string> = { repo1: '10.0.0.3', dst1: '10.0.0.4' };
  const poll = (agent: string, running: string[] = []) => broker.poll(agent, { bootId: `boot-${agent}`, running, address: addresses[agent] }, new Promise(() => undefined));
  return { broker, recovery: new RemoteRecovery(broker), poll };
}

/** Polls until the agent gets a task of that kind. */
async function take<K extends AgentTask['kind']>(poll: ReturnType<typeof setup>['poll'], agent: string, kind: K): Promise<Extract<AgentTask, { kind: K }>> {
  for (let i = 0; i < 100; i++) {
    const r = await poll(agent);
    const t = r.tasks.find((x) => x.kind === kind);
    if (t) return t as Extract<AgentTask, { kind: K }>;
  }
  throw new Error(`agent ${agent} got no ${kind} task`);
}

const config = { vm: 'web1', config: Buffer.from('{}').toString('base64'), disks: [{ name: 'vda', size: 1 << 20 }] };

/** A session as an agent reports it (WireInstantSession). */
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

describe('RemoteRecovery', () => {
  it('lists an agent\'s instant recovery sessions; undefined when it is not connected or silent (its task cancelled)', async () => {
    const { broker, recovery, poll } = setup();
    expect(await recovery.sessionsOn('dst1', 100)).toBeUndefined();
    await poll('dst1');
    const listed = recovery.sessionsOn('dst1', 5000);
    const t = await take(poll, 'dst1', 'instant-recovery');
    expect(t).toMatchObject({ action: 'list' });
    broker.events('dst1', t.taskId, [{ type: 'result', ok: true, value: { sessions: [session] } }]);
    expect(await listed).toEqual([session]);
    const silent = recovery.sessionsOn('dst1', 100);
    const t2 = await take(poll, 'dst1', 'instant-recovery');
    expect(await silent).toBeUndefined();
    expect((await poll('dst1', [t2.taskId])).cancel).toEqual([expect.objectContaining({ taskId: t2.taskId })]);
  });
  it('refuses at once when an agent it needs is not connected, naming it', async () => {
    const { recovery, poll } = setup();
    await poll('repo1');
    const err = await recovery.plan({ path: '/srv/repo', agent: 'repo1' }, 'dst1', 'p1', undefined, async () => config).catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'unavailable', message: "agent dst1 (the host's agent) is not connected", hint: expect.stringMatching(/agent list/) });
    expect((await poll('repo1')).tasks).toEqual([]);
  });

  it('reads from the repository folder when the host agent owns the repository (no serve task)', async () => {
    const { recovery, poll } = setup();
    await poll('dst1');
    const plan = await recovery.plan({ path: '/srv/repo', agent: 'dst1' }, 'dst1', 'p1', 'pw', async () => {
      throw new Error('not asked');
    });
    expect(plan).toEqual({ source: { kind: 'repository', repositoryPath: '/srv/repo', password: 'pw' }, serve: undefined });
    expect((await poll('dst1')).tasks).toEqual([]);
  });

  it('a repository of another agent: restore-serve there, the host agent reads from its listener', async () => {
    const { broker, recovery, poll } = setup();
    await poll('repo1'); // the server learns the agent's address
    await poll('dst1');
    const planned = recovery.plan({ path: '/srv/repo', agent: 'repo1' }, 'dst1', 'p1', undefined, async () => config);
    const serve = await take(poll, 'repo1', 'restore-serve');
    expect(serve).toMatchObject<Partial<RestoreServeTask>>({ repositoryPath: '/srv/repo', pointId: 'p1', readerAgent: 'dst1' });
    expect(serve.secret).toMatch(/^[0-9a-f]{64}$/);
    broker.events('repo1', serve.taskId, [{ type: 'ready', port: 9393, previous: null }]);
    const plan = await planned;
    expect(plan.source).toEqual({ kind: 'agent', agent: 'repo1', host: '10.0.0.3', port: 9393, transferId: serve.taskId, secret: serve.secret, ...config });
    expect(plan.serve?.taskId).toBe(serve.taskId);
  });

  it('a serve task that fails before it is ready fails the plan with its reason', async () => {
    const { broker, recovery, poll } = setup();
    await Promise.all([poll('repo1'), poll('dst1')]);
    const planned = recovery.plan({ path: '/srv/repo', agent: 'repo1' }, 'dst1', 'p1', 'bad', async () => config);
    const serve = await take(poll, 'repo1', 'restore-serve');
    broker.events('repo1', serve.taskId, [{ type: 'result', ok: false, error: { kind: 'unauthorized', message: 'wrong password for restore point p1' } }]);
    await expect(planned).rejects.toMatchObject({ kind: 'unauthorized', message: expect.stringMatching(/wrong password/) });
  });

  it('restoreVm: the host agent gets the task with the served source; the serve task is cancelled after success and after a refusal', async () => {
    const { broker, recovery, poll } = setup();
    const events: string[] = [];
    const run = (name: string) =>
      recovery.restoreVm({
        repository: { path: '/srv/repo', agent: null },
        hostAgent: 'dst1',
        hypervisor: { kind: 'qemu', qmpGlob: '/run/vms/*/qmp.sock' },
        pointId: 'p1',
        name,
        powerOn: true,
        onEvent: (e) => events.push(e.type === 'log' ? e.message : e.type),
      });
    await Promise.all([poll('local'), poll('dst1')]);
    // The server's own repository is read by its local agent, which serves it to dst1.
    const ok = run('web1-copy');
    const cfg = await take(poll, 'local', 'restore-point-config');
    broker.events('local', cfg.taskId, [{ type: 'result', ok: true, value: config }]);
    const serve = await take(poll, 'local', 'restore-serve');
    broker.events('local', serve.taskId, [{ type: 'ready', port: 7000, host: '192.0.2.1', previous: null }]);
    const vmTask = await take(poll, 'dst1', 'restore-vm');
    expect(vmTask).toMatchObject<Partial<RestoreVmTask>>({ pointId: 'p1', name: 'web1-copy', powerOn: true, hypervisor: { kind: 'qemu', qmpGlob: '/run/vms/*/qmp.sock' } });
    expect(vmTask.source).toMatchObject({ kind: 'agent', agent: 'local', host: '192.0.2.1', port: 7000, transferId: serve.taskId });
    broker.events('dst1', vmTask.taskId, [
      { type: 'log', level: 'info', message: 'disk vda restored' },
      { type: 'result', ok: true, value: { vm: 'web1-copy', poweredOn: true } },
    ]);
    expect(await ok).toEqual({ vm: 'web1-copy', poweredOn: true });
    expect(events).toContain('disk vda restored');
    expect((await poll('local', [serve.taskId])).cancel).toEqual([expect.objectContaining({ taskId: serve.taskId })]);

    const refused = run('web1');
    broker.events('local', (await take(poll, 'local', 'restore-point-config')).taskId, [{ type: 'result', ok: true, value: config }]);
    const serve2 = await take(poll, 'local', 'restore-serve');
    broker.events('local', serve2.taskId, [{ type: 'ready', port: 7000, previous: null }]);
    const vm2 = await take(poll, 'dst1', 'restore-vm');
    broker.events('dst1', vm2.taskId, [{ type: 'result', ok: false, error: { kind: 'conflict', message: 'VM web1 is running', hint: 'or restore it as a new VM with --name NEW' } }]);
    const err = await refused.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect(err).toMatchObject({ kind: 'conflict', message: 'VM web1 is running', hint: 'or restore it as a new VM with --name NEW' });
    expect((await poll('local', [serve2.taskId])).cancel).toEqual([expect.objectContaining({ taskId: serve2.taskId })]);
  });

  it('agent replies are checked at the wire boundary: a malformed one fails naming the agent, the action and the field', async () => {
    const { broker, recovery, poll } = setup();
    await Promise.all([poll('dst1'), poll('repo1')]);
    // show: a state this server does not know.
    const shown = recovery.instant('dst1', { action: 'show', session: 'ir-1' });
    const t = await take(poll, 'dst1', 'instant-recovery');
    broker.events('dst1', t.taskId, [{ type: 'result', ok: true, value: { ...session, state: 'running' } }]);
    const err = await shown.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect(err).toMatchObject({ kind: 'internal', message: expect.stringMatching(/^agent dst1 answered instant-recovery show with a reply this server cannot read \(field \/state: /), context: { agent: 'dst1', field: '/state' } });
    // migrate: a disk without its overlay.
    const migrated = recovery.instant('dst1', { action: 'migrate', session: 'ir-1' });
    const t2 = await take(poll, 'dst1', 'instant-recovery');
    broker.events('dst1', t2.taskId, [{ type: 'result', ok: true, value: { ...session, disks: [{ name: 'vda', size: 1, target: '/x' }] } }]);
    await expect(migrated).rejects.toThrow(/agent dst1 answered instant-recovery migrate .*field \/disks\/0\/overlay/);
    // A well-formed reply passes as it is (extra fields of a newer agent too).
    const ok = recovery.instant('dst1', { action: 'show', session: 'ir-1' });
    const t3 = await take(poll, 'dst1', 'instant-recovery');
    broker.events('dst1', t3.taskId, [{ type: 'result', ok: true, value: { ...session, newer: 1 } }]);
    expect(await ok).toEqual({ ...session, newer: 1 });
    // stop and list.
    const stopped = recovery.instant('dst1', { action: 'stop', session: 'ir-1' });
    broker.events('dst1', (await take(poll, 'dst1', 'instant-recovery')).taskId, [{ type: 'result', ok: true, value: { stopped: 7 } }]);
    await expect(stopped).rejects.toThrow(/agent dst1 answered instant-recovery stop .*field \/stopped/);
    const listed = recovery.sessionsOn('dst1', 5000);
    broker.events('dst1', (await take(poll, 'dst1', 'instant-recovery')).taskId, [{ type: 'result', ok: true, value: { sessions: [{ ...session, pid: '4242' }] } }]);
    expect(await listed).toBeUndefined();
    // The repository agent's point configuration.
    const planned = recovery.plan({ path: '/srv/repo', agent: 'repo1' }, 'dst1', 'p1', undefined, () => recovery.pointConfig({ path: '/srv/repo', agent: 'repo1' }, 'p1', undefined));
    const cfg = await take(poll, 'repo1', 'restore-point-config');
    broker.events('repo1', cfg.taskId, [{ type: 'result', ok: true, value: { vm: 'web1', disks: [] } }]);
    await expect(planned).rejects.toThrow(/agent repo1 answered restore-point-config of point p1 .*field \/config/);
  });
});
