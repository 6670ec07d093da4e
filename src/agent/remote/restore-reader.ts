// Both ends of reading a restore point across agents (docs/formats/agent-link.md, "Restore
// tasks"): on the repository's agent, `pointRestoreSource` serves a point's disks to data-mover
// reader streams (decoded blocks, data-mover-protocol.md §5); on the agent of the host a VM goes
// to, `RemotePoint` reads them — whole disks into files for a full VM restore (VmPointSource), or
// block ranges on demand for instant recovery's NBD exports (InstantPointSource).
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, rm } from 'node:fs/promises';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { BulwarkError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { RandomAccessDisk } from '../../disk/types.js';
import type { Repository } from '../../repository/index.js';
import { assertImageTarget, placeRestoredImage } from '../../restore/disk/index.js';
import type { InstantPointSource } from '../../restore/instant/index.js';
import type { PointDiskWrite, VmPointSource, WrittenDisk } from '../../restore/vm/index.js';
import { TransferReader, type RestoreSource, type TlsIdentity } from '../../transport/index.js';
import type { OpenDiskMessage, ReceivedBlockMessage } from '../../transport/frame.js';
import type { WireRestoreSource } from '../../transport/restore-tasks.js';

const log = logger('restore-reader');

/** One reader stream's view of a point in a repository here: every block decoded, sent uncompressed. */
export async function pointRestoreSource(repository: Repository, pointId: string, password: string | undefined): Promise<RestoreSource> {
  const point = await repository.openRestorePoint(pointId, password === undefined ? {} : { password });
  const blockSize = point.files[0]!.header.blockSize;
  const disks: OpenDiskMessage[] = point.disks.map((d, disk) => ({ disk, name: d.name, size: d.size, blockSize }));
  const opened = point.disks.map((d) => point.openDisk(d.name, { cacheBytes: 0 }));
  return {
    disks,
    async readBlock(disk, index) {
      const d = opened[disk];
      if (!d) throw new BulwarkError(`restore point ${pointId} has no disk ${disk}`, { kind: 'not-found', context: { point: pointId } });
      const data = await d.block(index, false);
      if (data === null) return null;
      return { index, plainLength: data.length, compression: 'none', sha256: createHash('sha256').update(data).digest(), data };
    },
    close: () => point.close(),
  };
}

function plain(b: ReceivedBlockMessage, what: string): Buffer {
  if (b.compression !== 'none') {
    throw new BulwarkError(`the repository agent sent block ${b.index} of ${what} compressed (${b.compression}); restore streams carry decoded blocks`, { kind: 'invalid' });
  }
  return b.data;
}

/** A restore point on another agent, read over the data-mover protocol. */
export class RemotePoint implements VmPointSource, InstantPointSource {
  readonly pointId: string;
  readonly vm: string;
  readonly config: Buffer;
  readonly disks: readonly { readonly name: string; readonly size: number }[];
  readonly #reader: TransferReader;
  readonly #source: Extract<WireRestoreSource, { kind: 'agent' }>;
  /** readBlocks runs one call at a time per reader. */
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(pointId: string, source: Extract<WireRestoreSource, { kind: 'agent' }>, reader: TransferReader) {
    this.pointId = pointId;
    this.vm = source.vm;
    this.config = Buffer.from(source.config, 'base64');
    this.disks = source.disks.map((d) => ({ name: d.name, size: d.size }));
    this.#reader = reader;
    this.#source = source;
  }

  /** Connects the reader streams to the repository agent's restore-serve task. */
  static async open(pointId: string, source: Extract<WireRestoreSource, { kind: 'agent' }>, tls: TlsIdentity, streams?: number): Promise<RemotePoint> {
    let reader: TransferReader;
    try {
      reader = await TransferReader.open({
        target: { host: source.host, port: source.port, servername: source.agent },
        tls,
        taskId: source.transferId,
        taskSecret: source.secret,
        streams: source.streams ?? streams ?? 4,
      });
    } catch (err) {
      throw new BulwarkError(`could not read restore point ${pointId} from repository agent ${source.agent} at ${source.host}:${source.port}`, {
        kind: err instanceof BulwarkError ? err.kind : 'unavailable',
        cause: err,
        context: { point: pointId, agent: source.agent },
        hint: 'the repository agent must be reachable from this host on its data-mover port (--data-listen)',
      });
    }
    return new RemotePoint(pointId, source, reader);
  }

  #disk(name: string): OpenDiskMessage {
    const d = this.#reader.disks.find((x) => x.name === name);
    if (!d) {
      throw new BulwarkError(`restore point ${this.pointId} has no disk ${name}`, { kind: 'not-found', context: { point: this.pointId, disk: name }, hint: `disks: ${this.disks.map((x) => x.name).join(', ')}` });
    }
    return d;
  }

  /** Runs `fn` after every earlier read of this reader. */
  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.#queue.then(fn, fn);
    this.#queue = next.catch(() => undefined);
    return next;
  }

  async describe(): Promise<{ config: Buffer; disks: readonly { name: string; size: number }[] }> {
    return { config: this.config, disks: this.disks };
  }

  /** Writes a whole disk: a sparse raw file (qcow2 converted from it), its SHA-256 read back when asked (`digest`). */
  async writeDisk(w: PointDiskWrite): Promise<WrittenDisk> {
    const d = this.#disk(w.disk);
    const target = path.resolve(w.to);
    await assertImageTarget(target, w.overwrite);
    const tag = `.bulwark-restore-${process.pid}-${Date.now()}`;
    const rawTmp = `${target}${tag}.raw`;
    const outTmp = `${target}${tag}.${w.format}`;
    const what = `disk ${w.disk} of restore point ${this.pointId}`;
    try {
      const fh = await open(rawTmp, 'wx+', 0o600);
      try {
        await fh.truncate(d.size);
        let done = 0;
        const advance = (bytes: number): void => {
          done += bytes;
          w.onProgress?.(Math.min(done, d.size));
        };
        await this.#serial(() =>
          this.#reader.readDisk(d.disk, {
            block: async (b) => {
              w.signal?.throwIfAborted();
              const data = plain(b, what);
              await fh.write(data, 0, data.length, b.index * d.blockSize);
              advance(d.blockSize);
            },
            zeroRun: async (r) => advance(r.count * d.blockSize),
          }),
        );
        await fh.datasync();
      } finally {
        await fh.close();
      }
      let sha256: string | undefined;
      if (w.digest === true) {
        const hash = createHash('sha256');
        await pipeline(createReadStream(rawTmp), hash);
        sha256 = hash.digest('hex');
      }
      await placeRestoredImage({ rawTmp, outTmp, target, format: w.format, overwrite: w.overwrite });
      log.info({ point: this.pointId, disk: w.disk, path: target, from: this.#source.agent }, 'disk restored from a repository agent');
      return { path: target, format: w.format, size: d.size, ...(sha256 !== undefined ? { sha256 } : {}) };
    } catch (err) {
      await rm(rawTmp, { force: true });
      await rm(outTmp, { force: true });
      throw err;
    }
  }

  /**
   * A disk read on demand (instant recovery): the blocks a read needs that are not among the last
   * `cacheBlocks` fetched are asked from the repository agent in one range (whole repository
   * blocks: a 4 MiB block is fetched once, not once per 1 MiB piece the NBD cache asks for).
   */
  openDisk(name: string, cacheBlocks = 16): RandomAccessDisk {
    const d = this.#disk(name);
    const bs = d.blockSize;
    const what = `disk ${name} of restore point ${this.pointId}`;
    /** Block index -> data (null: zeroes), in LRU order. */
    const cache = new Map<number, Buffer | null>();
    const keep = (index: number, data: Buffer | null): void => {
      cache.delete(index);
      cache.set(index, data);
      while (cache.size > Math.max(1, cacheBlocks)) cache.delete(cache.keys().next().value!);
    };
    return {
      size: d.size,
      read: async (offset, length) => {
        if (offset < 0 || length < 0 || offset + length > d.size) {
          throw new BulwarkError(`read of ${length} bytes at ${offset} is outside ${what} (${d.size} bytes)`, { kind: 'invalid', context: { disk: name, offset, length } });
        }
        const out = Buffer.alloc(length);
        if (length === 0) return out;
        const first = Math.floor(offset / bs);
        const last = Math.floor((offset + length - 1) / bs);
        const missing: number[] = [];
        for (let i = first; i <= last; i++) if (!cache.has(i)) missing.push(i);
        const got = new Map<number, Buffer | null>();
        if (missing.length > 0) {
          const from = missing[0]!;
          const to = missing[missing.length - 1]!;
          await this.#serial(() =>
            this.#reader.readBlocks(d.disk, from, to - from + 1, {
              block: async (b) => void got.set(b.index, plain(b, what)),
              zeroRun: async (r) => {
                for (let i = r.start; i < r.start + r.count; i++) got.set(i, null);
              },
            }),
          );
          for (const [i, data] of got) keep(i, data);
        }
        for (let i = first; i <= last; i++) {
          const data = got.has(i) ? got.get(i) : cache.get(i);
          if (data === undefined) throw new BulwarkError(`block ${i} of ${what} did not arrive`, { kind: 'internal', context: { disk: name, block: i } });
          if (data === null) continue;
          keep(i, data);
          const start = i * bs;
          const lo = Math.max(offset, start);
          const hi = Math.min(offset + length, start + data.length);
          if (hi > lo) data.copy(out, lo - offset, lo - start, hi - start);
        }
        return out;
      },
      close: async () => undefined,
    };
  }

  async close(): Promise<void> {
    this.#reader.close();
  }
}
