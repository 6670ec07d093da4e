// Shared by bench/backup and bench/restore (run by hand): Bulwark's data path phases (run in a
// child process compiled as shipped), the peers (restic, borg) driven the same way, and helpers.
import { execFile, execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { dirtyBitmapContext } from '../../src/hypervisor/nbd/protocol.js';
import { prepareBackupDisk, readBackupDisk } from '../../src/hypervisor/cbt/reader.js';
import type { DiskBlock } from '../../src/disk/types.js';
import type { DiskChanges } from '../../src/hypervisor/types.js';
import { openRepository } from '../../src/repository/index.js';
import { restoreDisk } from '../../src/restore/disk/index.js';
import { ensureMixedDiskImage, MIXED_DISK_SIZE } from './mixed-disk.js';

const exec = promisify(execFile);
export const BENCH_DIR = path.join(tmpdir(), 'bulwark-bench');
export const PASSWORD = 'bench';

export interface Phase {
  seconds: number;
  cpuSeconds: number;
  maxRssMiB: number;
  bytesRead?: number;
  pointId?: string;
  sha256?: string;
  /** Wall seconds of the whole child process (node start, module load, the phase, exit): runPhase. */
  processSeconds?: number;
  /** CPU seconds of the whole child process, node start and module load included. */
  processCpuSeconds?: number;
}

/**
 * Block size of the bench's chain: BULWARK_BENCH_BLOCK_SIZE (e.g. 262144), default 1 MiB. The
 * full creates the chain with it; the incremental's reader must use the same (the chain's).
 */
export function benchBlockSize(): number {
  return Number(process.env.BULWARK_BENCH_BLOCK_SIZE ?? 1 << 20);
}

// ---- Bulwark phases (child process) ----
export async function bulwarkBackup(repoDir: string, socketPath: string, exportName: string, kind: 'full' | 'incremental'): Promise<Phase> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const changes: DiskChanges =
    kind === 'full' ? { kind: 'full', reason: 'no-checkpoint', detail: 'bench', compareDigests: false } : { kind: 'bitmap', bitmap: 'bm0', context: dirtyBitmapContext('bm0') };
  const view = { disk: { name: 'vda', targetDev: 'vda', imagePath: '', format: 'qcow2', virtualSize: MIXED_DISK_SIZE }, nbd: { socketPath, exportName }, size: MIXED_DISK_SIZE, changes };
  const blockSize = benchBlockSize();
  const shape = /^c(\d+)x(\d+)$/.exec(process.env.BULWARK_BENCH_READER ?? '');
  // As the product's startVmBackup: the export opens and its first window is mapped while the
  // repository opens and the point starts (BULWARK_BENCH_PREPARE=0: one after the other, as before).
  const prepared =
    process.env.BULWARK_BENCH_PREPARE === '0' ? undefined : prepareBackupDisk(view as Parameters<typeof prepareBackupDisk>[0], { blockSize, ...(shape ? { connections: Number(shape[2]) } : {}) });
  const repo = await openRepository(repoDir, { create: true });
  const t1 = performance.now();
  // BULWARK_BENCH_THREADS=N: N encoder threads (default the writer's, min(2, cores)); BULWARK_BENCH_SLOTS=N: N encoder slots.
  const threads = process.env.BULWARK_BENCH_THREADS;
  const slots = process.env.BULWARK_BENCH_SLOTS;
  const w = await repo.startRestorePoint({
    job: 'bench', vm: 'mixed', kind, ...(kind === 'full' ? { blockSize } : {}), ...(threads ? { threads: Number(threads) } : {}), ...(slots ? { slots: Number(slots) } : {}),
    disks: [{ name: 'vda', size: MIXED_DISK_SIZE }],
  });
  const t2 = performance.now();
  let firstBlockMs = -1;
  let stats: { bytesRead: number; bufferWaitMs?: number } = { bytesRead: 0 };
  try {
    // As the product's backupDisk into a local repository: the reader reuses a ring of buffers
    // (BULWARK_BENCH_FRESH_BUFFERS=1: a new buffer per block, to compare peak RSS).
    const reuseBuffers = process.env.BULWARK_BENCH_FRESH_BUFFERS !== '1';
    // BULWARK_BENCH_LEND=1: the reader reads straight into the writer's lent encoder slots instead
    // of its own ring (no copy; reads then share the writer's 12 slots, see bench/backup/README).
    // BULWARK_BENCH_READER=cNxM: N blocks in flight over M NBD connections (default: the reader's).
    const lend = process.env.BULWARK_BENCH_LEND === '1' ? { take: () => w.lendBuffer(), giveBack: (b: Buffer) => w.giveBackBuffer(b) } : undefined;
    const source = readBackupDisk(view as Parameters<typeof readBackupDisk>[0], {
      blockSize,
      reuseBuffers,
      ...(lend ? { lend } : {}),
      ...(prepared ? { prepared } : {}),
      ...(shape ? { concurrency: Number(shape[1]), connections: Number(shape[2]) } : {}),
      onStats: (s) => void (stats = s),
    });
    // Stage waits as the product measures them: the writer waiting for the reader (source), for its encoders (proxy), for file writes (target).
    const waits = { source: 0, proxy: 0, target: 0 };
    async function* timed(): AsyncGenerator<DiskBlock> {
      for (;;) {
        const t = performance.now();
        const r = await source.next();
        waits.source += performance.now() - t;
        // NBD connections, the first window's block-status queries and the first read.
        if (firstBlockMs < 0) firstBlockMs = performance.now() - t2;
        if (r.done) return;
        yield r.value;
      }
    }
    await w.writeDisk('vda', timed(), { onWait: (stage, ms) => void (waits[stage] += ms) });
    // A reader reading into lent slots waits for them itself: that part of the source wait is the encoders'.
    const lentWait = stats.bufferWaitMs ?? 0;
    waits.source -= lentWait;
    waits.proxy += lentWait;
    console.error(`  ${kind}: writer waited for source ${Math.round(waits.source)} ms, proxy ${Math.round(waits.proxy)} ms, target ${Math.round(waits.target)} ms`);
  } catch (err) {
    await w.abort();
    throw err;
  }
  const t3 = performance.now();
  const bytesRead = stats.bytesRead;
  const info = await w.commit();
  // Where the time goes (stderr): open the repository, start the point, read+write the disk, commit.
  const ms = (a: number, b: number) => Math.round(b - a);
  const cpu = process.cpuUsage(c0);
  const all = process.cpuUsage();
  console.error(
    `  ${kind}: node start + module load ${Math.round(t0)} ms (${((all.user + all.system - cpu.user - cpu.system) / 1e6).toFixed(2)} CPU-s), ` +
      `open ${ms(t0, t1)} ms, start point ${ms(t1, t2)} ms, read+write ${ms(t2, t3)} ms (first block after ${Math.round(firstBlockMs)} ms; ${(bytesRead / 2 ** 20).toFixed(0)} MiB read, block size ${blockSize / 1024} KiB), commit ${ms(t3, performance.now())} ms`,
  );
  const mem = process.memoryUsage();
  const mib = (n: number) => `${(n / 2 ** 20).toFixed(0)}`;
  console.error(`  ${kind}: memory at the end: rss ${mib(mem.rss)}, V8 heap ${mib(mem.heapUsed)} of ${mib(mem.heapTotal)}, external ${mib(mem.external)} (array buffers ${mib(mem.arrayBuffers)}) MiB; peak rss ${mib(process.resourceUsage().maxRSS * 1024)} MiB`);
  const processCpuSeconds = (all.user + all.system) / 1e6;
  return { seconds: (performance.now() - t0) / 1000, cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssMiB: process.resourceUsage().maxRSS / 1024, bytesRead, pointId: info.id, processCpuSeconds };
}

