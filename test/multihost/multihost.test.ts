// Multi-host data path in network namespaces this test creates (and always deletes): the backup
// server, a source agent next to the VM (a QEMU with no guest, `-machine none`, serving a qcow2
// disk through the qemu adapter) and a repository agent, each in its own namespace on one bridge.
// A job run is dispatched over the agent link; blocks go source agent -> repository agent over
// mutual TLS, never through the server. Checked: the disk restores bit-exact (the repository
// agent restores it, asked through the server's restore route); a throttling rule between the two
// agents' addresses holds the transfer to within 10% of its limit and the session names
// Throttling; blocks damaged in transit (sender test hook) are resent and the result is bit-exact;
// a short cut resumes; a stop stops both agents; the repository agent SIGKILLed mid-task fails the
// session cleanly (no visible point, the repository verifies clean) and the next run succeeds.
// Needs root (ip netns).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openRepository, verifyRepository } from '../../src/repository/index.js';

const root = process.getuid?.() === 0;
const hasIp = spawnSync('ip', ['-V']).status === 0;
const hasQemu = spawnSync('qemu-system-x86_64', ['--version']).status === 0;
const skipReason = !root ? 'needs root to create network namespaces' : !hasIp ? 'needs iproute2 (ip)' : !hasQemu ? 'needs qemu-system-x86' : '';

const tag = randomBytes(3).toString('hex');
const ns = { server: `bwm-${tag}-s`, source: `bwm-${tag}-a`, repo: `bwm-${tag}-r` };
const bridge = `bwbr${tag}`;
const octet = 16 + (parseInt(tag.slice(0, 2), 16) % 200);
const ip = { server: `10.214.${octet}.1`, source: `10.214.${octet}.2`, repo: `10.214.${octet}.3` };
const repoRoot = path.resolve(import.meta.dirname, '../..');
const VM = 'mh-vm';
// Incompressible data: what the throttled transfer carries (~6 s at the limit). A larger value
// (BULWARK_MH_RANDOM_MIB, by hand with -t "restores bit-exact") measures the agents' memory.
const RANDOM_BYTES = Number(process.env.BULWARK_MH_RANDOM_MIB ?? 6) * 1024 * 1024;
const DISK_SIZE = RANDOM_BYTES + 18 * 1024 * 1024;
const LIMIT_MBPS = 8;

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

let tmp = '';
const children: ChildProcess[] = [];
const stderrOf = new Map<ChildProcess, string[]>();

/** Starts a test script in a namespace; resolves with its first JSON line. */
async function startInNs(name: string, netns: string, script: string, args: string[], env: Record<string, string> = {}): Promise<{ child: ChildProcess; info: Record<string, unknown> }> {
  const child = spawn('ip', ['netns', 'exec', netns, process.execPath, '--import', 'tsx', path.join(import.meta.dirname, 'netns', script), ...args], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, BULWARK_LOG_LEVEL: 'warn', ...env },
  });
  children.push(child);
  const err: string[] = [];
  stderrOf.set(child, err);
  child.stderr.on('data', (d: Buffer) => {
    err.push(d.toString());
    if (err.length > 200) err.shift();
  });
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const first = await Promise.race([
    lines.next(),
    new Promise<never>((_, reject) => child.once('exit', (code) => reject(new Error(`${name} exited ${String(code)}: ${err.join('')}`)))),
  ]);
  if (first.done) throw new Error(`${name} ended without output: ${err.join('')}`);
  return { child, info: JSON.parse(first.value) as Record<string, unknown> };
}

