import { randomUUID } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import * as f from './index.js';

const header = (over: Partial<f.FileHeader> = {}): f.FileHeader => ({
  kind: 'forward',
  formatMinor: 0,
  blockSize: 1048576,
  fileId: randomUUID(),
  chainId: randomUUID(),
  pointId: randomUUID(),
  baseFileId: randomUUID(),
  timeMs: 1_764_000_000_123,
  compression: 'zstd',
  encryption: null,
  ...over,
});

describe('fixed sizes (docs/formats/backup-files.md)', () => {
  it('match the spec', () => {
    expect(f.HEADER_PAGE_SIZE).toBe(4096);
    expect(f.HEADER_CRC_OFFSET).toBe(508);
    expect(f.COMMIT_SLOT_OFFSETS).toEqual([512, 576]);
    expect(f.COMMIT_SLOT_SIZE).toBe(64);
    expect(f.RECORD_HEADER_SIZE).toBe(32);
    expect(f.BLOCK_ENTRY_SIZE).toBe(64);
    expect(f.ENTRIES_PER_PAGE).toBe(1024);
    expect(f.INDEX_HEADER_SIZE).toBe(64);
    expect(f.DISK_DESCRIPTOR_SIZE).toBe(128);
    expect(f.TABLE_PAGE_REF_SIZE).toBe(16);
    expect(f.CHAIN_METADATA_HEADER_SIZE).toBe(64);
    expect(f.BLOCK_SIZES).toEqual([262144, 524288, 1048576, 4194304]);
  });
  it('encoders produce exactly those sizes', () => {
    expect(f.encodeHeader(header()).length).toBe(4096);
    expect(f.encodeCommitSlot({ generation: 1, indexOffset: 4096, indexLength: 64, fileLength: 4160, indexCrc: 1 }).length).toBe(64);
    expect(f.encodeRecordHeader({ type: 'block', compression: 'lz4', encrypted: false, storedLength: 1, plainLength: 1, payloadCrc: 0 }).length).toBe(32);
    expect(f.encodeTablePage([f.ZERO]).length).toBe(64);
    expect(f.encodeIndex({ config: Buffer.alloc(0), disks: [] }).length).toBe(64);
    const idx = f.encodeIndex({
      config: Buffer.from('abc'),
      disks: [{ name: 'vda', size: 1, blockCount: 1, entriesPerPage: 1024, stats: zeroStats(), pages: [{ offset: 4096, entryCount: 1, crc: 7 }] }],
    });
    expect(idx.length).toBe(64 + 8 + 128 + 16);
  });
});

const zeroStats = (): f.DiskStats => ({ storedBytes: 0, plainBytes: 0, storedBlocks: 0, dedupBlocks: 0, zeroBlocks: 0, holeBlocks: 0, inheritBlocks: 0 });

describe('round trips', () => {
  it('header, plain and encrypted, every kind', () => {
    for (const kind of ['full', 'forward', 'reverse'] as const) {
      const h = header({ kind });
      expect(f.decodeHeader(f.encodeHeader(h))).toEqual(h);
    }
    const e = header({ encryption: { log2N: 15, r: 8, p: 1, salt: Buffer.alloc(32, 1), keyCheck: Buffer.alloc(32, 2) } });
    expect(f.decodeHeader(f.encodeHeader(e))).toEqual(e);
  });
  it('header refuses a flipped byte', () => {
    const b = f.encodeHeader(header());
    b[20]! ^= 1;
    expect(() => f.decodeHeader(b)).toThrow(/checksum/);
  });
  it('commit slots: highest valid generation wins, damaged slot skipped', () => {
    const a = f.encodeCommitSlot({ generation: 1, indexOffset: 5000, indexLength: 100, fileLength: 5100, indexCrc: 3 });
    const b = f.encodeCommitSlot({ generation: 2, indexOffset: 6000, indexLength: 100, fileLength: 6100, indexCrc: 4 });
    expect(f.pickCommitSlot([a, b], 7000).slot.generation).toBe(2);
    expect(f.pickCommitSlot([a, b], 6050).slot.generation).toBe(1); // b's index beyond file end
    const bad = Buffer.from(b);
    bad[9]! ^= 0x10;
    expect(f.pickCommitSlot([a, bad], 7000).slot.generation).toBe(1);
    expect(() => f.pickCommitSlot([Buffer.alloc(64), Buffer.alloc(64)], 7000)).toThrow(/no valid commit/);
  });
  it('record header', () => {
    const r: f.RecordHeader = { type: 'table-page', compression: 'none', encrypted: false, storedLength: 640, plainLength: 640, payloadCrc: 0xdeadbeef };
    expect(f.decodeRecordHeader(f.encodeRecordHeader(r))).toEqual(r);
  });
  it('block entries and table pages', () => {
    const stored: f.BlockEntry = { kind: 'stored', storedLength: 1234, recordOffset: 8192, plainLength: 1048576, crc: 42, digest: Buffer.alloc(32, 9) };
    const entries = [f.HOLE, f.ZERO, f.INHERIT, stored];
    expect(f.decodeTablePage(f.encodeTablePage(entries), 4)).toEqual(entries);
  });
  it('index with config and disks', () => {
    const idx: f.BackupIndex = {
      config: Buffer.from('<domain/>'),
      disks: [
        { name: 'vda', size: 3 * 1048576 + 5, blockCount: 4, entriesPerPage: 1024, stats: { ...zeroStats(), storedBlocks: 3 }, pages: [{ offset: 4096, entryCount: 4, crc: 1 }] },
        { name: 'vdb-é', size: 0, blockCount: 0, entriesPerPage: 1024, stats: zeroStats(), pages: [] },
      ],
    };
    const b = f.encodeIndex(idx);
    expect(f.decodeIndex(b, 1048576, 1 << 20)).toEqual(idx);
    expect(() => f.decodeIndex(b, 262144, 1 << 20)).toThrow(/block count/);
  });
  it('chain metadata', () => {
    const chainId = randomUUID();
    const p1 = randomUUID();
    const body: f.ChainMetadata = {
      version: 1,
      job: 'nightly',
      vm: 'web 1',
      chains: [
        {
          id: chainId,
          method: 'forward',
          blockSize: 1048576,
          compression: 'zstd',
          encryption: null,
          points: [
            { id: p1, time: new Date().toISOString(), kind: 'full', file: 'a.vbk', fileId: randomUUID(), base: null, generation: 1, disks: [{ name: 'vda', size: 5 }], fileBytes: 9000 },
            { id: randomUUID(), time: new Date().toISOString(), kind: 'incremental', file: 'b.vib', fileId: randomUUID(), base: p1, generation: 1, disks: [], fileBytes: 9000 },
          ],
        },
      ],
      journal: null,
    };
    expect(f.decodeChainMetadata(f.encodeChainMetadata(7, body))).toEqual({ generation: 7, body });
    const bad = { ...body, chains: [{ ...body.chains[0]!, points: [{ ...body.chains[0]!.points[1]!, base: randomUUID() }] }] };
    expect(() => f.encodeChainMetadata(1, bad)).toThrow(/outside its chain/);
  });
});
