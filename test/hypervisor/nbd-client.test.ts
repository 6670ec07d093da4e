// The NBD client against real servers: qemu-storage-daemon (qcow2 with data, zero and unallocated
// areas and a dirty bitmap; compared with nbdinfo --map and qemu-img convert), qemu-nbd over TCP,
// and nbdkit (simple replies, injected errors, delays, a server that dies mid-read).
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdConnection, NbdError, NbdExport, allocationExtents, parseNbdUri, type StatusExtent } from '../../src/hypervisor/nbd/client.js';
import { BASE_ALLOCATION, dirtyBitmapContext } from '../../src/hypervisor/nbd/protocol.js';
import { QsdFixture } from '../fixtures/qsd.js';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
// Not a multiple of any power of two above 512: catches off-by-one at the end of the disk.
const SIZE = 64 * MiB + 3 * 512;

let dir: string;
let qsd: QsdFixture;
let rawReference: Buffer;

/** Bytes whose every 8-byte word holds its own offset: a misplaced read shows at once. */
function offsetPattern(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 8) b.writeBigUInt64BE(BigInt(offset + i), i);
  return b;
}

async function nbdinfoMap(uri: string, context?: string): Promise<StatusExtent[]> {
  const args = ['--json', context ? `--map=${context}` : '--map', uri];
  const { stdout } = await exec('nbdinfo', args);
  const rows = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
  const out: StatusExtent[] = [];
  for (const r of rows) {
    const last = out[out.length - 1];
    if (last && last.flags === r.type && last.offset + last.length === r.offset) out[out.length - 1] = { ...last, length: last.length + r.length };
    else out.push({ offset: r.offset, length: r.length, flags: r.type });
  }
  return out;
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-nbd-test-'));
  // Raw image: offset pattern, a hole, random bytes at an unaligned place, data in the last sector.
  const raw = Buffer.alloc(SIZE);
  offsetPattern(0, 2 * MiB).copy(raw, 0);
  randomBytes(300_001).copy(raw, 9 * MiB + 4096 + 17);
  offsetPattern(SIZE - 1536, 1536).copy(raw, SIZE - 1536);
  await writeFile(path.join(dir, 'dense.raw'), raw);
  await exec('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', path.join(dir, 'dense.raw'), path.join(dir, 'disk.qcow2')]);
  // A sparse copy (holes where the zeroes are) for qemu-nbd.
  await exec('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'raw', path.join(dir, 'dense.raw'), path.join(dir, 'src.raw')]);
  // An allocated zero cluster range over former data, and more data at 20 MiB.
  await exec('qemu-io', ['-f', 'qcow2', '-c', `write -z ${MiB} ${MiB}`, '-c', `write -P 0x5a ${20 * MiB} ${3 * MiB}`, path.join(dir, 'disk.qcow2')]);
  raw.fill(0, MiB, 2 * MiB);
  raw.fill(0x5a, 20 * MiB, 23 * MiB);
  rawReference = raw;

  qsd = await QsdFixture.start({ image: path.join(dir, 'disk.qcow2') });
  await qsd.qmp.execute('block-dirty-bitmap-add', { node: qsd.nodeName, name: 'bm0', persistent: false });
  await qsd.addExport('live', { writable: true });
});

