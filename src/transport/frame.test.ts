import { createHash } from 'node:crypto';
import { crc32c } from '@node-rs/crc32';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../common/errors.js';
import {
  BLOCK_HEADER_SIZE,
  FRAME_HEADER_SIZE,
  FRAME_MAGIC,
  FLAG_RESEND,
  FrameDecoder,
  MAX_PAYLOAD,
  MessageType,
  NACK_SIZE,
  ZERO_RUN_SIZE,
  decodeAck,
  decodeBeginPoint,
  decodeBlock,
  decodeEndDisk,
  decodeHeader,
  decodeHello,
  decodeNack,
  decodeOpenDisk,
  decodeWelcome,
  decodeZeroRun,
  encodeAck,
  encodeBlock,
  encodeFrame,
  encodeHeader,
  encodeJson,
  encodeNack,
  encodeZeroRun,
  type BlockMessage,
} from './frame.js';

function block(data: Buffer, index = 7): BlockMessage {
  return {
    disk: 2,
    index,
    plainLength: data.length,
    compression: 'none',
    sha256: createHash('sha256').update(data).digest(),
    data,
  };
}

describe('frame sizes and layout (spec section 2, 3, 8)', () => {
  it('has the sizes the spec states', () => {
    expect(FRAME_HEADER_SIZE).toBe(32);
    expect(BLOCK_HEADER_SIZE).toBe(64);
    expect(ZERO_RUN_SIZE).toBe(24);
    expect(NACK_SIZE).toBe(16);
    expect(MAX_PAYLOAD).toBe(64 * 1024 * 1024 + 64);
    expect(encodeHeader({ type: 13, flags: 0, stream: 0, length: 0, sequence: 0 })).toHaveLength(32);
    expect(encodeZeroRun({ disk: 1, start: 2, count: 3 })).toHaveLength(24);
    expect(encodeNack({ sequence: 9, reason: 1 })).toHaveLength(16);
    expect(encodeAck({ window: 1, sequences: [1, 2, 3] })).toHaveLength(8 + 24);
    expect(encodeBlock(block(Buffer.alloc(100)))[0]).toHaveLength(64);
  });

  it('writes the header fields at the spec offsets, little-endian', () => {
    const h = encodeHeader({ type: MessageType.block, flags: FLAG_RESEND, stream: 3, length: 1000, sequence: 2 ** 40 + 5 });
    expect(h.subarray(0, 4).toString('latin1')).toBe('BWDM');
    expect(h.readUInt32LE(0)).toBe(FRAME_MAGIC);
    expect(h[4]).toBe(1);
    expect(h[5]).toBe(4);
    expect(h.readUInt16LE(6)).toBe(2);
    expect(h.readUInt32LE(8)).toBe(3);
    expect(h.readUInt32LE(12)).toBe(1000);
    expect(h.readBigUInt64LE(16)).toBe(2n ** 40n + 5n);
    expect(h.readUInt32LE(24)).toBe(0);
    expect(h.readUInt32LE(28)).toBe(crc32c(h.subarray(0, 28)));
    expect(decodeHeader(h)).toEqual({ type: 4, flags: 2, stream: 3, length: 1000, sequence: 2 ** 40 + 5 });
  });

  it('writes the block header at the spec offsets', () => {
    const data = Buffer.from('hello block');
    const [h, d] = encodeBlock(block(data, 2 ** 33));
    expect(d).toBe(data);
    expect(h!.readUInt32LE(0)).toBe(2);
    expect(h!.readBigUInt64LE(8)).toBe(2n ** 33n);
    expect(h!.readUInt32LE(16)).toBe(data.length);
    expect(h!.readUInt32LE(20)).toBe(data.length);
    expect(h![24]).toBe(0);
    const zeroed = Buffer.from(h!);
    zeroed.writeUInt32LE(0, 28);
    expect(h!.readUInt32LE(28)).toBe(crc32c(Buffer.concat([zeroed, data])));
    expect(h!.subarray(32, 64)).toEqual(createHash('sha256').update(data).digest());
  });
});

