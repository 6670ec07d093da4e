// Every parser gets random and mutated bytes: it must return or throw FormatError, never crash,
// hang or throw anything else. The parsers of stored bytes outside src/format (a block payload's
// decryption and decompression, the single-file VM configuration) may throw a plain Error, the
// kind their callers turn into a `corrupt` error naming the place; never crash or hang.
import { randomUUID } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockEncoder, decodePayload, payloadBound } from '../repository/block-codec.js';
import { decodeAllVmsConfig, encodeAllVmsConfig } from '../repository/single-file.js';
import * as f from './index.js';
import { decodeFrameHead, decodeSealedHeader, encodeFrameHead, encodeSealedHeader } from './sealed-file-index.js';

const stats: f.DiskStats = { storedBytes: 1, plainBytes: 2, storedBlocks: 3, dedupBlocks: 0, zeroBlocks: 1, holeBlocks: 0, inheritBlocks: 0 };
const samples: Record<string, Buffer> = {
  header: f.encodeHeader({
    kind: 'full', formatMinor: 0, blockSize: 262144, fileId: randomUUID(), chainId: randomUUID(), pointId: randomUUID(),
    baseFileId: f.NIL_UUID, timeMs: 5, compression: 'lz4',
    encryption: { log2N: 15, r: 8, p: 1, salt: Buffer.alloc(32, 3), keyCheck: Buffer.alloc(32, 4) },
  }),
  slot: f.encodeCommitSlot({ generation: 3, indexOffset: 4096, indexLength: 200, fileLength: 4296, indexCrc: 5 }),
  record: f.encodeRecordHeader({ type: 'block', compression: 'zstd', encrypted: true, storedLength: 77, plainLength: 262144, payloadCrc: 9 }),
  page: f.encodeTablePage([f.HOLE, { kind: 'stored', storedLength: 9, recordOffset: 4096, plainLength: 100, crc: 1, digest: Buffer.alloc(32, 1) }, f.ZERO]),
  index: f.encodeIndex({
    config: Buffer.from('cfg'),
    disks: [{ name: 'vda', size: 600000, blockCount: 3, entriesPerPage: 1024, stats, pages: [{ offset: 4096, entryCount: 3, crc: 2 }] }],
  }),
  vbm: f.encodeChainMetadata(1, {
    version: 1, job: 'j', vm: 'v', journal: null,
    chains: [{ id: randomUUID(), method: 'forward', blockSize: 1048576, compression: 'none', encryption: null,
      points: [{ id: randomUUID(), time: '2026-01-01T00:00:00Z', kind: 'full', file: 'x.vbk', fileId: randomUUID(), base: null, generation: 1, disks: [{ name: 'vda', size: 1 }], fileBytes: 1 }] }],
  }),
  sealedHeader: encodeSealedHeader({ kdf: { log2N: 15, r: 8, p: 1, salt: Buffer.alloc(32, 3), keyCheck: Buffer.alloc(32, 4) }, frameSize: 65536 }),
  frameHead: encodeFrameHead({ length: 4000, flags: 1, nonce: Buffer.alloc(12, 9) }),
};

const parsers: Record<string, (b: Buffer) => unknown> = {
  header: (b) => f.decodeHeader(b),
  slot: (b) => f.pickCommitSlot([b, b], 1 << 30),
  record: (b) => f.decodeRecordHeader(b),
  page: (b) => f.decodeTablePage(b, Math.floor(b.length / 64)),
  index: (b) => f.decodeIndex(b, 262144, 1 << 20),
  vbm: (b) => f.decodeChainMetadata(b),
  sealedHeader: (b) => decodeSealedHeader(b),
  frameHead: (b) => decodeFrameHead(b),
};

function mustNotCrash(parse: (b: Buffer) => unknown, b: Buffer): void {
  try {
    parse(b);
  } catch (err) {
    if (!(err instanceof f.FormatError)) throw err;
  }
}

