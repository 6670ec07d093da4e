// A committed restore point opened for reading: the chain of backup files from the point's own
// file down to its full (following `base`), and each disk as a RandomAccessDisk plus a sequential
// block stream. Blocks a file marks `inherit` are looked up in the next file of the chain.
import path from 'node:path';
import { BulwarkError } from '../common/errors.js';
import type { DiskBlock, Extent, ExtentKind, RandomAccessDisk } from '../disk/types.js';
import type { BlockEntry, Compression, PointKind, StoredBlockEntry } from '../format/index.js';
import { BackupFile, corrupt } from './backup-file.js';
import type { ChainKeys } from './chain-keys.js';
import { openConfig } from './chain-keys.js';

/** One restore point as listed from a `.vbm` (no backup file opened). */
export interface RestorePointInfo {
  readonly id: string;
  readonly job: string;
  readonly vm: string;
  readonly chainId: string;
  readonly method: 'forward' | 'reverse';
  readonly kind: PointKind;
  readonly time: Date;
  /** Absolute path of the point's own backup file. */
  readonly file: string;
  readonly fileBytes: number;
  /** Point whose file this one inherits from; null for a full. */
  readonly base: string | null;
  readonly disks: readonly { readonly name: string; readonly size: number }[];
  readonly blockSize: number;
  readonly compression: Compression;
  readonly encrypted: boolean;
  /** Commit-slot generation of the file at which this point is valid (absent: the highest). */
  readonly generation?: number;
  /** Other file ids an inheriting point may name as its base (docs/formats/backup-files.md §4). */
  readonly aliasFileIds?: readonly string[];
  /** File id the .vbm names for the point's file. */
  readonly fileId?: string;
  /**
   * What the last health check that read this point found damaged (the .vbm's damagedPoints):
   * metadata of a file of its chain, and/or blocks of these disks. Absent: no damage known.
   */
  readonly damage?: { readonly metadata: boolean; readonly disks: readonly string[] };
}

export type ResolvedBlock =
  | { readonly kind: 'hole' | 'zero'; readonly file: BackupFile }
  | { readonly kind: 'stored'; readonly file: BackupFile; readonly entry: StoredBlockEntry };

export interface OpenDiskOptions {
  /** Decoded blocks kept for random access; default 32 MiB. */
  readonly cacheBytes?: number;
  /** Blocks fetched ahead by stream() and in parallel by read(); default 8. */
  readonly parallel?: number;
}

export class RestorePoint {
  readonly info: RestorePointInfo;
  /** The VM configuration stored with the point (decrypted). */
  readonly vmConfig: Buffer;
  /** Files of the chain, the point's own first, its full last. */
  readonly files: readonly BackupFile[];
  readonly keys: ChainKeys | null;

  constructor(info: RestorePointInfo, files: readonly BackupFile[], keys: ChainKeys | null) {
    this.info = info;
    this.files = files;
    this.keys = keys;
    const top = files[0]!;
    try {
      this.vmConfig = openConfig(top.index.config, keys, top.aad);
    } catch (err) {
      throw corrupt(`damaged VM configuration in ${top.path}`, { file: top.path, point: info.id }, err);
    }
  }

  get disks(): readonly { name: string; size: number }[] {
    return this.files[0]!.index.disks.map((d) => ({ name: d.name, size: d.size }));
  }

  openDisk(name: string, opts: OpenDiskOptions = {}): RestorePointDisk {
    const d = this.files[0]!.disk(name);
    if (!d) {
      throw new BulwarkError(`restore point ${this.info.id} of VM ${this.info.vm} has no disk ${name}`, {
        kind: 'not-found',
        context: { point: this.info.id, disk: name, vm: this.info.vm },
        hint: `disks: ${this.disks.map((x) => x.name).join(', ')}`,
      });
    }
    return new RestorePointDisk(this, name, d.size, opts);
  }

