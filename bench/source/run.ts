// Source benchmark (run by hand: `npx tsx bench/source/run.ts [--size-gib 4] [--connections 4]
// [--depth 64] [--chunk-kib 512] [--runs 3] [--no-verify]`): a deterministic mixed 4 GiB qcow2 served
// by qemu-storage-daemon, read in full through Bulwark's NBD client (pooled connections, reads of
// allocated extents into preallocated buffers) against `nbdcopy URI null:` on the same export in
// the same run; then a 5% incremental scattered in ~700 runs, found through a dirty bitmap:
// map (qemu:dirty-bitmap + base:allocation) + read time. Prints medians of --runs.
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rename, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { NbdExport } from '../../src/hypervisor/nbd/client.js';
import { BASE_ALLOCATION, dirtyBitmapContext } from '../../src/hypervisor/nbd/protocol.js';
import { QsdFixture } from '../../test/fixtures/qsd.js';
import { scatteredWrites, writeMixedRaw } from './disk.js';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
}
const SIZE = arg('size-gib', 4) * GiB;
const CONNECTIONS = arg('connections', 4);
const DEPTH = arg('depth', 64);
const CHUNK = arg('chunk-kib', 512) * 1024;
const RUNS = arg('runs', 3);
// Room for all of DEPTH on the pool even when the split is uneven.
const PER_CONNECTION = Math.max(16, Math.ceil(DEPTH / CONNECTIONS) * 2);
const VERIFY = !process.argv.includes('--no-verify');
const CTX = dirtyBitmapContext('bm0');

interface Range {
  offset: number;
  length: number;
}

/** Reads the ranges in CHUNK pieces, DEPTH at a time, each worker into its own buffer. Returns bytes read. */
async function readRanges(disk: NbdExport, ranges: readonly Range[]): Promise<number> {
  function* chunks(): Generator<Range> {
    for (const r of ranges) {
      for (let p = 0; p < r.length; p += CHUNK) yield { offset: r.offset + p, length: Math.min(CHUNK, r.length - p) };
    }
  }
  const it = chunks();
  let bytes = 0;
  await Promise.all(
    Array.from({ length: DEPTH }, async () => {
      const buf = Buffer.allocUnsafe(CHUNK);
      for (let n = it.next(); !n.done; n = it.next()) {
        await disk.readInto(n.value.offset, buf.subarray(0, n.value.length));
        bytes += n.value.length;
      }
    }),
  );
  return bytes;
}

/** CPU seconds (user + system) a process has used so far, from /proc. */
function cpuOf(pid: number): number {
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // clock ticks (USER_HZ = 100 on Linux)
}

interface FullRun {
  seconds: number;
  /** CPU seconds of the reader (client process or nbdcopy) and of qemu-storage-daemon. */
  readerCpu: number;
  qsdCpu: number;
}

async function clientFull(qsd: QsdFixture): Promise<FullRun & { bytes: number }> {
  const q0 = cpuOf(qsd.pid);
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const disk = await NbdExport.open({ endpoint: qsd.nbdEndpoint, exportName: 'full', connections: CONNECTIONS, maxInFlight: PER_CONNECTION, noFragment: true });
  try {
    const data = (await disk.extents(0, disk.size)).filter((e) => e.kind === 'data');
    const bytes = await readRanges(disk, data);
    const c = process.cpuUsage(c0);
    return { seconds: (performance.now() - t0) / 1000, bytes, readerCpu: (c.user + c.system) / 1e6, qsdCpu: cpuOf(qsd.pid) - q0 };
  } finally {
    await disk.close();
  }
}

async function nbdcopyFull(qsd: QsdFixture): Promise<FullRun> {
  const q0 = cpuOf(qsd.pid);
  const t0 = performance.now();
  const { stderr } = await exec('/usr/bin/time', ['-f', 'cpu %U %S', 'nbdcopy', qsd.nbdUri('full'), 'null:']);
  const seconds = (performance.now() - t0) / 1000;
  const m = /cpu ([\d.]+) ([\d.]+)/.exec(stderr);
  return { seconds, readerCpu: m ? Number(m[1]) + Number(m[2]) : NaN, qsdCpu: cpuOf(qsd.pid) - q0 };
}