const mutated = (base: Buffer) =>
  fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }).chain((flips) =>
    fc.oneof(
      fc.constant(
        (() => {
          const b = Buffer.from(base);
          for (const [pos, v] of flips) b[pos % b.length] = v;
          return b;
        })(),
      ),
      fc.nat({ max: base.length }).map((n) => Buffer.from(base.subarray(0, n))),
    ),
  );

describe('fuzz: parsers never crash', () => {
  for (const [name, parse] of Object.entries(parsers)) {
    it(`${name}: random bytes`, () => {
      fc.assert(fc.property(fc.uint8Array({ maxLength: 5000 }), (u) => mustNotCrash(parse, Buffer.from(u))), { numRuns: 300 });
    });
    it(`${name}: mutated valid bytes`, () => {
      const base = samples[name]!;
      parse(base); // the sample itself is valid
      fc.assert(fc.property(mutated(base), (b) => mustNotCrash(parse, b)), { numRuns: 500 });
    });
  }
  it('block entries at every kind byte', () => {
    for (let k = 0; k < 256; k++) {
      const b = Buffer.alloc(64);
      b[0] = k;
      b.writeUInt32LE(4096, 8);
      b.writeUInt32LE(1, 16);
      mustNotCrash((x) => f.decodeBlockEntry(x, 0), b);
    }
  });
});

/** Must return or throw an Error (no crash, no hang, no huge allocation from a stored length). */
function mustNotCrashPlain(parse: () => unknown): void {
  try {
    parse();
  } catch (err) {
    if (!(err instanceof Error)) throw err;
  }
}

describe('fuzz: stored payloads and the single-file configuration', () => {
  const PLAIN = 4096;
  const keys = { blockKey: Buffer.alloc(32, 1), digestKey: Buffer.alloc(32, 2) };
  const aad = Buffer.alloc(16, 3);
  const plain = Buffer.from('the quick brown fox jumps over the lazy dog. '.repeat(100).slice(0, PLAIN));
  const payloads = (['zstd', 'lz4'] as const).flatMap((compression) =>
    [null, keys].map((k) => {
      const out = Buffer.alloc(payloadBound(262144));
      const e = new BlockEncoder(compression, k, aad, 262144).encodeInto(plain, out);
      const payload = Buffer.from(e.raw ? plain : out.subarray(0, e.storedLength));
      expect(decodePayload(payload, e.compression, k !== null, PLAIN, k, aad).equals(plain)).toBe(true);
      return { compression: e.compression, keys: k, payload };
    }),
  );
  for (const [i, p] of payloads.entries()) {
    it(`block payload ${i} (${p.compression}${p.keys ? ', encrypted' : ''}): random and mutated bytes`, () => {
      const decode = (b: Buffer) => mustNotCrashPlain(() => decodePayload(b, p.compression, p.keys !== null, PLAIN, p.keys, aad));
      fc.assert(fc.property(fc.uint8Array({ maxLength: 5000 }), (u) => decode(Buffer.from(u))), { numRuns: 300 });
      fc.assert(fc.property(mutated(p.payload), decode), { numRuns: 500 });
    });
  }
  it('single-file VM configuration: random and mutated bytes', () => {
    const base = encodeAllVmsConfig([{ name: 'web', config: Buffer.from('<domain/>'), disks: ['vda', 'vdb'] }, { name: 'db', config: Buffer.alloc(0), disks: [] }]);
    expect(decodeAllVmsConfig(base)).toHaveLength(2);
    fc.assert(fc.property(fc.uint8Array({ maxLength: 2000 }), (u) => mustNotCrashPlain(() => decodeAllVmsConfig(Buffer.from(u)))), { numRuns: 300 });
    fc.assert(fc.property(mutated(base), (b) => mustNotCrashPlain(() => decodeAllVmsConfig(b))), { numRuns: 500 });
  });
});
