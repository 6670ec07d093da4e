// Damage detection, exhaustively: for every byte of every file of three small chains, and for
// every length each file can be cut to, the verifier reports damage naming the file (and, for a
// byte of a block record, the disk, block and the block's disk offset); it never throws and never
// says OK. A reader refuses a damaged block or commit slot with an error naming file, disk,
// offset and restore point, and wrong data stays distinct from a wrong password.
//
// What is covered (docs/formats/backup-files.md):
// - chains: (forward) .vbk + .vib + .vbm; (reverse) the full after two reverse injections (three
//   commit generations: its slots hold generations 2 and 3, the data area the indexes of
//   generations 1 and 2 and the replaced records and table pages) + two .vrb + .vbm;
//   (encrypted) AES-256-GCM .vbk + .vib + .vbm, checked with the right password's keys.
//   256 KiB blocks; disks not multiples of it: vda zero, hole, 1000 compressible bytes; vdb 300
//   random bytes (stored uncompressed); vdc zero, then vda's last block again (deduplicated).
// - exhaustive, in memory: every byte of every file xor 0xff and xor one bit (bit = offset mod 8),
//   and every truncation length 0 .. size-1, each checked by what `verifyRepository` runs for the
//   file: for a backup file BackupFile.open at the point's generation, checkFileMatches against
//   the chain metadata and verifyBackupFile (keys of the encrypted chain given); for the .vbm
//   decodeChainMetadata. Files are read from memory (BackupFile's ByteSource), so each check
//   costs about 0.1 ms, not a file system round trip. 134,613 mutations in all (~12 s here).
// - through the real files and the whole `verifyRepository` (~900 runs): every SAMPLE-th byte
//   (xor 0xff), the first and last byte of every region (header page, each slot, each record,
//   each index), and a cut at each of those offsets: the report names the file, and for a block
//   record disk, block, offset and restore point; never "wrong password".
// - fuzz: 150 random changes of up to 16 bytes (with or without a cut) per file, in memory.
// The one region no checksum can cover: the index of a generation older than the one kept in
// the other commit slot (here the reverse full's generation-1 index). Nothing names it any more
// (section 3, "After an in-place transform"); verify checks its layout only. Mutations there it
// does not see (419 here: statistics, reserved bytes, the configuration and such) are counted,
// and every restore point of the chain must read bit-exact with all those bytes changed at once
// (xor 0xff, then xor 1), through the real files.
import { closeSync, existsSync, ftruncateSync, openSync, readdirSync, readFileSync, writeSync } from 'node:fs';
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BulwarkError } from '../../src/common/errors.js';
import type { DiskBlock } from '../../src/disk/types.js';
import {
  COMMIT_SLOT_OFFSETS,
  COMMIT_SLOT_SIZE,
  decodeChainMetadata,
  decodeCommitSlot,
  decodeIndex,
  decodeRecordHeader,
  decodeTablePage,
  HEADER_PAGE_SIZE,
  INDEX_MAGIC,
  RECORD_HEADER_SIZE,
  FormatError,
  type CommitSlot,
} from '../../src/format/index.js';
import { BackupFile, memorySource } from '../../src/repository/backup-file.js';
import { unlockChain, type ChainKeys } from '../../src/repository/chain-keys.js';
import { openRepository, Repository, verifyRepository, type BackupChain, type RestorePointInfo } from '../../src/repository/index.js';
import { checkFileMatches } from '../../src/repository/repository.js';
import { verifyBackupFile, type AddDamage } from '../../src/repository/verify.js';

const BS = 262144;
const DISKS = [
  { name: 'vda', size: 2 * BS + 1000 },
  { name: 'vdb', size: 300 },
  { name: 'vdc', size: BS + 1000 },
];
const PASSWORD = 'correct horse';
/** Copies of each chain mutated side by side (the whole-verify sample), so file I/O overlaps. */
const COPIES = 4;
/** The whole-verify sample: every SAMPLE-th byte and length of each file. */
const SAMPLE = 149;
const work = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();

/** Text-like data: compresses to a few dozen bytes. */
function text(len: number, tag: number): Buffer {
  const phrase = Buffer.from(`block ${tag}: the quick brown fox jumps over the lazy dog. `);
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i += phrase.length) phrase.copy(b, i);
  return b;
}