/** Dirty ∩ allocated-data ranges. */
function intersect(dirty: readonly Range[], data: readonly Range[]): Range[] {
  const out: Range[] = [];
  let j = 0;
  for (const d of dirty) {
    while (j < data.length && data[j]!.offset + data[j]!.length <= d.offset) j++;
    for (let k = j; k < data.length && data[k]!.offset < d.offset + d.length; k++) {
      const s = Math.max(d.offset, data[k]!.offset);
      const e = Math.min(d.offset + d.length, data[k]!.offset + data[k]!.length);
      if (e > s) out.push({ offset: s, length: e - s });
    }
  }
  return out;
}

async function clientIncremental(qsd: QsdFixture): Promise<{ seconds: number; mapSeconds: number; connectSeconds: number; bytes: number; runs: number }> {
  const t0 = performance.now();
  const disk = await NbdExport.open({ endpoint: qsd.nbdEndpoint, exportName: 'full', connections: CONNECTIONS, maxInFlight: PER_CONNECTION, noFragment: true, metaContexts: [BASE_ALLOCATION, CTX] });
  try {
    const t1 = performance.now();
    const [dirty, alloc] = await Promise.all([disk.dirtyExtents(CTX, 0, disk.size), disk.extents(0, disk.size)]);
    const ranges = intersect(
      dirty.filter((e) => e.dirty),
      alloc.filter((e) => e.kind === 'data'),
    );
    const t2 = performance.now();
    const bytes = await readRanges(disk, ranges);
    const t3 = performance.now();
    return { seconds: (t3 - t0) / 1000, connectSeconds: (t1 - t0) / 1000, mapSeconds: (t2 - t1) / 1000, bytes, runs: dirty.filter((e) => e.dirty).length };
  } finally {
    await disk.close();
  }
}

/** SHA-256 of the whole disk through the client (holes as zeroes), in order. */
async function clientDigest(qsd: QsdFixture): Promise<string> {
  const disk = await NbdExport.open({ endpoint: qsd.nbdEndpoint, exportName: 'full', connections: CONNECTIONS, maxInFlight: PER_CONNECTION });
  try {
    const h = createHash('sha256');
    const step = 64 * MiB;
    for (let p = 0; p < disk.size; p += step) h.update(await disk.read(p, Math.min(step, disk.size - p)));
    return h.digest('hex');
  } finally {
    await disk.close();
  }
}

async function nbdcopyDigest(qsd: QsdFixture): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('nbdcopy', [qsd.nbdUri('full'), '-'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const h = createHash('sha256');
    child.stdout.on('data', (b: Buffer) => h.update(b));
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve(h.digest('hex')) : reject(new Error(`nbdcopy exited ${code}`))));
  });
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const mbps = (bytes: number, s: number): string => (bytes / 1e6 / s).toFixed(0);

