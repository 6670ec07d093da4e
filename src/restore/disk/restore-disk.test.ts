import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { lstat, mkdir, mkdtemp, open, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { crc32c } from '@node-rs/crc32';
import { COMMIT_SLOT_OFFSETS, decodeRecordHeader, decodeTablePage, encodeCommitSlot, encodeIndex, encodeRecordHeader, encodeTablePage, RECORD_HEADER_SIZE } from '../../format/index.js';
import { openRepository, type Repository } from '../../repository/index.js';
import { DiskModel, iterate } from '../../repository/test-helpers.js';
import { conversionDeadlineMs, restoreDisk } from './restore-disk.js';

let dir: string;
let repo: Repository;
const BS = 262144;

beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-restore-disk-'));
  repo = await openRepository(path.join(dir, 'repo'), { create: true });
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('restoreDisk (raw)', () => {
  it('restores full and incremental points bit-exact, sparse, with the right SHA-256', async () => {
    const size = 40 * BS + 1234;
    const m = new DiskModel(size, BS);
    const w0 = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size }], threads: 0 });
    await w0.writeDisk('vda', iterate(m.change([[0, 'data'], [3, 'data'], [7, 'zero'], [40, 'data']])));
    const p0 = await w0.commit();
    const at0 = Buffer.from(m.bytes);
    const w1 = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'incremental', disks: [{ name: 'vda', size }], threads: 0 });
    await w1.writeDisk('vda', iterate(m.change([[3, 'hole'], [5, 'data', 99], [40, 'data', 7]])));
    const p1 = await w1.commit();

    // Decoded on this thread, then by decoder threads.
    for (const [p, bytes, threads] of [[p0, at0, 0], [p1, m.bytes, 2]] as const) {
      const to = path.join(dir, `${p.id}.raw`);
      const r = await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, threads, imageDigest: true });
      const out = await readFile(to);
      expect(out.equals(bytes)).toBe(true);
      expect(r.sha256).toBe(createHash('sha256').update(bytes).digest('hex'));
      expect(r.size).toBe(size);
      // Sparse: far fewer blocks allocated than the disk's size.
      expect((await stat(to)).blocks * 512).toBeLessThan(size / 4);
    }
  });

  it('restores bit-exact with direct writes (default) and through the page cache, any codec, a short last block', async () => {
    const size = 24 * BS + 4096 + 100; // the last block is short and not page-aligned
    for (const compression of ['zstd', 'none', 'lz4'] as const) {
      const m = new DiskModel(size, BS);
      const kinds = Array.from({ length: 25 }, (_, i) => [i, i % 5 === 2 ? 'zero' : i % 7 === 3 ? 'hole' : 'data', i] as [number, 'data' | 'zero' | 'hole', number]);
      const w = await repo.startRestorePoint({ job: `d-${compression}`, vm: 'v', kind: 'full', blockSize: BS, compression, disks: [{ name: 'vda', size }], threads: 0 });
      await w.writeDisk('vda', iterate(m.change(kinds)));
      const p = await w.commit();
      // Decoder threads cost seconds to start under tsx: one codec through them is enough.
      for (const [directIo, threads] of compression === 'zstd' ? ([[true, 2], [false, 0]] as const) : ([[true, 0], [false, 0]] as const)) {
        const to = path.join(dir, `d-${compression}-${String(directIo)}-${threads}.raw`);
        const r = await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, threads, directIo });
        expect((await readFile(to)).equals(m.bytes), `${compression}, directIo ${String(directIo)}, threads ${threads}`).toBe(true);
        expect(r.size).toBe(size);
        await rm(to);
      }
    }
  });

  it('refuses to overwrite an existing file unless told to, and leaves no temporary on failure', async () => {
    const size = 4 * BS;
    const m = new DiskModel(size, BS);
    const w = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size }], threads: 0 });
    await w.writeDisk('vda', iterate(m.change([[1, 'data']])));
    const p = await w.commit();
    const to = path.join(dir, 'out.raw');
    await writeFile(to, 'keep me');
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, threads: 0 })).rejects.toThrow(/already exists/);
    expect(await readFile(to, 'utf8')).toBe('keep me');
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'nope', to: path.join(dir, 'x.raw'), threads: 0 })).rejects.toThrow(/no disk nope/);
    const r = await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, overwrite: true, threads: 0 });
    expect((await readFile(to)).equals(m.bytes)).toBe(true);
    // The image digest is opt-in: absent unless asked for.
    expect(r.sha256).toBeUndefined();
    expect('sha256' in r).toBe(false);
    expect(r.bytesWritten).toBe(BS);
    expect((await readdir(dir)).filter((f) => f.includes('.bulwark-restore-'))).toEqual([]);
  });

  it('restores an encrypted, lz4 and uncompressed chain, a disk that grew, and a qcow2, checking digests with verify', async () => {
    const small = 5 * BS + 1000;
    const big = 9 * BS + 77;
    const m = new DiskModel(small, BS);
    const w0 = await repo.startRestorePoint({ job: 'e', vm: 'v', kind: 'full', blockSize: BS, compression: 'lz4', encryption: { password: 'pw', log2N: 10 }, disks: [{ name: 'vda', size: small }], threads: 0 });
    await w0.writeDisk('vda', iterate(m.change([[0, 'data'], [1, 'data'], [2, 'zero'], [5, 'data']])));
    const p0 = await w0.commit();
    // The disk grows: the old short last block is inherited and must read padded with zeroes.
    const grown = Buffer.alloc(big);
    m.bytes.copy(grown);
    const w1 = await repo.startRestorePoint({ job: 'e', vm: 'v', kind: 'incremental', password: 'pw', disks: [{ name: 'vda', size: big }], threads: 0 });
    const b8 = Buffer.alloc(BS, 0x42);
    b8.copy(grown, 8 * BS);
    await w1.writeDisk('vda', iterate([{ index: 8, data: b8 }]));
    const p1 = await w1.commit();
    const to = path.join(dir, 'grown.raw');
    const r = await restoreDisk({ repository: repo, pointId: p1.id, disk: 'vda', to, password: 'pw', verify: true, threads: 2, imageDigest: true });
    expect((await readFile(to)).equals(grown)).toBe(true);
    expect(r.sha256).toBe(createHash('sha256').update(grown).digest('hex'));
    expect(r.bytesWritten).toBe(2 * BS + 1000 + BS);
    const q = path.join(dir, 'p0.qcow2');
    const rq = await restoreDisk({ repository: repo, pointId: p0.id, disk: 'vda', to: q, format: 'qcow2', password: 'pw', verify: true, threads: 0, imageDigest: true });
    expect(rq.sha256).toBe(createHash('sha256').update(m.bytes).digest('hex'));
    expect((await readFile(q)).subarray(0, 4).toString('latin1')).toBe('QFI\xfb');
  });

  it('names the missing folder of the target (not a temporary file name) before reading anything', async () => {
    const m = new DiskModel(BS, BS);
    const w = await repo.startRestorePoint({ job: 'j', vm: 'v', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size: BS }], threads: 0 });
    await w.writeDisk('vda', iterate(m.change([[0, 'data']])));
    const p = await w.commit();
    const to = path.join(dir, 'no such folder', 'vda.raw');
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to })).rejects.toMatchObject({
      kind: 'not-found',
      message: `cannot restore to ${to}: the folder ${path.dirname(to)} does not exist`,
      hint: expect.stringMatching(/create/),
    });
    await writeFile(path.join(dir, 'a file'), 'x');
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to: path.join(dir, 'a file', 'vda.raw') })).rejects.toMatchObject({
      kind: 'invalid',
      message: expect.stringMatching(/a file is not a folder/),
    });
  });

  it('names the damaged block when a record is altered, and leaves no temporary', async () => {
    const size = 12 * BS;
    const m = new DiskModel(size, BS);
    const w = await repo.startRestorePoint({ job: 'c', vm: 'v', kind: 'full', blockSize: BS, compression: 'none', disks: [{ name: 'vda', size }], threads: 0 });
    await w.writeDisk('vda', iterate(m.change(Array.from({ length: 12 }, (_, i) => [i, 'data'] as [number, 'data']))));
    const p = await w.commit();
    const point = await repo.openRestorePoint(p.id);
    const [r7] = await point.resolveRange('vda', 7, 1);
    const file = point.files[0]!.path;
    await point.close();
    if (r7?.kind !== 'stored') throw new Error('block 7 is not stored');
    const fh = await open(file, 'r+');
    await fh.write(Buffer.from([0xff ^ m.bytes[7 * BS + 100]!]), 0, 1, r7.entry.recordOffset + 32 + 100);
    await fh.close();
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to: path.join(dir, 'bad.raw'), threads: 1 })).rejects.toThrow(/damaged block in .*block 7 \(disk offset 1835008\).*CRC32C mismatch/);
    expect((await readdir(dir)).filter((f) => f.includes('.bulwark-restore-'))).toEqual([]);
  });

  it('verify catches plain data that does not match the SHA-256 in the block table', async () => {
    const size = 3 * BS;
    const m = new DiskModel(size, BS);
    const w = await repo.startRestorePoint({ job: 'd', vm: 'v', kind: 'full', blockSize: BS, compression: 'none', disks: [{ name: 'vda', size }], threads: 0 });
    await w.writeDisk('vda', iterate(m.change([[0, 'data'], [1, 'data']])));
    const p = await w.commit();
    // Forge block 1's digest with every checksum around it recomputed (table page record, index,
    // commit slot): only the plain data check can notice.
    const point = await repo.openRestorePoint(p.id);
    const bf = point.files[0]!;
    const d = bf.index.disks[0]!;
    const ref = d.pages[0]!;
    await point.close();
    const fh = await open(bf.path, 'r+');
    try {
      const rec = Buffer.alloc(RECORD_HEADER_SIZE + ref.entryCount * 64);
      await fh.read(rec, 0, rec.length, ref.offset);
      const entries = decodeTablePage(rec.subarray(RECORD_HEADER_SIZE), ref.entryCount);
      const e1 = entries[1]!;
      if (e1.kind !== 'stored') throw new Error('block 1 is not stored');
      entries[1] = { ...e1, digest: createHash('sha256').update('something else').digest() };
      const page = encodeTablePage(entries);
      const crc = crc32c(page);
      await fh.write(Buffer.concat([encodeRecordHeader({ ...decodeRecordHeader(rec), payloadCrc: crc }), page]), 0, rec.length, ref.offset);
      const index = encodeIndex({ ...bf.index, disks: [{ ...d, pages: [{ ...ref, crc }, ...d.pages.slice(1)] }] });
      await fh.write(index, 0, index.length, bf.slot.indexOffset);
      const slot = encodeCommitSlot({ ...bf.slot, indexCrc: crc32c(index) });
      await fh.write(slot, 0, slot.length, COMMIT_SLOT_OFFSETS[bf.slotIndex]);
    } finally {
      await fh.close();
    }
    const ok = await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to: path.join(dir, 'unverified.raw'), threads: 0, imageDigest: true });
    expect(ok.sha256).toBe(createHash('sha256').update(m.bytes).digest('hex'));
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to: path.join(dir, 'v.raw'), verify: true, threads: 1 })).rejects.toThrow(
      /damaged block in .*block 1 \(disk offset 262144\).*does not match the SHA-256/,
    );
  });

  it('stops when aborted and leaves no temporary', async () => {
    const size = 8 * BS;
    const m = new DiskModel(size, BS);
    const w = await repo.startRestorePoint({ job: 'a', vm: 'v', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size }], threads: 0 });
    await w.writeDisk('vda', iterate(m.change(Array.from({ length: 8 }, (_, i) => [i, 'data'] as [number, 'data']))));
    const p = await w.commit();
    const ac = new AbortController();
    ac.abort(new Error('user cancelled'));
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to: path.join(dir, 'a.raw'), signal: ac.signal, threads: 0 })).rejects.toThrow(/user cancelled/);
    expect((await readdir(dir)).filter((f) => f.includes('.bulwark-restore-') || f === 'a.raw')).toEqual([]);
  });
});

