// The chain metadata file (.vbm) of one VM folder: a 64-byte header and a JSON body that lists
// every chain and restore point. docs/formats/backup-files.md section 4. The body is validated
// field by field: a repository is imported from these files with no database.
import { crc32c } from '@node-rs/crc32';
import { check, FormatError, readU64, writeU64 } from './errors.js';
import { CHAIN_METADATA_MAGIC } from './magic.js';
import { isBlockSize, type BlockSize, type Compression } from './header.js';
import { isUuid } from './uuid.js';

export const CHAIN_METADATA_HEADER_SIZE = 64;
export const MAX_CHAIN_METADATA_BODY = 64 * 1024 * 1024;
const S = 'chain metadata';

export type ChainMethod = 'forward' | 'reverse';
export type PointKind = 'full' | 'incremental' | 'reverse';

export interface ChainEncryption {
  readonly algorithm: 'aes-256-gcm';
  readonly kdf: 'scrypt';
  readonly log2N: number;
  readonly r: number;
  readonly p: number;
  /** hex, 32 bytes */
  readonly salt: string;
  /** hex, 32 bytes */
  readonly keyCheck: string;
  readonly hint: string;
}

export interface PointRecord {
  readonly id: string;
  /** ISO 8601 */
  readonly time: string;
  readonly kind: PointKind;
  /** File name inside the VM folder. */
  readonly file: string;
  readonly fileId: string;
  /** Point whose file this one inherits from; null for a full. */
  readonly base: string | null;
  /** Commit-slot generation of the file at which this point is valid. */
  readonly generation: number;
  readonly disks: readonly { readonly name: string; readonly size: number }[];
  readonly fileBytes: number;
  /**
   * Other file ids an inheriting point's header may name as its base file when it inherits from
   * this point: the increment merged into a full (section 5, merge), or the full a reverse
   * increment's point moved out of (section 5, reverse injection). Absent when none.
   */
  readonly aliasFileIds?: readonly string[];
}

export interface ChainRecord {
  readonly id: string;
  readonly method: ChainMethod;
  readonly blockSize: BlockSize;
  readonly compression: Compression;
  readonly encryption: ChainEncryption | null;
  /** Oldest first. */
  readonly points: readonly PointRecord[];
}

export interface TransformJournal {
  readonly kind: 'merge' | 'synthetic-full' | 'reverse-inject' | 'compact';
  readonly startedAt: string;
  readonly points: readonly string[];
  readonly files: readonly { readonly name: string; readonly generationBefore: number }[];
  readonly step: string;
  /** Reverse injection: the point being injected (id, ISO time), to roll forward after a crash. */
  readonly newPoint?: { readonly id: string; readonly time: string };
}

/** Blocks a health check found damaged, for the next backup to store fresh (section 4). */
export interface PendingRepairRecord {
  readonly detectedAt: string;
  /** The point found damaged. */
  readonly point: string;
  /** Damage an increment cannot repair (header, index, table pages): an active full is needed. */
  readonly metadataDamaged: boolean;
  readonly disks: readonly { readonly disk: string; readonly blocks: readonly number[] }[];
}

/**
 * A point a health check found damaged (section 4). Kept while the point exists, after its
 * repair too: the damaged records stay in their files, and retention never merges a damaged
 * point into the full (section 5, "Damage and merges").
 */
export interface DamagedPointRecord {
  readonly point: string;
  readonly detectedAt: string;
  /** Header, index or table pages of a file of the point's chain. */
  readonly metadataDamaged: boolean;
  readonly disks: readonly { readonly disk: string; readonly blocks: readonly number[] }[];
}

export interface ChainMetadata {
  readonly version: 1;
  readonly job: string;
  readonly vm: string;
  readonly chains: readonly ChainRecord[];
  readonly journal: TransformJournal | null;
  /** Absent or null when no repair is pending. */
  readonly pendingRepair?: PendingRepairRecord | null;
  /** Absent or empty when no health check found a point damaged. */
  readonly damagedPoints?: readonly DamagedPointRecord[];
}

export interface ChainMetadataFile {
  readonly generation: number;
  readonly body: ChainMetadata;
}

export function encodeChainMetadata(generation: number, body: ChainMetadata): Buffer {
  validateChainMetadata(body);
  const json = Buffer.from(JSON.stringify(body), 'utf8');
  const b = Buffer.alloc(CHAIN_METADATA_HEADER_SIZE + json.length);
  CHAIN_METADATA_MAGIC.copy(b, 0);
  writeU64(b, 16, generation);
  writeU64(b, 24, json.length);
  b.writeUInt32LE(crc32c(json), 32);
  b.writeUInt32LE(crc32c(b.subarray(0, 60)), 60);
  json.copy(b, CHAIN_METADATA_HEADER_SIZE);
  return b;
}

