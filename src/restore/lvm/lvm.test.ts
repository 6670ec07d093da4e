import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { parseConfig } from './config.js';
import { openLogicalVolume } from './lv-disk.js';
import { formatUuid, lvmCrc, parsePvLabel, readMetadataText } from './on-disk.js';
import { deviceMapperName, scanLvm } from './scan.js';
import { dashed, memoryDisk, vgText, writePv, type VgDescription } from './test-helpers.js';
import { volumeGroupFromText } from './volume-group.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const U1 = 'AAAAAA1111BBBB2222CCCC3333DDDDDD';
const U2 = 'ZZZZZZ9999YYYY8888XXXX7777WWWWWW';

/** Bytes whose every 4-byte word says where it is: (disk tag << 24) + byte offset / 4. */
function patternedImage(size: number, tag: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i + 4 <= size; i += 4) b.writeUInt32LE(((tag << 24) | (i >>> 2)) >>> 0, i);
  return b;
}

describe('LVM CRC', () => {
  it('is the reflected CRC-32 from 0xF597A6CF without the final inversion', () => {
    // Bitwise reference, straight from the definition.
    const reference = (b: Buffer): number => {
      let c = 0xf597a6cf;
      for (const x of b) {
        c ^= x;
        for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0xedb88320 : c >>> 1;
      }
      return c >>> 0;
    };
    for (const s of ['', 'a', 'LVM2 001 and more', 'x'.repeat(1000)]) expect(lvmCrc(Buffer.from(s))).toBe(reference(Buffer.from(s)));
    expect(lvmCrc(Buffer.from('abc'))).not.toBe(crc32('abc'));
    // Continues over pieces like one buffer (a wrapped metadata text).
    expect(lvmCrc(Buffer.from('def'), lvmCrc(Buffer.from('abc')))).toBe(lvmCrc(Buffer.from('abcdef')));
  });
});

describe('label and PV header', () => {
  it('finds the label in any of the first four sectors and reads the areas', () => {
    for (const sector of [0, 1, 2, 3]) {
      const img = Buffer.alloc(2 * MiB);
      writePv(img, { uuid: U1, at: 0, size: img.length, text: 'x {\n}\n', labelSector: sector });
      const l = parsePvLabel(img.subarray(0, 2048));
      expect(l).toEqual({ sector, pvUuid: U1, deviceSize: 2 * MiB, dataAreas: [{ offset: MiB, size: 0 }], metadataAreas: [{ offset: 4096, size: MiB - 4096 }] });
    }
    expect(formatUuid(U1)).toBe('AAAAAA-1111-BBBB-2222-CCCC-3333-DDDDDD');
    expect(parsePvLabel(Buffer.alloc(2048))).toBeNull();
    expect(parsePvLabel(Buffer.alloc(100))).toBeNull();
  });

  it('refuses a label whose checksum, sector, type or header offset is wrong', () => {
    const img = Buffer.alloc(2 * MiB);
    writePv(img, { uuid: U1, at: 0, size: img.length, text: null });
    const head = img.subarray(0, 2048);
    const bad = (mutate: (b: Buffer) => void): BulwarkError => {
      const b = Buffer.from(head);
      mutate(b);
      try {
        parsePvLabel(b);
      } catch (err) {
        return err as BulwarkError;
      }
      throw new Error('accepted');
    };
    expect(bad((b) => void (b[512 + 40] = b[512 + 40]! ^ 1)).message).toMatch(/sector 1 fails its checksum/);
    expect(bad((b) => void b.writeBigUInt64LE(3n, 512 + 8)).message).toMatch(/says it is in sector 3/);
    expect(bad((b) => void b.write('LVM1 001', 512 + 24, 'latin1')).message).toMatch(/type "LVM1 001"/);
    const resum = (b: Buffer): void => void b.writeUInt32LE(lvmCrc(b.subarray(512 + 20, 1024)), 512 + 16);
    expect(bad((b) => (b.write('-.-.', 512 + 32, 'latin1'), resum(b))).message).toMatch(/no valid PV UUID/);
    expect(bad((b) => (b.writeUInt32LE(500, 512 + 20), resum(b))).message).toMatch(/PV header at byte 500/);
    // Lists that never end inside the sector.
    expect(bad((b) => (b.fill(0xff, 512 + 72, 1024), resum(b))).message).toMatch(/too large|does not end/);
    expect(parsePvLabel(head)?.metadataAreas).toEqual([]);
  });
});

