// RecordSink (the appending end of every transform) closes the file it opened when it cannot
// start: a header that does not encode leaves no open descriptor behind (the caller removes the
// temporary file, but only the sink holds its handle).
import { randomUUID } from 'node:crypto';
import { readdirSync, readlinkSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { NIL_UUID, type FileHeader } from '../../format/index.js';
import { RecordSink } from './file-ops.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'bulwark-file-ops-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** The files this process holds open below `folder`. */
const openBelow = (folder: string): string[] =>
  readdirSync('/proc/self/fd').flatMap((fd) => {
    try {
      const target = readlinkSync(path.join('/proc/self/fd', fd));
      return target.startsWith(folder) ? [target] : [];
    } catch {
      return []; // the descriptor of the listing itself, closed meanwhile
    }
  });

it('create: a header that cannot be encoded fails and leaves the new file closed', async () => {
  const file = path.join(dir, 'bad-header.vbk.tmp');
  const header: FileHeader = { kind: 'full', formatMinor: 0, blockSize: 262144, fileId: 'not-a-uuid', chainId: randomUUID(), pointId: randomUUID(), baseFileId: NIL_UUID, timeMs: Date.now(), compression: 'zstd', encryption: null };
  await expect(RecordSink.create(file, header)).rejects.toThrow(/uuid/i);
  expect(openBelow(dir)).toEqual([]);
});
