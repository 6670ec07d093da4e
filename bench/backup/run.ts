// Backup benchmark (run by hand, never in the test suite):
//   npx tsx bench/backup/run.ts [--runs 3] [--peers restic,borg] [--work DIR] [--ab DIR] [--incrementals K] [--warm]
// --ab DIR: also run the Bulwark of another work tree (e.g. `git worktree add DIR COMMIT`, with
// node_modules symlinked) as tool "bulwark-ab", in the same runs on the same export, order rotated.
// --incrementals K: K incrementals per run from the same frozen bitmap (each a new point of the
// chain with the same data); the table reports the median of all of them.
// --warm: each Bulwark incremental process takes two incrementals one after the other and reports
// the second, as the long-running agent takes them (its threads and JIT warm; `--phase … --repeat`).
// Every Bulwark phase runs node with the agent unit's flags (AGENT_NODE_FLAGS).
// The 4 GiB mixed disk (bench/lib/mixed-disk.ts: 35% zero, 35% text-like, 30% random) as a qcow2
// (zeroes unallocated) served by qemu-storage-daemon. Per run, on a fresh overlay of it:
//   1. full backup of the export by Bulwark and by each peer (same export, same state);
//   2. 5% of the disk rewritten in ~700 scattered runs (bench/source/disk.ts scatteredWrites)
//      through a writable export while dirty bitmap bm0 records them; bm0 is then frozen;
//   3. incremental: Bulwark reads only bm0's dirty extents (CBT); a peer has no CBT, it reads the
//      whole export again and deduplicates;
//   4. restore of the incremental point to a raw file by each, checked against the export.
// Bulwark's data path here is the product's own: the CBT reader (hypervisor/cbt/reader.ts: NBD
// client, base:allocation and the dirty bitmap) into the repository writer, and restoreDisk for
// the restore, each in its own process (compiled as shipped) so its peak RSS is the agent's.
// What it skips next to backupVm: QMP orchestration of a running VM (fleecing, checkpoints),
// which costs the same for a full or an incremental and is measured in the adapter tests.
// Peers read the export with nbdcopy into stdin: `restic backup --stdin`, `borg create ... -`.
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { QsdFixture } from '../../test/fixtures/qsd.js';
import { bulwarkBackup, bulwarkRestore, compileBench, duBytes, ensureMixedQcow2, PEERS, runPhase, sha256OfExport, sha256OfFile, type Phase } from '../lib/backup-tools.js';
import { MIXED_DISK_SIZE } from '../lib/mixed-disk.js';
import { scatteredWrites } from '../source/disk.js';

const exec = promisify(execFile);
const args = process.argv.slice(2);
const opt = (name: string, def: string) => (args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1]! : def);
const GB = 1e9;
let compiled = '';
let compiledAb = '';
const bulwark = (...a: string[]) => runPhase(compiled, ...a);
const bulwarkAb = (...a: string[]) => runPhase(compiledAb, ...a);
const isBulwark = (name: string) => name === 'bulwark' || name === 'bulwark-ab';

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const load = () => loadavg()[0]!.toFixed(1);

