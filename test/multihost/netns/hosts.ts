// Fixture of the multi-host tests: three "hosts" in network namespaces this fixture creates (and
// always deletes) on one bridge: the backup server, a source agent next to a VM (a QEMU with no
// guest, `-machine none`, serving a qcow2 disk through the qemu adapter) and a repository agent.
// Helpers: the server's REST API over its unix socket, job runs to their end, guest writes
// through HMP qemu-io, and disk restores through the server (the repository agent writes them).
// Needs root (ip netns); `multiHostSkipReason` says why not.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';

const root = process.getuid?.() === 0;
const hasIp = spawnSync('ip', ['-V']).status === 0;
const hasQemu = spawnSync('qemu-system-x86_64', ['--version']).status === 0;
export const multiHostSkipReason = !root ? 'needs root to create network namespaces' : !hasIp ? 'needs iproute2 (ip)' : !hasQemu ? 'needs qemu-system-x86' : '';

const repoRoot = path.resolve(import.meta.dirname, '../../..');

export function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

export interface SessionJson {
  id: string;
  state: string;
  reason?: string;
  tasks: Array<{ state: string; message?: string; proxy?: string; progress: { bytesStored: number; bytesTransferred: number } }>;
  log: Array<{ level: string; message: string }>;
  stages?: { bottleneck: string | null; summary: string };
}

/** A session's log as text (for failure messages and matching). */
export const logText = (s: SessionJson): string => s.log.map((l) => `${l.level}: ${l.message}`).join('\n');

export interface MultiHostOptions {
  /** The VM's name (QEMU -name). */
  readonly vm: string;
  /** The VM disk's contents at the start (written as qcow2). */
  readonly disk: Buffer;
  /** Extra environment of the source agent (test hooks). */
  readonly sourceEnv?: Record<string, string>;
  /** More disks of the VM (drive id = name, node name = name + '0'), written as qcow2 like `disk`. */
  readonly extraDisks?: ReadonlyArray<{ readonly name: string; readonly data: Buffer }>;
}

export class MultiHost {
  readonly tag = randomBytes(3).toString('hex');
  readonly ns = { server: `bwm-${this.tag}-s`, source: `bwm-${this.tag}-a`, repo: `bwm-${this.tag}-r` };
  readonly bridge = `bwbr${this.tag}`;
  readonly #octet = 16 + (parseInt(this.tag.slice(0, 2), 16) % 200);
  readonly ip = { server: `10.214.${this.#octet}.1`, source: `10.214.${this.#octet}.2`, repo: `10.214.${this.#octet}.3` };
  readonly tmp = mkdtempSync(path.join(tmpdir(), 'bulwark-multihost-'));
  readonly vmDir = path.join(this.tmp, 'vm');
  /** The repository folder on the repository agent's "host" (the shared file system here). */
  readonly repoDir = path.join(this.tmp, 'repository');
  readonly children: ChildProcess[] = [];
  /** Namespaces of agents added with addAgent (deleted by close()). */
  readonly extraNs: string[] = [];
  readonly stderrOf = new Map<ChildProcess, string[]>();
  socketPath = '';
  readonly #clockFile = path.join(this.tmp, 'clock-offset-ms');
  #offsetMs = 0;
  sourceAgent: ChildProcess | undefined;
  repoAgent: ChildProcess | undefined;
  /** The disk's contents as the test wrote them (the image file itself lags behind QEMU's cache). */
  expected: Buffer;

  private constructor(readonly o: MultiHostOptions) {
    this.expected = Buffer.from(o.disk);
  }

  /** Namespaces, the VM, the server and both agents (src1 next to the VM, repo1 with the repository). */
  static async start(o: MultiHostOptions): Promise<MultiHost> {
    const h = new MultiHost(o);
    try {
      await h.#start();
    } catch (err) {
      h.close();
      throw err;
    }
    return h;
  }