export async function bulwarkRestore(repoDir: string, pointId: string, to: string): Promise<Phase> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const repo = await openRepository(repoDir);
  // As the product restores by default: no image SHA-256 (the caller checks the file itself).
  const r = await restoreDisk({ repository: repo, pointId, disk: 'vda', to, overwrite: true });
  const cpu = process.cpuUsage(c0);
  return { seconds: (performance.now() - t0) / 1000, cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssMiB: process.resourceUsage().maxRSS / 1024, ...(r.sha256 !== undefined ? { sha256: r.sha256 } : {}) };
}

// ---- running Bulwark compiled, as shipped ----
export async function compileBench(entry: string, outName: string): Promise<string> {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
  const outdir = path.join(root, '.cache', outName);
  const { build } = await import('esbuild');
  await build({
    entryPoints: [entry, path.join(root, 'src/repository/block-worker.ts'), path.join(root, 'src/restore/disk/restore-worker.ts')],
    bundle: true, platform: 'node', format: 'esm', target: 'node20', outdir, entryNames: '[name]', packages: 'external', logLevel: 'warning',
  });
  return path.join(outdir, `${path.basename(entry, '.ts')}.js`);
}

/** Runs a phase in a child process of the compiled bench `entry`; its last stdout line is a Phase. */
/** node flags of the agent's unit (packaging/bulwark-agent.service): a phase runs as the agent would. */
export const AGENT_NODE_FLAGS = ['--max-semi-space-size=2'];