describe('round trips', () => {
  it('block, zero run, ack, nack, control messages', () => {
    const data = Buffer.from('x'.repeat(4097));
    const b = block(data, 123456789);
    const { crc: _crc, crcValid, ...decoded } = decodeBlock(Buffer.concat(encodeBlock(b)));
    expect(crcValid).toBe(true);
    expect({ ...decoded, sha256: Buffer.from(decoded.sha256), data: Buffer.from(decoded.data) }).toEqual(b);
    expect(decodeZeroRun(encodeZeroRun({ disk: 4, start: 2 ** 50, count: 17 }))).toEqual({ disk: 4, start: 2 ** 50, count: 17 });
    expect(decodeAck(encodeAck({ window: 65536, sequences: [1, 5, 2 ** 45] }))).toEqual({ window: 65536, sequences: [1, 5, 2 ** 45] });
    expect(decodeNack(encodeNack({ sequence: 77, reason: 1 }))).toEqual({ sequence: 77, reason: 1 });
    const hello = { protocol: 1, role: 'send' as const, taskId: 't1', taskSecret: 'ab', sessionId: 'cd', streams: 5 };
    expect(decodeHello(encodeJson(hello))).toEqual(hello);
    const welcome = { sessionId: 's', window: 100, resumeWindowMs: 30000, durableBelow: 4, durable: [6, 9] };
    expect(decodeWelcome(encodeJson(welcome))).toEqual(welcome);
    expect(decodeOpenDisk(encodeJson({ disk: 0, name: 'vda', size: 10, blockSize: 4 }))).toEqual({ disk: 0, name: 'vda', size: 10, blockSize: 4 });
    expect(decodeEndDisk(encodeJson({ disk: 0, blocks: 1, zeroBlocks: 2, bytes: 3 }))).toEqual({ disk: 0, blocks: 1, zeroBlocks: 2, bytes: 3 });
  });

  it('the decoder reassembles frames split at every byte boundary', () => {
    const frames = [
      Buffer.concat(encodeFrame(MessageType.block, encodeBlock(block(Buffer.from('abcdefghij'))), { sequence: 1, stream: 2 })),
      Buffer.concat(encodeFrame(MessageType.keepalive, Buffer.alloc(0))),
      Buffer.concat(encodeFrame(MessageType.zeroRun, encodeZeroRun({ disk: 0, start: 1, count: 2 }), { sequence: 2 })),
    ];
    const all = Buffer.concat(frames);
    for (let cut = 0; cut <= all.length; cut++) {
      const d = new FrameDecoder();
      const got = [...d.push(all.subarray(0, cut)), ...d.push(all.subarray(cut))];
      expect(got.map((f) => f.type)).toEqual([4, 13, 5]);
      expect(got[0]!.stream).toBe(2);
      expect(decodeBlock(got[0]!.payload).data.toString()).toBe('abcdefghij');
      expect(d.bufferedBytes).toBe(0);
    }
  });
});

