// The CBT reader over a real export (qemu-storage-daemon, qcow2 with data, zero and unallocated
// areas and a dirty bitmap): an export opened ahead (prepareBackupDisk, its first window's block
// status asked before the reads) yields exactly the blocks of one opened when read, for a full and
// an incremental read, with a first map window that ends mid-disk; one never read is closed
// without a read; a failed early open fails the read with the open's error. The progress a disk
// task reports from the reader's statistics (diskProgress) rises through intermediate values for
// a disk smaller than the reader's map window (it once jumped to 100 % when the window was mapped).
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { diskProgress } from '../../src/agent/backup/job-settings.js';
import { prepareBackupDisk, readBackupDisk, type ChangedBlock, type ChangedBlockStats } from '../../src/hypervisor/cbt/reader.js';
import { dirtyBitmapContext } from '../../src/hypervisor/nbd/protocol.js';
import type { BackupDiskView, DiskChanges } from '../../src/hypervisor/types.js';
import { createTestImage, QsdFixture } from '../fixtures/qsd.js';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 24 * MiB + 512;
const BS = 1 * MiB;

let dir: string;
let qsd: QsdFixture;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-cbt-prepare-'));
  const image = await createTestImage(dir, 'disk.qcow2', SIZE, [
    { offset: 0, length: 3 * MiB, fill: 0x11 },
    { offset: 5 * MiB + 65536, length: 65536, fill: 0x22 },
    { offset: 9 * MiB, length: 2 * MiB, fill: 'zero' },
    { offset: 17 * MiB, length: 7 * MiB + 512, fill: 0x33 },
  ]);
  qsd = await QsdFixture.start({ image });
  await qsd.addExport('full');
  await qsd.qmp.execute('block-dirty-bitmap-add', { node: qsd.nodeName, name: 'bm0', persistent: false });
  await qsd.addExport('live', { writable: true });
  // Dirty: data over data, data over a hole, zeroes over data (read back as a zero block), the tail.
  await qsd.write('live', 1 * MiB + 4096, 8192, 0x44);
  await qsd.write('live', 13 * MiB, 65536, 0x55);
  await qsd.writeZeroes('live', 18 * MiB, 1 * MiB);
  await qsd.write('live', SIZE - 512, 512, 0x66);
  await qsd.removeExport('live');
  await qsd.qmp.execute('block-dirty-bitmap-disable', { node: qsd.nodeName, name: 'bm0' });
  await qsd.addExport('inc', { bitmaps: ['bm0'] });
}, 60_000);