export function runPhase(entry: string, ...a: string[]): Phase {
  const t0 = performance.now();
  const out = execFileSync(process.execPath, [...AGENT_NODE_FLAGS, entry, ...a], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 20, env: { ...process.env, BULWARK_LOG_LEVEL: 'warn' } });
  const processSeconds = (performance.now() - t0) / 1000;
  return { ...(JSON.parse(out.trim().split('\n').pop()!) as Phase), processSeconds };
}

// ---- peers ----
/** Runs a shell pipeline under /usr/bin/time; CPU and peak RSS of the peer (the last command). */
export async function timed(script: string, env: Record<string, string> = {}): Promise<Phase> {
  const t0 = performance.now();
  const { stderr } = await exec('bash', ['-o', 'pipefail', '-c', script.replace(/^(.*\|\s*)?(\S+)/, (_m, pipe: string | undefined, cmd: string) => `${pipe ?? ''}/usr/bin/time -f 'BENCHTIME %U %S %M' ${cmd}`)], {
    env: { ...process.env, ...env },
    maxBuffer: 16 << 20,
  });
  const m = /BENCHTIME (\S+) (\S+) (\d+)/.exec(stderr);
  return { seconds: (performance.now() - t0) / 1000, cpuSeconds: m ? Number(m[1]) + Number(m[2]) : NaN, maxRssMiB: m ? Number(m[3]) / 1024 : NaN };
}

export interface Peer {
  readonly name: string;
  init(repo: string): Promise<void>;
  /** Backs up the NBD export `uri` (read with nbdcopy) as snapshot `tag`. */
  backup(repo: string, uri: string, tag: string): Promise<Phase>;
  restore(repo: string, tag: string, to: string): Promise<Phase>;
}

const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
export const PEERS: Record<string, Peer> = {
  restic: {
    name: 'restic',
    init: async (repo) => void (await exec('restic', ['init', '--repo', repo], { env: { ...process.env, RESTIC_PASSWORD: PASSWORD } })),
    backup: (repo, uri, tag) => timed(`nbdcopy ${q(uri)} - | restic backup --quiet --repo ${q(repo)} --stdin --stdin-filename vda.raw --tag ${tag}`, { RESTIC_PASSWORD: PASSWORD }),
    restore: async (repo, tag, to) => {
      const dir = `${to}.d`;
      const r = await timed(`restic restore --quiet --repo ${q(repo)} latest --tag ${tag} --target ${q(dir)}`, { RESTIC_PASSWORD: PASSWORD });
      await rename(path.join(dir, 'vda.raw'), to);
      await rm(dir, { recursive: true, force: true });
      return r;
    },
  },
  borg: {
    name: 'borg',
    init: async (repo) => void (await exec('borg', ['init', '--encryption', 'repokey', repo], { env: { ...process.env, BORG_PASSPHRASE: PASSWORD } })),
    backup: (repo, uri, tag) => timed(`nbdcopy ${q(uri)} - | borg create ${q(`${repo}::${tag}`)} -`, { BORG_PASSPHRASE: PASSWORD }),
    restore: (repo, tag, to) => timed(`borg extract --stdout ${q(`${repo}::${tag}`)} > ${q(to)}`, { BORG_PASSPHRASE: PASSWORD }),
  },
};

export async function sha256OfFile(file: string): Promise<string> {
  const { stdout } = await exec('sha256sum', [file], { maxBuffer: 1 << 20 });
  return stdout.split(' ')[0]!;
}

export async function sha256OfExport(uri: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    const child = spawn('nbdcopy', [uri, '-'], { stdio: ['ignore', 'pipe', 'inherit'] });
    child.stdout.on('data', (d: Buffer) => h.update(d));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(h.digest('hex')) : reject(new Error(`nbdcopy exited with ${code}`))));
  });
}

export async function duBytes(dir: string): Promise<number> {
  const { stdout } = await exec('du', ['-sb', dir]);
  return Number(stdout.split('\t')[0]);
}

/** The mixed disk as a qcow2 (zero extents unallocated), made once from the raw image. */
export async function ensureMixedQcow2(): Promise<string> {
  const raw = await ensureMixedDiskImage(path.join(BENCH_DIR, 'mixed-4g.raw'));
  const qcow = path.join(BENCH_DIR, 'mixed-4g.qcow2');
  if (!existsSync(qcow)) {
    await exec('qemu-img', ['convert', '-O', 'qcow2', raw, `${qcow}.tmp`]);
    await rename(`${qcow}.tmp`, qcow);
  }
  return qcow;
}