export function decodeChainMetadata(b: Buffer): ChainMetadataFile {
  check(b.length >= CHAIN_METADATA_HEADER_SIZE, S, `needs ${CHAIN_METADATA_HEADER_SIZE} bytes, got ${b.length}`);
  check(b.subarray(0, 8).equals(CHAIN_METADATA_MAGIC), S, 'bad magic: not a Bulwark .vbm');
  check(b.readUInt32LE(60) === crc32c(b.subarray(0, 60)), S, 'header checksum mismatch');
  const generation = readU64(b, 16, S, 'generation');
  const bodyLength = readU64(b, 24, S, 'body length');
  check(bodyLength <= MAX_CHAIN_METADATA_BODY, S, 'body too large');
  check(b.length === CHAIN_METADATA_HEADER_SIZE + bodyLength, S, `body is ${b.length - CHAIN_METADATA_HEADER_SIZE} bytes, header says ${bodyLength} (truncated?)`);
  const json = b.subarray(CHAIN_METADATA_HEADER_SIZE);
  check(b.readUInt32LE(32) === crc32c(json), S, 'body checksum mismatch');
  let body: unknown;
  try {
    body = JSON.parse(json.toString('utf8'));
  } catch (err) {
    throw new FormatError(S, `body is not JSON: ${(err as Error).message}`);
  }
  validateChainMetadata(body);
  return { generation, body };
}

// --- validation -----------------------------------------------------------------------------

type Obj = Record<string, unknown>;
function obj(v: unknown, where: string): Obj {
  check(typeof v === 'object' && v !== null && !Array.isArray(v), S, `${where} must be an object`);
  return v as Obj;
}
function str(o: Obj, k: string, where: string): string {
  const v = o[k];
  check(typeof v === 'string', S, `${where}.${k} must be a string`);
  return v;
}
function int(o: Obj, k: string, where: string, min = 0): number {
  const v = o[k];
  check(typeof v === 'number' && Number.isSafeInteger(v) && v >= min, S, `${where}.${k} must be an integer >= ${min}`);
  return v;
}
function arr(o: Obj, k: string, where: string): unknown[] {
  const v = o[k];
  check(Array.isArray(v), S, `${where}.${k} must be an array`);
  return v;
}
function oneOf<T extends string>(o: Obj, k: string, values: readonly T[], where: string): T {
  const v = str(o, k, where);
  check((values as readonly string[]).includes(v), S, `${where}.${k} must be one of ${values.join(', ')}`);
  return v as T;
}
function uuid(o: Obj, k: string, where: string): string {
  const v = str(o, k, where);
  check(isUuid(v), S, `${where}.${k} must be a UUID`);
  return v;
}
const HEX32 = /^[0-9a-f]{64}$/;
const FILE_NAME = /^[A-Za-z0-9._%-]{1,200}$/;

