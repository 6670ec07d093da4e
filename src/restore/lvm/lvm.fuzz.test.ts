// The LVM reader on hostile bytes: random sectors, PV labels and metadata area headers mutated
// (checksums recomputed, so the checks behind them are reached), and metadata text mutated.
// Every outcome must be a result or a BulwarkError: never another exception, never a hang, and
// never a read outside a disk by a logical volume that was accepted.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { parseConfig } from './config.js';
import { lvmCrc } from './on-disk.js';
import { scanLvm } from './scan.js';
import { memoryDisk, vgText, writePv } from './test-helpers.js';

const MiB = 1024 * 1024;
const U1 = 'AAAAAA1111BBBB2222CCCC3333DDDDDD';
const SIZE = 2 * MiB;
const TEXT = vgText({
  name: 'vg',
  extentSize: 8,
  pvs: [{ uuid: U1, peStart: 2048, peCount: 200 }],
  lvs: [
    { name: 'root', segments: [{ start: 0, count: 3, stripes: [['pv0', 20]] }, { start: 3, count: 2, stripes: [['pv0', 5]] }] },
    { name: 'data', segments: [{ start: 0, count: 8, stripes: [['pv0', 100], ['pv0', 150]], stripeSize: 2 }] },
  ],
});

/** Scans and reads every accepted LV at a few places; any failure must be a BulwarkError. */
async function settle(image: Buffer): Promise<void> {
  const disk = memoryDisk(image);
  try {
    const scan = await scanLvm([{ diskName: 'vda', volumeName: 'vda1', disk, offset: 0, size: image.length }]);
    for (const lv of scan.logicalVolumes) {
      if (!lv.disk) continue;
      expect(lv.disk.size).toBeLessThanOrEqual(image.length);
      for (const [o, n] of [[0, Math.min(lv.disk.size, 9000)], [Math.max(0, lv.disk.size - 3000), Math.min(3000, lv.disk.size)]] as const) {
        const b = await lv.disk.read(o, n);
        expect(b.length).toBe(n);
      }
    }
  } catch (err) {
    if (!(err instanceof BulwarkError)) throw err;
  }
}

function pvImage(text: string): Buffer {
  const img = Buffer.alloc(SIZE);
  writePv(img, { uuid: U1, at: 0, size: SIZE, text, mda: { offset: 4096, size: 64 * 1024 } });
  return img;
}

describe('LVM reader fuzz', () => {
  it('random first sectors', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 0, maxLength: 16384 }), fc.boolean(), async (bytes, labelled) => {
        const b = Buffer.alloc(Math.max(bytes.length, 2048));
        Buffer.from(bytes).copy(b);
        if (labelled) {
          // A real label start, so the PV header and area lists are what is random.
          b.write('LABELONE', 512, 'latin1');
          b.writeBigUInt64LE(1n, 520);
          b.write('LVM2 001', 536, 'latin1');
          b.writeUInt32LE(32, 532);
          b.writeUInt32LE(lvmCrc(b.subarray(532, 1024)), 528);
        }
        await settle(b);
      }),
      { numRuns: 300 },
    );
  });

  it('mutated labels, PV headers and metadata area headers (checksums recomputed)', async () => {
    const good = pvImage(TEXT);
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }), fc.boolean(), async (edits, resum) => {
        const d = Buffer.from(good);
        for (const [pos, val] of edits) {
          // Label sector (512..1023) or metadata area header (4096..4607).
          const at = pos % 2 === 0 ? 512 + ((pos >> 1) % 512) : 4096 + ((pos >> 1) % 512);
          d[at] = val;
        }
        if (resum) {
          d.writeUInt32LE(lvmCrc(d.subarray(532, 1024)), 528);
          d.writeUInt32LE(lvmCrc(d.subarray(4100, 4608)), 4096);
        }
        await settle(d);
      }),
      { numRuns: 400 },
    );
  });

  it('mutated metadata text', async () => {
    const alphabet = [...'{}[]=,"#\n 0123456789-\\abcpvsegmnt_'];
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.nat({ max: TEXT.length }), fc.nat({ max: 40 }), fc.constantFrom(...alphabet), fc.constantFrom('set', 'cut', 'dup', 'num')), { minLength: 1, maxLength: 6 }),
        async (edits) => {
          let t = TEXT;
          for (const [pos, len, ch, op] of edits) {
            const p = pos % (t.length + 1);
            if (op === 'set') t = t.slice(0, p) + ch + t.slice(p + 1);
            else if (op === 'cut') t = t.slice(0, p) + t.slice(p + len);
            else if (op === 'dup') t = t.slice(0, p) + t.slice(p, p + len) + t.slice(p);
            else t = t.replace(/\d+/g, (m, at: number) => (at >= p && at < p + 200 ? String(Number(m) * (len + 1) + len) : m));
          }
          await settle(pvImage(t));
        },
      ),
      { numRuns: 400 },
    );
  });

  it('config parser on arbitrary text', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 2000 }), (s) => {
        try {
          parseConfig(s);
        } catch (err) {
          if (!(err instanceof BulwarkError)) throw err;
        }
      }),
      { numRuns: 500 },
    );
  });
});
