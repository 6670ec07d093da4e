import { mkdtemp, open, rm, symlink, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fdHolders, processesHolding } from './proc.js';
import { socketAnswers } from './socket.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-proc-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('fdHolders / processesHolding (the /proc fd scan)', () => {
  it('finds this process holding a file (also named through a symlink) only while it is open, and leaves itself out when asked', async () => {
    const file = path.join(dir, 'vda.qcow2');
    const other = path.join(dir, 'other.img');
    const link = path.join(dir, 'link-to-vda');
    await writeFile(file, 'disk');
    await writeFile(other, 'not open');
    await symlink(file, link);
    const fh = await open(file, 'r');
    try {
      const held = await fdHolders(new Set([file, other]));
      expect(held).toEqual([{ pid: process.pid, comm: expect.any(String) as string, target: file }]);
      expect(held[0]!.comm).not.toBe('?');
      expect(await fdHolders(new Set([file]), { exceptSelf: true })).toEqual([]);
      expect(await processesHolding([link, other], { includeSelf: true })).toEqual([{ pid: process.pid, comm: held[0]!.comm, file: link }]);
      expect(await processesHolding([file])).toEqual([]);
    } finally {
      await fh.close();
    }
    expect(await fdHolders(new Set([file]))).toEqual([]);
    expect(await processesHolding([path.join(dir, 'missing.img')], { includeSelf: true })).toEqual([]);
    expect(await fdHolders(new Set())).toEqual([]);
  });

  it('stops at the first holder, scanning the preferred command names first', async () => {
    const a = await open(path.join(dir, 'a'), 'w');
    try {
      const target = path.join(dir, 'a');
      const seen: string[] = [];
      const held = await fdHolders(new Set([target]), { first: true, prefer: (comm) => (seen.push(comm), comm === 'no-such-comm') });
      expect(held.map((h) => h.pid)).toEqual([process.pid]);
      // prefer was asked about every process (this one included) before the scan.
      expect(seen.length).toBeGreaterThan(1);
    } finally {
      await a.close();
    }
  });
});

describe('socketAnswers (is anything listening on a unix socket?)', () => {
  it('true while a server listens; false after it closes, for a plain file and for no file', async () => {
    const sock = path.join(dir, 'qmp.sock');
    const server = net.createServer((c) => c.destroy());
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      expect(await socketAnswers(sock)).toBe(true);
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
    expect(await socketAnswers(sock)).toBe(false);
    const plain = path.join(dir, 'plain');
    await writeFile(plain, '');
    expect(await socketAnswers(plain)).toBe(false);
    expect(await socketAnswers(path.join(dir, 'none.sock'))).toBe(false);
  });
});