  /** Resolves block `i` of disk `name` through the chain (inherit → next file). */
  async resolve(name: string, i: number): Promise<ResolvedBlock> {
    for (const file of this.files) {
      const e: BlockEntry = await file.entry(name, i);
      switch (e.kind) {
        case 'inherit':
          continue;
        case 'hole':
        case 'zero':
          return { kind: e.kind, file };
        case 'stored':
          return { kind: 'stored', file, entry: e };
      }
    }
    const last = this.files[this.files.length - 1]!;
    throw corrupt(`block ${i} of disk ${name} inherits past the full backup file ${last.path}`, { file: last.path, disk: name, block: i, point: this.info.id });
  }

  /**
   * Blocks `first` .. `first + count - 1` of disk `name` resolved through the chain, like
   * resolve(), but awaiting each table page once instead of once per block (sequential readers).
   */
  async resolveRange(name: string, first: number, count: number): Promise<ResolvedBlock[]> {
    const out = new Array<ResolvedBlock>(count);
    let open: number[] = Array.from({ length: count }, (_, k) => first + k);
    for (const file of this.files) {
      if (open.length === 0) break;
      const d = file.disk(name);
      const next: number[] = [];
      let pageNo = -1;
      let page: BlockEntry[] = [];
      for (const i of open) {
        if (!d || i >= d.blockCount) {
          out[i - first] = { kind: 'hole', file };
          continue;
        }
        const p = Math.floor(i / d.entriesPerPage);
        if (p !== pageNo) {
          page = await file.page(d, p);
          pageNo = p;
        }
        const e = page[i % d.entriesPerPage]!;
        switch (e.kind) {
          case 'inherit':
            next.push(i);
            break;
          case 'hole':
          case 'zero':
            out[i - first] = { kind: e.kind, file };
            break;
          case 'stored':
            out[i - first] = { kind: 'stored', file, entry: e };
            break;
        }
      }
      open = next;
    }
    if (open.length > 0) {
      const last = this.files[this.files.length - 1]!;
      throw corrupt(`block ${open[0]} of disk ${name} inherits past the full backup file ${last.path}`, { file: last.path, disk: name, block: open[0], point: this.info.id });
    }
    return out;
  }

  async close(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close()));
  }
}

export class RestorePointDisk implements RandomAccessDisk {
  readonly point: RestorePoint;
  readonly name: string;
  readonly size: number;
  readonly blockSize: number;
  readonly blockCount: number;
  readonly #parallel: number;
  readonly #cacheBlocks: number;
  readonly #cache = new Map<string, Promise<Buffer>>();

  constructor(point: RestorePoint, name: string, size: number, opts: OpenDiskOptions) {
    this.point = point;
    this.name = name;
    this.size = size;
    this.blockSize = point.files[0]!.header.blockSize;
    this.blockCount = Math.ceil(size / this.blockSize);
    this.#parallel = Math.max(1, opts.parallel ?? 8);
    this.#cacheBlocks = Math.max(1, Math.floor((opts.cacheBytes ?? 32 * 1024 * 1024) / this.blockSize));
  }

