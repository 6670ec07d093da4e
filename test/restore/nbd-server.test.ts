// The NBD server against real clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and a raw
// wire-level client for what real clients do not expose (simple replies, REQ_ONE, writes,
// disk errors, hostile bytes, shutdown with clients connected).
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openFileDisk } from '../../src/disk/file-disk.js';
import type { RandomAccessDisk } from '../../src/disk/types.js';
import * as P from '../../src/hypervisor/nbd/protocol.js';
import { startNbdServer, type NbdServer } from '../../src/restore/nbd-server/server.js';
import { assembleRead, RawNbdClient } from './nbd-raw-client.js';

const run = promisify(execFile);

/** Sizes that are multiples of neither 512 nor 64 KiB. */
const BIG_SIZE = 10_000_001;
const SMALL_SIZE = 3 * 65536 + 1000;
/** Data ranges written into the big image; everything else stays a hole. */
const DATA_RANGES: Array<[number, number]> = [
  [40960, 409600],
  [3_000_000, 65536],
  [BIG_SIZE - 1665, 1665],
];

let dir: string;
let bigPath: string;
let smallPath: string;
let big: RandomAccessDisk;
let small: RandomAccessDisk;
let server: NbdServer;
let sock: string;

/** Offset-patterned bytes: each 8-byte word holds its own offset, so misplaced bytes show. */
function pattern(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) {
    const at = offset + i;
    b[i] = (at >> ((at % 4) * 8)) & 0xff ^ 0x5a;
  }
  return b;
}

/** A disk whose reads fail inside [badOffset, badOffset + 4096). */
function failingDisk(inner: RandomAccessDisk, badOffset: number): RandomAccessDisk {
  return {
    size: inner.size,
    read: (o, l) =>
      o < badOffset + 4096 && o + l > badOffset ? Promise.reject(new Error('injected media error')) : inner.read(o, l),
    close: () => Promise.resolve(),
  };
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bulwark-nbd-'));
  bigPath = join(dir, 'big.raw');
  smallPath = join(dir, 'small.raw');
  const h = await open(bigPath, 'w');
  for (const [o, l] of DATA_RANGES) await h.write(pattern(o, l), 0, l, o);
  await h.close();
  await truncate(bigPath, BIG_SIZE);
  const s = await open(smallPath, 'w');
  await s.write(randomBytes(SMALL_SIZE), 0, SMALL_SIZE, 0);
  await s.close();
  big = await openFileDisk(bigPath);
  small = await openFileDisk(smallPath);
  sock = join(dir, 'nbd.sock');
  server = await startNbdServer({
    exports: [
      { name: 'big', disk: big, description: 'sparse patterned disk' },
      { name: 'small disk', disk: small },
      { name: 'failing', disk: failingDisk(small, 65536) },
    ],
    listen: { socketPath: sock },
    maxInFlight: 4,
  });
});