describe('metadata area', () => {
  const text = vgText({ name: 'vg0', extentSize: 8, pvs: [{ uuid: U1, peStart: 2048, peCount: 10 }], lvs: [] });

  it('reads the committed text, also when it wraps around the circular buffer', async () => {
    for (const textOffset of [512, 4096 - 700, 4096 - 1]) {
      const img = Buffer.alloc(2 * MiB);
      writePv(img, { uuid: U1, at: 0, size: img.length, mda: { offset: 4096, size: 4096 }, textOffset, text });
      expect(await readMetadataText(memoryDisk(img), { offset: 4096, size: 4096 })).toBe(text);
    }
  });

  it('names a bad checksum, a bad magic and a location outside the area', async () => {
    const img = Buffer.alloc(2 * MiB);
    writePv(img, { uuid: U1, at: 0, size: img.length, text });
    const area = { offset: 4096, size: MiB - 4096 };
    const flip = Buffer.from(img);
    flip[4096 + 600] = flip[4096 + 600]! ^ 0x20;
    await expect(readMetadataText(memoryDisk(flip), area)).rejects.toThrow(/metadata text at byte 4608 fails its checksum/);
    const magic = Buffer.from(img);
    magic[4096 + 5] = 0;
    await expect(readMetadataText(memoryDisk(magic), area)).rejects.toThrow(/bad magic/);
    await expect(readMetadataText(memoryDisk(img), { offset: 4096, size: 8192 })).rejects.toThrow(/8192 by the PV header/);
    await expect(readMetadataText(memoryDisk(img.subarray(0, 8192)), area)).rejects.toThrow(/does not fit/);
  });
});