let socketPath = '';
async function api<T>(method: string, route: string, body?: unknown): Promise<T> {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise<T>((resolve, reject) => {
    const req = http.request(
      { socketPath, path: `/api/v1${route}`, method, headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {} },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          if ((res.statusCode ?? 500) >= 300) reject(new Error(`${method} ${route}: ${res.statusCode} ${text}`));
          else resolve((text ? JSON.parse(text) : undefined) as T);
        });
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

interface SessionJson {
  id: string;
  state: string;
  reason?: string;
  tasks: Array<{ state: string; message?: string; proxy?: string; progress: { bytesStored: number; bytesTransferred: number } }>;
  log: Array<{ level: string; message: string }>;
  stages?: { bottleneck: string | null; summary: string };
}

async function runJob(job: string, body: { full?: boolean } = {}, during?: (sessionId: string) => Promise<void>): Promise<SessionJson> {
  const { sessionId } = await api<{ sessionId: string }>('POST', `/jobs/${job}/run`, body);
  if (during) await during(sessionId);
  let s: SessionJson | undefined;
  for (let i = 0; i < 450; i++) {
    s = await api<SessionJson>('GET', `/sessions/${sessionId}`);
    if (!['queued', 'running'].includes(s.state)) return s;
    await new Promise((r) => setTimeout(r, 100));
  }
  const logs = [...stderrOf.values()].map((e) => e.join('').slice(-3000)).join('\n----\n');
  throw new Error(`session ${sessionId} did not end: ${JSON.stringify(s)}\n${logs}`);
}


let repoDir = '';
let vmDir = '';
let repoAgent: ChildProcess | undefined;
let sourceAgentPid: number | undefined;
let idleRss: number | undefined;

async function startRepoAgent(token: string): Promise<ChildProcess> {
  const { child } = await startInNs('repository agent', ns.repo, 'agent.ts', [path.join(tmp, 'repo-agent'), `https://${ip.server}:9392`, token, 'repo1', `${ip.repo}:9393`]);
  return child;
}

/** The disk's contents as the test wrote them (the image file itself lags behind QEMU's cache). */
let expected = Buffer.alloc(0);
function sourceImageSha(): string {
  return createHash('sha256').update(expected).digest('hex');
}

/** Restores the point's disk through the server, which has the repository agent write it (on its host: here the shared file system). */
async function restoredSha(pointId: string): Promise<string> {
  const to = path.join(tmp, `restored-${pointId}.raw`);
  try {
    const r = await api<{ sha256: string; path: string }>('POST', `/restore-points/${pointId}/restore-disk`, { disk: 'vda', to, format: 'raw', overwrite: true });
    const written = createHash('sha256').update(readFileSync(to)).digest('hex');
    expect(written).toBe(r.sha256);
    return r.sha256;
  } finally {
    rmSync(to, { force: true });
  }
}

async function untilDataFlows(sessionId: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    const cur = await api<{ progress: { bytesRead: number } }>('GET', `/sessions/${sessionId}`);
    if (cur.progress.bytesRead > 0) return;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Peak resident memory of a process (VmHWM), in MiB. */
function peakRssMiB(pid: number | undefined): number | undefined {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Math.round(Number(m[1]) / 1024) : undefined;
  } catch {
    return undefined;
  }
}

async function visiblePoints(): Promise<string[]> {
  const repository = await openRepository(repoDir);
  return (await repository.listRestorePoints({ job: 'mh', vm: VM })).map((p) => p.id);
}

async function qemuIo(command: string): Promise<void> {
  // HMP qemu-io on the running QEMU: the "guest" writes, and the dirty bitmap counts them.
  const sock = path.join(vmDir, 'qmp.sock');
  const script = `{"execute":"qmp_capabilities"}\n{"execute":"human-monitor-command","arguments":{"command-line":"qemu-io vda0 \\"${command}\\""}}\n`;
  run('sh', ['-c', `printf '%s' '${script}' | socat -t 2 - UNIX-CONNECT:${sock}`]);
}

describe.skipIf(skipReason !== '')(`multi-host data path in network namespaces${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  beforeAll(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), 'bulwark-multihost-'));
    // Three hosts on one bridge (in the server's namespace).
    for (const n of Object.values(ns)) run('ip', ['netns', 'add', n]);
    run('ip', ['-n', ns.server, 'link', 'add', bridge, 'type', 'bridge']);
    run('ip', ['-n', ns.server, 'addr', 'add', `${ip.server}/24`, 'dev', bridge]);
    run('ip', ['-n', ns.server, 'link', 'set', bridge, 'up']);
    run('ip', ['-n', ns.server, 'link', 'set', 'lo', 'up']);
    for (const [who, n] of [['a', ns.source], ['r', ns.repo]] as const) {
      const inner = `bw${who}${tag}`;
      const outer = `bw${who}${tag}p`;
      run('ip', ['link', 'add', inner, 'netns', n, 'type', 'veth', 'peer', 'name', outer, 'netns', ns.server]);
      run('ip', ['-n', ns.server, 'link', 'set', outer, 'master', bridge]);
      run('ip', ['-n', ns.server, 'link', 'set', outer, 'up']);
      run('ip', ['-n', n, 'addr', 'add', `${who === 'a' ? ip.source : ip.repo}/24`, 'dev', inner]);
      run('ip', ['-n', n, 'link', 'set', inner, 'up']);
      run('ip', ['-n', n, 'link', 'set', 'lo', 'up']);
    }

    // The VM's disk: a pattern, 4 MiB of random data, zero holes; served by a QEMU with no guest.
    vmDir = path.join(tmp, 'vm');
    run('mkdir', ['-p', vmDir]);
    const raw = Buffer.alloc(DISK_SIZE);
    raw.fill(0x5a, 0, 1 << 20);
    randomBytes(RANDOM_BYTES).copy(raw, 3 << 20);
    for (let off = 12 << 20; off < 14 << 20; off += 4096) raw.writeUInt32LE(off, off);
    writeFileSync(path.join(vmDir, 'disk.raw'), raw);
    expected = raw;
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(vmDir, 'disk.raw'), path.join(vmDir, 'disk.qcow2')]);
    rmSync(path.join(vmDir, 'disk.raw'));
    run('ip', [
      'netns', 'exec', ns.source, 'qemu-system-x86_64', '-machine', 'none', '-nodefaults', '-display', 'none', '-name', VM,
      '-drive', `if=none,id=vda,node-name=vda0,format=qcow2,file=${path.join(vmDir, 'disk.qcow2')}`,
      '-qmp', `unix:${path.join(vmDir, 'qmp.sock')},server=on,wait=off`, '-pidfile', path.join(vmDir, 'qemu.pid'), '-daemonize',
    ]);

    const server = await startInNs('server', ns.server, 'server.ts', [path.join(tmp, 'server'), `${ip.server}:9392`]);
    socketPath = server.info.socket as string;
    const token = async (name: string) => (await api<{ token: string }>('POST', '/agents/tokens', { name })).token;
    const [tSrc, tRepo] = [await token('src1'), await token('repo1')];
    const src = await startInNs('source agent', ns.source, 'agent.ts', [path.join(tmp, 'src-agent'), `https://${ip.server}:9392`, tSrc, 'src1', `${ip.source}:9393`], {
      BULWARK_TEST_CORRUPT_EVERY: '7',
    });
    sourceAgentPid = src.child.pid;
    idleRss = peakRssMiB(sourceAgentPid);
    repoAgent = await startRepoAgent(tRepo);
    repoDir = path.join(tmp, 'repository');
    await api('POST', '/hosts', { name: 'kvm-a', kind: 'qemu', uri: path.join(vmDir, 'qmp.sock'), agent: 'src1' });
    await api('POST', '/repositories', { name: 'remote-repo', path: repoDir, agent: 'repo1' });
    await api('POST', '/jobs', { name: 'mh', vms: [VM], repository: 'remote-repo', retries: { count: 0, waitMinutes: 0 }, blockSize: 262144 });
  }, 120_000);

  afterAll(() => {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    try {
      const pid = Number(readFileSync(path.join(vmDir, 'qemu.pid'), 'utf8'));
      if (pid > 0) process.kill(pid, 'SIGKILL');
    } catch {
      // not started
    }
    for (const n of Object.values(ns)) spawnSync('ip', ['netns', 'del', n]);
    if (tmp) rmSync(tmp, { recursive: true, force: true });
    const left = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
    expect(left).not.toContain(tag);
  });

  it('backs up over the agents (blocks damaged in transit are resent) and the disk restores bit-exact', async () => {
    const s = await runJob('mh');
    expect(s.state, `${s.reason ?? ''}\n${s.log.map((l) => l.message).join('\n')}`).toMatch(/success|warning/);
    expect(s.tasks.map((t) => t.state)).toEqual([expect.stringMatching(/success|warning/)]);
    expect(s.log.some((l) => /on agent src1 into repository remote-repo/.test(l.message))).toBe(true);
    // The sender's test hook damaged every 7th block once; each was NACKed and sent again.
    expect(s.log.some((l) => /arrived damaged .* sent again/.test(l.message))).toBe(true);
    // The session counts what the repository stored (after its own compression), not what crossed the wire.
    const stored = s.tasks[0]!.progress.bytesStored;
    expect(stored).toBeGreaterThan(RANDOM_BYTES);
    expect(stored).toBeLessThan(RANDOM_BYTES + (2 << 20));
    const points = await visiblePoints();
    expect(points).toHaveLength(1);
    expect(await restoredSha(points[0]!)).toBe(sourceImageSha());
    console.info(`multi-host: ${RANDOM_BYTES >> 20} MiB of random data; source agent peak RSS ${peakRssMiB(sourceAgentPid) ?? '?'} MiB (${idleRss ?? '?'} MiB after start), repository agent ${peakRssMiB(repoAgent?.pid) ?? '?'} MiB`);
  }, 60_000);

  it('a throttling rule between the agents holds the transfer to within 10% and the session names Throttling', async () => {
    await api('POST', '/throttling-rules', { name: 'wan', source: ip.source, target: `${ip.repo}/32`, mbps: LIMIT_MBPS });
    await qemuIo('write -P 0x33 8M 64k');
    expected.fill(0x33, 8 << 20, (8 << 20) + 65536);
    const s = await runJob('mh', { full: true });
    await api('DELETE', '/throttling-rules/wan');
    expect(s.state, `${s.reason ?? ''}\n${s.log.map((l) => l.message).join('\n')}`).toMatch(/success|warning/);
    const line = s.log.find((l) => l.message.includes('transfer: sent'));
    expect(line, s.log.map((l) => l.message).join('\n')).toBeDefined();
    // Bytes over the time from the first block leaving (before the limiter) to the last written.
    const m = /sent (\d+) bytes .*on the wire for (\d+) ms/.exec(line!.message)!;
    const mbps = (Number(m[1]) * 8) / 1e6 / (Number(m[2]) / 1000);
    console.info(`multi-host throttle: ${mbps.toFixed(2)} Mbit/s against a ${LIMIT_MBPS} Mbit/s rule; ${s.stages?.summary ?? 'no stage summary'}`);
    expect(mbps).toBeGreaterThan(LIMIT_MBPS * 0.9);
    expect(mbps).toBeLessThan(LIMIT_MBPS * 1.1);
    expect(s.stages?.bottleneck).toBe('throttling');
    const points = await visiblePoints();
    expect(points).toHaveLength(2);
    expect(await restoredSha(points[1]!)).toBe(sourceImageSha());
  }, 60_000);

  it('data streams cut for a moment (TCP resets) resume within the window; the point is bit-exact', async () => {
    await api('POST', '/throttling-rules', { name: 'slow', source: ip.source, target: ip.repo, mbps: 2 * LIMIT_MBPS });
    await qemuIo('write -P 0x44 9M 64k');
    expected.fill(0x44, 9 << 20, (9 << 20) + 65536);
    const nft = (...args: string[]) => run('ip', ['netns', 'exec', ns.source, 'nft', ...args]);
    const s = await runJob('mh', { full: true }, async (sessionId) => {
      await untilDataFlows(sessionId);
      // Every packet to the repository agent's data port is answered with a reset for a second.
      nft('add', 'table', 'inet', 'bwcut');
      nft('add', 'chain', 'inet', 'bwcut', 'out', '{ type filter hook output priority 0; }');
      nft('add', 'rule', 'inet', 'bwcut', 'out', 'tcp', 'dport', '9393', 'reject', 'with', 'tcp', 'reset');
      await new Promise((r) => setTimeout(r, 1000));
      nft('delete', 'table', 'inet', 'bwcut');
    });
    await api('DELETE', '/throttling-rules/slow');
    expect(s.state, `${s.reason ?? ''}\n${s.log.map((l) => l.message).join('\n')}`).toMatch(/success|warning/);
    const line = s.log.find((l) => l.message.includes('transfer: sent'))!.message;
    expect(Number(/(\d+) reconnects/.exec(line)![1])).toBeGreaterThan(0);
    const points = await visiblePoints();
    expect(await restoredSha(points.at(-1)!)).toBe(sourceImageSha());
  }, 60_000);

  it('stopping the session mid-transfer stops both agents: no point becomes visible', async () => {
    const before = await visiblePoints();
    await api('POST', '/throttling-rules', { name: 'wan', source: ip.source, target: ip.repo, mbps: LIMIT_MBPS });
    const s = await runJob('mh', { full: true }, async (sessionId) => {
      await untilDataFlows(sessionId);
      await api('POST', `/sessions/${sessionId}/stop`, {});
    });
    await api('DELETE', '/throttling-rules/wan');
    expect(s.state).toBe('stopped');
    expect(await visiblePoints()).toEqual(before);
  }, 60_000);

  it('the repository agent killed mid-task fails the session cleanly; the next run succeeds', async () => {
    const before = await visiblePoints();
    await api('POST', '/throttling-rules', { name: 'wan', source: ip.source, target: ip.repo, mbps: LIMIT_MBPS });
    const s = await runJob('mh', { full: true }, async (sessionId) => {
      // Once data flows, kill the repository agent's process outright.
      await untilDataFlows(sessionId);
      repoAgent!.kill('SIGKILL');
    });
    await api('DELETE', '/throttling-rules/wan');
    expect(s.state).toBe('failed');
    expect(s.tasks[0]?.message ?? '').toMatch(/repo1|target agent|connection/);
    expect(await visiblePoints()).toEqual(before);
    const report = await verifyRepository(repoDir);
    expect(report.damage).toEqual([]);
    expect(report.points).toBe(before.length);

    repoAgent = await startRepoAgent('-');
    const again = await runJob('mh');
    expect(again.state, `${again.reason ?? ''}\n${again.log.map((l) => l.message).join('\n')}`).toMatch(/success|warning/);
    const after = await visiblePoints();
    expect(after).toHaveLength(before.length + 1);
    expect(await restoredSha(after.at(-1)!)).toBe(sourceImageSha());
    // No temporary file of the killed task is left in the VM folder once the agent reopened it.
    const leftovers = readdirSync(repoDir, { recursive: true }).map(String).filter((f) => /\.tmp|partial/i.test(f));
    expect(leftovers).toEqual([]);
    const rss = /peak RSS (\d+) MiB/.exec(again.log.map((l) => l.message).join('\n'));
    console.info(`multi-host: peak RSS of the source agent ${rss?.[1] ?? '?'} MiB (its own report), ${peakRssMiB(sourceAgentPid) ?? '?'} MiB (/proc); repository agent ${peakRssMiB(repoAgent?.pid) ?? '?'} MiB`);
  }, 90_000);
});