afterAll(async () => {
  await qsd?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('NBD client against qemu-storage-daemon', () => {
  it('reports the export and negotiates base:allocation', async () => {
    await qsd.addExport('plain');
    const c = await NbdConnection.connect({ endpoint: qsd.nbdEndpoint, exportName: 'plain' });
    try {
      expect(c.size).toBe(SIZE);
      expect(c.info.readOnly).toBe(true);
      expect(c.info.structuredReplies).toBe(true);
      expect(c.info.metaContexts.has(BASE_ALLOCATION)).toBe(true);
      expect(c.info.maximumBlockSize).toBeGreaterThanOrEqual(MiB);
    } finally {
      await c.close();
    }
  });

  it('maps allocation exactly as nbdinfo --map does', async () => {
    const c = await NbdConnection.connect({ endpoint: qsd.nbdEndpoint, exportName: 'plain' });
    try {
      const mine = await c.blockStatus(BASE_ALLOCATION, 0, c.size);
      expect(mine).toEqual(await nbdinfoMap(qsd.nbdUri('plain')));
      const extents = await c.extents(0, c.size);
      expect(extents).toEqual(allocationExtents(mine));
      // qemu reports qcow2 zero clusters as hole+zero, like unallocated ones; in order, no gaps.
      expect(new Set(extents.map((e) => e.kind))).toEqual(new Set(['data', 'hole']));
      expect(extents.find((e) => e.offset <= MiB && e.offset + e.length > MiB)?.kind).toBe('hole');
      let pos = 0;
      for (const e of extents) {
        expect(e.offset).toBe(pos);
        pos += e.length;
      }
      expect(pos).toBe(SIZE);
      // An unaligned sub-range is clipped to the range asked.
      const part = await c.extents(MiB - 100, 2 * MiB + 7);
      expect(part[0]!.offset).toBe(MiB - 100);
      expect(part.reduce((s, e) => s + e.length, 0)).toBe(2 * MiB + 7);
    } finally {
      await c.close();
    }
  });

  it('reads the whole disk through a pool of connections bit-exact to qemu-img convert and nbdcopy', async () => {
    const converted = path.join(dir, 'converted.raw');
    await exec('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', qsd.image, converted]);
    const copied = path.join(dir, 'nbdcopy.raw');
    await exec('nbdcopy', [qsd.nbdUri('plain'), copied]);
    const disk = await NbdExport.open({ endpoint: qsd.nbdEndpoint, exportName: 'plain', connections: 3, splitSize: 256 * 1024 });
    try {
      expect(disk.connections).toBe(3);
      const all = await disk.read(0, disk.size);
      expect(sha(all)).toBe(sha(await readFile(converted)));
      expect(sha(all)).toBe(sha(await readFile(copied)));
      expect(sha(all)).toBe(sha(rawReference));
      // Sparse-aware reads of holes and zero areas are zero-filled even in a dirty buffer.
      const target = Buffer.alloc(3 * MiB, 0xff);
      await disk.readInto(MiB / 2, target);
      expect(target.equals(rawReference.subarray(MiB / 2, MiB / 2 + 3 * MiB))).toBe(true);
      // The last bytes, unaligned.
      const tail = await disk.read(SIZE - 1000, 1000);
      expect(tail.equals(rawReference.subarray(SIZE - 1000))).toBe(true);
    } finally {
      await disk.close();
    }
    // The same with reads asked unfragmented (NBD_CMD_FLAG_DF: holes come back as data chunks).
    const df = await NbdConnection.connect({ endpoint: qsd.nbdEndpoint, exportName: 'plain', noFragment: true });
    try {
      const target = Buffer.alloc(4 * MiB, 0xff);
      await df.readInto(MiB / 2, target);
      expect(target.equals(rawReference.subarray(MiB / 2, MiB / 2 + 4 * MiB))).toBe(true);
    } finally {
      await df.close();
    }
  });

  it('keeps many reads in flight on one connection and matches each reply to its request', async () => {
    const c = await NbdConnection.connect({ endpoint: qsd.nbdEndpoint, exportName: 'plain', maxInFlight: 8 });
    try {
      const offsets = Array.from({ length: 200 }, (_, i) => (i * 7919 * 4099) % (SIZE - 70_000));
      const reads = offsets.map((o, i) => c.read(o, 1000 + (i % 7) * 9000));
      expect(c.inFlight).toBeLessThanOrEqual(8);
      const got = await Promise.all(reads);
      got.forEach((b, i) => expect(b.equals(rawReference.subarray(offsets[i], offsets[i]! + b.length))).toBe(true));
    } finally {
      await c.close();
    }
  });

  it('reads dirty extents of a qemu:dirty-bitmap context, equal to nbdinfo and to the writes made', async () => {
    // Guest writes through the writable export; the bitmap (64 KiB granularity) records them.
    await qsd.write('live', MiB + 100, 10, 0xa1);
    await qsd.write('live', 10 * MiB, 200 * 1024, 0xa2);
    await qsd.write('live', 40 * MiB + 65536, 65536, 0xa3);
    // A read-only export only takes a bitmap that no longer records (as in a backup transaction).
    await qsd.qmp.execute('block-dirty-bitmap-disable', { node: qsd.nodeName, name: 'bm0' });
    await qsd.addExport('inc', { bitmaps: ['bm0'] });
    const ctx = dirtyBitmapContext('bm0');
    const disk = await NbdExport.open({ endpoint: qsd.nbdEndpoint, exportName: 'inc', metaContexts: [BASE_ALLOCATION, ctx], connections: 2 });
    try {
      expect(disk.info.metaContexts.has(ctx)).toBe(true);
      const dirty = await disk.dirtyExtents(ctx, 0, disk.size);
      expect(dirty.filter((e) => e.dirty).map((e) => [e.offset, e.length])).toEqual([
        [MiB, 65536],
        [10 * MiB, 256 * 1024],
        [40 * MiB + 65536, 65536],
      ]);
      expect(await disk.blockStatus(ctx, 0, disk.size)).toEqual(await nbdinfoMap(qsd.nbdUri('inc'), ctx));
      const bitmaps = await qsd.bitmaps();
      expect(bitmaps.find((b) => b.name === 'bm0')?.count).toBe(dirty.filter((e) => e.dirty).reduce((s, e) => s + e.length, 0));
      // Read what changed: the writes are there.
      const b = await disk.read(10 * MiB, 200 * 1024);
      expect(b.every((x) => x === 0xa2)).toBe(true);
      // base:allocation works on the same connection.
      expect((await disk.extents(0, disk.size)).length).toBeGreaterThan(2);
    } finally {
      await disk.close();
    }
  });

  it('fails with typed errors naming export, option and range', async () => {
    const err = await NbdConnection.connect({ endpoint: qsd.nbdEndpoint, exportName: 'no-such-export' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdError);
    const e = err as NbdError;
    expect(e.reason).toBe('export');
    expect(e.nbd.export).toBe('no-such-export');
    expect(e.nbd.option).toMatch(/NBD_OPT_(GO|SET_META_CONTEXT)/);
    expect(e.message).toContain('no-such-export');

    const c = await NbdConnection.connect({ endpoint: qsd.nbdEndpoint, exportName: 'plain' });
    try {
      const outside = (await c.read(SIZE - 10, 11).catch((x: unknown) => x)) as NbdError;
      expect(outside).toBeInstanceOf(NbdError);
      expect(outside.nbd).toMatchObject({ offset: SIZE - 10, length: 11, command: 'NBD_CMD_READ' });
      const noCtx = (await c.dirtyExtents(dirtyBitmapContext('nope'), 0, MiB).catch((x: unknown) => x)) as NbdError;
      expect(noCtx).toBeInstanceOf(NbdError);
      expect(noCtx.message).toContain('qemu:dirty-bitmap:nope');
      // The connection is still good after refused requests.
      expect((await c.read(0, 16)).equals(rawReference.subarray(0, 16))).toBe(true);
    } finally {
      await c.close();
    }
    const refused = (await NbdConnection.connect({ endpoint: { socketPath: path.join(dir, 'absent.sock') }, exportName: 'x' }).catch((x: unknown) => x)) as NbdError;
    expect(refused.reason).toBe('connect');
    expect(refused.cause).toBeDefined();
  });

  it('fails requests in flight when the export is removed under them', async () => {
    await qsd.addExport('doomed');
    const c = await NbdConnection.connect({ endpoint: qsd.nbdEndpoint, exportName: 'doomed' });
    await c.read(0, 4096);
    await qsd.removeExport('doomed');
    const err = (await c.read(0, 4096).catch((x: unknown) => x)) as NbdError;
    expect(err).toBeInstanceOf(NbdError);
    expect(['closed', 'command']).toContain(err.reason);
    await c.close();
  });
});

// ---------------------------------------------------------------------------------------------
// Other peers

interface Peer {
  child: ChildProcess;
  stop(): Promise<void>;
}

async function startPeer(cmd: string, args: readonly string[], ready: () => Promise<boolean>): Promise<Peer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const until = Date.now() + 10_000;
  while (!(await ready())) {
    if (child.exitCode !== null || Date.now() > until) {
      child.kill('SIGKILL');
      throw new Error(`${cmd} did not start: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    child,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

/** Ready when a connection is accepted (the socket file appears before the server listens). */
const socketReady = (p: string) => async (): Promise<boolean> =>
  existsSync(p) &&
  new Promise<boolean>((r) => {
    const s = net.connect({ path: p }, () => {
      s.destroy();
      r(true);
    });
    s.once('error', () => r(false));
  });

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

describe('NBD client against qemu-nbd over TCP', () => {
  it('reads a sparse raw file with structured replies (holes) bit-exact', async () => {
    const file = path.join(dir, 'src.raw');
    const port = await freePort();
    const canConnect = async (): Promise<boolean> =>
      new Promise((r) => {
        const s = net.connect({ host: '127.0.0.1', port }, () => {
          s.destroy();
          r(true);
        });
        s.once('error', () => r(false));
      });
    // -e 4 lets the probe connection and the pool in; -t keeps serving after each one.
    const peer = await startPeer('qemu-nbd', ['-r', '-t', '-e', '8', '-f', 'raw', '-b', '127.0.0.1', '-p', String(port), '-x', 'tcpdisk', file], canConnect);
    try {
      const { endpoint, exportName } = parseNbdUri(`nbd://127.0.0.1:${port}/tcpdisk`);
      const disk = await NbdExport.open({ endpoint, exportName, connections: 2 });
      try {
        expect(disk.size).toBe(SIZE);
        const raw = await readFile(file);
        expect(sha(await disk.read(0, disk.size))).toBe(sha(raw));
        expect((await disk.extents(0, disk.size)).some((e) => e.kind === 'hole')).toBe(true);
      } finally {
        await disk.close();
      }
    } finally {
      await peer.stop();
    }
  });
});

