// Partition tables written by sfdisk and parted, and file systems made by mkfs, read by our
// pure readers and compared with what sfdisk --json and blkid say about the same images.
import { execFile } from 'node:child_process';
import { mkdtemp, open, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openFileDisk } from '../../src/disk/file-disk.js';
import { detectFileSystem } from '../../src/restore/fs-detect/fs-detect.js';
import { readPartitionTable, type PartitionTable } from '../../src/restore/partitions/partitions.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bulwark-parts-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function image(name: string, size: number): Promise<string> {
  const p = join(dir, name);
  await truncate(p, size).catch(async () => (await open(p, 'w')).close());
  await truncate(p, size);
  return p;
}

async function sfdisk(path: string, script: string): Promise<void> {
  const child = execFile('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', path]);
  child.stdin!.end(script);
  await new Promise<void>((resolve, reject) =>
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`sfdisk exited ${code}`)))),
  );
}

async function table(path: string): Promise<PartitionTable> {
  const disk = await openFileDisk(path);
  try {
    return await readPartitionTable(disk);
  } finally {
    await disk.close();
  }
}

interface SfdiskJson {
  partitiontable: { label: string; id: string; partitions: Array<{ node: string; start: number; size: number; type: string; name?: string; uuid?: string }> };
}

async function sfdiskView(path: string): Promise<SfdiskJson['partitiontable']> {
  return (JSON.parse((await run('sfdisk', ['--json', path])).stdout) as SfdiskJson).partitiontable;
}

describe('partition tables made by real tools', () => {
  it('MBR with primaries, an extended partition and logicals (sfdisk)', async () => {
    const p = await image('mbr.raw', 64 * MiB + 12345);
    await sfdisk(p, 'label: dos\n,8MiB,83,*\n,8MiB,82\n,,E\n,10MiB,83\n,10MiB,8e\n,,c\n');
    const ours = await table(p);
    const theirs = await sfdiskView(p);
    expect(ours.scheme).toBe('mbr');
    expect(ours.warnings).toEqual([]);
    expect(ours.partitions.map((x) => [`${p}${x.index}`, x.start / 512, x.size / 512, Number(x.type)])).toEqual(
      theirs.partitions.map((x) => [x.node, x.start, x.size, parseInt(x.type, 16)]),
    );
    expect(ours.partitions.map((x) => x.index)).toEqual([1, 2, 3, 5, 6, 7]);
    expect(ours.partitions[0]!.bootable).toBe(true);
    expect(`0x${ours.diskId}`).toBe(theirs.id);
  });

  it('GPT with names (parted), then a damaged primary header falls back to the backup', async () => {
    const p = await image('gpt.raw', 100 * MiB + 4096);
    await run('parted', ['-s', p, 'mklabel', 'gpt', 'mkpart', '"EFI system"', 'fat32', '1MiB', '20MiB', 'set', '1', 'esp', 'on', 'mkpart', '"root fs"', 'ext4', '20MiB', '60MiB', 'mkpart', 'data', 'xfs', '60MiB', '99MiB']);
    const ours = await table(p);
    const theirs = await sfdiskView(p);
    expect(ours.scheme).toBe('gpt');
    expect(ours.warnings).toEqual([]);
    expect(ours.diskId).toBe(theirs.id);
    expect(ours.partitions.map((x) => [`${p}${x.index}`, x.start / 512, x.size / 512, x.type, x.name, x.uuid])).toEqual(
      theirs.partitions.map((x) => [x.node, x.start, x.size, x.type, x.name, x.uuid]),
    );
    expect(ours.partitions.map((x) => x.typeName)).toEqual(['EFI System', 'Linux filesystem', 'Linux filesystem']);

    // Corrupt one byte of the primary header (its disk GUID): the header CRC no longer matches.
    const h = await open(p, 'r+');
    await h.write(Buffer.from([0xff]), 0, 1, 512 + 60);
    await h.close();
    const fallback = await table(p);
    expect(fallback.partitions).toEqual(ours.partitions);
    expect(fallback.warnings.join('\n')).toMatch(/primary GPT header damaged \(header CRC mismatch at LBA 1\); using the backup/);
  });
});

describe('file-system detection against blkid', () => {
  const cases: Array<{ name: string; size: number; mkfs: (p: string) => string[] }> = [
    { name: 'ext2', size: 8 * MiB, mkfs: (p) => ['mkfs.ext2', '-q', '-L', 'old one', p] },
    { name: 'ext3', size: 16 * MiB, mkfs: (p) => ['mkfs.ext3', '-q', '-L', 'j', p] },
    { name: 'ext4', size: 16 * MiB, mkfs: (p) => ['mkfs.ext4', '-q', '-L', 'root', p] },
    { name: 'xfs', size: 300 * MiB, mkfs: (p) => ['mkfs.xfs', '-q', '-L', 'srv', p] },
    { name: 'btrfs', size: 128 * MiB, mkfs: (p) => ['mkfs.btrfs', '-q', '-L', 'pool', p] },
    { name: 'vfat', size: 40 * MiB, mkfs: (p) => ['mkfs.vfat', '-n', 'ESP', p] },
    { name: 'swap', size: 8 * MiB, mkfs: (p) => ['mkswap', '-L', 'sw', p] },
  ];
  for (const c of cases) {
    it(`${c.name}`, async () => {
      const p = await image(`${c.name}.raw`, c.size);
      const [cmd, ...args] = c.mkfs(p);
      await run(cmd!, args);
      const blkid = Object.fromEntries(
        (await run('blkid', ['-p', '-o', 'export', p])).stdout
          .trim()
          .split('\n')
          .map((l) => {
            const eq = l.indexOf('=');
            return [l.slice(0, eq), l.slice(eq + 1).replace(/\\(.)/g, '$1')];
          }),
      );
      const disk = await openFileDisk(p);
      try {
        const fs = await detectFileSystem(disk);
        expect(fs).not.toBeNull();
        expect(fs!.type).toBe(blkid['TYPE']);
        expect(fs!.label).toBe(blkid['LABEL']);
        expect(fs!.uuid).toBe(blkid['UUID']);
      } finally {
        await disk.close();
        await rm(p);
      }
    });
  }
});
