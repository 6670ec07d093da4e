// The guest agent client against a real qemu-ga running ON THE HOST on a unix socket. The host
// agent is started with every freeze, suspend and shutdown command blocked: freezing it would
// freeze this machine's file systems. Freeze/thaw are tested inside the test guest instead.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QgaClient, QgaError } from '../../src/hypervisor/qga/client.js';

const BLOCKED = [
  'guest-fsfreeze-freeze',
  'guest-fsfreeze-freeze-list',
  'guest-fsfreeze-thaw',
  'guest-shutdown',
  'guest-suspend-disk',
  'guest-suspend-ram',
  'guest-suspend-hybrid',
];

let dir: string;
let sock: string;
let agent: ChildProcess;
let agentExited: Promise<void>;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-qga-test-'));
  sock = path.join(dir, 'qga.sock');
  agent = spawn('qemu-ga', ['-m', 'unix-listen', '-p', sock, '-t', dir, '-f', path.join(dir, 'qga.pid'), '-b', BLOCKED.join(',')], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  agentExited = new Promise((r) => agent.once('exit', () => r()));
  const until = Date.now() + 10_000;
  while (!existsSync(sock)) {
    if (agent.exitCode !== null || Date.now() > until) throw new Error('host qemu-ga did not start');
    await new Promise((r) => setTimeout(r, 20));
  }
});

afterAll(async () => {
  if (agent && agent.exitCode === null && agent.signalCode === null) {
    agent.kill('SIGCONT');
    agent.kill('SIGTERM');
    await agentExited;
  }
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('guest agent client against a host qemu-ga', () => {
  it('syncs, pings, and sees freeze and shutdown disabled on this host agent', async () => {
    const qga = await QgaClient.connect({ socketPath: sock, timeoutMs: 5000 });
    try {
      await qga.ping();
      const info = await qga.info();
      expect(info.version).toMatch(/^\d+\.\d+/);
      const cmd = (name: string) => info.supported_commands.find((c) => c.name === name);
      for (const name of BLOCKED) expect(cmd(name)?.enabled).toBe(false);
      expect(cmd('guest-exec')?.enabled).toBe(true);
      // Status is read-only and safe here.
      expect(await qga.fsfreezeStatus()).toBe('thawed');
      const fs = await qga.getFsInfo();
      expect(fs.some((f) => f.mountpoint === '/')).toBe(true);
    } finally {
      await qga.close();
    }
  });

  it('runs a program with exec + exec-status and returns exit code, stdout, stderr and stdin', async () => {
    const qga = await QgaClient.connect({ socketPath: sock, timeoutMs: 10_000 });
    try {
      const r = await qga.exec('/bin/sh', ['-c', 'echo "out:$FOO"; echo err >&2; cat; exit 3'], { env: ['FOO=bar'], input: Buffer.from('from-stdin\n') });
      expect(r.exitCode).toBe(3);
      expect(r.stdout.toString()).toBe('out:bar\nfrom-stdin\n');
      expect(r.stderr.toString()).toBe('err\n');
      // exec-status forgets the pid once it reported the exit.
      const again = (await qga.execStatus(r.pid).catch((e: unknown) => e)) as QgaError;
      expect(again).toBeInstanceOf(QgaError);
      expect(again.reason).toBe('command');
      expect(again.command).toBe('guest-exec-status');
      expect(again.desc).toContain('pid');
      // A process that outlives its deadline.
      const slow = (await qga.exec('/bin/sleep', ['3'], { timeoutMs: 300 }).catch((e: unknown) => e)) as QgaError;
      expect(slow.reason).toBe('timeout');
      expect(slow.message).toContain('/bin/sleep');
      await qga.ping();
    } finally {
      await qga.close();
    }
  });

  it('writes and reads files through guest-file-* (base64, chunked)', async () => {
    const qga = await QgaClient.connect({ socketPath: sock, timeoutMs: 10_000 });
    try {
      const file = path.join(dir, 'data.bin');
      const data = Buffer.alloc(2.5 * 1024 * 1024 + 7);
      for (let i = 0; i < data.length; i++) data[i] = (i * 31 + (i >> 12)) & 0xff;
      await qga.writeFile(file, data);
      expect((await readFile(file)).equals(data)).toBe(true);
      await writeFile(path.join(dir, 'small.txt'), 'hello agent');
      expect((await qga.readFile(path.join(dir, 'small.txt'))).toString()).toBe('hello agent');
      expect((await qga.readFile(file)).equals(data)).toBe(true);
      const h = await qga.fileOpen(file, 'r');
      expect(await qga.fileSeek(h, 1000, 'set')).toBe(1000);
      const { data: part } = await qga.fileRead(h, 10);
      expect(part.equals(data.subarray(1000, 1010))).toBe(true);
      await qga.fileClose(h);
      const missing = (await qga.readFile(path.join(dir, 'nope')).catch((e: unknown) => e)) as QgaError;
      expect(missing.reason).toBe('command');
      expect(missing.command).toBe('guest-file-open');
    } finally {
      await qga.close();
    }
  });

  it('refuses a blocked command with a typed error', async () => {
    const qga = await QgaClient.connect({ socketPath: sock, timeoutMs: 5000 });
    try {
      // guest-suspend-ram is blocked (never run a freeze here, even blocked).
      const err = (await qga.execute('guest-suspend-ram').catch((e: unknown) => e)) as QgaError;
      expect(err).toBeInstanceOf(QgaError);
      expect(err.errorClass).toBe('CommandNotFound');
      expect(err.message).toContain('guest-suspend-ram');
    } finally {
      await qga.close();
    }
  });

  it('times out an agent that does not answer, naming the command, and resyncs afterwards', async () => {
    const qga = await QgaClient.connect({ socketPath: sock, timeoutMs: 5000 });
    try {
      agent.kill('SIGSTOP');
      let err: QgaError;
      try {
        err = (await qga.ping({ timeoutMs: 300 }).catch((e: unknown) => e)) as QgaError;
      } finally {
        agent.kill('SIGCONT');
      }
      expect(err).toBeInstanceOf(QgaError);
      expect(err.reason).toBe('timeout');
      expect(err.command).toBe('guest-ping');
      expect(err.message).toContain(sock);
      // The late answer to the ping is dropped by the resync; the next command gets its own answer.
      expect(await qga.fsfreezeStatus()).toBe('thawed');
      expect((await qga.exec('/bin/echo', ['x'])).stdout.toString()).toBe('x\n');
    } finally {
      await qga.close();
    }
  });

  it('connect fails with a timeout when nobody answers on the socket', async () => {
    // A listening socket with no agent behind it (as a VM whose agent is not running).
    const net = await import('node:net');
    const silent = path.join(dir, 'silent.sock');
    // It reads and drops what it gets (so it also sees the client go away).
    const server = net.createServer((c) => c.resume());
    await new Promise<void>((r) => server.listen(silent, r));
    try {
      const err = (await QgaClient.connect({ socketPath: silent, timeoutMs: 300 }).catch((e: unknown) => e)) as QgaError;
      expect(err).toBeInstanceOf(QgaError);
      expect(err.reason).toBe('timeout');
      expect(err.command).toBe('guest-sync-delimited');
      expect(err.hint).toContain('qemu-guest-agent');
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
  });
});
