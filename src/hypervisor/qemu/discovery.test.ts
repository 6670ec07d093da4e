import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { globFiles, processInfo, socketOwnerPid } from './discovery.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-discovery-'));
  for (const vm of ['vm1', 'vm2', 'other']) {
    await mkdir(path.join(dir, vm));
    await writeFile(path.join(dir, vm, vm === 'other' ? 'monitor' : 'qmp.sock'), '');
  }
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('globFiles', () => {
  it('matches * and ? inside segments, sorted, existing files only', async () => {
    expect(await globFiles(path.join(dir, '*', 'qmp.sock'))).toEqual([path.join(dir, 'vm1', 'qmp.sock'), path.join(dir, 'vm2', 'qmp.sock')]);
    expect(await globFiles(path.join(dir, 'vm?', '*.sock'))).toHaveLength(2);
    expect(await globFiles(path.join(dir, 'vm3', 'qmp.sock'))).toEqual([]);
    expect(await globFiles(path.join(dir, 'vm1', 'qmp.sock'))).toEqual([path.join(dir, 'vm1', 'qmp.sock')]);
  });
});

describe('socketOwnerPid / processInfo', () => {
  it('finds the process listening on a unix socket, and its command line and identity', async () => {
    const sock = path.join(dir, 'listen.sock');
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      expect(await socketOwnerPid(sock)).toBe(process.pid);
      const info = await processInfo(process.pid);
      expect(info.commandLine[0]).toContain('node');
      expect(info.instance).toMatch(new RegExp(`^${process.pid}@[0-9]+$`));
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
    expect(await socketOwnerPid(sock)).toBeUndefined();
  });
});
