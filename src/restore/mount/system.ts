// The side effects of the mount pipeline (child processes, the kernel's mount table), behind
// one interface so the pipeline's bookkeeping reads as logic. The real implementation runs the
// tools the notes found working here: nbdfuse, mount -o loop, umount, fusermount3.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { BulwarkError } from '../../common/errors.js';
import { runTool as runCommonTool } from '../../common/process.js';

/** Runs a tool (src/common/process.ts); rejects with its stderr in the message. */
export async function runTool(cmd: string, args: readonly string[], what: string, env?: NodeJS.ProcessEnv, timeoutMs?: number): Promise<string> {
  return await runCommonTool(cmd, args, what, { ...(env ? { env } : {}), ...(timeoutMs !== undefined ? { timeoutMs } : {}) });
}

/** Mount points currently in the kernel's table (decoded from /proc/self/mountinfo). */
export function mountedPaths(): Set<string> {
  const out = new Set<string>();
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const field = line.split(' ')[4];
    if (field) out.add(field.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8))));
  }
  return out;
}

/** File system types the running kernel can mount (/proc/filesystems). */
export async function kernelFileSystems(): Promise<Set<string>> {
  const text = await readFile('/proc/filesystems', 'utf8');
  return new Set(text.split('\n').map((l) => l.trim().split(/\s+/).pop() ?? '').filter(Boolean));
}

export interface NbdfuseProcess {
  readonly child: ChildProcess;
  /** The file FUSE shows the disk as. */
  readonly image: string;
}

/**
 * Starts `nbdfuse -r DIR URI` and waits until it is ready (it writes its pid file then).
 * The disk appears as DIR/nbd.
 */
export async function startNbdfuse(dir: string, uri: string, pidFile: string, timeoutMs = 15_000): Promise<NbdfuseProcess> {
  const child = spawn('nbdfuse', ['-r', '-P', pidFile, dir, uri], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ready = await stat(pidFile).then(
      (s) => s.size > 0,
      () => false,
    );
    if (ready) return { child, image: `${dir}/nbd` };
    const early = await Promise.race([
      exited.then((code) => `nbdfuse exited with code ${code}`),
      spawnError.then((e) => `nbdfuse could not start: ${e.message}`),
      new Promise<null>((r) => setTimeout(() => r(null), 25)),
    ]);
    if (early !== null || Date.now() > deadline) {
      if (early === null) child.kill('SIGTERM');
      throw new BulwarkError(`FUSE view of the disk did not come up: ${early ?? 'timed out'}${stderr ? `: ${stderr.trim()}` : ''}`, {
        kind: 'unavailable',
        context: { dir, uri },
        hint: 'nbdfuse (package libnbd-bin) and /dev/fuse are needed for file-level restore',
      });
    }
  }
}

/** Waits for a child to exit; kills it with SIGTERM after `ms`. */
export async function waitExit(child: ChildProcess, ms = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const timer = setTimeout(() => child.kill('SIGTERM'), ms);
  await exited;
  clearTimeout(timer);
}

/** Best-effort synchronous commands for the exit hook (nothing async runs at process exit). */
export function runSyncQuietly(cmd: string, args: readonly string[]): boolean {
  try {
    execFileSync(cmd, [...args], { stdio: 'ignore', timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}
