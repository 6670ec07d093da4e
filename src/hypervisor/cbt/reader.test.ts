import { describe, expect, it } from 'vitest';
import type { DiskBlock, Extent } from '../../disk/types.js';
import type { DirtyExtent } from '../nbd/client.js';
import { ChangedBlockReader, defaultConcurrency, planBlocks, type BlockSource } from './reader.js';

const K = 1024;

/** An in-memory disk with a given allocation map and dirty map; records every read. */
class FakeSource implements BlockSource {
  readonly reads: Array<[number, number]> = [];
  constructor(
    readonly bytes: Buffer,
    readonly allocation: Extent[],
    readonly dirty: DirtyExtent[],
    readonly failAt?: number,
  ) {}
  get size(): number {
    return this.bytes.length;
  }
  async readInto(offset: number, target: Buffer): Promise<Buffer> {
    await new Promise((r) => setTimeout(r, Math.random() * 3));
    if (this.failAt !== undefined && offset <= this.failAt && this.failAt < offset + target.length) throw new Error(`read failed at ${offset}`);
    this.reads.push([offset, target.length]);
    this.bytes.copy(target, 0, offset, offset + target.length);
    return target;
  }
  async extents(offset: number, length: number): Promise<Extent[]> {
    return clip(this.allocation, offset, length);
  }
  async dirtyExtents(_context: string, offset: number, length: number): Promise<DirtyExtent[]> {
    return clip(this.dirty, offset, length);
  }
}

function clip<T extends { offset: number; length: number }>(list: T[], offset: number, length: number): T[] {
  return list
    .filter((e) => e.offset < offset + length && e.offset + e.length > offset)
    .map((e) => {
      const s = Math.max(e.offset, offset);
      const t = Math.min(e.offset + e.length, offset + length);
      return { ...e, offset: s, length: t - s };
    });
}

/** A disk of `size` bytes whose data extents hold an offset pattern, zero elsewhere. */
function diskWith(size: number, allocation: Extent[]): Buffer {
  const b = Buffer.alloc(size);
  for (const e of allocation) if (e.kind === 'data') for (let i = e.offset; i < e.offset + e.length; i++) b[i] = ((i * 7) >>> 3) & 0xff || 1;
  return b;
}

async function collect(it: AsyncIterable<DiskBlock>): Promise<DiskBlock[]> {
  const out: DiskBlock[] = [];
  for await (const b of it) out.push(b);
  return out;
}

describe('planBlocks', () => {
  const alloc: Extent[] = [
    { offset: 0, length: 10 * K, kind: 'data' },
    { offset: 10 * K, length: 54 * K, kind: 'hole' },
    { offset: 64 * K, length: 64 * K, kind: 'zero' },
    { offset: 128 * K, length: 8 * K, kind: 'data' },
    { offset: 136 * K, length: 120 * K + 100, kind: 'hole' },
  ];
  it('full: only blocks holding data, with their data ranges', () => {
    const plans = planBlocks(64 * K, 0, 256 * K + 100, alloc, null);
    expect(plans).toEqual([
      { index: 0, offset: 0, length: 64 * K, data: [[0, 10 * K]] },
      { index: 2, offset: 128 * K, length: 64 * K, data: [[0, 8 * K]] },
    ]);
  });
  it('incremental: dirty blocks only; dirty blocks without data plan zeroes; the short last block', () => {
    const dirty: DirtyExtent[] = [
      { offset: 0, length: 64 * K, dirty: false },
      { offset: 64 * K, length: 64 * K, dirty: true },
      { offset: 128 * K, length: 128 * K, dirty: false },
      { offset: 256 * K, length: 100, dirty: true },
    ];
    const plans = planBlocks(64 * K, 0, 256 * K + 100, alloc, dirty);
    expect(plans).toEqual([
      { index: 1, offset: 64 * K, length: 64 * K, data: [] },
      { index: 4, offset: 256 * K, length: 100, data: [] },
    ]);
  });
  it('merges touching data extents inside a block', () => {
    const a: Extent[] = [
      { offset: 0, length: 4 * K, kind: 'data' },
      { offset: 4 * K, length: 4 * K, kind: 'data' },
      { offset: 8 * K, length: 4 * K, kind: 'zero' },
      { offset: 12 * K, length: 4 * K, kind: 'data' },
    ];
    expect(planBlocks(16 * K, 0, 16 * K, a, null)[0]!.data).toEqual([
      [0, 8 * K],
      [12 * K, 4 * K],
    ]);
  });
});