afterAll(async () => {
  await qsd?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

function viewOf(exportName: string, changes: DiskChanges): BackupDiskView {
  return { disk: { name: 'vda', targetDev: 'vda', imagePath: '', format: 'qcow2', virtualSize: SIZE, persistentBitmaps: false }, nbd: { socketPath: qsd.nbdSocket, exportName }, size: SIZE, changes };
}

async function collect(blocks: AsyncIterable<ChangedBlock>): Promise<Array<{ index: number; data: string | null }>> {
  const out: Array<{ index: number; data: string | null }> = [];
  for await (const b of blocks) out.push({ index: b.index, data: b.data ? b.data.toString('base64') : null });
  return out;
}

/** NBD connections qemu-storage-daemon has open (its unix sockets other than the listening one and QMP's). */
async function openConnections(): Promise<number> {
  const { stdout } = await exec('ss', ['-x', '-n']).catch(() => ({ stdout: '' }));
  return stdout.split('\n').filter((l) => l.includes(qsd.nbdSocket) && l.includes('ESTAB')).length;
}

describe('prepareBackupDisk', () => {
  const full: DiskChanges = { kind: 'full', reason: 'no-checkpoint', detail: 'test', compareDigests: false };
  const inc: DiskChanges = { kind: 'bitmap', bitmap: 'bm0', context: dirtyBitmapContext('bm0') };

  for (const [name, exportName, changes] of [['full', 'full', full], ['incremental', 'inc', inc]] as const) {
    it(`${name}: the same blocks as an export opened at the read, with a first window ending mid-disk`, async () => {
      const view = viewOf(exportName, changes);
      const mapWindow = 8 * MiB;
      const plain = await collect(readBackupDisk(view, { blockSize: BS, mapWindow }));
      const prepared = prepareBackupDisk(view, { blockSize: BS, mapWindow, connections: 2 });
      const ahead = await collect(readBackupDisk(view, { blockSize: BS, mapWindow, prepared, reuseBuffers: false }));
      expect(ahead).toEqual(plain);
      expect(plain.length).toBeGreaterThan(2);
      if (changes.kind === 'bitmap') {
        // Blocks 1 (data), 13 (over a hole), 18 (zeroes: null), 24 (the partial last block).
        expect(plain.map((b) => b.index)).toEqual([1, 13, 18, 24]);
        expect(plain.find((b) => b.index === 18)!.data).toBeNull();
      }
      await prepared.close(); // again: a no-op
    });
  }

  it('an export opened ahead and never read is closed; a failed early open fails the read', async () => {
    const view = viewOf('full', full);
    const before = await openConnections();
    const prepared = prepareBackupDisk(view, { blockSize: BS, connections: 3 });
    await prepared.source;
    await prepared.close();
    // The server may take a moment to see the connections go.
    for (let i = 0; i < 50 && (await openConnections()) > before; i++) await new Promise((r) => setTimeout(r, 20));
    expect(await openConnections()).toBe(before);

    const missing = viewOf('no-such-export', full);
    const failed = prepareBackupDisk(missing, { blockSize: BS });
    await expect(collect(readBackupDisk(missing, { blockSize: BS, prepared: failed }))).rejects.toThrow(/no-such-export/);
    await failed.close();
  });

  it('refuses a prepared export of another view', async () => {
    const a = viewOf('full', full);
    const b = viewOf('inc', inc);
    const prepared = prepareBackupDisk(a, { blockSize: BS });
    try {
      await expect(collect(readBackupDisk(b, { blockSize: BS, prepared }))).rejects.toThrow(/not the one of/);
    } finally {
      await prepared.close();
    }
  });
});

describe('progress of a disk smaller than the map window', () => {
  it('rises through intermediate values block by block and reaches 100 % only at the end', async () => {
    const view = viewOf('full', { kind: 'full', reason: 'no-checkpoint', detail: 'test', compareDigests: false });
    let stats: ChangedBlockStats | undefined;
    const percents: number[] = [];
    // As the disk task computes it (disk-backup.ts: bytesProcessed is the reader's position).
    const percent = (done: boolean): number => {
      const p = diskProgress({ disks: { vda: { bytesProcessed: stats!.bytesMapped, bytesRead: stats!.bytesRead, bytesStored: 0, size: SIZE, done } }, bytesProcessed: 0, bytesRead: 0, bytesStored: 0, size: SIZE, rate: 0 }, 'vda');
      return p.total > 0 ? (100 * p.bytesRead) / p.total : 0;
    };
    // The default map window (1 GiB) holds the whole 24 MiB disk; 2 blocks in flight.
    for await (const block of readBackupDisk(view, { blockSize: BS, concurrency: 2, onStats: (s) => (stats = s) })) {
      expect(block.data).not.toBeNull();
      percents.push(percent(false));
    }
    percents.push(percent(true));
    expect(percents.length).toBeGreaterThan(8);
    for (let i = 1; i < percents.length; i++) expect(percents[i]!, percents.join(' ')).toBeGreaterThanOrEqual(percents[i - 1]!);
    expect(percents[0]!, percents.join(' ')).toBeLessThan(50);
    expect(percents.filter((p) => p > 0 && p < 100).length, percents.join(' ')).toBeGreaterThan(5);
    // Below 100 % until the last block (the disk's end) is handed on.
    expect(Math.max(...percents.slice(0, -2)), percents.join(' ')).toBeLessThan(100);
    expect(percents.at(-1)).toBe(100);
  });
});