describe('rejects malformed input', () => {
  const good = encodeHeader({ type: 4, flags: 0, stream: 0, length: 64, sequence: 1 });
  it.each([
    ['magic', 0],
    ['version', 4],
    ['type', 5],
    ['length', 13],
    ['sequence', 17],
    ['reserved', 24],
    ['crc', 29],
  ])('a flipped %s byte fails the header CRC or a field check', (_name, offset) => {
    const bad = Buffer.from(good);
    bad[offset]! ^= 0x40;
    expect(() => decodeHeader(bad)).toThrow(BulwarkError);
  });

  it('a length beyond the maximum is refused before any allocation', () => {
    const h = Buffer.from(good);
    h.writeUInt32LE(MAX_PAYLOAD + 1, 12);
    h.writeUInt32LE(crc32c(h.subarray(0, 28)), 28);
    expect(() => decodeHeader(h)).toThrow(/exceeds/);
  });

  it('a block whose stored length disagrees with the payload is refused', () => {
    const [h, d] = encodeBlock(block(Buffer.from('abcd')));
    expect(() => decodeBlock(Buffer.concat([h!, d!, Buffer.from('x')]))).toThrow(/stored length/);
  });

  it('control payloads that are not the right JSON shape are refused', () => {
    expect(() => decodeHello(Buffer.from('{'))).toThrow(/not JSON/);
    expect(() => decodeHello(encodeJson({ protocol: 1, role: 'write' }))).toThrow(/role/);
    expect(() => decodeWelcome(encodeJson({ sessionId: 's', window: 1, resumeWindowMs: 1, durableBelow: 0, durable: ['x'] }))).toThrow(/durable/);
    expect(() => decodeOpenDisk(Buffer.from('[]'))).toThrow(/object/);
  });

  it('BEGIN_POINT: a reverse injection and a reverse chain\'s full are taken; other kinds and methods are refused', () => {
    const disks = [{ name: 'vda', size: 4096 }];
    expect(decodeBeginPoint(encodeJson({ kind: 'reverse', parent: 'p1', vmConfig: '', disks }))).toEqual({ kind: 'reverse', parent: 'p1', vmConfig: '', disks });
    expect(decodeBeginPoint(encodeJson({ kind: 'full', chainMethod: 'reverse', vmConfig: '', disks }))).toMatchObject({ kind: 'full', chainMethod: 'reverse' });
    expect(() => decodeBeginPoint(encodeJson({ kind: 'synthetic', vmConfig: '', disks }))).toThrow(/kind/);
    expect(() => decodeBeginPoint(encodeJson({ kind: 'full', chainMethod: 'sideways', vmConfig: '', disks }))).toThrow(/chainMethod/);
  });
});

describe('fuzz: random bytes produce frames or BulwarkErrors, never crashes or hangs', () => {
  const decoders = [decodeHello, decodeWelcome, decodeOpenDisk, decodeEndDisk, decodeBlock, decodeZeroRun, decodeAck, decodeNack];

  it('FrameDecoder on random byte streams', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 10 }), (chunks) => {
        const d = new FrameDecoder(4096);
        try {
          for (const c of chunks) d.push(Buffer.from(c));
        } catch (err) {
          expect(err).toBeInstanceOf(BulwarkError);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('valid frames with random bit flips', () => {
    const frame = Buffer.concat(encodeFrame(MessageType.block, encodeBlock(block(Buffer.from('payload-bytes'))), { sequence: 3 }));
    fc.assert(
      fc.property(fc.nat(frame.length * 8 - 1), fc.nat(frame.length), (bit, cut) => {
        const bad = Buffer.from(frame);
        bad[bit >> 3]! ^= 1 << (bit & 7);
        const d = new FrameDecoder();
        try {
          const frames = [...d.push(bad.subarray(0, cut)), ...d.push(bad.subarray(cut))];
          // A flip in the header is always caught by the header CRC; one in the payload reaches the
          // block decoder, which rejects it or reports a CRC mismatch (the receiver NACKs both).
          expect(bit >> 3).toBeGreaterThanOrEqual(FRAME_HEADER_SIZE);
          for (const f of frames) {
            try {
              expect(decodeBlock(f.payload).crcValid).toBe(false);
            } catch (err) {
              expect(err).toBeInstanceOf(BulwarkError);
            }
          }
        } catch (err) {
          expect(err).toBeInstanceOf(BulwarkError);
        }
      }),
      { numRuns: 3000 },
    );
  });

  it('payload decoders on random bytes', () => {
    fc.assert(
      fc.property(fc.nat(decoders.length - 1), fc.uint8Array({ maxLength: 300 }), (which, bytes) => {
        try {
          decoders[which]!(Buffer.from(bytes));
        } catch (err) {
          expect(err).toBeInstanceOf(BulwarkError);
        }
      }),
      { numRuns: 5000 },
    );
  });

  it('payload decoders on random JSON values', () => {
    fc.assert(
      fc.property(fc.nat(3), fc.jsonValue(), (which, value) => {
        try {
          decoders[which]!(Buffer.from(JSON.stringify(value) ?? 'null'));
        } catch (err) {
          expect(err).toBeInstanceOf(BulwarkError);
        }
      }),
      { numRuns: 3000 },
    );
  });
});
