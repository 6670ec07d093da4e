// `bulwark repo inspect PATH` and `bulwark repo verify PATH`: offline tools that work on a bare
// repository folder with no server. Thin glue over src/repository (inspect/verify reports).
// Encrypted chains: the password comes from $BULWARK_REPO_PASSWORD, passed in by the command
// (verify checks CRCs without it).
import path from 'node:path';
import { describeError } from '../../common/errors.js';
import { inspectRepository, verifyRepository, type InspectPoint } from '../../repository/index.js';
import { formatTable, humanSize, localTime, printJson, processOutput, type Output } from '../output.js';

const x = (r: number) => `${r.toFixed(2)}x`;

/** Prints chains, points, disks, sizes and ratios; returns the exit code (0, or 1 if unreadable). */
export async function repoInspectCommand(repoPath: string, opts: { json: boolean }, output: Output = processOutput): Promise<number> {
  let report;
  try {
    report = await inspectRepository(repoPath);
  } catch (err) {
    output.err(`error: ${describeError(err)}\n`);
    return 1;
  }
  const bad = report.problems.length > 0 || report.chains.some((c) => c.points.some((p) => p.problem));
  if (opts.json) {
    printJson(output, report);
    return bad ? 1 : 0;
  }
  output.out(`Repository ${report.repository}: ${report.chains.length} chains, ${report.totals.points} restore points, ${humanSize(report.totals.fileBytes)} in files\n`);
  output.out(`Compression ${x(report.totals.compressionRatio)} (${humanSize(report.totals.plainBytes)} -> ${humanSize(report.totals.storedBytes)}), in-file dedup ${x(report.totals.dedupRatio)}\n`);
  for (const c of report.chains) {
    output.out(
      `\n${c.job} / ${c.vm}  chain ${c.id}  (${c.method}, ${humanSize(c.blockSize)} blocks, ${c.compression}${c.encrypted ? `, encrypted${c.passwordHint ? `, hint: ${c.passwordHint}` : ''}` : ''})\n`,
    );
    const rows = c.points.flatMap((p) => p.disks.map((d, i) => ({ p, d, first: i === 0 })));
    output.out(
      formatTable(rows, [
        { header: 'point', value: (r) => (r.first ? r.p.id.slice(0, 8) : '') },
        { header: 'kind', value: (r) => (r.first ? r.p.kind : '') },
        { header: 'time', value: (r) => (r.first ? localTime(r.p.time) : '') },
        { header: 'file', value: (r) => (r.first ? `${path.basename(r.p.file)} (${humanSize(r.p.fileBytes)})` : '') },
        { header: 'disk', value: (r) => r.d.name },
        { header: 'size', value: (r) => humanSize(r.d.size), align: 'right' },
        { header: 'stored', value: (r) => r.d.storedBlocks, align: 'right' },
        { header: 'dedup', value: (r) => r.d.dedupBlocks, align: 'right' },
        { header: 'zero', value: (r) => r.d.zeroBlocks + r.d.holeBlocks, align: 'right' },
        { header: 'inherited', value: (r) => r.d.inheritedBlocks, align: 'right' },
        { header: 'data', value: (r) => `${humanSize(r.d.plainBytes)} -> ${humanSize(r.d.storedBytes)}`, align: 'right' },
        { header: 'ratio', value: (r) => (r.first ? `${x(r.p.compressionRatio)}` : ''), align: 'right' },
      ]),
    );
    for (const p of c.points.filter((q: InspectPoint) => q.problem)) output.out(`  ! ${p.id}: ${p.problem}\n`);
  }
  for (const p of report.problems) output.out(`! ${p.file}: ${p.problem}\n`);
  return bad ? 1 : 0;
}

/** Checks every block of every point; prints where damage is; 0 when clean, 1 when damaged. */
export async function repoVerifyCommand(repoPath: string, opts: { json: boolean; password?: string | undefined }, output: Output = processOutput): Promise<number> {
  let report;
  try {
    report = await verifyRepository(repoPath, { password: opts.password });
  } catch (err) {
    output.err(`error: ${describeError(err)}\n`);
    return 1;
  }
  if (opts.json) {
    printJson(output, report);
    return report.ok ? 0 : 1;
  }
  output.out(
    `Verified ${report.repository}: ${report.chains} chains, ${report.points} restore points, ${report.filesChecked} files, ${report.blocksChecked} blocks (${humanSize(report.bytesChecked)})\n`,
  );
  for (const w of report.warnings) output.out(`warning: ${w}\n`);
  if (report.ok) {
    output.out(report.chains === 0 ? 'nothing to verify: no backup chains\n' : 'OK: no damage found\n');
    return 0;
  }
  output.out(`DAMAGE: ${report.damage.length} problem(s)\n`);
  output.out(
    formatTable(report.damage, [
      { header: 'file', value: (d) => d.file },
      { header: 'disk', value: (d) => d.disk },
      { header: 'block', value: (d) => d.block, align: 'right' },
      { header: 'disk offset', value: (d) => d.diskOffset, align: 'right' },
      { header: 'file offset', value: (d) => d.fileOffset, align: 'right' },
      { header: 'problem', value: (d) => d.problem },
    ]),
  );
  const affected = [...new Set(report.damage.flatMap((d) => d.affectedPoints))];
  if (affected.length > 0) output.out(`Restore points affected: ${affected.join(', ')}\n`);
  return 1;
}
