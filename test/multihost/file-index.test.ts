// The guest file index of points in a repository on another agent's host, in network namespaces
// this test creates (and always deletes): the server, the source agent src1 next to a VM (a QEMU
// with no guest, serving an ext4 disk made here) and the repository agent repo1. An encrypted job
// with the file index on backs the VM up into repo1's repository; then
// - the index was built by repo1 (the session's log line names it), beside the point, sealed;
// - search finds the file through repo1 (a `file-index` search task) with the server's password;
// - with repo1 gone, search names its point as not searched, with the reason.
// No guest boots: the disk is an ext4 image made with mkfs.ext4 -d.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SEALED_FILE_INDEX_MAGIC } from '../../src/format/sealed-file-index.js';
import { MultiHost, multiHostSkipReason as skipReason, logText } from './netns/hosts.js';

const VM = 'mhidx-vm';
const FILE = 'quarterly report.txt';
let h: MultiHost;

describe.skipIf(skipReason !== '')(`file index of points on a repository agent${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  beforeAll(async () => {
    const work = mkdtempSync(path.join(tmpdir(), 'bulwark-mh-index-'));
    try {
      mkdirSync(path.join(work, 'root/notes'), { recursive: true });
      writeFileSync(path.join(work, 'root/notes', FILE), 'numbers\n');
      utimesSync(path.join(work, 'root/notes', FILE), 1_700_000_000, 1_700_000_000);
      const image = path.join(work, 'disk.raw');
      execFileSync('truncate', ['-s', '16M', image]);
      execFileSync('mkfs.ext4', ['-q', '-F', '-L', 'mhdata', '-d', path.join(work, 'root'), image]);
      h = await MultiHost.start({ vm: VM, disk: readFileSync(image) });
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
    await h.api('POST', '/jobs', { name: 'mhidx', vms: [VM], repository: 'remote-repo', retries: { count: 0, waitMinutes: 0 }, fileIndex: true });
    await h.api('POST', '/jobs/mhidx/encryption', { password: 'index-Pa55word-on-agent', hint: 'mh index' });
  }, 120_000);

  afterAll(() => {
    if (h) expect(h.close()).toBe('');
  });

  it('the repository agent builds the sealed index beside the point; search finds the file through it', async () => {
    const s = await h.runJob('mhidx');
    expect(s.state, logText(s)).toMatch(/success|warning/); // warning: the VM has no guest agent to freeze
    const line = s.log.find((l) => l.message.startsWith('guest file index of restore point'));
    expect(line?.message, logText(s)).toMatch(/^guest file index of restore point (\S+) \(built by agent repo1\): \d+ entries from 1 file systems, sealed$/);
    const pointId = /restore point (\S+) /.exec(line!.message)![1]!;

    const folder = path.join(h.repoDir, 'mhidx', VM);
    expect(readdirSync(folder).filter((n) => n.endsWith('.files.gz'))).toEqual([`${pointId}.files.gz`]);
    const index = readFileSync(path.join(folder, `${pointId}.files.gz`));
    expect(index.subarray(0, 8)).toEqual(SEALED_FILE_INDEX_MAGIC);
    expect(index.includes(Buffer.from('quarterly'))).toBe(false);

    const found = await h.api<{ matches: Array<{ vm: string; path: string; versions: Array<{ size: number; mtime: string; points: Array<{ id: string }> }> }>; pointsSearched: number; pointsLocked: unknown[]; pointsWithoutIndex: unknown[] }>(
      'GET',
      `/file-index/search?pattern=${encodeURIComponent('QUARTERLY*')}`,
    );
    expect(found).toMatchObject({ pointsSearched: 1, pointsLocked: [], pointsWithoutIndex: [] });
    expect(found.matches).toEqual([{ vm: VM, path: `vda:/notes/${FILE}`, versions: [{ type: 'f', size: 8, mtime: new Date(1_700_000_000_000).toISOString(), points: [expect.objectContaining({ id: pointId })] }] }]);

    // `bulwark index POINT` (the API) rebuilds it on the agent too.
    const again = await h.api<{ point: string; agent?: string; sealed: boolean; entries: number }>('POST', `/restore-points/${pointId}/file-index`, {});
    expect(again).toMatchObject({ point: pointId, agent: 'repo1', sealed: true });

    // The repository agent gone: its points are listed as not searched, with the reason.
    h.repoAgent!.kill('SIGKILL');
    const gone = await h.api<{ matches: unknown[]; pointsSearched: number; pointsWithoutIndex: Array<{ id: string; reason: string }> }>('GET', `/file-index/search?pattern=${encodeURIComponent('QUARTERLY*')}`);
    expect(gone).toMatchObject({ matches: [], pointsSearched: 0 });
    expect(gone.pointsWithoutIndex).toEqual([{ id: pointId, time: expect.any(String), vm: VM, reason: expect.stringMatching(/^repository agent repo1 could not search: /) }]);
  }, 120_000);
});