describe('config text', () => {
  it('parses sections, strings with escapes, numbers, arrays and comments', () => {
    const c = parseConfig('# top\nvg {\n id = "a\\"b\\\\c" # c\n n = -12\n f = 1.5\n a = [ "x", 3 ,"y#z"]\n e = []\n sub { k = 1 }\n}\nversion = 1\n');
    const vg = c.sections.get('vg')!;
    expect(c.order).toEqual(['vg']);
    expect(vg.values.get('id')).toBe('a"b\\c');
    expect(vg.values.get('n')).toBe(-12);
    expect(vg.values.get('f')).toBe(1.5);
    expect(vg.values.get('a')).toEqual(['x', 3, 'y#z']);
    expect(vg.values.get('e')).toEqual([]);
    expect(vg.sections.get('sub')!.values.get('k')).toBe(1);
    expect(c.values.get('version')).toBe(1);
  });

  it('says what is wrong and on which line', () => {
    expect(() => parseConfig('vg {\n a = "open\n')).toThrow(/line 2: a string is not closed/);
    expect(() => parseConfig('vg {\n a = 1\n')).toThrow(/line 3: a section is not closed/);
    expect(() => parseConfig('a = [1, [2]]')).toThrow(/line 1: expected a string or a number/);
    expect(() => parseConfig('a 1')).toThrow(/expected = or \{ after a/);
    expect(() => parseConfig('}')).toThrow(/without a section/);
    expect(() => parseConfig('a = bare')).toThrow(/expected a string or a number/);
    expect(() => parseConfig(`${'s {'.repeat(40)}${'}'.repeat(40)}`)).toThrow(/nested deeper/);
  });
});

describe('volume group metadata', () => {
  const base: VgDescription = {
    name: 'rhel',
    seqno: 4,
    extentSize: 8, // 4 KiB extents keep test images small
    pvs: [
      { uuid: U1, peStart: 2048, peCount: 100 },
      { uuid: U2, peStart: 2048, peCount: 50 },
    ],
    lvs: [
      { name: 'root', segments: [{ start: 0, count: 10, stripes: [['pv0', 30]] }, { start: 10, count: 5, stripes: [['pv0', 2]] }] },
      { name: 'data', segments: [{ start: 0, count: 8, stripes: [['pv0', 50], ['pv1', 0]], stripeSize: 2 }] },
      { name: 'root_rimage_0', hidden: true, segments: [{ start: 0, count: 1, stripes: [['pv0', 99]] }] },
      { name: 'pool', segments: [{ start: 0, count: 4, type: 'thin-pool', extra: 'metadata = "pool_tmeta"\npool = "pool_tdata"' }] },
      { name: 'mirror', segments: [{ start: 0, count: 4, type: 'raid1', extra: 'device_count = 2' }] },
      { name: 'snap', segments: [{ start: 0, count: 2, stripes: [['pv1', 40]] }] },
      { name: 'snapshot0', hidden: true, segments: [{ start: 0, count: 15, type: 'snapshot', extra: 'chunk_size = 8\norigin = "root"\ncow_store = "snap"' }] },
      { name: 'gappy', segments: [{ start: 0, count: 1, stripes: [['pv0', 60]] }, { start: 2, count: 1, stripes: [['pv0', 61]] }] },
      { name: 'toolong', segments: [{ start: 0, count: 10, stripes: [['pv1', 45]] }] },
      { name: 'moving', segments: [{ start: 0, count: 2, stripes: [['pvmove0', 0]] }] },
      { name: 'pvmove0', hidden: true, segments: [{ start: 0, count: 2, type: 'mirror', extra: 'mirror_count = 2' }] },
    ],
  };

  it('reads PVs and visible LVs; refuses thin, raid, snapshots, gaps and extents past a PV', () => {
    const vg = volumeGroupFromText(vgText(base));
    expect([vg.name, vg.seqno, vg.extentSize]).toEqual(['rhel', 4, 4096]);
    expect(vg.id).toBe(dashed('VGID'.padEnd(32, 'v')));
    expect(vg.physicalVolumes.map((p) => [p.name, p.uuid, p.peStart, p.peCount, p.device])).toEqual([
      ['pv0', U1, MiB, 100, '/dev/vda2'],
      ['pv1', U2, MiB, 50, '/dev/vdb2'],
    ]);
    const lvs = Object.fromEntries(vg.logicalVolumes.map((l) => [l.name, l]));
    expect(Object.keys(lvs)).toEqual(['root', 'data', 'pool', 'mirror', 'snap', 'gappy', 'toolong', 'moving']);
    expect(lvs.root!.refused).toBeNull();
    expect(lvs.root!.size).toBe(15 * 4096);
    expect(lvs.data!.segments[0]!.stripeSize).toBe(1024);
    expect(lvs.pool!.refused).toMatch(/thin pool/);
    expect(lvs.mirror!.refused).toMatch(/RAID volume \(raid1/);
    expect(lvs.snap!.refused).toMatch(/snapshot of root/);
    expect(lvs.gappy!.refused).toMatch(/gap at extent 1/);
    expect(lvs.toolong!.refused).toMatch(/extents 45–54 of pv1, which has only 50/);
    expect(lvs.moving!.refused).toMatch(/extents are on pvmove0.*pvmove was in progress/);
  });

  it('rejects metadata without the fields every VG has', () => {
    expect(() => volumeGroupFromText('vg {\n seqno = 1\n}\n')).toThrow(/volume group vg has no id string/);
    expect(() => volumeGroupFromText('vg {\n id = "x"\n seqno = 1\n extent_size = 0\n}\n')).toThrow(/extent_size/);
    expect(() => volumeGroupFromText('version = 1\n')).toThrow(/no volume group section/);
  });
});

describe('logical volumes as disks', () => {
  it('maps linear segments out of order and stripes across two disks, byte for byte', async () => {
    const d1 = patternedImage(2 * MiB, 1);
    const d2 = patternedImage(3 * MiB, 2);
    const text = vgText({
      name: 'vg',
      extentSize: 8,
      pvs: [
        { uuid: U1, peStart: 2048, peCount: 200 },
        { uuid: U2, peStart: 2048, peCount: 100 },
      ],
      lvs: [
        { name: 'root', segments: [{ start: 0, count: 3, stripes: [['pv0', 20]] }, { start: 3, count: 2, stripes: [['pv0', 5]] }, { start: 5, count: 1, stripes: [['pv1', 7]] }] },
        { name: 'striped', segments: [{ start: 0, count: 6, stripes: [['pv0', 100], ['pv1', 10]], stripeSize: 2 }] },
        { name: 'flat', segments: [{ start: 0, count: 4, stripes: [['pv1', 50]] }, { start: 4, count: 4, stripes: [['pv1', 54]] }] },
      ],
    });
    // pv0 is partition-like: it starts 64 KiB into disk 1; pv1 is the whole of disk 2.
    writePv(d1, { uuid: U1, at: 64 * KiB, size: 2 * MiB - 64 * KiB, text });
    writePv(d2, { uuid: U2, at: 0, size: 3 * MiB, text: null });
    const disk1 = memoryDisk(d1);
    const disk2 = memoryDisk(d2);
    const scan = await scanLvm([
      { diskName: 'vda', volumeName: 'vda2', disk: disk1, offset: 64 * KiB, size: 2 * MiB - 64 * KiB },
      { diskName: 'vdb', volumeName: 'vdb', disk: disk2, offset: 0, size: 3 * MiB },
    ]);
    expect(scan.warnings).toEqual([]);
    expect(scan.physicalVolumes.map((p) => [p.volumeName, p.vg, p.problem])).toEqual([
      ['vda2', 'vg', null],
      ['vdb', 'vg', null],
    ]);
    const lv = (n: string) => scan.logicalVolumes.find((l) => l.name === n)!;
    expect(lv('root').on).toEqual(['vda2', 'vdb']);

    // Reference: where each 4 KiB extent (and 1 KiB chunk) of each LV is, computed by hand.
    const E = 4096;
    const pv0 = (x: number) => d1.subarray(64 * KiB + MiB + x * E);
    const pv1 = (x: number) => d2.subarray(MiB + x * E);
    const rootWant = Buffer.concat([pv0(20).subarray(0, 3 * E), pv0(5).subarray(0, 2 * E), pv1(7).subarray(0, E)]);
    const stripedWant = Buffer.alloc(6 * E);
    for (let c = 0; c < (6 * E) / 1024; c++) {
      const src = c % 2 === 0 ? pv0(100) : pv1(10);
      src.copy(stripedWant, c * 1024, Math.floor(c / 2) * 1024, Math.floor(c / 2) * 1024 + 1024);
    }
    const root = lv('root').disk!;
    const striped = lv('striped').disk!;
    expect(root.size).toBe(6 * E);
    expect(await root.read(0, root.size)).toEqual(rootWant);
    expect(await striped.read(0, striped.size)).toEqual(stripedWant);
    // Unaligned reads across segment and chunk boundaries.
    for (const [o, n] of [[3 * E - 5, 10], [5 * E - 1, E + 1], [1, 3 * E], [E * 6 - 3, 3]] as const) {
      expect(await root.read(o, n), `root ${o}+${n}`).toEqual(rootWant.subarray(o, o + n));
    }
    for (const [o, n] of [[1023, 2], [1000, 5000], [3 * E + 17, 2 * E]] as const) {
      expect(await striped.read(o, n), `striped ${o}+${n}`).toEqual(stripedWant.subarray(o, o + n));
    }
    await expect(root.read(6 * E - 1, 2)).rejects.toThrow(/outside logical volume root/);

    // The allocation map comes from the PV disks' maps: here disk 2 has a hole where root's last extent is.
    const holey = Object.assign(memoryDisk(d2), {
      extents: (o: number, n: number) =>
        Promise.resolve(
          [
            { offset: 0, length: MiB + 7 * E, kind: 'data' as const },
            { offset: MiB + 7 * E, length: E, kind: 'hole' as const },
            { offset: MiB + 8 * E, length: d2.length - MiB - 8 * E, kind: 'data' as const },
          ].filter((e) => e.offset < o + n && e.offset + e.length > o),
        ),
    });
    const rescan = await scanLvm([
      { diskName: 'vda', volumeName: 'vda2', disk: disk1, offset: 64 * KiB, size: 2 * MiB - 64 * KiB },
      { diskName: 'vdb', volumeName: 'vdb', disk: holey, offset: 0, size: 3 * MiB },
    ]);
    const root2 = rescan.logicalVolumes.find((l) => l.name === 'root')!.disk!;
    expect(await root2.extents!(0, root2.size)).toEqual([
      { offset: 0, length: 5 * E, kind: 'data' },
      { offset: 5 * E, length: E, kind: 'hole' },
    ]);
    expect(await root2.extents!(4 * E + 3, E + 10)).toEqual([
      { offset: 4 * E + 3, length: E - 3, kind: 'data' },
      { offset: 5 * E, length: 13, kind: 'hole' },
    ]);

    // Only an LV that is one run on one disk is "linear" (a loop offset is enough).
    expect(root.linear).toBeNull();
    expect(striped.linear).toBeNull();
    expect(lv('flat').disk!.linear).toEqual({ diskName: 'vdb', disk: disk2, offset: MiB + 50 * E, size: 8 * E });
  });

  it('refuses LVs on a missing PV, takes the newest metadata, warns about a PV seen twice', async () => {
    const desc = (seqno: number, lvName: string): string =>
      vgText({
        name: 'vg',
        seqno,
        extentSize: 8,
        pvs: [
          { uuid: U1, peStart: 2048, peCount: 100 },
          { uuid: U2, peStart: 2048, peCount: 100 },
        ],
        lvs: [
          { name: lvName, segments: [{ start: 0, count: 2, stripes: [['pv0', 0]] }] },
          { name: 'spans', segments: [{ start: 0, count: 2, stripes: [['pv0', 10]] }, { start: 2, count: 2, stripes: [['pv1', 0]] }] },
        ],
      });
    const a = Buffer.alloc(2 * MiB);
    const b = Buffer.alloc(2 * MiB);
    writePv(a, { uuid: U1, at: 0, size: a.length, text: desc(3, 'old') });
    writePv(b, { uuid: U1, at: 0, size: b.length, text: desc(5, 'new') });
    const scan = await scanLvm([
      { diskName: 'vda', volumeName: 'vda', disk: memoryDisk(a), offset: 0, size: a.length },
      { diskName: 'vdb', volumeName: 'vdb', disk: memoryDisk(b), offset: 0, size: b.length },
    ]);
    expect(scan.warnings).toEqual([`LVM PV ${formatUuid(U1)} is on both vda and vdb (a cloned disk?); vda is used`]);
    expect(scan.volumeGroups.map((v) => v.seqno)).toEqual([5]);
    expect(scan.logicalVolumes.map((l) => [l.name, l.refused === null])).toEqual([
      ['new', true],
      ['spans', false],
    ]);
    expect(scan.logicalVolumes[1]!.refused).toMatch(/missing physical volume: physical volume pv1 \(the guest's \/dev\/vdb2\), UUID ZZZZZZ-9999-.*is not in this restore point/);
  });

  it('reports a PV whose metadata is damaged, and names LVs like /dev/mapper', async () => {
    const a = Buffer.alloc(2 * MiB);
    writePv(a, { uuid: U1, at: 0, size: a.length, text: 'vg {\n id = "x"\n' });
    const scan = await scanLvm([{ diskName: 'vda', volumeName: 'vda1', disk: memoryDisk(a), offset: 0, size: a.length }]);
    expect(scan.physicalVolumes).toEqual([{ volumeName: 'vda1', uuid: formatUuid(U1), vg: null, problem: 'an LVM physical volume whose volume group metadata cannot be read' }]);
    expect(scan.warnings[0]).toMatch(/^vda1: LVM metadata copy skipped: LVM metadata text, line 3: a section is not closed/);
    expect(deviceMapperName('my-vg', 'root')).toBe('my--vg-root');
    expect(() => openLogicalVolume({ name: 'x', id: '', size: 0, segments: [], refused: 'thin' }, 4096, new Map())).toThrow(/cannot be read: thin/);
  });
});