  #fetch(r: ResolvedBlock & { kind: 'stored' }, i: number): Promise<Buffer> {
    // The block's length must fit this disk's geometry: a block inherited from a point whose disk
    // was smaller is padded with zeroes (the disk grew: the new bytes read as zeroes); a longer
    // one is damage, never silently cut or passed on.
    const offset = i * this.blockSize;
    const expected = Math.min(this.blockSize, this.size - offset);
    if (r.entry.plainLength > expected) {
      return Promise.reject(
        corrupt(
          `damaged block table in ${path.basename(r.file.path)}: disk ${this.name}, block ${i} (disk offset ${offset}) holds ${r.entry.plainLength} bytes, more than the ${expected} the disk has there (restore point ${this.point.info.id})`,
          { file: r.file.path, disk: this.name, block: i, offset, point: this.point.info.id },
        ),
      );
    }
    return this.#read(r, i).then((data) => {
      if (data.length >= expected) return data;
      const padded = Buffer.alloc(expected);
      data.copy(padded);
      return padded;
    });
  }

  #read(r: ResolvedBlock & { kind: 'stored' }, i: number): Promise<Buffer> {
    return r.file.readBlock(r.entry, this.point.keys).catch((err: unknown) => {
      if (err instanceof BulwarkError) throw err;
      const offset = i * this.blockSize;
      throw corrupt(
        `damaged block in ${path.basename(r.file.path)}: disk ${this.name}, block ${i} (disk offset ${offset}), file offset ${r.entry.recordOffset}, restore point ${this.point.info.id}: ${(err as Error).message}`,
        { file: r.file.path, disk: this.name, block: i, offset, fileOffset: r.entry.recordOffset, point: this.point.info.id },
        err,
      );
    });
  }

  /** Plain data of block `i`, or null when it reads as zeroes. Cached when `cache` is set. */
  async block(i: number, cache = true): Promise<Buffer | null> {
    const r = await this.point.resolve(this.name, i);
    if (r.kind !== 'stored') return null;
    if (!cache) return this.#fetch(r, i);
    const key = `${r.file.header.fileId}:${r.entry.recordOffset}`;
    let hit = this.#cache.get(key);
    if (hit) {
      this.#cache.delete(key);
    } else {
      hit = this.#fetch(r, i);
      hit.catch(() => this.#cache.delete(key));
    }
    this.#cache.set(key, hit);
    while (this.#cache.size > this.#cacheBlocks) this.#cache.delete(this.#cache.keys().next().value!);
    return hit;
  }

  #checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new BulwarkError(`read of ${length} bytes at ${offset} is outside disk ${this.name} (${this.size} bytes)`, {
        kind: 'invalid',
        context: { disk: this.name, offset, length, point: this.point.info.id },
      });
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.#checkRange(offset, length);
    const out = Buffer.alloc(length);
    if (length === 0) return out;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + length - 1) / this.blockSize);
    let nextBlock = first;
    const worker = async () => {
      while (nextBlock <= last) {
        const i = nextBlock++;
        const data = await this.block(i);
        if (!data) continue;
        const blockStart = i * this.blockSize;
        const from = Math.max(offset, blockStart);
        const to = Math.min(offset + length, blockStart + data.length);
        data.copy(out, from - offset, from - blockStart, to - blockStart);
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.#parallel, last - first + 1) }, worker));
    return out;
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    this.#checkRange(offset, length);
    const out: Extent[] = [];
    if (length === 0) return out;
    const end = offset + length;
    for (let i = Math.floor(offset / this.blockSize); i * this.blockSize < end; i++) {
      const r = await this.point.resolve(this.name, i);
      const kind: ExtentKind = r.kind === 'stored' ? 'data' : r.kind;
      const from = Math.max(offset, i * this.blockSize);
      const to = Math.min(end, (i + 1) * this.blockSize);
      const prev = out[out.length - 1];
      if (prev && prev.kind === kind && prev.offset + prev.length === from) out[out.length - 1] = { offset: prev.offset, length: to - prev.offset, kind };
      else out.push({ offset: from, length: to - from, kind });
    }
    return out;
  }

  /** Every block in order (data null for zero and hole blocks), reading ahead in parallel. */
  async *stream(): AsyncGenerator<DiskBlock> {
    const ahead: Promise<Buffer | null>[] = [];
    let next = 0;
    try {
      for (let i = 0; i < this.blockCount; i++) {
        while (next < this.blockCount && ahead.length < this.#parallel) {
          const p = this.block(next++, false);
          p.catch(() => undefined);
          ahead.push(p);
        }
        yield { index: i, data: await ahead.shift()! };
      }
    } finally {
      await Promise.allSettled(ahead);
    }
  }

  async close(): Promise<void> {
    this.#cache.clear();
  }
}
