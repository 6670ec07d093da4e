// A read-only NBD server (fixed newstyle, as in the NBD project's doc/proto.md) that serves
// RandomAccessDisks, e.g. restore points, to nbdfuse, qemu, nbdcopy or any other NBD client.
// One listener, many named exports, many clients; each connection pipelines requests with a
// bounded number in flight. Disk errors become NBD_EIO replies; the connection survives.
import { randomUUID } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger, type Logger } from '../../common/log.js';
import type { RandomAccessDisk } from '../../disk/types.js';
import { NbdConnection } from './connection.js';

/** One export: the name clients ask for, and the disk behind it. */
export interface NbdExport {
  readonly name: string;
  readonly disk: RandomAccessDisk;
  /** Shown by `nbdinfo --list` (NBD_INFO_DESCRIPTION). */
  readonly description?: string;
}

export type NbdListen = { readonly socketPath: string } | { readonly host: string; readonly port: number };

export interface NbdServerOptions {
  readonly exports: readonly NbdExport[];
  /** A unix socket path (created; removed on close) or a TCP host and port (port 0: any free). */
  readonly listen: NbdListen;
  /** Requests processed at once per connection (default 16); more wait in the socket. */
  readonly maxInFlight?: number;
  /** Largest read length accepted, in bytes (default 32 MiB). */
  readonly maxRequest?: number;
  /** Clients connected at once (default 64); more are refused at connect. */
  readonly maxConnections?: number;
  /** Drop a client that has not finished the handshake after this long (default 30 s). */
  readonly handshakeTimeoutMs?: number;
}

/** A running NBD server. Close it to stop listening and drop every client. */
export interface NbdServer {
  /** Unix socket path, or `host:port` for TCP. */
  readonly address: string;
  /** The NBD URI of one export, e.g. `nbd+unix:///sda?socket=/run/x.sock`. */
  uri(exportName: string): string;
  /** Number of clients connected now. */
  readonly connections: number;
  /** Stops listening, closes every connection; the disks stay open (the caller owns them). */
  close(): Promise<void>;
}

/** Starts an NBD server; resolves once it listens. */
export async function startNbdServer(options: NbdServerOptions): Promise<NbdServer> {
  const names = new Set<string>();
  for (const e of options.exports) {
    if (names.has(e.name)) throw new BulwarkError(`two NBD exports are named "${e.name}"`, { kind: 'invalid' });
    if (Buffer.byteLength(e.name) > 4096) throw new BulwarkError(`NBD export name too long: ${e.name}`, { kind: 'invalid' });
    names.add(e.name);
  }
  const server = new NbdServerImpl(options);
  await server.listen();
  return server;
}

class NbdServerImpl implements NbdServer {
  readonly #options: NbdServerOptions;
  readonly #exports: Map<string, NbdExport>;
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  readonly #log: Logger;
  #address = '';
  #closing: Promise<void> | null = null;

  constructor(options: NbdServerOptions) {
    this.#options = options;
    this.#exports = new Map(options.exports.map((e) => [e.name, e]));
    this.#log = logger('nbd-server', { server: randomUUID().slice(0, 8) });
    this.#server = createServer((socket) => this.#accept(socket));
    this.#server.maxConnections = options.maxConnections ?? 64;
  }

  get address(): string {
    return this.#address;
  }

  get connections(): number {
    return this.#sockets.size;
  }

  uri(exportName: string): string {
    const name = encodeURIComponent(exportName);
    const listen = this.#options.listen;
    if ('socketPath' in listen) return `nbd+unix:///${name}?socket=${encodeURIComponent(listen.socketPath).replaceAll('%2F', '/')}`;
    return `nbd://${this.#address}/${name}`;
  }

  async listen(): Promise<void> {
    const listen = this.#options.listen;
    if ('socketPath' in listen) await rm(listen.socketPath, { force: true });
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => {
        reject(
          new BulwarkError(`NBD server cannot listen on ${describeListen(listen)}`, {
            kind: 'unavailable',
            cause: err,
          }),
        );
      };
      this.#server.once('error', onError);
      const done = (): void => {
        this.#server.off('error', onError);
        resolve();
      };
      if ('socketPath' in listen) this.#server.listen(listen.socketPath, done);
      else this.#server.listen(listen.port, listen.host, done);
    });
    this.#server.on('error', (err) => this.#log.error({ err: describeError(err) }, 'NBD listener error'));
    const addr = this.#server.address();
    this.#address =
      'socketPath' in listen ? listen.socketPath : `${(addr as AddressInfo).address}:${(addr as AddressInfo).port}`;
    this.#log.info({ address: this.#address, exports: [...this.#exports.keys()] }, 'NBD server listening');
  }

  #accept(socket: Socket): void {
    if (this.#closing) {
      socket.destroy();
      return;
    }
    this.#sockets.add(socket);
    socket.on('close', () => this.#sockets.delete(socket));
    socket.setNoDelay?.(true);
    const conn = new NbdConnection(socket, {
      exports: this.#exports,
      maxInFlight: this.#options.maxInFlight ?? 16,
      maxRequest: this.#options.maxRequest ?? 32 * 1024 * 1024,
      handshakeTimeoutMs: this.#options.handshakeTimeoutMs ?? 30_000,
      log: this.#log,
    });
    conn.run().then(
      () => socket.end(),
      (err: unknown) => {
        this.#log.warn({ err: describeError(err) }, 'NBD connection failed');
        socket.destroy();
      },
    );
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
      for (const s of this.#sockets) s.destroy();
      await closed;
      const listen = this.#options.listen;
      if ('socketPath' in listen) await rm(listen.socketPath, { force: true });
      this.#log.info({ address: this.#address }, 'NBD server stopped');
    })();
    return this.#closing;
  }
}

function describeListen(listen: NbdListen): string {
  return 'socketPath' in listen ? listen.socketPath : `${listen.host}:${listen.port}`;
}
