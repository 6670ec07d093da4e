// End-to-end helpers: the `bulwark` program as a user runs it (node bin/bulwark.js, compiled
// by `npm run build`), and a real server it starts. The build runs once, under a lock shared by
// every test file, and only when dist/ is missing or older than a source file.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);

export const root = dirname(dirname(dirname(fileURLToPath(import.meta.url))));
export const program = join(root, 'bin', 'bulwark.js');
const entry = join(root, 'dist', 'cli', 'main.js');

function newestSource(dir: string): number {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) newest = Math.max(newest, newestSource(p));
    else if (e.name.endsWith('.ts') && !e.name.endsWith('.test.ts')) newest = Math.max(newest, statSync(p).mtimeMs);
  }
  return newest;
}

const stale = (): boolean => !existsSync(entry) || statSync(entry).mtimeMs < newestSource(join(root, 'src'));

/**
 * Builds dist/ when it is missing or stale. tsc writes its output even when some other module
 * fails to typecheck (that is `npm run typecheck`'s job to report); the build counts as done
 * when the console's entry was written.
 */
export async function ensureBuilt(): Promise<void> {
  if (!stale()) return;
  // Incremental: on a busy machine a full build takes minutes, a rebuild after a few edits far
  // less. tsc does not notice deleted outputs, so the build info goes when dist/ is gone.
  const info = join(root, 'node_modules', '.cache', 'bulwark-e2e', 'build.tsbuildinfo');
  const script =
    `cd "${root}" && if [ ! -f "${entry}" ]; then rm -f "${info}"; fi && ` +
    `if [ ! -f "${entry}" ] || [ -n "$(find src -name '*.ts' ! -name '*.test.ts' -newer "${entry}" | head -1)" ]; then ` +
    `npx tsc -p tsconfig.build.json --incremental --tsBuildInfoFile "${info}"; touch "${entry}"; fi`;
  try {
    await run('flock', ['/tmp/bulwark-build.lock', 'sh', '-c', script], { maxBuffer: 16 << 20 });
  } catch (err) {
    if (stale()) throw new Error(`npm run build failed and left no fresh ${entry}: ${(err as { stdout?: string }).stdout ?? String(err)}`);
  }
}

export interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `bulwark ARGS` with `env` added to a clean environment; `input` goes to stdin. */
export function bulwark(args: string[], env: Record<string, string>, input?: string): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [program, ...args], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', BULWARK_LOG_LEVEL: 'warn', ...env },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
    child.stdin.end(input ?? '');
  });
}

export interface ServerProcess {
  child: ChildProcess;
  dataDir: string;
  url: string;
  caFingerprint: string;
  output(): string;
  stop(): Promise<number | null>;
}

/**
 * Starts `bulwark --data DIR server --listen 127.0.0.1:0` and waits for its first-start message
 * (URL and CA fingerprint); with `restart`, the data directory has been used before: it starts
 * with `--listen none` and waits for the socket.
 */
export async function startServerProcess(dataDir: string, opts: { restart?: boolean; timeoutMs?: number; simulate?: boolean } = {}): Promise<ServerProcess> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const child = spawn(process.execPath, [program, '--data', dataDir, 'server', '--listen', opts.restart ? 'none' : '127.0.0.1:0'], {
    // Console tests run jobs in simulation mode (no VMs); the one-host backup test runs the real data path.
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', BULWARK_LOG_LEVEL: 'warn', HOME: dataDir, BULWARK_SIMULATE_DATA_PATH: opts.simulate === false ? '0' : '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr.on('data', (c: Buffer) => (out += c.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const stop = async (): Promise<number | null> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    try {
      return await exited;
    } finally {
      clearTimeout(timer);
    }
  };
  const started = Date.now();
  for (;;) {
    const m = /bulwark login (https:\/\/\S+)\s+\(CA fingerprint ([0-9A-F:]+)\)/.exec(out);
    if ((m || opts.restart) && existsSync(join(dataDir, 'bulwark.sock'))) {
      return { child, dataDir, url: m?.[1] ?? '', caFingerprint: m?.[2] ?? '', output: () => out, stop };
    }
    if (child.exitCode !== null || Date.now() - started > timeoutMs) {
      await stop();
      throw new Error(`bulwark server did not start (exit ${child.exitCode}):\n${out}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}