async function main(): Promise<void> {
  const cache = path.join(os.tmpdir(), 'bulwark-bench-source', `mixed-v2-${SIZE}`);
  await mkdir(cache, { recursive: true });
  const image = path.join(cache, 'disk.qcow2');
  if (!existsSync(image)) {
    console.log(`generating ${SIZE / GiB} GiB mixed disk in ${cache} (once)…`);
    const raw = path.join(cache, 'disk.raw');
    await writeMixedRaw(raw, SIZE);
    await exec('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, `${image}.tmp`]);
    await rename(`${image}.tmp`, image);
    await rm(raw);
  }
  const qsd = await QsdFixture.start({ image });
  try {
    // The day of guest writes, recorded by bm0. The same writes every run: the image ends in the
    // same state, whatever ran before.
    await qsd.qmp.execute('block-dirty-bitmap-add', { node: qsd.nodeName, name: 'bm0', persistent: false });
    await qsd.addExport('live', { writable: true });
    const writes = scatteredWrites(SIZE);
    const tw = performance.now();
    for (let i = 0; i < writes.length; i += 200) {
      await qsd.qemuIo('live', ...writes.slice(i, i + 200).map((w) => `write -P ${w.fill} ${w.offset} ${w.length}`));
    }
    const written = writes.reduce((s, w) => s + w.length, 0);
    console.log(`incremental: ${writes.length} runs, ${(written / MiB).toFixed(1)} MiB (${((written / SIZE) * 100).toFixed(1)}%), written in ${((performance.now() - tw) / 1000).toFixed(1)} s`);
    await qsd.removeExport('live');
    await qsd.qmp.execute('block-dirty-bitmap-disable', { node: qsd.nodeName, name: 'bm0' });
    await qsd.addExport('full', { bitmaps: ['bm0'] });

    if (VERIFY) {
      const [a, b] = [await clientDigest(qsd), await nbdcopyDigest(qsd)];
      console.log(`verify: client sha256 ${a.slice(0, 16)}… nbdcopy ${b.slice(0, 16)}… ${a === b ? 'EQUAL' : 'DIFFERENT'}`);
      if (a !== b) process.exitCode = 1;
    }
    await nbdcopyFull(qsd); // warm the page cache for both

    const nc: FullRun[] = [];
    const cl: FullRun[] = [];
    const inc: Array<Awaited<ReturnType<typeof clientIncremental>>> = [];
    let dataBytes = 0;
    for (let r = 0; r < RUNS; r++) {
      // Alternate the order so neither tool always runs on a cooler machine.
      if (r % 2 === 0) {
        nc.push(await nbdcopyFull(qsd));
        const c = await clientFull(qsd);
        cl.push(c);
        dataBytes = c.bytes;
      } else {
        const c = await clientFull(qsd);
        cl.push(c);
        nc.push(await nbdcopyFull(qsd));
      }
      inc.push(await clientIncremental(qsd));
      console.log(`run ${r + 1}: nbdcopy ${nc[r]!.seconds.toFixed(2)} s, client ${cl[r]!.seconds.toFixed(2)} s, incremental ${inc[r]!.seconds.toFixed(3)} s (map ${inc[r]!.mapSeconds.toFixed(3)} s)`);
    }
    const ncm = median(nc.map((x) => x.seconds));
    const clm = median(cl.map((x) => x.seconds));
    const im = median(inc.map((i) => i.seconds));
    const imap = median(inc.map((i) => i.mapSeconds));
    const iconn = median(inc.map((i) => i.connectSeconds));
    const last = inc[inc.length - 1]!;
    console.log('');
    console.log(`disk ${SIZE / GiB} GiB qcow2, allocated data ${(dataBytes / MiB).toFixed(0)} MiB; client: ${CONNECTIONS} connections, ${DEPTH} x ${CHUNK / 1024} KiB reads in flight`);
    console.log(`full read   nbdcopy ${ncm.toFixed(2)} s (${mbps(SIZE, ncm)} MB/s of disk)   client ${clm.toFixed(2)} s (${mbps(SIZE, clm)} MB/s of disk, ${mbps(dataBytes, clm)} MB/s of data)   ratio ${(ncm / clm).toFixed(2)}x nbdcopy (target >= 0.8)`);
    // CPU seconds do not depend on how busy the machine is; wall seconds do.
    console.log(
      `cpu (median s) nbdcopy ${median(nc.map((x) => x.readerCpu)).toFixed(2)} + qsd ${median(nc.map((x) => x.qsdCpu)).toFixed(2)}   client ${median(cl.map((x) => x.readerCpu)).toFixed(2)} + qsd ${median(cl.map((x) => x.qsdCpu)).toFixed(2)}`,
    );
    console.log(`incremental ${last.runs} dirty runs, ${(last.bytes / MiB).toFixed(1)} MiB: connect ${iconn.toFixed(3)} s + map ${imap.toFixed(3)} s + read = ${im.toFixed(3)} s median (target <= 0.5 s)`);
  } finally {
    await qsd.stop();
  }
}

await main();