describe('restoreDisk: what lands at the target', () => {
  async function onePoint(): Promise<{ id: string; bytes: Buffer }> {
    const m = new DiskModel(3 * BS, BS);
    const w = await repo.startRestorePoint({ job: 't', vm: 'v', kind: 'full', blockSize: BS, disks: [{ name: 'vda', size: m.size }], threads: 0 });
    await w.writeDisk('vda', iterate(m.change([[0, 'data'], [2, 'data']])));
    return { id: (await w.commit()).id, bytes: Buffer.from(m.bytes) };
  }

  it('a qcow2 image is readable by its owner only, like a raw one (qemu-img alone makes it 0644)', async () => {
    const p = await onePoint();
    const old = process.umask(0o022);
    try {
      for (const format of ['raw', 'qcow2'] as const) {
        const to = path.join(dir, `private.${format}`);
        await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, format, threads: 0 });
        expect(((await stat(to)).mode & 0o777).toString(8), format).toBe('600');
      }
    } finally {
      process.umask(old);
    }
    expect((await readdir(dir)).filter((f) => f.includes('.bulwark-restore'))).toEqual([]);
  });

  it('refuses a folder, a block device or a link to one, even with overwrite, before reading; a link to a file is replaced, not followed', async () => {
    const p = await onePoint();
    const folder = path.join(dir, 'a folder');
    await mkdir(folder);
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to: folder, overwrite: true, threads: 0 })).rejects.toMatchObject({
      kind: 'invalid',
      message: `cannot restore to ${folder}: it is a folder, and a restore writes an image file`,
      hint: expect.stringContaining(path.join(folder, 'disk.raw')),
    });
    // A block device node (loop device numbers; never opened) and a link to it, as /dev/vg/lv is.
    const dev = path.join(dir, 'blockdev');
    await promisify(execFile)('mknod', [dev, 'b', '7', '250']);
    const link = path.join(dir, 'lv');
    await symlink(dev, link);
    for (const to of [dev, link]) {
      await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to, overwrite: true, threads: 0 }), to).rejects.toMatchObject({
        kind: 'invalid',
        message: expect.stringMatching(/it is a block device/),
        hint: expect.stringMatching(/qemu-img convert -n/),
      });
    }
    expect((await lstat(dev)).isBlockDevice()).toBe(true);
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
    expect((await readdir(dir)).filter((f) => f.includes('.bulwark-restore'))).toEqual([]);
    // A link to a file: replaced by the image with overwrite; the file it named is untouched.
    const file = path.join(dir, 'precious');
    await writeFile(file, 'keep me');
    const toFile = path.join(dir, 'to-file');
    await symlink(file, toFile);
    await expect(restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to: toFile, threads: 0 })).rejects.toMatchObject({ kind: 'conflict' });
    await restoreDisk({ repository: repo, pointId: p.id, disk: 'vda', to: toFile, overwrite: true, threads: 0 });
    expect(await readFile(file, 'utf8')).toBe('keep me');
    expect((await lstat(toFile)).isFile()).toBe(true);
    expect((await readFile(toFile)).equals(p.bytes)).toBe(true);
  });
});

describe('conversionDeadlineMs', () => {
  it('keeps 10 minutes for small disks and grows with the size past them (no kill mid-convert of a large disk)', () => {
    const GiB = 1024 ** 3;
    expect(conversionDeadlineMs(0)).toBe(600_000);
    expect(conversionDeadlineMs(10 * GiB)).toBe(600_000);
    // 1 TiB at the 20 MiB/s floor rate: 52429 s, not the 600 s that killed such conversions.
    expect(conversionDeadlineMs(1024 * GiB)).toBe(52_429_000);
  });
});
