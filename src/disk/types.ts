// The shapes in which disk data moves between Bulwark's parts: a disk read at random offsets
// (an NBD export, a restore point in a repository, an image file), its allocation map, and the
// fixed-size blocks that stream from a source to a repository.

/** How a byte range of a disk is backed, as NBD's base:allocation reports it. */
export type ExtentKind = 'data' | 'zero' | 'hole';

export interface Extent {
  readonly offset: number;
  readonly length: number;
  /** data: must be read; zero: reads as zeroes (allocated or not); hole: unallocated, reads as zeroes. */
  readonly kind: ExtentKind;
}

/** A disk that can be read at any offset: an NBD export, a restore point, an image file. */
export interface RandomAccessDisk {
  /** Virtual size in bytes (not necessarily a multiple of any block size). */
  readonly size: number;
  /** Reads exactly `length` bytes at `offset`; offset + length must not pass `size`. */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * The allocation map of [offset, offset + length), in order and without gaps. Optional: a disk
   * that does not know its allocation reports the whole range as data.
   */
  extents?(offset: number, length: number): Promise<Extent[]>;
  close(): Promise<void>;
}

/** One fixed-size block of a disk on its way from a source to a repository. */
export interface DiskBlock {
  /** Block number: byte offset / block size. */
  readonly index: number;
  /**
   * Plain data: blockSize bytes, fewer only for the last block of a disk whose size is not a
   * multiple of the block size. null: the block reads as zeroes (zero or unallocated).
   */
  readonly data: Buffer | null;
  /**
   * The SHA-256 of `data` as the block's source computed it, when the block crossed the network
   * (docs/formats/data-mover-protocol.md §3): the repository writer checks it against the digest
   * it computes itself (checkSourceDigest).
   */
  readonly sha256?: Buffer | undefined;
}