/** Deterministic incompressible bytes (xorshift32). */
function random(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  let x = seed | 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

type Disks = Record<string, Buffer>;

/** Applies blocks to the model of a disk and returns them for the writer. */
function put(model: Buffer, blocks: Array<[number, Buffer | null]>): DiskBlock[] {
  return blocks.map(([index, data]) => {
    const off = index * BS;
    const len = Math.min(BS, model.length - off);
    if (data) data.copy(model, off);
    else model.fill(0, off, off + len);
    return { index, data };
  });
}

async function* each(blocks: DiskBlock[]): AsyncGenerator<DiskBlock> {
  for (const b of blocks) yield b;
}

interface Chain {
  readonly name: string;
  /** Folder holding the chain (job j, VM v), and COPIES copies of it. */
  readonly root: string;
  readonly copies: readonly string[];
  /** Point id -> what each disk must read as. */
  readonly expected: Map<string, Disks>;
  readonly info: BackupChain;
  readonly keys: ChainKeys | null;
}

const chains: Chain[] = [];

/** Writes a chain: a full and `more` further points of `kind`, each changing vda's and vdb's last blocks. */
async function buildChain(name: string, kind: 'incremental' | 'reverse', more: number, encrypted = false): Promise<Chain> {
  const root = await mkdtemp(path.join(work, `bulwark-damage-${name}-`));
  const repo = await openRepository(root);
  const model: Disks = Object.fromEntries(DISKS.map((d) => [d.name, Buffer.alloc(d.size)]));
  const snapshot = () => Object.fromEntries(Object.entries(model).map(([k, v]) => [k, Buffer.from(v)]));
  const expected = new Map<string, Disks>();
  const w = await repo.startRestorePoint({
    job: 'j', vm: 'v', kind: 'full', chainMethod: kind === 'reverse' ? 'reverse' : 'forward', blockSize: BS, threads: 0,
    vmConfig: Buffer.from('<domain>v</domain>'), disks: DISKS,
    ...(encrypted ? { encryption: { password: PASSWORD, hint: 'horse', log2N: 10 } } : {}),
  });
  await w.writeDisk('vda', each(put(model.vda!, [[0, Buffer.alloc(BS)], [1, null], [2, text(1000, 2)]])));
  await w.writeDisk('vdb', each(put(model.vdb!, [[0, random(300, 1)]])));
  await w.writeDisk('vdc', each(put(model.vdc!, [[0, Buffer.alloc(BS)], [1, text(1000, 2)]])));
  expected.set((await w.commit()).id, snapshot());
  for (let k = 1; k <= more; k++) {
    const wi = await repo.startRestorePoint({ job: 'j', vm: 'v', kind, threads: 0, disks: DISKS, ...(encrypted ? { password: PASSWORD } : {}) });
    await wi.writeDisk('vda', each(put(model.vda!, [[2, text(1000, 10 + k)]])));
    await wi.writeDisk('vdb', each(put(model.vdb!, [[0, random(300, 40 + k)]])));
    await wi.writeDisk('vdc', each([]));
    expected.set((await wi.commit()).id, snapshot());
  }
  const copies: string[] = [];
  for (let c = 0; c < COPIES; c++) {
    const copy = `${root}-copy${c}`;
    await cp(path.join(root, 'j'), path.join(copy, 'j'), { recursive: true });
    copies.push(copy);
  }
  const info = (await repo.listChains({ job: 'j', vm: 'v' }))[0]!;
  const vbk = info.points.find((p) => p.kind === 'full')!;
  const full = await BackupFile.open(vbk.file);
  const header = full.header;
  await full.close();
  const keys = header.encryption ? await unlockChain(PASSWORD, header.encryption, {}) : null;
  return { name, root, copies, expected, info, keys };
}

beforeAll(async () => {
  chains.push(await buildChain('forward', 'incremental', 1));
  chains.push(await buildChain('reverse', 'reverse', 2));
  chains.push(await buildChain('encrypted', 'incremental', 1, true));
  for (const c of chains) expect((await verifyRepository(c.root, { password: PASSWORD })).ok, c.name).toBe(true);
}, 120_000);
afterAll(async () => {
  for (const c of chains) for (const r of [c.root, ...c.copies]) await rm(r, { recursive: true, force: true });
});

/** What a byte of a file is, from the format modules: for the expectations and the messages. */
interface ByteMap {
  /** Region name per byte. */
  readonly region: string[];
  /** Blocks (disk, index) whose record holds the byte, when it is in a referenced block record. */
  readonly blocks: Map<number, Array<{ disk: string; index: number }>>;
  /** Bytes of an index no valid commit slot names (nothing can check them; nothing reads them). */
  readonly unnamed: (pos: number) => boolean;
}

function mapBackupFile(buf: Buffer, generation: number): ByteMap {
  const region = new Array<string>(buf.length);
  const mark = (from: number, to: number, what: string) => {
    for (let i = from; i < to; i++) region[i] = what;
  };
  mark(0, HEADER_PAGE_SIZE, 'header page');
  const slots: CommitSlot[] = [];
  COMMIT_SLOT_OFFSETS.forEach((o, i) => {
    const s = decodeCommitSlot(buf.subarray(o, o + COMMIT_SLOT_SIZE), buf.length);
    mark(o, o + COMMIT_SLOT_SIZE, `commit slot ${'AB'[i]} (generation ${s?.generation ?? 'empty'})`);
    if (s) slots.push(s);
  });
  const cur = slots.find((s) => s.generation === generation)!;
  const recordBlocks = new Map<number, Array<{ disk: string; index: number }>>();
  const idx = decodeIndex(buf.subarray(cur.indexOffset, cur.fileLength), BS, cur.indexOffset);
  for (const d of idx.disks) {
    d.pages.forEach((ref, p) => {
      decodeTablePage(buf.subarray(ref.offset + RECORD_HEADER_SIZE, ref.offset + RECORD_HEADER_SIZE + ref.entryCount * 64), ref.entryCount).forEach((e, k) => {
        if (e.kind !== 'stored') return;
        const list = recordBlocks.get(e.recordOffset) ?? [];
        list.push({ disk: d.name, index: p * d.entriesPerPage + k });
        recordBlocks.set(e.recordOffset, list);
      });
    });
  }
  const blocks = new Map<number, Array<{ disk: string; index: number }>>();
  const unnamedRanges: Array<[number, number]> = [];
  let pos = HEADER_PAGE_SIZE;
  while (pos < cur.indexOffset) {
    if (buf.subarray(pos, pos + 8).equals(INDEX_MAGIC)) {
      const named = slots.find((s) => s.indexOffset === pos);
      let len = 64 + ((buf.readUInt32LE(pos + 12) + 7) & ~7);
      for (let i = 0; i < buf.readUInt32LE(pos + 8); i++) len += 128 + buf.readUInt32LE(pos + len + 80) * 16;
      mark(pos, pos + len, named ? `index of generation ${named.generation}` : 'index of an earlier generation no slot names');
      if (!named) unnamedRanges.push([pos, pos + len]);
      pos += len;
      continue;
    }
    const h = decodeRecordHeader(buf, pos);
    const end = pos + RECORD_HEADER_SIZE + h.storedLength;
    const refs = recordBlocks.get(pos);
    mark(pos, end, h.type === 'table-page' ? 'table-page record' : refs ? 'block record' : 'unreferenced block record');
    if (refs) for (let i = pos; i < end; i++) blocks.set(i, refs);
    pos = end;
  }
  mark(cur.indexOffset, cur.fileLength, `index of generation ${generation}`);
  expect(cur.fileLength).toBe(buf.length);
  return { region, blocks, unnamed: (p) => unnamedRanges.some(([a, b]) => p >= a && p < b) };
}

function mapVbm(buf: Buffer): ByteMap {
  const region = new Array<string>(buf.length).fill('.vbm body');
  region.fill('.vbm header', 0, 64);
  return { region, blocks: new Map(), unnamed: () => false };
}

type Mutation = { kind: 'xor'; pos: number; value: number } | { kind: 'cut'; length: number };

function describeMutation(m: Mutation, map: ByteMap): string {
  return m.kind === 'xor' ? `byte ${m.pos} (${map.region[m.pos]}) xor 0x${m.value.toString(16)}` : `cut to ${m.length} bytes`;
}

/** Reads every point of the chain in `root` and compares it with what it must read as. */
async function readsBitExact(chain: Chain, root: string): Promise<boolean> {
  const repo = new Repository(root); // no sweep: nothing to sweep, and no lock helper per call
  for (const [id, disks] of chain.expected) {
    const p = await repo.openRestorePoint(id, { password: PASSWORD });
    try {
      for (const [name, bytes] of Object.entries(disks)) if (!(await p.openDisk(name).read(0, bytes.length)).equals(bytes)) return false;
    } finally {
      await p.close();
    }
  }
  return true;
}

interface FileUnderTest {
  readonly rel: string;
  readonly original: Buffer;
  readonly map: ByteMap;
  readonly point: RestorePointInfo | undefined;
}

function fileUnderTest(chain: Chain, rel: string): FileUnderTest {
  const original = readFileSync(path.join(chain.root, rel));
  const point = chain.info.points.find((p) => path.basename(p.file) === path.basename(rel));
  return { rel, original, point, map: point ? mapBackupFile(original, point.generation ?? 1) : mapVbm(original) };
}

type Found = Parameters<AddDamage>[0];

/**
 * What the verifier finds in `bytes` as the file `f` of `chain`: the checks verifyRepository runs
 * for one file, on bytes in memory. Throws only when a check crashed (anything but a `corrupt`
 * error naming the file, or a FormatError of the .vbm).
 */
async function checkInMemory(chain: Chain, f: FileUnderTest, bytes: Buffer): Promise<Found[]> {
  const abs = path.join(chain.root, f.rel);
  const corruptNamingFile = (err: unknown) => err instanceof BulwarkError && err.kind === 'corrupt' && err.message.includes(abs);
  if (!f.point) {
    try {
      decodeChainMetadata(bytes);
      return [];
    } catch (err) {
      if (err instanceof FormatError) return [{ problem: err.message }];
      throw err;
    }
  }
  let file: BackupFile;
  try {
    file = await BackupFile.open(abs, { generation: f.point.generation ?? 1, source: memorySource(bytes) });
  } catch (err) {
    if (corruptNamingFile(err)) return [{ problem: (err as Error).message }];
    throw err;
  }
  const found: Found[] = [];
  try {
    checkFileMatches(file, chain.info, f.point, null);
  } catch (err) {
    if (!corruptNamingFile(err)) throw err;
    found.push({ problem: (err as Error).message });
  }
  await verifyBackupFile(file, chain.keys, (d) => found.push(d));
  await file.close();
  return found;
}

/** Whether `found` names one of the blocks whose record holds byte `pos`. */
function namesBlock(f: FileUnderTest, pos: number, found: readonly { disk?: string; block?: number; diskOffset?: number }[]): boolean {
  return f.map.blocks.get(pos)!.some((b) => found.some((d) => d.disk === b.disk && d.block === b.index && d.diskOffset === b.index * BS));
}

interface Sweep {
  mutations: number;
  /** Mutations the verifier did not report, each in an unnamed index with every point still bit-exact. */
  unseenDead: number;
  failures: string[];
}

/** Every byte xor 0xff and xor one bit, every truncation; checked in memory. */
async function sweepInMemory(chain: Chain, f: FileUnderTest, out: Sweep): Promise<void> {
  const bytes = Buffer.from(f.original);
  const check = async (m: Mutation, view: Buffer) => {
    out.mutations++;
    let problem: string | null = null;
    try {
      const found = await checkInMemory(chain, f, view);
      if (found.length === 0) {
        if (m.kind === 'xor' && f.map.unnamed(m.pos)) out.unseenDead++; // no reader reads it: deadBytesReadBitExact
        else problem = 'not detected';
      } else if (m.kind === 'xor' && f.map.blocks.has(m.pos) && !namesBlock(f, m.pos, found)) {
        problem = `damaged block not named by disk, block and offset: ${JSON.stringify(found)}`;
      }
    } catch (err) {
      problem = `the check threw: ${err instanceof Error ? err.stack : String(err)}`;
    }
    if (problem) out.failures.push(`${chain.name} ${f.rel} ${describeMutation(m, f.map)}: ${problem}`);
  };
  for (let pos = 0; pos < bytes.length; pos++) {
    for (const value of [0xff, 1 << (pos % 8)]) {
      bytes[pos] = f.original[pos]! ^ value;
      await check({ kind: 'xor', pos, value }, bytes);
      bytes[pos] = f.original[pos]!;
    }
  }
  for (let length = 0; length < bytes.length; length++) await check({ kind: 'cut', length }, bytes.subarray(0, length));
}

/**
 * The bytes of indexes no slot names, all changed at once (xor `value`), written to a copy: every
 * point must still read bit-exact, so no change there can alter what a restore reads.
 */
async function deadBytesReadBitExact(chain: Chain, f: FileUnderTest, value: number): Promise<boolean> {
  const bytes = Buffer.from(f.original);
  for (let pos = 0; pos < bytes.length; pos++) if (f.map.unnamed(pos)) bytes[pos]! ^= value;
  const file = path.join(chain.copies[0]!, f.rel);
  await writeFile(file, bytes);
  try {
    return await readsBitExact(chain, chain.copies[0]!);
  } finally {
    await writeFile(file, f.original);
  }
}

/** The sample through the real files and the whole verifyRepository (see the header comment). */
async function sweepWholeVerify(chain: Chain, f: FileUnderTest, out: Sweep): Promise<void> {
  const len = f.original.length;
  // Every SAMPLE-th byte and length, and the first and last byte of every region (each header
  // field group, slot, record, index), cut there too.
  const positions = new Set<number>([len - 1]);
  for (let pos = 0; pos < len; pos += SAMPLE) positions.add(pos);
  for (let pos = 1; pos < len; pos++) if (f.map.region[pos] !== f.map.region[pos - 1] || f.map.blocks.get(pos) !== f.map.blocks.get(pos - 1)) positions.add(pos).add(pos - 1);
  const mutations: Mutation[] = [...positions].map((pos) => ({ kind: 'xor', pos, value: 0xff }));
  for (const length of positions) mutations.push({ kind: 'cut', length });
  await Promise.all(
    chain.copies.map(async (copy, c) => {
      const file = path.join(copy, f.rel);
      const fd = openSync(file, 'r+');
      try {
        for (let k = c; k < mutations.length; k += chain.copies.length) {
          const m = mutations[k]!;
          if (m.kind === 'xor') writeSync(fd, Buffer.of(f.original[m.pos]! ^ m.value), 0, 1, m.pos);
          else ftruncateSync(fd, m.length);
          let problem: string | null = null;
          try {
            const r = await verifyRepository(copy, { password: PASSWORD });
            const mine = r.damage.filter((d) => d.file === file);
            const wrongPassword = [...r.warnings, ...r.damage.map((d) => d.problem)].find((x) => /wrong password/.test(x));
            if (wrongPassword) problem = `reported as a wrong password: ${wrongPassword}`;
            else if (r.ok || mine.length === 0) {
              if (!(m.kind === 'xor' && f.map.unnamed(m.pos) && r.ok)) problem = r.ok ? 'verify says OK' : `damage does not name the file: ${JSON.stringify(r.damage)}`;
            } else if (m.kind === 'xor' && f.map.blocks.has(m.pos)) {
              if (!namesBlock(f, m.pos, mine.filter((d) => d.point === f.point!.id))) problem = `damaged block not named by disk, offset and point: ${JSON.stringify(mine)}`;
            }
          } catch (err) {
            problem = `verify threw: ${err instanceof Error ? err.stack : String(err)}`;
          }
          if (problem) out.failures.push(`${chain.name} ${f.rel} (whole verify) ${describeMutation(m, f.map)}: ${problem}`);
          out.mutations++;
          if (m.kind === 'xor') writeSync(fd, f.original, m.pos, 1, m.pos);
          else writeSync(fd, f.original, m.length, len - m.length, m.length);
        }
      } finally {
        closeSync(fd);
      }
      expect(readFileSync(file).equals(f.original)).toBe(true);
    }),
  );
}

/** The chain's files, relative to its root: the .vbm first, then the backup files. */
function filesOf(chain: Chain): string[] {
  const names = readdirSync(path.join(chain.root, 'j', 'v')).filter((n) => /\.(vbk|vib|vrb)$/.test(n)).sort();
  return ['v.vbm', ...names].map((n) => path.join('j', 'v', n));
}

describe('damage is detected and named', () => {
  for (const name of ['forward', 'reverse', 'encrypted']) {
    it(`${name} chain: every byte flipped (xor 0xff, xor one bit) and every truncation of every file`, async () => {
      const chain = chains.find((c) => c.name === name)!;
      const exhaustive: Sweep = { mutations: 0, unseenDead: 0, failures: [] };
      const whole: Sweep = { mutations: 0, unseenDead: 0, failures: [] };
      let bytes = 0;
      let deadFiles = 0;
      for (const rel of filesOf(chain)) {
        const f = fileUnderTest(chain, rel);
        bytes += f.original.length;
        const t0 = performance.now();
        await sweepInMemory(chain, f, exhaustive);
        const t1 = performance.now();
        await sweepWholeVerify(chain, f, whole);
        if (process.env.DAMAGE_TIMING) console.log(name, rel, f.original.length, 'bytes; in memory', Math.round(t1 - t0), 'ms; whole verify', Math.round(performance.now() - t1), 'ms', whole.mutations);
        if (f.original.some((_, pos) => f.map.unnamed(pos))) {
          deadFiles++;
          for (const value of [0xff, 0x01]) expect(await deadBytesReadBitExact(chain, f, value), `${rel}: unnamed indexes xor ${value}`).toBe(true);
        }
      }
      expect(exhaustive.failures.slice(0, 20), `${exhaustive.failures.length} mutations not reported as they must be`).toEqual([]);
      expect(whole.failures.slice(0, 20), `${whole.failures.length} mutations not reported as they must be`).toEqual([]);
      expect(exhaustive.mutations).toBe(3 * bytes);
      if (name !== 'reverse') expect(exhaustive.unseenDead).toBe(0);
      else expect(deadFiles).toBe(1); // the full: its generation-1 index
      if (process.env.DAMAGE_TIMING) console.log(name, { bytes, exhaustive: exhaustive.mutations, unseenDead: exhaustive.unseenDead, whole: whole.mutations });
      expect((await verifyRepository(chain.root, { password: PASSWORD })).ok).toBe(true);
    });
  }
});

describe('fuzz: whole files with several bytes changed', () => {
  it('random multi-byte changes and cuts of every file: a corrupt error or damage naming the file, never a crash', async () => {
    for (const chain of chains) {
      for (const rel of filesOf(chain)) {
        const f = fileUnderTest(chain, rel);
        const change = fc.record({
          bytes: fc.array(fc.tuple(fc.nat({ max: f.original.length - 1 }), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 16 }),
          cut: fc.option(fc.nat({ max: f.original.length - 1 })),
        });
        await fc.assert(
          fc.asyncProperty(change, async ({ bytes, cut }) => {
            const b = Buffer.from(f.original);
            for (const [pos, value] of bytes) b[pos]! ^= value;
            const view = cut === null ? b : b.subarray(0, cut);
            const found = await checkInMemory(chain, f, view); // throws on a crash
            const changed = cut !== null || bytes.some(([pos]) => b[pos] !== f.original[pos] && !f.map.unnamed(pos));
            if (changed && found.length === 0) throw new Error(`${chain.name} ${rel}: ${JSON.stringify({ bytes, cut })} not detected`);
          }),
          { numRuns: 150 },
        );
      }
    }
  });
});

/** Flips `value` into byte `pos` of `file` while `fn` runs, then puts the original back. */
async function withFlip<T>(file: string, pos: number, fn: () => Promise<T>): Promise<T> {
  const original = await readFile(file);
  const damaged = Buffer.from(original);
  damaged[pos]! ^= 0xff;
  await writeFile(file, damaged);
  try {
    return await fn();
  } finally {
    await writeFile(file, original);
  }
}

/** Offset of the first byte of the payload of block `index` of `disk` in backup file `rel` of a chain. */
async function payloadOf(chain: Chain, rel: string, disk: string, index: number): Promise<number> {
  const f = fileUnderTest(chain, rel);
  for (const [pos, refs] of f.map.blocks) if (refs.some((b) => b.disk === disk && b.index === index)) return pos + RECORD_HEADER_SIZE + 5;
  throw new Error(`no record of ${disk} block ${index} in ${rel}`);
}

describe('readers refuse damage, naming where it is', () => {
  it('a damaged block names file, disk, block, offset and restore point, for readers and verify', async () => {
    const chain = chains.find((c) => c.name === 'forward')!;
    const root = chain.copies[0]!;
    const [fullId, incId] = [...chain.expected.keys()];
    const vbk = filesOf(chain).find((f) => f.endsWith('.vbk'))!;
    const file = path.join(root, vbk);
    // vdc's block 1 shares its record with vda's block 2 (deduplicated); the increment changes
    // vda's and inherits vdc's.
    const pos = await payloadOf(chain, vbk, 'vdc', 1);
    await withFlip(file, pos, async () => {
      const r = await verifyRepository(root);
      expect(r.damage).toEqual([expect.objectContaining({ file, disk: 'vda', block: 2, diskOffset: 2 * BS, point: fullId })]);
      expect(r.damage[0]!.affectedPoints).toEqual([fullId, incId]); // the full and the increment that inherits from it
      const repo = await openRepository(root);
      for (const id of [fullId!, incId!]) {
        const p = await repo.openRestorePoint(id);
        const err = await p.openDisk('vdc').read(BS + 7, 10).catch((e: unknown) => e);
        await p.close();
        expect(err).toBeInstanceOf(BulwarkError);
        const e = err as BulwarkError;
        expect(e.kind).toBe('corrupt');
        expect(e.context).toMatchObject({ file, disk: 'vdc', block: 1, offset: BS, point: id });
        expect(e.message).toMatch(/vdc.*block 1.*offset 262144.*restore point/);
      }
    });
  });

  it('a damaged current commit slot is an error, never the previous generation read in its place', async () => {
    // The reverse full holds the newest point at generation 3; its other slot still holds
    // generation 2 (the point before, now in a .vrb). A reader that fell back to that slot would
    // return the older point's data as the newest's.
    const chain = chains.find((c) => c.name === 'reverse')!;
    const root = chain.copies[0]!;
    const newest = [...chain.expected.keys()].at(-1)!;
    const vbk = filesOf(chain).find((f) => f.endsWith('.vbk'))!;
    const file = path.join(root, vbk);
    const page = (await readFile(file)).subarray(0, HEADER_PAGE_SIZE);
    const at = COMMIT_SLOT_OFFSETS.find((o) => decodeCommitSlot(page.subarray(o, o + COMMIT_SLOT_SIZE), 1 << 30)?.generation === 3)!;
    await withFlip(file, at + 8, async () => {
      const repo = await openRepository(root);
      const err = await repo.openRestorePoint(newest).then(
        async (p) => {
          const data = await p.openDisk('vda').read(0, DISKS[0]!.size);
          await p.close();
          return data.equals(chain.expected.get(newest)!.vda!) ? 'read the newest point' : 'read another point in its place';
        },
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(BulwarkError);
      expect((err as BulwarkError).kind).toBe('corrupt');
      expect((err as BulwarkError).message).toContain(file);
      expect((err as BulwarkError).message).toMatch(/generation 3/);
    });
  });

  it('encrypted: damaged data is corruption with the right password, a wrong password is a wrong password', async () => {
    const chain = chains.find((c) => c.name === 'encrypted')!;
    const root = chain.copies[0]!;
    const [fullId] = [...chain.expected.keys()];
    const repo = await openRepository(root);
    const wrong = await repo.openRestorePoint(fullId!, { password: 'battery staple' }).catch((e: unknown) => e);
    expect(wrong).toMatchObject({ kind: 'unauthorized' });
    expect((wrong as BulwarkError).message).toMatch(/wrong password/);
    const clean = await verifyRepository(root, { password: 'battery staple' });
    expect(clean.ok).toBe(true);
    expect(clean.warnings.join('\n')).toMatch(/wrong password/);
    const vbk = filesOf(chain).find((f) => f.endsWith('.vbk'))!;
    const file = path.join(root, vbk);
    await withFlip(file, await payloadOf(chain, vbk, 'vdb', 0), async () => {
      const p = await repo.openRestorePoint(fullId!, { password: PASSWORD });
      const err = await p.openDisk('vdb').read(0, 10).catch((e: unknown) => e);
      await p.close();
      expect(err).toMatchObject({ kind: 'corrupt', context: { file, disk: 'vdb', block: 0, offset: 0, point: fullId } });
      const right = await verifyRepository(root, { password: PASSWORD });
      expect(right.damage).toEqual([expect.objectContaining({ file, disk: 'vdb', block: 0, point: fullId })]);
      expect(right.warnings.join('\n')).not.toMatch(/password/);
      const wrongPw = await verifyRepository(root, { password: 'battery staple' });
      expect(wrongPw.damage).toEqual([expect.objectContaining({ file, disk: 'vdb', block: 0, point: fullId })]);
      expect(wrongPw.warnings.join('\n')).toMatch(/wrong password/);
    });
  });
});