afterAll(async () => {
  await server?.close();
  await big?.close();
  await small?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('NBD server with real clients', () => {
  it('nbdinfo shows the export, its flags and the allocation map', async () => {
    const info = JSON.parse((await run('nbdinfo', ['--json', server.uri('big')])).stdout) as {
      protocol: string;
      exports: Array<Record<string, unknown>>;
    };
    expect(info.protocol).toBe('newstyle-fixed');
    const e = info.exports[0]!;
    expect(e['export-size']).toBe(BIG_SIZE);
    expect(e['is_read_only']).toBe(true);
    expect(e['can_multi_conn']).toBe(true);
    expect(e['description']).toBe('sparse patterned disk');
    expect(e['contexts']).toContain('base:allocation');

    const map = JSON.parse((await run('nbdinfo', ['--map', '--json', server.uri('big')])).stdout) as Array<{
      offset: number;
      length: number;
      type: number;
    }>;
    const data = map.filter((m) => m.type === 0).map((m) => [m.offset, m.length]);
    // The file system allocates whole blocks, so data ranges are rounded out to 4 KiB.
    expect(data).toEqual([
      [40960, 409600],
      [2_998_272, 69632],
      [9_998_336, BIG_SIZE - 9_998_336],
    ]);
    expect(map.reduce((n, m) => n + m.length, 0)).toBe(BIG_SIZE);
  });

  it('nbdinfo --list lists every export', async () => {
    const list = JSON.parse((await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${sock}`])).stdout) as {
      exports: Array<{ 'export-name': string; 'export-size': number }>;
    };
    expect(list.exports.map((e) => e['export-name']).sort()).toEqual(['big', 'failing', 'small disk']);
    expect(list.exports.find((e) => e['export-name'] === 'small disk')!['export-size']).toBe(SMALL_SIZE);
  });

  it('nbdcopy copies bit-exact, with several connections and requests in flight', async () => {
    for (const [name, path] of [
      ['big', bigPath],
      ['small disk', smallPath],
    ] as const) {
      const out = join(dir, 'copy.raw');
      await run('nbdcopy', ['--connections=4', '--requests=16', server.uri(name), out]);
      expect((await readFile(out)).equals(await readFile(path))).toBe(true);
      await rm(out);
    }
  });

  it('qemu-img compare/convert and qemu-io read through it', async () => {
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', bigPath, server.uri('big')]);
    const out = join(dir, 'conv.raw');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri('small disk'), out]);
    // QEMU rounds a disk size up to whole 512-byte sectors and reads the tail as zeroes.
    const got = await readFile(out);
    expect(got.length).toBe(Math.ceil(SMALL_SIZE / 512) * 512);
    expect(got.subarray(0, SMALL_SIZE).equals(await readFile(smallPath))).toBe(true);
    expect(got.subarray(SMALL_SIZE).every((b) => b === 0)).toBe(true);
    await rm(out);
    // QEMU's block-status client sees the holes, so it can skip them.
    const map = JSON.parse((await run('qemu-img', ['map', '--output=json', server.uri('big')])).stdout) as Array<{
      start: number;
      length: number;
      data: boolean;
    }>;
    expect(map.filter((e) => e.data).map((e) => [e.start, e.length])).toEqual([
      [40960, 409600],
      [2_998_272, 69632],
      [9_998_336, BIG_SIZE - 9_998_336],
    ]);
    const io = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 40960', '-c', 'read -P 0 450560 4096', server.uri('big')]);
    expect(io.stdout).toContain('read 40960/40960 bytes at offset 0');
    expect(io.stdout).toContain('read 4096/4096 bytes at offset 450560');
    // qemu-io verifies the pattern itself and fails when it differs.
    const wrong = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 1 0 512', server.uri('big')]).then(
      () => 'no error',
      (e: { stdout: string; stderr: string }) => e.stdout + e.stderr,
    );
    expect(wrong).toContain('Pattern verification failed');
  });

  it('qemu-storage-daemon reads it as a blockdev (driver=nbd) and re-exports it over FUSE', async () => {
    const view = join(dir, 'qsd-view.raw');
    const pidFile = join(dir, 'qsd.pid');
    await writeFile(view, '');
    await run('qemu-storage-daemon', [
      '--blockdev', `driver=nbd,node-name=n0,server.type=unix,server.path=${sock},export=big,read-only=on`,
      '--export', `type=fuse,id=e0,node-name=n0,mountpoint=${view},writable=off`,
      '--pidfile', pidFile,
      '--daemonize',
    ]);
    const pid = Number((await readFile(pidFile, 'utf8')).trim());
    try {
      const got = await readFile(view);
      expect(got.length).toBe(Math.ceil(BIG_SIZE / 512) * 512);
      expect(got.subarray(0, BIG_SIZE).equals(await readFile(bigPath))).toBe(true);
    } finally {
      await run('fusermount3', ['-u', view]).catch(() => undefined);
      process.kill(pid, 'SIGTERM');
      for (let i = 0; i < 100 && existsSync(`/proc/${pid}`); i++) await new Promise((r) => setTimeout(r, 20));
    }
  });

  it('serves over TCP as well', async () => {
    const tcp = await startNbdServer({ exports: [{ name: 'small', disk: small }], listen: { host: '127.0.0.1', port: 0 } });
    try {
      expect(tcp.uri('small')).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/small$/);
      const out = join(dir, 'tcp.raw');
      await run('nbdcopy', [tcp.uri('small'), out]);
      expect((await readFile(out)).equals(await readFile(smallPath))).toBe(true);
      await rm(out);
    } finally {
      await tcp.close();
    }
  });
});

describe('NBD server on the wire', () => {
  it('answers simple replies when structured replies were not negotiated', async () => {
    const c = await RawNbdClient.open(sock);
    try {
      await c.handshake('big', false);
      expect(c.size).toBe(BIG_SIZE);
      expect(c.flags & P.NBD_FLAG_READ_ONLY).toBeTruthy();
      const off = DATA_RANGES[0]![0] - 100;
      c.send(P.NBD_CMD_READ, off, 1000);
      const r = await c.reply(() => 1000);
      expect(r.error).toBe(0);
      expect(r.data!.equals(Buffer.concat([Buffer.alloc(100), pattern(off + 100, 900)]))).toBe(true);
      // Block status needs a meta context, which needs structured replies.
      c.send(P.NBD_CMD_BLOCK_STATUS, 0, 4096);
      expect((await c.reply(() => 0)).error).toBe(P.NBD_EINVAL);
      c.send(P.NBD_CMD_WRITE, 0, 512, 0, Buffer.alloc(512, 1));
      expect((await c.reply(() => 0)).error).toBe(P.NBD_EPERM);
      c.send(P.NBD_CMD_READ, BIG_SIZE - 10, 11);
      expect((await c.reply(() => 11)).error).toBe(P.NBD_EINVAL);
      c.send(P.NBD_CMD_FLUSH, 0, 0);
      expect((await c.reply(() => 0)).error).toBe(0);
    } finally {
      c.close();
    }
  });

  it('sends holes as OFFSET_HOLE, honours REQ_ONE, refuses writes, and pipelines', async () => {
    const c = await RawNbdClient.open(sock);
    try {
      await c.handshake('big', true);
      c.send(P.NBD_CMD_READ, 0, 65536);
      const r = await c.reply(() => 0);
      expect(r.chunks!.map((x) => x.type)).toEqual([P.NBD_REPLY_TYPE_OFFSET_HOLE, P.NBD_REPLY_TYPE_OFFSET_DATA]);
      expect(assembleRead(r.chunks!, 0, 65536).equals(Buffer.concat([Buffer.alloc(40960), pattern(40960, 24576)]))).toBe(true);

      c.send(P.NBD_CMD_BLOCK_STATUS, 0, 500_000, P.NBD_CMD_FLAG_REQ_ONE);
      const one = (await c.reply(() => 0)).chunks![0]!;
      expect(one.type).toBe(P.NBD_REPLY_TYPE_BLOCK_STATUS);
      expect(one.payload.length).toBe(12);
      expect([one.payload.readUInt32BE(4), one.payload.readUInt32BE(8)]).toEqual([40960, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO]);

      c.send(P.NBD_CMD_TRIM, 0, 4096);
      expect((await c.reply(() => 0)).error).toBe(P.NBD_EPERM);

      // 40 reads in flight on one connection (the server runs 4 at a time): every answer right.
      const want = new Map<bigint, number>();
      for (let i = 0; i < 40; i++) want.set(c.send(P.NBD_CMD_READ, 40960 + i * 8000, 8000), 40960 + i * 8000);
      const seen = new Set<bigint>();
      for (let i = 0; i < 40; i++) {
        const rep = await c.reply(() => 0);
        const off = want.get(rep.cookie)!;
        expect(assembleRead(rep.chunks!, off, 8000).equals(pattern(off, 8000))).toBe(true);
        seen.add(rep.cookie);
      }
      expect(seen.size).toBe(40);
    } finally {
      c.close();
    }
  });

  it('turns disk errors into EIO with the offset, and the connection survives', async () => {
    const c = await RawNbdClient.open(sock);
    try {
      await c.handshake('failing', true);
      c.send(P.NBD_CMD_READ, 60000, 10000);
      const bad = await c.reply(() => 0);
      expect(bad.error).toBe(P.NBD_EIO);
      expect(bad.chunks!.at(-1)!.type).toBe(P.NBD_REPLY_TYPE_ERROR_OFFSET);
      c.send(P.NBD_CMD_READ, 0, 4096);
      const good = await c.reply(() => 0);
      expect(good.error).toBe(0);
      expect(assembleRead(good.chunks!, 0, 4096).equals((await small.read(0, 4096)))).toBe(true);
    } finally {
      c.close();
    }
    const s = await RawNbdClient.open(sock);
    try {
      await s.handshake('failing', false);
      s.send(P.NBD_CMD_READ, 65536, 512);
      expect((await s.reply(() => 512)).error).toBe(P.NBD_EIO);
    } finally {
      s.close();
    }
  });

  it('answers unknown options and unknown exports per spec, and NBD_OPT_ABORT', async () => {
    const c = await RawNbdClient.open(sock);
    try {
      await c.reader.read(18);
      c.socket.write(Buffer.from([0, 0, 0, 3]));
      c.option(99, Buffer.from('junk'));
      expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_UNSUP >>> 0);
      c.option(P.NBD_OPT_STARTTLS, Buffer.alloc(0));
      expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_UNSUP >>> 0);
      const n = Buffer.from('nope');
      const lenBuf = Buffer.alloc(4);
      lenBuf.writeUInt32BE(n.length);
      c.option(P.NBD_OPT_GO, Buffer.concat([lenBuf, n, Buffer.from([0, 0])]));
      expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_UNKNOWN >>> 0);
      c.option(P.NBD_OPT_INFO, Buffer.from([0, 0, 0, 9]));
      expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID >>> 0);
      c.option(P.NBD_OPT_LIST, Buffer.from('x'));
      expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID >>> 0);
      c.option(P.NBD_OPT_ABORT, Buffer.alloc(0));
      expect((await c.optionReply()).type).toBe(P.NBD_REP_ACK);
      await new Promise<void>((resolve) => c.socket.once('close', () => resolve()));
    } finally {
      c.close();
    }
  });

  it('survives hostile clients: random and mutated bytes never crash it', async () => {
    // A valid session prefix, mutated at random positions, and pure noise.
    const valid = Buffer.concat([
      Buffer.from([0, 0, 0, 3]),
      optionBytes(P.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)),
      optionBytes(P.NBD_OPT_GO, Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.from('big'), Buffer.from([0, 0])])),
      requestBytes(P.NBD_CMD_READ, 0, 4096),
      requestBytes(P.NBD_CMD_BLOCK_STATUS, 0, 1 << 20),
      requestBytes(P.NBD_CMD_READ, BIG_SIZE - 1, 1),
    ]);
    let seed = 12345;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    for (let round = 0; round < 60; round++) {
      let bytes: Buffer;
      if (round % 3 === 0) bytes = randomBytes(1 + rnd(300));
      else {
        bytes = Buffer.from(valid);
        for (let k = 0; k < 1 + rnd(4); k++) bytes[rnd(bytes.length)] = rnd(256);
        bytes = bytes.subarray(0, rnd(bytes.length) + 1);
      }
      await new Promise<void>((resolve) => {
        const s = connect(sock);
        s.on('error', () => resolve());
        s.on('close', () => resolve());
        s.on('data', () => undefined);
        s.on('connect', () => {
          s.write(bytes);
          setTimeout(() => s.destroy(), 20);
        });
      });
    }
    // Still serving correctly afterwards.
    const r = await run('nbdinfo', ['--size', server.uri('big')]);
    expect(r.stdout.trim()).toBe(String(BIG_SIZE));
  });

  it('drops a client that stalls in the handshake, and refuses clients over the limit', async () => {
    const path = join(dir, 'limits.sock');
    const s = await startNbdServer({
      exports: [{ name: 'x', disk: small }],
      listen: { socketPath: path },
      handshakeTimeoutMs: 200,
      maxConnections: 1,
    });
    try {
      const staller = await RawNbdClient.open(path);
      await staller.reader.read(18); // server greeting, then silence
      const second = await RawNbdClient.open(path);
      // Over the limit: closed by the server without a greeting.
      await expect(second.reader.read(18)).rejects.toThrow(/closed/);
      second.close();
      await expect(staller.reader.read(1)).rejects.toThrow(/closed/);
      staller.close();
      // The slot is free again.
      expect((await run('nbdinfo', ['--size', s.uri('x')])).stdout.trim()).toBe(String(SMALL_SIZE));
    } finally {
      await s.close();
    }
  });

  it('close() drops connected clients and removes the socket', async () => {
    const path = join(dir, 'closing.sock');
    const s = await startNbdServer({ exports: [{ name: 'x', disk: small }], listen: { socketPath: path } });
    const c = await RawNbdClient.open(path);
    await c.handshake('x', true);
    const closed = new Promise<void>((resolve) => c.socket.once('close', () => resolve()));
    expect(s.connections).toBe(1);
    await s.close();
    await closed;
    expect(existsSync(path)).toBe(false);
  });
});

function optionBytes(option: number, data: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(P.NBD_IHAVEOPT, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

function requestBytes(type: number, offset: number, length: number): Buffer {
  const r = Buffer.alloc(P.NBD_REQUEST_SIZE);
  r.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  r.writeUInt16BE(type, 6);
  r.writeBigUInt64BE(BigInt(offset), 16);
  r.writeUInt32BE(length, 24);
  return r;
}
