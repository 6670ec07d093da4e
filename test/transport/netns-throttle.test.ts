// Two hosts in network namespaces this test creates (and always deletes): a source agent in A
// sends to a target agent in B over mutual TLS, and a throttling rule between their address
// ranges, enforced by the sender's shared token bucket, limits the measured rate to within 10%.
// Needs root (ip netns); skipped with the reason otherwise.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makePki } from './helpers.js';

const root = process.getuid?.() === 0;
const hasIp = spawnSync('ip', ['-V']).status === 0;
const skipReason = !root ? 'needs root to create network namespaces' : !hasIp ? 'needs iproute2 (ip)' : '';

const tag = randomBytes(3).toString('hex');
const nsA = `bwt-${tag}-a`;
const nsB = `bwt-${tag}-b`;
const vethA = `bwa${tag}`;
const vethB = `bwb${tag}`;
const octet = 16 + (parseInt(tag.slice(0, 2), 16) % 200);
const ipA = `10.213.${octet}.1`;
const ipB = `10.213.${octet}.2`;
const repoRoot = path.resolve(import.meta.dirname, '../..');

function ip(...args: string[]): void {
  const r = spawnSync('ip', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ip ${args.join(' ')} failed: ${r.stderr}`);
}

let certDir = '';
const children: ChildProcess[] = [];

function runInNs(ns: string, script: string, args: string[]): { child: ChildProcess; lines: AsyncIterator<string> } {
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, '--import', 'tsx', path.join(import.meta.dirname, 'netns', script), ...args], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, BULWARK_LOG_LEVEL: 'warn' },
  });
  children.push(child);
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.on('exit', (code) => {
    if (code !== 0 && code !== null) console.error(`${script} exited ${code}: ${stderr}`);
  });
  return { child, lines: createInterface({ input: child.stdout })[Symbol.asyncIterator]() };
}

async function nextJson(lines: AsyncIterator<string>): Promise<Record<string, unknown>> {
  const r = await lines.next();
  if (r.done) throw new Error('child process ended without output');
  return JSON.parse(r.value) as Record<string, unknown>;
}

describe.skipIf(skipReason !== '')(`multi-host throttling in network namespaces${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  beforeAll(() => {
    ip('netns', 'add', nsA);
    ip('netns', 'add', nsB);
    ip('link', 'add', vethA, 'netns', nsA, 'type', 'veth', 'peer', 'name', vethB, 'netns', nsB);
    ip('-n', nsA, 'addr', 'add', `${ipA}/30`, 'dev', vethA);
    ip('-n', nsB, 'addr', 'add', `${ipB}/30`, 'dev', vethB);
    for (const [ns, dev] of [[nsA, vethA], [nsB, vethB]] as const) {
      ip('-n', ns, 'link', 'set', dev, 'up');
      ip('-n', ns, 'link', 'set', 'lo', 'up');
    }
    const pki = makePki([ipA, ipB]);
    certDir = mkdtempSync(path.join(tmpdir(), 'bulwark-netns-'));
    const files: Record<string, string> = {
      'ca.crt': pki.target.ca,
      'target.key': pki.target.key,
      'target.crt': pki.target.cert,
      'source.key': pki.source.key,
      'source.crt': pki.source.cert,
    };
    for (const [f, v] of Object.entries(files)) writeFileSync(path.join(certDir, f), v, { mode: 0o600 });
  });

  afterAll(() => {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    spawnSync('ip', ['netns', 'del', nsA]);
    spawnSync('ip', ['netns', 'del', nsB]);
    if (certDir) rmSync(certDir, { recursive: true, force: true });
    const left = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
    expect(left).not.toContain(tag);
  });

  it('a 20 Mbit/s rule between the two ranges holds 5 streams to within 10% of 20 Mbit/s', async () => {
    const secret = randomBytes(32).toString('hex');
    const receiver = runInNs(nsB, 'receive.ts', [certDir, ipB, 'task-ns', secret]);
    const { listening } = await nextJson(receiver.lines);
    const rules = [
      { name: 'wan-20', source: `${ipB}/32`, target: `10.213.${octet}.0/30`, mbps: 20 }, // matches A->B in reverse direction
      { name: 'elsewhere', source: '192.0.2.0/24', target: '198.51.100.0/24', mbps: 1 },
    ];
    const sender = runInNs(nsA, 'send.ts', [certDir, ipA, ipB, String(listening), 'task-ns', secret, '10', JSON.stringify(rules)]);
    const result = await nextJson(sender.lines);
    const ended = await nextJson(receiver.lines);

    expect(result.rules).toEqual(['wan-20']);
    expect(ended).toEqual({ ended: 'committed', bytes: 10 * 1024 * 1024 });
    const mbps = result.mbps as number;
    console.info(`netns throttle: ${mbps.toFixed(2)} Mbit/s against a 20 Mbit/s rule; ${(result.verdict as { summary: string }).summary}`);
    expect(mbps).toBeGreaterThan(18);
    expect(mbps).toBeLessThan(22);
    expect((result.verdict as { bottleneck: string }).bottleneck).toBe('throttling');
  });
});