  async #start(): Promise<void> {
    const { ns, ip, tag } = this;
    for (const n of Object.values(ns)) run('ip', ['netns', 'add', n]);
    run('ip', ['-n', ns.server, 'link', 'add', this.bridge, 'type', 'bridge']);
    run('ip', ['-n', ns.server, 'addr', 'add', `${ip.server}/24`, 'dev', this.bridge]);
    run('ip', ['-n', ns.server, 'link', 'set', this.bridge, 'up']);
    run('ip', ['-n', ns.server, 'link', 'set', 'lo', 'up']);
    for (const [who, n] of [['a', ns.source], ['r', ns.repo]] as const) {
      const inner = `bw${who}${tag}`;
      const outer = `bw${who}${tag}p`;
      run('ip', ['link', 'add', inner, 'netns', n, 'type', 'veth', 'peer', 'name', outer, 'netns', ns.server]);
      run('ip', ['-n', ns.server, 'link', 'set', outer, 'master', this.bridge]);
      run('ip', ['-n', ns.server, 'link', 'set', outer, 'up']);
      run('ip', ['-n', n, 'addr', 'add', `${who === 'a' ? ip.source : ip.repo}/24`, 'dev', inner]);
      run('ip', ['-n', n, 'link', 'set', inner, 'up']);
      run('ip', ['-n', n, 'link', 'set', 'lo', 'up']);
    }