/** Asserts that `v` is a valid ChainMetadata body (shape and cross references). */
export function validateChainMetadata(v: unknown): asserts v is ChainMetadata {
  const o = obj(v, 'body');
  check(o.version === 1, S, `unsupported body version ${JSON.stringify(o.version)}`);
  str(o, 'job', 'body');
  str(o, 'vm', 'body');
  const pointIds = new Set<string>();
  const files = new Set<string>();
  arr(o, 'chains', 'body').forEach((c, ci) => {
    const w = `chains[${ci}]`;
    const co = obj(c, w);
    uuid(co, 'id', w);
    oneOf(co, 'method', ['forward', 'reverse'], w);
    check(isBlockSize(int(co, 'blockSize', w)), S, `${w}.blockSize is not an allowed block size`);
    oneOf(co, 'compression', ['none', 'zstd', 'lz4'], w);
    if (co.encryption !== null) {
      const e = obj(co.encryption, `${w}.encryption`);
      const ew = `${w}.encryption`;
      oneOf(e, 'algorithm', ['aes-256-gcm'], ew);
      oneOf(e, 'kdf', ['scrypt'], ew);
      check(int(e, 'log2N', ew) <= 22, S, `${ew}.log2N too large`);
      int(e, 'r', ew, 1);
      int(e, 'p', ew, 1);
      check(HEX32.test(str(e, 'salt', ew)) && HEX32.test(str(e, 'keyCheck', ew)), S, `${ew} salt/keyCheck must be 64 hex digits`);
      str(e, 'hint', ew);
    }
    const chainPoints = new Set<string>();
    arr(co, 'points', w).forEach((p, pi) => {
      const pw = `${w}.points[${pi}]`;
      const po = obj(p, pw);
      const id = uuid(po, 'id', pw);
      check(!pointIds.has(id), S, `${pw}.id duplicates another point`);
      pointIds.add(id);
      chainPoints.add(id);
      check(!Number.isNaN(Date.parse(str(po, 'time', pw))), S, `${pw}.time is not a date`);
      const kind = oneOf(po, 'kind', ['full', 'incremental', 'reverse'], pw);
      const file = str(po, 'file', pw);
      check(FILE_NAME.test(file) && file !== '.' && file !== '..', S, `${pw}.file is not a plain file name`);
      check(!files.has(file), S, `${pw}.file is named by two points`);
      files.add(file);
      uuid(po, 'fileId', pw);
      if (kind === 'full') check(po.base === null, S, `${pw}.base must be null for a full`);
      else check(typeof po.base === 'string' && isUuid(po.base), S, `${pw}.base must be a point id`);
      int(po, 'generation', pw, 1);
      int(po, 'fileBytes', pw);
      if (po.aliasFileIds !== undefined) {
        check(Array.isArray(po.aliasFileIds) && po.aliasFileIds.every((x) => typeof x === 'string' && isUuid(x)), S, `${pw}.aliasFileIds must be file ids`);
      }
      arr(po, 'disks', pw).forEach((d, di) => {
        const dw = `${pw}.disks[${di}]`;
        const dobj = obj(d, dw);
        str(dobj, 'name', dw);
        int(dobj, 'size', dw);
      });
    });
    // Bases must be points of the same chain.
    for (const p of co.points as Obj[]) {
      if (typeof p.base === 'string') check(chainPoints.has(p.base), S, `${w}: point ${String(p.id)} has base ${p.base} outside its chain`);
    }
  });
  if (o.pendingRepair !== undefined && o.pendingRepair !== null) {
    const r = obj(o.pendingRepair, 'pendingRepair');
    check(!Number.isNaN(Date.parse(str(r, 'detectedAt', 'pendingRepair'))), S, 'pendingRepair.detectedAt is not a date');
    str(r, 'point', 'pendingRepair');
    check(typeof r.metadataDamaged === 'boolean', S, 'pendingRepair.metadataDamaged must be a boolean');
    arr(r, 'disks', 'pendingRepair').forEach((d, i) => {
      const dw = `pendingRepair.disks[${i}]`;
      const dobj = obj(d, dw);
      str(dobj, 'disk', dw);
      arr(dobj, 'blocks', dw).forEach((b, j) => check(typeof b === 'number' && Number.isSafeInteger(b) && b >= 0, S, `${dw}.blocks[${j}] must be a block index`));
    });
  }
  if (o.damagedPoints !== undefined) {
    check(Array.isArray(o.damagedPoints), S, 'damagedPoints must be an array');
    (o.damagedPoints as unknown[]).forEach((x, i) => {
      const w = `damagedPoints[${i}]`;
      const r = obj(x, w);
      str(r, 'point', w);
      check(!Number.isNaN(Date.parse(str(r, 'detectedAt', w))), S, `${w}.detectedAt is not a date`);
      check(typeof r.metadataDamaged === 'boolean', S, `${w}.metadataDamaged must be a boolean`);
      arr(r, 'disks', w).forEach((d, k) => {
        const dw = `${w}.disks[${k}]`;
        const dobj = obj(d, dw);
        str(dobj, 'disk', dw);
        arr(dobj, 'blocks', dw).forEach((b, j) => check(typeof b === 'number' && Number.isSafeInteger(b) && b >= 0, S, `${dw}.blocks[${j}] must be a block index`));
      });
    });
  }
  if (o.journal !== null) {
    const j = obj(o.journal, 'journal');
    oneOf(j, 'kind', ['merge', 'synthetic-full', 'reverse-inject', 'compact'], 'journal');
    str(j, 'startedAt', 'journal');
    str(j, 'step', 'journal');
    if (j.newPoint !== undefined) {
      const np = obj(j.newPoint, 'journal.newPoint');
      uuid(np, 'id', 'journal.newPoint');
      check(!Number.isNaN(Date.parse(str(np, 'time', 'journal.newPoint'))), S, 'journal.newPoint.time is not a date');
    }
    arr(j, 'points', 'journal').forEach((p, i) => check(typeof p === 'string', S, `journal.points[${i}] must be a string`));
    arr(j, 'files', 'journal').forEach((f, i) => {
      const fo = obj(f, `journal.files[${i}]`);
      str(fo, 'name', `journal.files[${i}]`);
      int(fo, 'generationBefore', `journal.files[${i}]`);
    });
  }
}