describe('ChangedBlockReader', () => {
  const size = 5 * 1024 * K + 4097; // unaligned
  const alloc: Extent[] = [
    { offset: 0, length: 300 * K, kind: 'data' },
    { offset: 300 * K, length: 900 * K, kind: 'hole' },
    { offset: 1200 * K, length: 64 * K, kind: 'zero' },
    { offset: 1264 * K, length: 1000 * K, kind: 'data' },
    { offset: 2264 * K, length: 2000 * K, kind: 'hole' },
    { offset: 4264 * K, length: size - 4264 * K, kind: 'data' },
  ];
  const bytes = diskWith(size, alloc);

  it('full read yields every block with data, byte-exact, and never reads zero or unallocated extents', async () => {
    const src = new FakeSource(bytes, alloc, []);
    const reader = new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, { blockSize: 256 * K, mapWindow: 1024 * K, concurrency: 3 });
    const blocks = await collect(reader.blocks());
    const image = Buffer.alloc(size);
    let last = -1;
    for (const b of blocks) {
      expect(b.index).toBeGreaterThan(last);
      last = b.index;
      expect(b.data).not.toBeNull();
      b.data!.copy(image, b.index * 256 * K);
    }
    expect(image.equals(bytes)).toBe(true);
    for (const [off, len] of src.reads) {
      for (const e of alloc) if (e.kind !== 'data') expect(off + len <= e.offset || off >= e.offset + e.length).toBe(true);
    }
    expect(reader.stats.bytesRead).toBe(alloc.filter((e) => e.kind === 'data').reduce((n, e) => n + e.length, 0));
    expect(blocks[blocks.length - 1]!.data!.length).toBe(size % (256 * K));
  });

  it('incremental yields dirty blocks only: data read, zero/unallocated ones as null', async () => {
    const dirty: DirtyExtent[] = [
      { offset: 0, length: 64 * K, dirty: true }, // data
      { offset: 64 * K, length: 576 * K, dirty: false },
      { offset: 640 * K, length: 64 * K, dirty: true }, // hole
      { offset: 704 * K, length: 1600 * K, dirty: false },
      { offset: 2304 * K, length: 64 * K, dirty: true }, // hole
      { offset: 2368 * K, length: size - 2368 * K - 64, dirty: false },
      { offset: size - 64, length: 64, dirty: true }, // last, short block
    ];
    const src = new FakeSource(bytes, alloc, dirty);
    const reader = new ChangedBlockReader(src, { kind: 'bitmap', bitmap: 'b', context: 'qemu:dirty-bitmap:b' }, { blockSize: 256 * K, mapWindow: 512 * K });
    const blocks = await collect(reader.blocks());
    expect(blocks.map((b) => [b.index, b.data === null])).toEqual([
      [0, false],
      [2, true],
      [9, true],
      [20, false],
    ]);
    expect(blocks[0]!.data!.equals(bytes.subarray(0, 256 * K))).toBe(true);
    expect(blocks[3]!.data!.equals(bytes.subarray(20 * 256 * K))).toBe(true);
    expect(reader.stats.zeroBlocks).toBe(2);
  });

  it('attaches SHA-256 digests when the changes ask the target to compare them', async () => {
    const { createHash } = await import('node:crypto');
    const src = new FakeSource(bytes, alloc, []);
    const withDigests = new ChangedBlockReader(src, { kind: 'full', reason: 'bitmap-missing', detail: '', compareDigests: true }, { blockSize: 256 * K });
    const blocks = await collect(withDigests.blocks());
    expect(blocks.length).toBeGreaterThan(0);
    for (const b of blocks) expect((b as { digest?: Buffer }).digest).toEqual(createHash('sha256').update(b.data!).digest());
    const plain = new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, { blockSize: 256 * K });
    for (const b of await collect(plain.blocks())) expect((b as { digest?: Buffer }).digest).toBeUndefined();
  });

  it.each([
    [64 * K, 64],
    [256 * K, 16],
    [1024 * K, 8],
    [4096 * K, 8],
  ])('by default keeps 4 MiB of %i-byte blocks in flight (at least 8 blocks): %i reads at once', async (blockSize, expected) => {
    expect(defaultConcurrency(blockSize)).toBe(expected);
    // A source that answers nothing until `expected` reads are waiting (then everything at once):
    // the reader must issue that many without waiting for the first; never more.
    const blocks = expected + 4;
    const waiting: Array<() => void> = [];
    let open = true;
    let most = 0;
    const src: BlockSource = {
      size: blocks * blockSize,
      readInto: async (_offset, target) => {
        if (open) {
          const go = new Promise<void>((r) => waiting.push(r));
          most = Math.max(most, waiting.length);
          if (waiting.length >= expected) {
            open = false;
            for (const w of waiting.splice(0)) w();
          }
          await go;
        }
        return target;
      },
      extents: async (offset, length) => [{ offset, length, kind: 'data' }],
      dirtyExtents: async () => [],
    };
    const reader = new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, { blockSize, reuseBuffers: true });
    let n = 0;
    for await (const b of reader.blocks()) expect(b.index).toBe(n++);
    expect(n).toBe(blocks);
    expect(most).toBe(expected);
  });

  it('a failed read fails the iteration after the other reads settle', async () => {
    const src = new FakeSource(bytes, alloc, [], 1300 * K);
    const reader = new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, { blockSize: 64 * K, concurrency: 4 });
    await expect(collect(reader.blocks())).rejects.toThrow(/read failed/);
  });

  it('reuseBuffers: a ring of at most `concurrency` buffers; every block right when copied before the next is asked for', async () => {
    const src = new FakeSource(bytes, alloc, []);
    // Partial blocks (data and holes in one block) too: a reused buffer must not keep old bytes.
    const reader = new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, {
      blockSize: 192 * K,
      mapWindow: 768 * K,
      concurrency: 3,
      reuseBuffers: true,
    });
    const image = Buffer.alloc(size);
    const backing = new Set<ArrayBufferLike>();
    let blocks = 0;
    for await (const b of reader.blocks()) {
      backing.add(b.data!.buffer);
      b.data!.copy(image, b.index * 192 * K);
      blocks++;
    }
    expect(image.equals(bytes)).toBe(true);
    expect(blocks).toBeGreaterThan(6);
    expect(backing.size).toBeLessThanOrEqual(3);
    // Held across next(): the buffer is overwritten (why the option is only for copying consumers).
    const held: DiskBlock[] = [];
    const again = new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, { blockSize: 192 * K, concurrency: 2, reuseBuffers: true });
    for await (const b of again.blocks()) held.push(b);
    expect(new Set(held.map((b) => b.data!.buffer)).size).toBeLessThanOrEqual(2);
  });

  /** A consumer's pool of `n` block buffers: take() waits for a free one, as the writer's slots do. */
  class Lender {
    readonly free: Buffer[];
    readonly all: Buffer[];
    readonly waiters: Array<(b: Buffer) => void> = [];
    maxOut = 0;
    constructor(n: number, blockSize: number) {
      this.all = Array.from({ length: n }, () => Buffer.alloc(blockSize, 0xee));
      this.free = [...this.all];
    }
    async take(): Promise<Buffer> {
      const b = this.free.pop() ?? (await new Promise<Buffer>((r) => this.waiters.push(r)));
      this.maxOut = Math.max(this.maxOut, this.all.length - this.free.length);
      return b;
    }
    /** The lent buffer `b` is (a view from the start of). */
    whole(b: Buffer): Buffer | undefined {
      return this.all.find((x) => x.buffer === b.buffer && x.byteOffset === b.byteOffset);
    }
    giveBack(view: Buffer): void {
      const b = this.whole(view);
      if (!b || this.free.includes(b)) throw new Error('not a lent buffer');
      const w = this.waiters.shift();
      if (w) w(b);
      else this.free.push(b);
    }
  }

  it('lend: reads straight into the consumer\'s buffers, which it keeps and returns later; all come back on a failure', async () => {
    const bs = 192 * K;
    const lender = new Lender(4, bs);
    const src = new FakeSource(bytes, alloc, []);
    const reader = new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, {
      blockSize: bs,
      mapWindow: 768 * K,
      concurrency: 3,
      lend: { take: () => lender.take(), giveBack: (b) => lender.giveBack(b) },
    });
    const image = Buffer.alloc(size);
    const held: Buffer[] = [];
    for await (const b of reader.blocks()) {
      // The buffer is a view from the start of a lent one; the consumer keeps it a while (an
      // encoder), so the reader must not touch it: copy late, then give it back.
      expect(lender.whole(b.data!)).toBeDefined();
      held.push(b.data!);
      if (held.length === 2) {
        const old = held.shift()!;
        await new Promise((r) => setTimeout(r, 2));
        lender.giveBack(old);
      }
      b.data!.copy(image, b.index * bs);
    }
    expect(image.equals(bytes)).toBe(true);
    expect(lender.maxOut).toBeLessThanOrEqual(4);

    // A failed read: the iteration fails and every buffer not yielded goes back.
    const lender2 = new Lender(5, 64 * K);
    const failing = new ChangedBlockReader(new FakeSource(bytes, alloc, [], 1300 * K), { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, {
      blockSize: 64 * K,
      concurrency: 4,
      lend: { take: () => lender2.take(), giveBack: (b) => lender2.giveBack(b) },
    });
    let yielded = 0;
    await expect(
      (async () => {
        for await (const b of failing.blocks()) {
          yielded++;
          lender2.giveBack(b.data!);
        }
      })(),
    ).rejects.toThrow(/read failed/);
    expect(yielded).toBeGreaterThan(0);
    expect(lender2.free.length).toBe(5);

    // A consumer that stops while the reader waits for a buffer: the buffer lent later goes back too.
    const lender3 = new Lender(2, 64 * K);
    const stopping = new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, {
      blockSize: 64 * K,
      concurrency: 4,
      lend: { take: () => lender3.take(), giveBack: (b) => lender3.giveBack(b) },
    });
    let kept: Buffer | null = null;
    for await (const b of stopping.blocks()) {
      kept = b.data!; // the consumer keeps it: the reader now waits for a buffer
      break;
    }
    await new Promise((r) => setImmediate(r));
    expect(lender3.free.length).toBe(1); // all but the one the consumer kept
    lender3.giveBack(kept!);
    expect(lender3.free.length).toBe(2);
    expect(lender3.waiters.length).toBe(0);
  });

  it('the position (bytesMapped) advances with each yielded block, not with the mapped window, for a disk smaller than the window', async () => {
    // The default window (1 GiB) covers the whole disk: mapped at once, read block by block.
    for (const [label, changes, dirty, concurrency] of [
      ['full', { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, [], 3],
      ['incremental', { kind: 'bitmap', bitmap: 'b', context: 'qemu:dirty-bitmap:b' }, [{ offset: 0, length: 2 * 1024 * K, dirty: true }, { offset: 2 * 1024 * K, length: size - 2 * 1024 * K, dirty: false }], 1],
    ] as const) {
      const reader = new ChangedBlockReader(new FakeSource(bytes, alloc, [...dirty]), changes, { blockSize: 256 * K, concurrency });
      const seen: Array<[number, number]> = [];
      for await (const b of reader.blocks()) seen.push([b.index, reader.stats.bytesMapped]);
      expect(seen.length, label).toBeGreaterThan(2);
      // Each block is counted as passed when it is handed on: up to its end, never the window's.
      for (const [index, mapped] of seen) expect(mapped, `${label} block ${index}`).toBe(Math.min((index + 1) * 256 * K, size));
      expect(seen[0]![1], label).toBeLessThan(size / 4);
      expect(reader.stats.bytesMapped, label).toBe(size);
    }
  });

  it('the position passes clean windows of an incremental and reaches the disk size', async () => {
    // Windows of 1 MiB; only the first 64 KiB is dirty: the position moves on without a block.
    const dirty: DirtyExtent[] = [{ offset: 0, length: 64 * K, dirty: true }, { offset: 64 * K, length: size - 64 * K, dirty: false }];
    const reader = new ChangedBlockReader(new FakeSource(bytes, alloc, dirty), { kind: 'bitmap', bitmap: 'b', context: 'qemu:dirty-bitmap:b' }, { blockSize: 256 * K, mapWindow: 1024 * K });
    const seen: number[] = [];
    for await (const b of reader.blocks()) seen.push(b.index, reader.stats.bytesMapped);
    expect(seen).toEqual([0, 256 * K]);
    expect(reader.stats.bytesMapped).toBe(size);
  });

  it('rejects a block size that is not a multiple of 512', () => {
    const src = new FakeSource(bytes, alloc, []);
    expect(() => new ChangedBlockReader(src, { kind: 'full', reason: 'no-checkpoint', detail: '', compareDigests: false }, { blockSize: 1000 })).toThrow(/multiple of 512/);
  });
});