describe('NBD client against nbdkit', () => {
  it('reads with simple replies when the server has no structured replies (--no-sr)', async () => {
    const sock = path.join(dir, 'kit-nosr.sock');
    const peer = await startPeer('nbdkit', ['-f', '--exit-with-parent', '--no-sr', '-U', sock, 'pattern', `size=${SIZE}`], socketReady(sock));
    try {
      const c = await NbdConnection.connect({ endpoint: { socketPath: sock } });
      try {
        expect(c.info.structuredReplies).toBe(false);
        expect(c.info.metaContexts.size).toBe(0);
        const b = await c.read(12345 * 8, 3 * MiB);
        expect(b.equals(offsetPattern(12345 * 8, 3 * MiB))).toBe(true);
        // Without base:allocation everything is data.
        expect(await c.extents(0, c.size)).toEqual([{ offset: 0, length: SIZE, kind: 'data' }]);
      } finally {
        await c.close();
      }
    } finally {
      await peer.stop();
    }
  });

  it('maps nbdkit data extents like nbdinfo', async () => {
    const sock = path.join(dir, 'kit-data.sock');
    const peer = await startPeer(
      'nbdkit',
      ['-f', '--exit-with-parent', '-U', sock, 'data', 'data=1 2 3 @0x100000 0x55*65536 @0x300000 9', 'size=8M'],
      socketReady(sock),
    );
    try {
      const c = await NbdConnection.connect({ endpoint: { socketPath: sock } });
      try {
        expect(await c.blockStatus(BASE_ALLOCATION, 0, c.size)).toEqual(await nbdinfoMap(`nbd+unix:///?socket=${sock}`));
        const b = await c.read(0x100000 - 2, 4);
        expect([...b]).toEqual([0, 0, 0x55, 0x55]);
      } finally {
        await c.close();
      }
    } finally {
      await peer.stop();
    }
  });

  it('reports a server error with the command, offset, length and errno, and the connection goes on', async () => {
    const sock = path.join(dir, 'kit-err.sock');
    const peer = await startPeer(
      'nbdkit',
      ['-f', '--exit-with-parent', '-U', sock, '--filter=error', 'pattern', `size=${SIZE}`, 'error-pread=EIO', 'error-pread-rate=100%'],
      socketReady(sock),
    );
    try {
      const c = await NbdConnection.connect({ endpoint: { socketPath: sock } });
      try {
        const err = (await c.read(65536, 4096).catch((x: unknown) => x)) as NbdError;
        expect(err).toBeInstanceOf(NbdError);
        expect(err.reason).toBe('command');
        expect(err.nbd).toMatchObject({ command: 'NBD_CMD_READ', offset: 65536, length: 4096, code: 5 });
        expect(err.message).toContain('EIO');
        expect((await c.extents(0, MiB)).length).toBeGreaterThan(0);
      } finally {
        await c.close();
      }
    } finally {
      await peer.stop();
    }
  });

  it('fails every read in flight with a clear error when the server dies (no hang)', async () => {
    const sock = path.join(dir, 'kit-delay.sock');
    const peer = await startPeer('nbdkit', ['-f', '--exit-with-parent', '-U', sock, '--filter=delay', 'memory', '64M', 'rdelay=3'], socketReady(sock));
    const c = await NbdConnection.connect({ endpoint: { socketPath: sock }, maxInFlight: 4 });
    try {
      const reads = Array.from({ length: 10 }, (_, i) => c.read(i * MiB, 65536).catch((x: unknown) => x));
      await new Promise((r) => setTimeout(r, 200));
      await peer.stop();
      const results = await Promise.all(reads);
      for (const r of results) {
        expect(r).toBeInstanceOf(NbdError);
        expect((r as NbdError).reason).toBe('closed');
        expect((r as NbdError).message).toMatch(/closed|failed/);
      }
      expect(c.isClosed).toBe(true);
      await expect(c.read(0, 512)).rejects.toBeInstanceOf(NbdError);
    } finally {
      await c.close();
      await peer.stop();
    }
  });

  it('times out a request that gets no reply, naming it', async () => {
    const sock = path.join(dir, 'kit-slow.sock');
    const peer = await startPeer('nbdkit', ['-f', '--exit-with-parent', '-U', sock, '--filter=delay', 'memory', '16M', 'rdelay=5'], socketReady(sock));
    try {
      const c = await NbdConnection.connect({ endpoint: { socketPath: sock }, requestTimeoutMs: 300 });
      const err = (await c.read(4096, 512).catch((x: unknown) => x)) as NbdError;
      expect(err).toBeInstanceOf(NbdError);
      expect(err.reason).toBe('timeout');
      expect(err.nbd).toMatchObject({ command: 'NBD_CMD_READ', offset: 4096, length: 512 });
      await c.close();
    } finally {
      await peer.stop();
    }
  });
});
