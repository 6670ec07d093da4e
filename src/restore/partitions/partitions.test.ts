// Fuzzed and hand-built tables: the reader returns tables or BulwarkErrors, never crashes, and
// never reports a partition outside the disk. Tables made by sfdisk/parted: test/restore/.
import fc from 'fast-check';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { readPartitionTable, type SectorSource } from './partitions.js';

function memDisk(b: Buffer): SectorSource {
  return {
    size: b.length,
    read: (o, l) => {
      if (o < 0 || l < 0 || o + l > b.length) return Promise.reject(new Error(`read ${o}+${l} past ${b.length}`));
      return Promise.resolve(Buffer.from(b.subarray(o, o + l)));
    },
  };
}

function mbrEntry(buf: Buffer, slot: number, type: number, first: number, count: number, sectorBase = 0): void {
  const at = sectorBase + 446 + slot * 16;
  buf[at + 4] = type;
  buf.writeUInt32LE(first, at + 8);
  buf.writeUInt32LE(count, at + 12);
  buf[sectorBase + 510] = 0x55;
  buf[sectorBase + 511] = 0xaa;
}

/** A minimal valid GPT (protective MBR, primary and backup) with one partition. */
function buildGpt(sectors: number): Buffer {
  const d = Buffer.alloc(sectors * 512);
  mbrEntry(d, 0, 0xee, 1, sectors - 1);
  const entries = Buffer.alloc(128 * 128);
  Buffer.from('AF3DC60F838472478E793D69D8477DE4', 'hex').copy(entries, 0); // Linux filesystem
  entries.fill(7, 16, 32);
  entries.writeBigUInt64LE(34n, 32);
  entries.writeBigUInt64LE(BigInt(sectors - 34), 40);
  Buffer.from('root', 'utf16le').copy(entries, 56);
  const header = (my: number, other: number, entriesLba: number): Buffer => {
    const h = Buffer.alloc(92);
    h.write('EFI PART', 0, 'latin1');
    h.writeUInt32LE(0x10000, 8);
    h.writeUInt32LE(92, 12);
    h.writeBigUInt64LE(BigInt(my), 24);
    h.writeBigUInt64LE(BigInt(other), 32);
    h.writeBigUInt64LE(34n, 40);
    h.writeBigUInt64LE(BigInt(sectors - 34), 48);
    h.fill(9, 56, 72);
    h.writeBigUInt64LE(BigInt(entriesLba), 72);
    h.writeUInt32LE(128, 80);
    h.writeUInt32LE(128, 84);
    h.writeUInt32LE(crc32(entries), 88);
    h.writeUInt32LE(crc32(h), 16);
    return h;
  };
  header(1, sectors - 1, 2).copy(d, 512);
  entries.copy(d, 2 * 512);
  entries.copy(d, (sectors - 33) * 512);
  header(sectors - 1, 1, sectors - 33).copy(d, (sectors - 1) * 512);
  return d;
}

async function settle(disk: SectorSource): Promise<void> {
  try {
    const t = await readPartitionTable(disk);
    for (const p of t.partitions) {
      expect(p.start).toBeGreaterThan(0);
      expect(p.start + p.size).toBeLessThanOrEqual(disk.size);
    }
  } catch (err) {
    expect(err).toBeInstanceOf(BulwarkError);
  }
}

describe('readPartitionTable', () => {
  it('reads a hand-built MBR with an extended chain of logical partitions', async () => {
    const d = Buffer.alloc(4096 * 512);
    mbrEntry(d, 0, 0x83, 2048, 1000);
    mbrEntry(d, 1, 0x05, 3072, 1024);
    // EBR 1 at 3072: logical at +2, next EBR at extended+512.
    mbrEntry(d, 0, 0x83, 2, 100, 3072 * 512);
    mbrEntry(d, 1, 0x05, 512, 200, 3072 * 512);
    mbrEntry(d, 0, 0x82, 2, 50, (3072 + 512) * 512);
    const t = await readPartitionTable(memDisk(d));
    expect(t.scheme).toBe('mbr');
    expect(t.partitions.map((p) => [p.index, p.start / 512, p.size / 512, p.type, p.logical ?? false])).toEqual([
      [1, 2048, 1000, '0x83', false],
      [2, 3072, 1024, '0x05', false],
      [5, 3074, 100, '0x83', true],
      [6, 3586, 50, '0x82', true],
    ]);
  });

  it('stops a looping EBR chain with a warning', async () => {
    const d = Buffer.alloc(4096 * 512);
    mbrEntry(d, 0, 0x05, 2048, 1024);
    mbrEntry(d, 0, 0x83, 2, 10, 2048 * 512);
    mbrEntry(d, 1, 0x05, 0, 10, 2048 * 512); // points back at itself
    const t = await readPartitionTable(memDisk(d));
    expect(t.partitions.filter((p) => p.logical)).toHaveLength(1);
    expect(t.warnings.join()).toMatch(/loops/);
  });

  it('reads a hand-built GPT and falls back to the backup when the primary is damaged', async () => {
    const d = buildGpt(2048);
    const good = await readPartitionTable(memDisk(d));
    expect(good.scheme).toBe('gpt');
    expect(good.warnings).toEqual([]);
    expect(good.partitions).toEqual([
      {
        index: 1,
        start: 34 * 512,
        size: (2048 - 34 - 34 + 1) * 512,
        type: '0FC63DAF-8483-4772-8E79-3D69D8477DE4',
        typeName: 'Linux filesystem',
        name: 'root',
        uuid: '07070707-0707-0707-0707-070707070707',
      },
    ]);
    const broken = Buffer.from(d);
    broken.writeUInt8(broken.readUInt8(2 * 512 + 60) ^ 0xff, 2 * 512 + 60); // primary entry array: CRC mismatch
    const t = await readPartitionTable(memDisk(broken));
    expect(t.partitions).toEqual(good.partitions);
    expect(t.warnings.join()).toMatch(/primary GPT header damaged .*entry array CRC mismatch.*backup/);
    broken.writeUInt8(broken.readUInt8(2047 * 512 + 40) ^ 0xff, 2047 * 512 + 40); // and the backup header
    await expect(readPartitionTable(memDisk(broken))).rejects.toMatchObject({ kind: 'corrupt' });
  });

  it('never crashes on random bytes', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 0, maxLength: 8192 }), async (bytes) => {
        await settle(memDisk(Buffer.from(bytes)));
      }),
      { numRuns: 300 },
    );
  });

  it('never crashes on mutated MBR and GPT tables', async () => {
    const gpt = buildGpt(256);
    const mbr = Buffer.alloc(256 * 512);
    mbrEntry(mbr, 0, 0x83, 1, 100);
    mbrEntry(mbr, 1, 0x0f, 120, 100);
    mbrEntry(mbr, 0, 0x83, 1, 10, 120 * 512);
    mbrEntry(mbr, 1, 0x05, 20, 10, 120 * 512);
    await fc.assert(
      fc.asyncProperty(
        fc.boolean(),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 12 }),
        async (useGpt, edits) => {
          const d = Buffer.from(useGpt ? gpt : mbr);
          // Edits go where the tables are: sectors 0-3, the EBR, and the last sectors.
          const hot = [0, 512, 1024, 120 * 512, d.length - 33 * 512, d.length - 512];
          for (const [pos, val] of edits) d[(hot[pos % hot.length]! + (pos % 512)) % d.length] = val;
          await settle(memDisk(d));
        },
      ),
      { numRuns: 400 },
    );
  });
});
