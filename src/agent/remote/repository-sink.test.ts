import { createHash } from 'node:crypto';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { compressSync as lz4Compress } from 'lz4-napi';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openRepository } from '../../repository/index.js';
import { pointFromWire, RepositorySink } from './repository-sink.js';

const BS = 262144;
const SIZE = 10 * BS + 1000; // unaligned last block

function block(index: number, data: Buffer, lz4 = false) {
  const sha256 = createHash('sha256').update(data).digest();
  const stored = lz4 ? lz4Compress(data) : data;
  return { disk: 0, index, plainLength: data.length, compression: lz4 ? ('lz4' as const) : ('none' as const), sha256, data: stored, crc: 0, crcValid: true };
}

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-sink-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('RepositorySink', () => {
  it('writes BEGIN_POINT, a disk of blocks and zero runs, and commits a restore point that reads back', async () => {
    const repository = await openRepository(dir, { create: true });
    const sink = new RepositorySink({ repository, job: 'j', vm: 'web1' });
    const a = Buffer.alloc(BS, 0xab);
    const b = Buffer.from(Array.from({ length: BS }, (_, i) => i % 251));
    const last = Buffer.alloc(1000, 0x11);
    await sink.beginPoint({ kind: 'full', blockSize: BS, vmConfig: Buffer.from('{"x":1}').toString('base64'), disks: [{ name: 'vda', size: SIZE }] });
    await sink.openDisk({ disk: 0, name: 'vda', size: SIZE, blockSize: BS });
    await sink.writeBlock(block(1, a));
    await sink.writeZeroRun({ disk: 0, start: 2, count: 3 });
    await sink.writeBlock(block(5, b, true));
    await sink.writeBlock(block(10, last));
    await sink.endDisk({ disk: 0, blocks: 3, zeroBlocks: 3, bytes: 0 });
    const wire = await sink.commit();
    const info = pointFromWire(JSON.parse(JSON.stringify(wire)) as Record<string, unknown>);
    expect(info).toMatchObject({ job: 'j', vm: 'web1', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size: SIZE }] });

    const point = await repository.openRestorePoint(info.id);
    try {
      const disk = point.openDisk('vda');
      const image = await disk.read(0, SIZE);
      const want = Buffer.alloc(SIZE);
      a.copy(want, BS);
      b.copy(want, 5 * BS);
      last.copy(want, 10 * BS);
      expect(image.equals(want)).toBe(true);
      expect(point.vmConfig.toString()).toBe('{"x":1}');
    } finally {
      await point.close();
    }
  });

  it('a reverse chain over the wire: a full of method reverse, then a reverse injection (the newest is the full, a .vrb holds the old blocks)', async () => {
    const repository = await openRepository(dir, { create: true });
    const time = new Date('2026-11-25T20:00:00Z');
    const first = new RepositorySink({ repository, job: 'j', vm: 'web1', time });
    await first.beginPoint({ kind: 'full', chainMethod: 'reverse', blockSize: BS, vmConfig: '', disks: [{ name: 'vda', size: SIZE }] });
    await first.openDisk({ disk: 0, name: 'vda', size: SIZE, blockSize: BS });
    await first.writeBlock(block(1, Buffer.alloc(BS, 0x01)));
    await first.writeBlock(block(2, Buffer.alloc(BS, 0x02)));
    await first.endDisk({ disk: 0, blocks: 2, zeroBlocks: 0, bytes: 0 });
    const full = pointFromWire(await first.commit());
    expect(full).toMatchObject({ method: 'reverse', kind: 'full', time });

    const second = new RepositorySink({ repository, job: 'j', vm: 'web1' });
    await second.beginPoint({ kind: 'reverse', parent: full.id, vmConfig: '', disks: [{ name: 'vda', size: SIZE }] });
    await second.openDisk({ disk: 0, name: 'vda', size: SIZE, blockSize: BS });
    await second.writeBlock(block(2, Buffer.alloc(BS, 0x22)));
    await second.endDisk({ disk: 0, blocks: 1, zeroBlocks: 0, bytes: 0 });
    const newest = pointFromWire(await second.commit());

    const points = await repository.listRestorePoints({ job: 'j', vm: 'web1' });
    expect(points.map((p) => [p.id, p.kind])).toEqual([
      [full.id, 'reverse'],
      [newest.id, 'full'],
    ]);
    expect((await readdir(dir, { recursive: true })).map(String).some((f) => f.endsWith('.vrb'))).toBe(true);
    const want = (b2: number) => Buffer.concat([Buffer.alloc(BS), Buffer.alloc(BS, 0x01), Buffer.alloc(BS, b2)]);
    for (const [id, b2] of [[full.id, 0x02], [newest.id, 0x22]] as const) {
      const point = await repository.openRestorePoint(id);
      try {
        expect((await point.openDisk('vda').read(0, 3 * BS)).equals(want(b2))).toBe(true);
      } finally {
        await point.close();
      }
    }
  });

  it('abort mid-disk leaves no restore point and no file behind', async () => {
    const repository = await openRepository(dir, { create: true });
    const sink = new RepositorySink({ repository, job: 'j', vm: 'web1' });
    await sink.beginPoint({ kind: 'full', blockSize: BS, vmConfig: '', disks: [{ name: 'vda', size: SIZE }] });
    await sink.openDisk({ disk: 0, name: 'vda', size: SIZE, blockSize: BS });
    await sink.writeBlock(block(0, Buffer.alloc(BS, 1)));
    await sink.abort('the source agent went away');
    expect(await repository.listRestorePoints({ job: 'j', vm: 'web1' })).toEqual([]);
    const files = (await readdir(dir, { recursive: true })).map(String).filter((f) => /\.(vbk|vib|tmp)/.test(f));
    expect(files).toEqual([]);
  });

  it('a block whose data no longer matches the SHA-256 its source computed fails the disk naming it; nothing is stored or left', async () => {
    for (const [kind, lz4] of [['full', false], ['full', true], ['reverse', false]] as const) {
      const repository = await openRepository(dir, { create: true });
      let parent: string | undefined;
      if (kind === 'reverse') {
        const first = new RepositorySink({ repository, job: 'j', vm: 'web1' });
        await first.beginPoint({ kind: 'full', chainMethod: 'reverse', blockSize: BS, vmConfig: '', disks: [{ name: 'vda', size: SIZE }] });
        await first.openDisk({ disk: 0, name: 'vda', size: SIZE, blockSize: BS });
        await first.writeBlock(block(1, Buffer.alloc(BS, 0x01)));
        await first.endDisk({ disk: 0, blocks: 1, zeroBlocks: 0, bytes: 0 });
        parent = pointFromWire(await first.commit()).id;
      }
      const before = await repository.listRestorePoints({ job: 'j', vm: 'web1' });
      const sink = new RepositorySink({ repository, job: 'j', vm: 'web1' });
      await sink.beginPoint({ kind, ...(parent ? { parent } : {}), blockSize: BS, vmConfig: '', disks: [{ name: 'vda', size: SIZE }] });
      await sink.openDisk({ disk: 0, name: 'vda', size: SIZE, blockSize: BS });
      await sink.writeBlock(block(1, Buffer.alloc(BS, 0x21), lz4));
      // Block 3's data changed after its source hashed it (one byte): the wire CRC cannot see that.
      const read = Buffer.alloc(BS, 0x23);
      const sent = block(3, read, lz4);
      const changed = Buffer.from(read);
      changed.writeUInt8(changed.readUInt8(4096) ^ 0x01, 4096);
      await sink.writeBlock({ ...block(3, changed, lz4), sha256: sent.sha256 });
      await sink.writeBlock(block(5, Buffer.alloc(BS, 0x25), lz4));
      await expect(sink.endDisk({ disk: 0, blocks: 3, zeroBlocks: 0, bytes: 0 }), `${kind} lz4=${lz4}`).rejects.toThrow(/block 3 changed between the source's read and this repository's writer/);
      await sink.abort('the disk failed');
      expect(await repository.listRestorePoints({ job: 'j', vm: 'web1' })).toEqual(before);
      expect((await readdir(dir, { recursive: true })).map(String).filter((f) => /\.(vib|tmp)|\.vrb/.test(f))).toEqual([]);
      await rm(dir, { recursive: true, force: true });
      dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-sink-'));
    }
  });

  it('refuses data for a disk that was not opened, and a block whose size does not decompress right', async () => {
    const repository = await openRepository(dir, { create: true });
    const sink = new RepositorySink({ repository, job: 'j', vm: 'web1' });
    await expect(sink.openDisk({ disk: 0, name: 'vda', size: SIZE, blockSize: BS })).rejects.toThrow(/before BEGIN_POINT/);
    await sink.beginPoint({ kind: 'full', blockSize: BS, vmConfig: '', disks: [{ name: 'vda', size: SIZE }] });
    await expect(sink.writeBlock(block(0, Buffer.alloc(BS, 1)))).rejects.toThrow(/not opened/);
    await sink.openDisk({ disk: 0, name: 'vda', size: SIZE, blockSize: BS });
    await expect(sink.writeBlock({ ...block(0, Buffer.alloc(BS, 1), true), plainLength: BS + 1 })).rejects.toThrow(/decompressed to/);
    await sink.abort('test');
  });
});
