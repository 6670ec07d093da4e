// Fixtures for transport tests: throwaway mutual-TLS certificates (openssl), a TCP relay that a
// test can cut, a disk image with an offset pattern and zero holes, and an in-memory sink.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { DiskBlock } from '../../src/disk/types.js';
import type { TlsIdentity } from '../../src/transport/connection.js';
import type { TransferSink } from '../../src/transport/receiver.js';
import type { EndDiskMessage, OpenDiskMessage, ReceivedBlockMessage, ZeroRunMessage } from '../../src/transport/frame.js';

export interface TestPki {
  target: TlsIdentity;
  source: TlsIdentity;
  /** A client identity from a different CA: must be refused. */
  stranger: TlsIdentity;
}

/** A CA, a target and a source agent certificate (SAN: localhost, 127.0.0.1 and `ips`). */
export function makePki(ips: string[] = []): TestPki {
  const dir = mkdtempSync(path.join(tmpdir(), 'bulwark-pki-'));
  try {
    const ssl = (...args: string[]): void => {
      execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
    };
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
    const ca = (name: string): void => ssl('req', '-x509', ...ec, '-keyout', `${name}.key`, '-out', `${name}.crt`, '-days', '2', '-subj', `/CN=${name}`);
    const san = ['DNS:localhost', 'IP:127.0.0.1', ...ips.map((ip) => `IP:${ip}`)].join(',');
    writeFileSync(path.join(dir, 'ext.cnf'), `subjectAltName=${san}\nextendedKeyUsage=serverAuth,clientAuth\n`);
    const leaf = (name: string, caName: string): TlsIdentity => {
      ssl('req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
      ssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${caName}.crt`, '-CAkey', `${caName}.key`, '-CAcreateserial', '-out', `${name}.crt`, '-days', '2', '-extfile', 'ext.cnf');
      const read = (f: string): string => readFileSync(path.join(dir, f), 'utf8');
      return { key: read(`${name}.key`), cert: read(`${name}.crt`), ca: read('server-ca.crt') };
    };
    ca('server-ca');
    ca('other-ca');
    return { target: leaf('target-agent', 'server-ca'), source: leaf('source-agent', 'server-ca'), stranger: leaf('stranger', 'other-ca') };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A TCP relay in front of a port: tests cut its connections and refuse new ones to simulate outages. */
export class Relay {
  readonly #server: net.Server;
  readonly pairs = new Set<[net.Socket, net.Socket]>();
  refuse = false;

  private constructor(target: { host: string; port: number }) {
    this.#server = net.createServer((client) => {
      if (this.refuse) {
        client.destroy();
        return;
      }
      const upstream = net.connect(target.port, target.host);
      const pair: [net.Socket, net.Socket] = [client, upstream];
      this.pairs.add(pair);
      const end = (): void => {
        client.destroy();
        upstream.destroy();
        this.pairs.delete(pair);
      };
      client.on('error', end).on('close', end);
      upstream.on('error', end).on('close', end);
      client.pipe(upstream);
      upstream.pipe(client);
    });
  }

  static async start(target: { host: string; port: number }): Promise<Relay> {
    const r = new Relay(target);
    await new Promise<void>((resolve) => r.#server.listen(0, '127.0.0.1', resolve));
    return r;
  }

  get port(): number {
    return (this.#server.address() as net.AddressInfo).port;
  }

  /** Cuts `count` live connections (both directions, at once). */
  cut(count = Infinity): number {
    let n = 0;
    for (const [a, b] of [...this.pairs]) {
      if (n >= count) break;
      n++;
      a.destroy();
      b.destroy();
    }
    return n;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}

/** Bytes of a test disk: each 8-byte word holds its own offset (off-by-one errors show), with zero blocks. */
export function patternDisk(size: number, blockSize: number, zeroEvery = 7): Buffer {
  const buf = Buffer.alloc(size);
  for (let off = 0; off + 8 <= size; off += 8) {
    if (Math.floor(off / blockSize) % zeroEvery === 3) continue;
    buf.writeBigUInt64LE(BigInt(off) * 2654435761n + 1n & 0xffffffffffffffffn, off);
  }
  return buf;
}

export async function* diskBlocks(image: Buffer, blockSize: number): AsyncGenerator<DiskBlock> {
  for (let index = 0; index * blockSize < image.length; index++) {
    const data = image.subarray(index * blockSize, Math.min(image.length, (index + 1) * blockSize));
    yield { index, data: data.every((b) => b === 0) ? null : Buffer.from(data) };
  }
}

export function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** A sink that rebuilds the disk in memory; `delay` (awaited per block) makes it a slow repository. */
export class MemorySink implements TransferSink {
  image = Buffer.alloc(0);
  disk: OpenDiskMessage | undefined;
  end: EndDiskMessage | undefined;
  committed = false;
  aborted: string | undefined;
  blocksWritten = 0;
  zeroRuns: ZeroRunMessage[] = [];
  /** Block indexes and zero-run starts in the order the sink got them. */
  order: number[] = [];
  readonly #delay: (() => Promise<void>) | undefined;
  onBlock: ((n: number) => void) | undefined;

  constructor(delay?: () => Promise<void>) {
    this.#delay = delay;
  }

  async openDisk(disk: OpenDiskMessage): Promise<void> {
    this.disk = disk;
    this.image = Buffer.alloc(disk.size);
  }

  async writeBlock(block: ReceivedBlockMessage): Promise<void> {
    if (this.#delay) await this.#delay();
    const bs = this.disk!.blockSize;
    if (createHash('sha256').update(block.data).digest().compare(block.sha256) !== 0) throw new Error(`digest mismatch at block ${block.index}`);
    block.data.copy(this.image, block.index * bs);
    this.order.push(block.index);
    this.blocksWritten++;
    this.onBlock?.(this.blocksWritten);
  }

  async writeZeroRun(run: ZeroRunMessage): Promise<void> {
    this.order.push(run.start);
    this.zeroRuns.push(run);
  }

  async endDisk(summary: EndDiskMessage): Promise<void> {
    this.end = summary;
  }

  async commit(): Promise<void> {
    this.committed = true;
  }

  async abort(reason: string): Promise<void> {
    this.aborted = reason;
  }
}
