// Test data for repository tests: offset-patterned blocks (every 8-byte word names its disk,
// version and byte offset, so a block read from the wrong place or shifted is caught) and a
// model of what each disk should read back as.
import { endianness } from 'node:os';
import type { DiskBlock } from '../disk/types.js';

const LITTLE_ENDIAN = endianness() === 'LE';

export function patterned(length: number, diskOffset: number, tag: number): Buffer {
  const b = Buffer.alloc(length);
  const t = (tag * 2654435761) >>> 0;
  if (LITTLE_ENDIAN && b.byteOffset % 4 === 0) {
    // Same bytes as the writeUInt32LE loop below, ~10x faster (kill tests build many of these).
    const u = new Uint32Array(b.buffer, b.byteOffset, Math.floor(length / 8) * 2);
    for (let i = 0, w = 0; w < u.length; i += 8, w += 2) {
      u[w] = (diskOffset + i) >>> 0;
      u[w + 1] = t;
    }
  } else {
    for (let i = 0; i + 8 <= length; i += 8) {
      b.writeUInt32LE((diskOffset + i) >>> 0, i);
      b.writeUInt32LE(t, i + 4);
    }
  }
  for (let i = length - (length % 8); i < length; i++) b[i] = (tag + i) & 0xff;
  // Text-like run so compression has something to do.
  if (length > 64) b.write('the quick brown fox '.repeat(2), 16, 'latin1');
  return b;
}

/** A disk model: the bytes it must read as, and the blocks written into a point. */
export class DiskModel {
  readonly bytes: Buffer;
  constructor(readonly size: number, readonly blockSize: number) {
    this.bytes = Buffer.alloc(size);
  }
  get blockCount(): number {
    return Math.ceil(this.size / this.blockSize);
  }
  lengthOf(i: number): number {
    return Math.min(this.blockSize, this.size - i * this.blockSize);
  }
  /** Applies changes and returns them as blocks (in order). kind: data (tag), zero, hole. */
  change(changes: Array<[number, 'data' | 'zero' | 'hole', number?]>): DiskBlock[] {
    const out: DiskBlock[] = [];
    for (const [i, kind, tag] of [...changes].sort((a, b) => a[0] - b[0])) {
      const off = i * this.blockSize;
      const len = this.lengthOf(i);
      if (kind === 'data') {
        const d = patterned(len, off, tag ?? i);
        d.copy(this.bytes, off);
        out.push({ index: i, data: d });
      } else {
        this.bytes.fill(0, off, off + len);
        out.push({ index: i, data: kind === 'zero' ? Buffer.alloc(len) : null });
      }
    }
    return out;
  }
}

export async function* iterate(blocks: DiskBlock[]): AsyncGenerator<DiskBlock> {
  for (const b of blocks) yield b;
}