    run('mkdir', ['-p', this.vmDir]);
    writeFileSync(path.join(this.vmDir, 'disk.raw'), this.o.disk);
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(this.vmDir, 'disk.raw'), path.join(this.vmDir, 'disk.qcow2')]);
    rmSync(path.join(this.vmDir, 'disk.raw'));
    const extraDrives: string[] = [];
    for (const d of this.o.extraDisks ?? []) {
      writeFileSync(path.join(this.vmDir, `${d.name}.raw`), d.data);
      run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(this.vmDir, `${d.name}.raw`), path.join(this.vmDir, `${d.name}.qcow2`)]);
      rmSync(path.join(this.vmDir, `${d.name}.raw`));
      extraDrives.push('-drive', `if=none,id=${d.name},node-name=${d.name}0,format=qcow2,file=${path.join(this.vmDir, `${d.name}.qcow2`)}`);
    }
    run('ip', [
      'netns', 'exec', ns.source, 'qemu-system-x86_64', '-machine', 'none', '-nodefaults', '-display', 'none', '-name', this.o.vm,
      '-drive', `if=none,id=vda,node-name=vda0,format=qcow2,file=${path.join(this.vmDir, 'disk.qcow2')}`,
      ...extraDrives,
      '-qmp', `unix:${path.join(this.vmDir, 'qmp.sock')},server=on,wait=off`, '-pidfile', path.join(this.vmDir, 'qemu.pid'), '-daemonize',
    ]);

    const server = await this.startInNs('server', ns.server, 'server.ts', [path.join(this.tmp, 'server'), `${ip.server}:9392`], { BULWARK_TEST_CLOCK_FILE: this.#clockFile });
    this.socketPath = server.info.socket as string;
    const token = async (name: string) => (await this.api<{ token: string }>('POST', '/agents/tokens', { name })).token;
    const [tSrc, tRepo] = [await token('src1'), await token('repo1')];
    const src = await this.startInNs('source agent', ns.source, 'agent.ts', [path.join(this.tmp, 'src-agent'), `https://${ip.server}:9392`, tSrc, 'src1', `${ip.source}:9393`], this.o.sourceEnv ?? {});
    this.sourceAgent = src.child;
    this.repoAgent = await this.startRepoAgent(tRepo);
    await this.api('POST', '/hosts', { name: 'kvm-a', kind: 'qemu', uri: path.join(this.vmDir, 'qmp.sock'), agent: 'src1' });
    await this.api('POST', '/repositories', { name: 'remote-repo', path: this.repoDir, agent: 'repo1' });
  }

  /**
   * Moves the server's clock `days` on (what the jobs' days and retention are judged by); resolves
   * once every agent that was online counts as online again (their last heartbeat is then judged by
   * the new time; a task asking for a slot before that finds its proxy offline).
   */
  async advanceDays(days: number): Promise<void> {
    type Agents = { items: Array<{ name: string; state: string; lastSeenAt?: string | null }> };
    const online = (await this.api<Agents>('GET', '/agents')).items.filter((a) => a.state === 'online' && a.name !== 'local').map((a) => a.name); // the server's own agent runs in its process: always a proxy
    this.#offsetMs += days * 86_400_000;
    writeFileSync(this.#clockFile, String(this.#offsetMs));
    const since = this.serverNow().getTime();
    for (let i = 0; i < 200; i++) {
      const agents = await this.api<Agents>('GET', '/agents');
      const fresh = (name: string) => agents.items.some((a) => a.name === name && a.state === 'online' && a.lastSeenAt && Date.parse(a.lastSeenAt) >= since);
      if (online.every(fresh)) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error('the agents did not send a heartbeat after the clock moved on');
  }

  /** The server's time now. */
  serverNow(): Date {
    return new Date(Date.now() + this.#offsetMs);
  }

  /** Starts a test script in a namespace; resolves with its first JSON line. */
  async startInNs(name: string, netns: string, script: string, args: string[], env: Record<string, string> = {}): Promise<{ child: ChildProcess; info: Record<string, unknown> }> {
    const child = spawn('ip', ['netns', 'exec', netns, process.execPath, '--import', 'tsx', path.join(import.meta.dirname, script), ...args], {
      cwd: repoRoot,
      stdio: ['ignore', 'pipe', 'pipe'],
      // Each process's file-restore mounts in its own run dir under this harness's folder: the
      // machine-wide default (/run/bulwark/mounts) is shared with tests running beside this one,
      // whose mounts propagate into these namespaces.
      env: { ...process.env, BULWARK_LOG_LEVEL: 'warn', BULWARK_RUN_DIR: path.join(this.tmp, 'run', name.replace(/[^\w.-]+/g, '-')), ...env },
    });
    this.children.push(child);
    const err: string[] = [];
    this.stderrOf.set(child, err);
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

  /**
   * One more agent in its own namespace on the bridge (e.g. the host a VM is restored to), address
   * `10.214.x.(4+n)`; `who` is one letter naming its namespace and interfaces.
   */
  async addAgent(name: string, who: string): Promise<{ ns: string; ip: string; child: ChildProcess; dataDir: string }> {
    const n = `bwm-${this.tag}-${who}`;
    const ip = `10.214.${this.#octet}.${4 + this.extraNs.length}`;
    run('ip', ['netns', 'add', n]);
    this.extraNs.push(n);
    const inner = `bw${who}${this.tag}`;
    const outer = `bw${who}${this.tag}p`;
    run('ip', ['link', 'add', inner, 'netns', n, 'type', 'veth', 'peer', 'name', outer, 'netns', this.ns.server]);
    run('ip', ['-n', this.ns.server, 'link', 'set', outer, 'master', this.bridge]);
    run('ip', ['-n', this.ns.server, 'link', 'set', outer, 'up']);
    run('ip', ['-n', n, 'addr', 'add', `${ip}/24`, 'dev', inner]);
    run('ip', ['-n', n, 'link', 'set', inner, 'up']);
    run('ip', ['-n', n, 'link', 'set', 'lo', 'up']);
    const token = (await this.api<{ token: string }>('POST', '/agents/tokens', { name })).token;
    const dataDir = path.join(this.tmp, `${name}-agent`);
    const { child } = await this.startInNs(`agent ${name}`, n, 'agent.ts', [dataDir, `https://${this.ip.server}:9392`, token, name, `${ip}:9393`]);
    return { ns: n, ip, child, dataDir };
  }

  /** The repository agent `repo1` (token `-`: already enrolled). */
  async startRepoAgent(token: string): Promise<ChildProcess> {
    const { child } = await this.startInNs('repository agent', this.ns.repo, 'agent.ts', [path.join(this.tmp, 'repo-agent'), `https://${this.ip.server}:9392`, token, 'repo1', `${this.ip.repo}:9393`]);
    return child;
  }

  async api<T>(method: string, route: string, body?: unknown): Promise<T> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise<T>((resolve, reject) => {
      const req = http.request(
        { socketPath: this.socketPath, path: `/api/v1${route}`, method, headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {} },
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

  /** Waits for a session to end (at most 45 s). */
  async waitSession(sessionId: string): Promise<SessionJson> {
    let s: SessionJson | undefined;
    for (let i = 0; i < 450; i++) {
      s = await this.api<SessionJson>('GET', `/sessions/${sessionId}`);
      if (!['queued', 'running'].includes(s.state)) return s;
      await new Promise((r) => setTimeout(r, 100));
    }
    const logs = [...this.stderrOf.values()].map((e) => e.join('').slice(-3000)).join('\n----\n');
    throw new Error(`session ${sessionId} did not end: ${JSON.stringify(s)}\n${logs}`);
  }

  async runJob(job: string, body: { full?: boolean } = {}, during?: (sessionId: string) => Promise<void>): Promise<SessionJson> {
    const { sessionId } = await this.api<{ sessionId: string }>('POST', `/jobs/${job}/run`, body);
    if (during) await during(sessionId);
    return this.waitSession(sessionId);
  }

  /** The "guest" writes `pattern` at `offset` (HMP qemu-io on the running QEMU; the dirty bitmap counts it). */
  async write(offset: number, length: number, pattern: number): Promise<void> {
    await this.qemuIo(`write -P 0x${pattern.toString(16)} ${offset} ${length}`);
    this.expected.fill(pattern, offset, offset + length);
  }

  async qemuIo(command: string): Promise<void> {
    const sock = path.join(this.vmDir, 'qmp.sock');
    const script = `{"execute":"qmp_capabilities"}\n{"execute":"human-monitor-command","arguments":{"command-line":"qemu-io vda0 \\"${command}\\""}}\n`;
    run('sh', ['-c', `printf '%s' '${script}' | socat -t 2 - UNIX-CONNECT:${sock}`]);
  }

  /** SHA-256 of the disk as the test wrote it. */
  expectedSha(): string {
    return createHash('sha256').update(this.expected).digest('hex');
  }

  /** Restores the point's disk through the server (the repository agent writes it); its SHA-256, checked against the file. */
  async restoredSha(pointId: string, disk = 'vda'): Promise<string> {
    const to = path.join(this.tmp, `restored-${pointId}.raw`);
    try {
      const r = await this.api<{ sha256: string; path: string }>('POST', `/restore-points/${pointId}/restore-disk`, { disk, to, format: 'raw', overwrite: true, digest: true });
      const written = createHash('sha256').update(readFileSync(to)).digest('hex');
      if (written !== r.sha256) throw new Error(`restored file ${to} has SHA-256 ${written}, the restore said ${r.sha256}`);
      return r.sha256;
    } finally {
      rmSync(to, { force: true });
    }
  }

  /** Kills every process started, deletes the namespaces and the temp dir; returns namespaces left over with this tag. */
  close(): string {
    for (const c of this.children) if (c.exitCode === null) c.kill('SIGKILL');
    try {
      const pid = Number(readFileSync(path.join(this.vmDir, 'qemu.pid'), 'utf8'));
      if (pid > 0) process.kill(pid, 'SIGKILL');
    } catch {
      // not started
    }
    for (const n of [...Object.values(this.ns), ...this.extraNs]) spawnSync('ip', ['netns', 'del', n]);
    rmSync(this.tmp, { recursive: true, force: true });
    return spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout.split('\n').filter((l) => l.includes(this.tag)).join('\n');
  }
}