async function main(): Promise<void> {
  const phase = opt('phase', '');
  if (phase === 'full' || phase === 'incremental') {
    // --repeat K: K backups one after the other in this process, as a long-running agent takes
    // them (the second and later run with a warm JIT); every one is printed, the last one is the result.
    const repeat = Number(opt('repeat', '1'));
    for (let k = 1; k < repeat; k++) console.error(`  repeat ${k}: ${JSON.stringify(await bulwarkBackup(opt('repo', ''), opt('socket', ''), opt('export', ''), phase))}`);
    return void console.log(JSON.stringify(await bulwarkBackup(opt('repo', ''), opt('socket', ''), opt('export', ''), phase)));
  }
  if (phase === 'restore') return void console.log(JSON.stringify(await bulwarkRestore(opt('repo', ''), opt('point', ''), opt('to', ''))));

  const runs = Number(opt('runs', '3'));
  const peers = opt('peers', 'restic,borg').split(',').filter(Boolean).map((n) => PEERS[n]!);
  compiled = await compileBench(fileURLToPath(import.meta.url), 'bench-backup');
  const ab = opt('ab', '');
  if (ab) {
    // The other tree's own compile step, so its bundle holds its own workers.
    const other = (await import(path.join(path.resolve(ab), 'bench/lib/backup-tools.ts'))) as { compileBench: typeof compileBench };
    compiledAb = await other.compileBench(path.join(path.resolve(ab), 'bench/backup/run.ts'), 'bench-backup');
  }
  const incrementals = Number(opt('incrementals', '1'));
  const tools = [{ name: 'bulwark' }, ...(ab ? [{ name: 'bulwark-ab' }] : []), ...peers];
  const base = await ensureMixedQcow2();
  const writes = scatteredWrites(MIXED_DISK_SIZE);
  const written = writes.reduce((a, w) => a + w.length, 0);
  console.log(`disk: ${base} (4 GiB mixed); increment: ${writes.length} runs, ${(written / 2 ** 20).toFixed(0)} MiB (${((100 * written) / MIXED_DISK_SIZE).toFixed(1)}%)`);
  type Row = { tool: string; full: Phase; inc: Phase; incs: Phase[]; restore: Phase; repoBytes: number; loads: string };
  const rows: Row[] = [];
  for (let r = 0; r < runs; r++) {
    const work = await mkdtemp(path.join(opt('work', tmpdir()), 'bulwark-bench-backup-'));
    const overlay = path.join(work, 'disk.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
    const qsd = await QsdFixture.start({ image: overlay });
    try {
      const order = tools.map((t, i, a) => a[(i + r) % a.length]!); // rotate who goes first
      const phaseOf = (name: string) => (name === 'bulwark' ? bulwark : bulwarkAb);
      const repos = new Map(order.map((t) => [t.name, path.join(work, `repo-${t.name}`)]));
      for (const p of peers) await PEERS[p.name]!.init(repos.get(p.name)!);
      await qsd.qmp.execute('block-dirty-bitmap-add', { node: qsd.nodeName, name: 'bm0', persistent: false });
      await qsd.addExport('full');
      const full = new Map<string, Phase>();
      for (const t of order) {
        const l = load();
        full.set(t.name, isBulwark(t.name) ? phaseOf(t.name)('--phase', 'full', '--repo', repos.get(t.name)!, '--socket', qsd.nbdSocket, '--export', 'full') : await PEERS[t.name]!.backup(repos.get(t.name)!, qsd.nbdUri('full'), 'full'));
        console.log(`run ${r + 1} ${t.name.padEnd(10)} full        ${full.get(t.name)!.seconds.toFixed(2)} s, load ${l}`);
      }
      await qsd.removeExport('full');
      const repoAfterFull = new Map<string, number>();
      for (const t of order) repoAfterFull.set(t.name, await duBytes(repos.get(t.name)!));
      // Guest writes: 5% in ~700 scattered runs, recorded by bm0.
      await qsd.addExport('live', { writable: true });
      for (let i = 0; i < writes.length; i += 200) await qsd.qemuIo('live', ...writes.slice(i, i + 200).map((w) => `write -P ${w.fill} ${w.offset} ${w.length}`));
      await qsd.removeExport('live');
      await qsd.qmp.execute('block-dirty-bitmap-disable', { node: qsd.nodeName, name: 'bm0' });
      await qsd.addExport('inc', { bitmaps: ['bm0'] });
      const want = await sha256OfExport(qsd.nbdUri('inc'));
      const inc = new Map<string, Phase>();
      const incs = new Map<string, Phase[]>();
      for (let k = 0; k < incrementals; k++) {
        for (const t of k % 2 === 0 ? order : [...order].reverse()) {
          if (k > 0 && !isBulwark(t.name)) continue; // the peers' incremental is a whole re-read: once is enough
          const l = load();
          const warm = args.includes('--warm') ? ['--repeat', '2'] : [];
          const p = isBulwark(t.name) ? phaseOf(t.name)('--phase', 'incremental', '--repo', repos.get(t.name)!, '--socket', qsd.nbdSocket, '--export', 'inc', ...warm) : await PEERS[t.name]!.backup(repos.get(t.name)!, qsd.nbdUri('inc'), 'inc');
          inc.set(t.name, p);
          incs.set(t.name, [...(incs.get(t.name) ?? []), p]);
          console.log(`run ${r + 1} ${t.name.padEnd(10)} incremental ${p.seconds.toFixed(2)} s (${p.cpuSeconds.toFixed(2)} CPU-s), load ${l}`);
        }
      }
      for (const t of order) {
        const to = path.join(work, `restored-${t.name}.raw`);
        const l = load();
        const res = isBulwark(t.name) ? phaseOf(t.name)('--phase', 'restore', '--repo', repos.get(t.name)!, '--point', inc.get(t.name)!.pointId!, '--to', to) : await PEERS[t.name]!.restore(repos.get(t.name)!, 'inc', to);
        const got = res.sha256 ?? (await sha256OfFile(to));
        if (got !== want) throw new Error(`${t.name}: restored disk differs from the export (sha256 ${got} != ${want})`);
        await rm(to, { force: true });
        // The repository after the full and ONE incremental: every incremental point of a run holds
        // the same data (one frozen bitmap), so with several (--incrementals, --warm) one point's share counts.
        const points = isBulwark(t.name) ? incs.get(t.name)!.length * (args.includes('--warm') ? 2 : 1) : 1;
        const atFull = repoAfterFull.get(t.name)!;
        const repoBytes = atFull + ((await duBytes(repos.get(t.name)!)) - atFull) / points;
        rows.push({ tool: t.name, full: full.get(t.name)!, inc: inc.get(t.name)!, incs: incs.get(t.name)!, restore: res, repoBytes, loads: l });
        console.log(`run ${r + 1} ${t.name.padEnd(10)} restore     ${res.seconds.toFixed(2)} s (bit-exact), repository ${(repoBytes / 2 ** 20).toFixed(0)} MiB, load ${l}`);
      }
    } finally {
      await qsd.stop();
      await rm(work, { recursive: true, force: true });
    }
  }
  console.log(`\nmedians of ${runs} run(s); disk 4 GiB (4.29 GB); "GB/s" = disk size / wall time; RSS = peak of the process doing the work`);
  console.log('tool      full GB/s  full s  full cpu-s  full RSS   incr s  incr cpu-s  incr RSS  restore GB/s  restore RSS  repository MiB');
  for (const tool of tools.map((t) => t.name)) {
    const xs = rows.filter((x) => x.tool === tool);
    const m = (f: (x: Row) => number) => median(xs.map(f));
    // Every incremental of every run counts (--incrementals K).
    const mi = (f: (p: Phase) => number) => median(xs.flatMap((x) => x.incs.map(f)));
    console.log(
      `${tool.padEnd(9)} ${(MIXED_DISK_SIZE / m((x) => x.full.seconds) / GB).toFixed(2).padStart(9)}  ${m((x) => x.full.seconds).toFixed(2).padStart(6)}  ${m((x) => x.full.cpuSeconds).toFixed(2).padStart(10)}  ${m((x) => x.full.maxRssMiB).toFixed(0).padStart(5)} MiB` +
        `  ${mi((p) => p.seconds).toFixed(2).padStart(6)}  ${mi((p) => p.cpuSeconds).toFixed(2).padStart(10)}  ${mi((p) => p.maxRssMiB).toFixed(0).padStart(5)} MiB` +
        `  ${(MIXED_DISK_SIZE / m((x) => x.restore.seconds) / GB).toFixed(2).padStart(12)}  ${m((x) => x.restore.maxRssMiB).toFixed(0).padStart(7)} MiB  ${(m((x) => x.repoBytes) / 2 ** 20).toFixed(0).padStart(14)}`,
    );
  }
  console.log(`load average (1 min) at each step: ${rows.map((x) => x.loads).join(' ')}; now ${loadavg().map((l) => l.toFixed(1)).join(' ')}`);
}

await main();
