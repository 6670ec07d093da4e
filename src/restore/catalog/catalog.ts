// The guest file index (docs/formats/file-index.md): after a backup, the new restore point is
// mounted read-only, every recognised file system is walked, and the list (path, type, size,
// mtime) is written as gzip NDJSON next to the point's backup file. Searches read these files.
import { createWriteStream } from 'node:fs';
import { lstat, mkdtemp, open, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, posix } from 'node:path';
import { createInterface } from 'node:readline';
import { pipeline } from 'node:stream/promises';
import { Readable } from 'node:stream';
import { createGunzip, createGzip } from 'node:zlib';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { Repository, RestorePointInfo } from '../../repository/index.js';
import { publish, temporaryNameFor, trackTemporary } from '../../storage/local-fs.js';
import { fsName, mountpointOf } from '../mount/guest-paths.js';
import { describeFileSystems, mountRestorePoint, type FileSystemView, type PointMount } from '../mount/point-mount.js';
import { isSealedFileIndex } from '../../format/sealed-file-index.js';
import { sealStage, unsealedBytes, type IndexSeal, type IndexUnlock } from './sealed-index.js';

const log = logger('file-index');

export const FILE_INDEX_FORMAT = 'bulwark file index v1';
export const FILE_INDEX_SUFFIX = '.files.gz';

export type EntryType = 'f' | 'd' | 'l' | 'o';

export interface FileIndexEntry {
  /** Guest path, or `NAME:/path` when the file system's guest mount point is unknown. */
  readonly p: string;
  readonly t: EntryType;
  readonly s: number;
  /** Modification time, whole seconds since the epoch. */
  readonly m: number;
}

export interface FileIndexHeader {
  readonly format: typeof FILE_INDEX_FORMAT;
  readonly point: string;
  readonly job: string;
  readonly vm: string;
  readonly pointTime: string;
  readonly created: string;
  readonly filesystems: Array<Omit<FileSystemView, 'path' | 'disk' | 'partition'>>;
  readonly skipped: Array<{ name: string; type: string; reason: string }>;
}

/** Where the index of a point lives: beside its backup file. */
export function fileIndexPath(point: Pick<RestorePointInfo, 'id' | 'file'>): string {
  return join(dirname(point.file), `${point.id}${FILE_INDEX_SUFFIX}`);
}

export interface IndexResult {
  readonly point: string;
  readonly file: string;
  readonly entries: number;
  readonly filesystems: number;
  /** Written in the sealed form (the point's chain is encrypted). */
  readonly sealed: boolean;
  readonly durationMs: number;
}

/**
 * Builds the file index of one restore point: mounts it (under a private temp folder), walks
 * every mounted file system, writes `<point id>.files.gz` beside the point (atomically), unmounts,
 * and removes indexes of points no longer in that VM folder's chain metadata.
 */
export async function indexRestorePoint(o: { repository: Repository; pointId: string; runDir?: string; /** of an encrypted point */ password?: string }): Promise<IndexResult> {
  const started = Date.now();
  const work = await mkdtemp(join(tmpdir(), 'bulwark-index-'));
  try {
    const m = await mountRestorePoint({
      repository: o.repository,
      pointId: o.pointId,
      at: join(work, 'mnt'),
      ...(o.runDir !== undefined ? { runDir: o.runDir } : {}),
      ...(o.password !== undefined ? { password: o.password } : {}),
    });
    try {
      const point = m.point;
      const header: FileIndexHeader = {
        format: FILE_INDEX_FORMAT,
        point: point.id,
        job: point.job,
        vm: point.vm,
        pointTime: point.time.toISOString(),
        created: new Date().toISOString(),
        filesystems: describeFileSystems(m).map(({ path: _p, disk: _d, partition: _n, ...rest }) => rest),
        skipped: m.mount.skipped.map((s) => ({ name: fsName(s), type: s.type, reason: s.reason })),
      };
      const target = fileIndexPath(point);
      // A point of an encrypted chain gets a sealed index: path names are guest data too.
      const seal = m.encryption ? { kdf: m.encryption.kdf, keys: m.encryption.keys, pointId: point.id } : undefined;
      const count = await writeIndex(target, header, indexEntries(m), seal ? { seal } : {});
      await removeOrphanIndexes(o.repository, point);
      const result = { point: point.id, file: target, entries: count, filesystems: m.mount.filesystems.length, sealed: seal !== undefined, durationMs: Date.now() - started };
      log.info(result, 'guest file index written');
      return result;
    } finally {
      await m.close();
    }
  } finally {
    await rm(work, { recursive: true, force: true }).catch(() => undefined);
  }
}

/**
 * Every object of every mounted file system, as index entries: guest paths where the file
 * system's guest mount point is known (an inner mount point such as /srv is listed from its own
 * file system, not from the empty folder on the root), `NAME:/path` otherwise.
 */
export async function* indexEntries(m: Pick<PointMount, 'mount' | 'layout'>): AsyncGenerator<FileIndexEntry> {
  for (const f of m.mount.filesystems) yield* walk(f.path, mountpointOf(m.layout, f) ?? `${fsName(f)}:/`);
}

async function* walk(hostDir: string, guestDir: string): AsyncGenerator<FileIndexEntry> {
  let names: string[];
  try {
    names = (await readdir(hostDir)).sort();
  } catch (err) {
    log.warn({ dir: hostDir, err: describeError(err) }, 'folder cannot be listed; index skips it');
    return;
  }
  const dirs: Array<[string, string]> = [];
  for (const name of names) {
    const host = join(hostDir, name);
    const guest = guestDir.endsWith('/') ? `${guestDir}${name}` : `${guestDir}/${name}`;
    let st;
    try {
      st = await lstat(host);
    } catch (err) {
      // A damaged guest file system (EIO) or an unreadable entry: said, not silently dropped.
      log.warn({ path: guest, file: host, err: describeError(err) }, 'entry cannot be read; index skips it');
      continue;
    }
    const t: EntryType = st.isFile() ? 'f' : st.isDirectory() ? 'd' : st.isSymbolicLink() ? 'l' : 'o';
    yield { p: guest, t, s: t === 'f' ? st.size : 0, m: Math.floor(st.mtimeMs / 1000) };
    if (t === 'd') dirs.push([host, guest]);
  }
  for (const [h, g] of dirs) yield* walk(h, g);
}

/**
 * Writes header, entries and trailer as gzip NDJSON to a temporary, then renames it into place;
 * with `seal`, in the sealed form (docs/formats/file-index.md).
 */
export async function writeIndex(
  target: string,
  header: FileIndexHeader,
  entries: AsyncIterable<FileIndexEntry> | Iterable<FileIndexEntry>,
  opts: { seal?: IndexSeal } = {},
): Promise<number> {
  const tmp = temporaryNameFor(target);
  const untrack = trackTemporary(tmp);
  let count = 0;
  async function* lines(): AsyncGenerator<string> {
    yield `${JSON.stringify(header)}\n`;
    let batch = '';
    for await (const e of entries) {
      batch += `${JSON.stringify({ p: e.p, t: e.t, s: e.s, m: e.m })}\n`;
      count++;
      if (batch.length > 65536) {
        yield batch;
        batch = '';
      }
    }
    yield `${batch}${JSON.stringify({ end: true, entries: count })}\n`;
  }
  try {
    const out = createWriteStream(tmp, { mode: 0o600, flush: true });
    if (opts.seal) await pipeline(Readable.from(lines()), createGzip(), sealStage(opts.seal), out);
    else await pipeline(Readable.from(lines()), createGzip(), out);
    await publish(tmp, target);
  } catch (err) {
    await rm(tmp, { force: true });
    throw new BulwarkError(`cannot write the file index ${target}`, { context: { file: target }, cause: err });
  } finally {
    untrack();
  }
  return count;
}

export interface ReadIndexOptions {
  /** Keys for a sealed index (a point of an encrypted chain); without, a sealed index is refused as `unauthorized`. */
  readonly unlock?: IndexUnlock;
  /** The point the index belongs to (sealed frames are bound to it). Default: from the file name. */
  readonly pointId?: string;
}

/**
 * Reads an index, clear or sealed (told apart by its first bytes): the header, then each entry
 * through `onEntry`. Throws when it is incomplete or damaged (`corrupt`), or sealed without the
 * right keys (`unauthorized`).
 */
export async function readIndex(file: string, onEntry: (e: FileIndexEntry) => void, opts: ReadIndexOptions = {}): Promise<FileIndexHeader> {
  let fh;
  try {
    fh = await open(file, 'r');
  } catch (err) {
    throw new BulwarkError(`the file index ${file} cannot be read`, { kind: (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'not-found' : 'corrupt', context: { file }, cause: err });
  }
  try {
    const first = Buffer.alloc(8);
    const { bytesRead } = await fh.read(first, 0, 8, 0);
    const pointId = opts.pointId ?? posix.basename(file).replace(/\.files\.gz$/, '');
    if (isSealedFileIndex(first.subarray(0, bytesRead))) return await readIndexLines(file, Readable.from(unsealedBytes(fh, file, pointId, opts.unlock)), onEntry);
    if (bytesRead >= 2 && first[0] === 0x1f && first[1] === 0x8b) return await readIndexLines(file, fh.createReadStream({ start: 0, autoClose: false }), onEntry);
    throw new BulwarkError(`${file} is not a file index (neither gzip nor sealed)`, { kind: 'corrupt', context: { file } });
  } finally {
    await fh.close();
  }
}

async function readIndexLines(file: string, source: Readable, onEntry: (e: FileIndexEntry) => void): Promise<FileIndexHeader> {
  const gunzip = createGunzip();
  let sourceError: unknown;
  source.on('error', (err) => {
    sourceError = err;
    gunzip.destroy(err);
  });
  const rl = createInterface({ input: source.pipe(gunzip), crlfDelay: Infinity });
  let header: FileIndexHeader | undefined;
  let trailer: { end: true; entries: number } | undefined;
  let count = 0;
  try {
    for await (const line of rl) {
      if (line === '') continue;
      const obj = JSON.parse(line) as Record<string, unknown>;
      if (!header) {
        if (obj.format !== FILE_INDEX_FORMAT) throw new BulwarkError(`${file} is a file index of a format this version does not read (${String(obj.format)})`, { kind: 'corrupt', context: { file } });
        header = obj as unknown as FileIndexHeader;
        continue;
      }
      if (obj.end === true) {
        trailer = obj as { end: true; entries: number };
        continue;
      }
      count++;
      onEntry(obj as unknown as FileIndexEntry);
    }
  } catch (err) {
    if (sourceError instanceof BulwarkError) throw sourceError;
    if (err instanceof BulwarkError) throw err;
    throw new BulwarkError(`the file index ${file} cannot be read`, { kind: 'corrupt', context: { file }, cause: err });
  }
  if (!header) throw new BulwarkError(`the file index ${file} is empty`, { kind: 'corrupt', context: { file } });
  if (!trailer || trailer.entries !== count) throw new BulwarkError(`the file index ${file} is incomplete (${count} entries${trailer ? `, trailer says ${trailer.entries}` : ', no trailer'})`, { kind: 'corrupt', context: { file } });
  return header;
}

/** Removes indexes in a point's VM folder whose point is no longer in the chain metadata. */
async function removeOrphanIndexes(repository: Repository, point: RestorePointInfo): Promise<void> {
  const dir = dirname(point.file);
  const live = new Set((await repository.listRestorePoints({ job: point.job, vm: point.vm })).map((p) => p.id));
  for (const name of await readdir(dir)) {
    if (!name.endsWith(FILE_INDEX_SUFFIX)) continue;
    const id = name.slice(0, -FILE_INDEX_SUFFIX.length);
    if (!live.has(id)) {
      await rm(join(dir, name), { force: true });
      log.info({ file: join(dir, name) }, 'removed the file index of a point that no longer exists');
    }
  }
}

// ---- search -------------------------------------------------------------------------------------

type GlobToken = { readonly kind: 'star' } | { readonly kind: 'one' } | { readonly kind: 'char'; readonly c: string } | { readonly kind: 'set'; readonly negate: boolean; readonly ranges: ReadonlyArray<readonly [string, string]> };

function parseGlob(glob: string): GlobToken[] {
  const chars = Array.from(glob);
  const out: GlobToken[] = [];
  for (let i = 0; i < chars.length; i++) {
    const c = chars[i]!;
    if (c === '*') {
      if (out.at(-1)?.kind !== 'star') out.push({ kind: 'star' });
    } else if (c === '?') out.push({ kind: 'one' });
    else if (c === '[' && chars.indexOf(']', i + 2) > 0) {
      // `[...]` up to the first `]` after at least one member (`[]x]` holds `]`); `!` or `^` negates.
      const end = chars.indexOf(']', i + 2);
      let body = chars.slice(i + 1, end);
      const negate = body[0] === '!' || body[0] === '^';
      if (negate) body = body.slice(1);
      const ranges: Array<readonly [string, string]> = [];
      for (let k = 0; k < body.length; k++) {
        const lo = body[k]!;
        if (body[k + 1] === '-' && k + 2 < body.length) {
          const hi = body[k + 2]!;
          if (hi < lo) throw new BulwarkError(`the search pattern ${glob} has a range [${lo}-${hi}] whose end comes before its start`, { kind: 'invalid', hint: `write it [${hi}-${lo}]` });
          ranges.push([lo, hi]);
          k += 2;
        } else ranges.push([lo, lo]);
      }
      out.push({ kind: 'set', negate, ranges });
      i = end;
    } else out.push({ kind: 'char', c: c.toLowerCase() });
  }
  return out;
}

function matchesOne(t: Exclude<GlobToken, { kind: 'star' }>, c: string): boolean {
  switch (t.kind) {
    case 'one':
      return true;
    case 'char':
      return t.c === c.toLowerCase();
    case 'set': {
      const forms = [c, c.toLowerCase(), c.toUpperCase()];
      const hit = t.ranges.some(([lo, hi]) => forms.some((f) => f >= lo && f <= hi));
      return hit !== t.negate;
    }
  }
}

/** A compiled glob: `test` says whether a whole string matches. */
export interface Glob {
  test(s: string): boolean;
}

/**
 * A glob (`*`, `?`, `[...]`, `[!...]`) matched case-insensitively against whole strings, in time
 * proportional to pattern length times string length: no regular expression, whose backtracking
 * takes exponential time on patterns such as `*a*a*a*a*a*a*a*a*a*a*a*a*b` (a search froze the
 * server's event loop, and with it every NBD export it serves, for minutes per path).
 */
export function compileGlob(glob: string): Glob {
  const tokens = parseGlob(glob);
  return {
    test(s: string): boolean {
      const chars = Array.from(s);
      let p = 0;
      let i = 0;
      let starP = -1;
      let starI = 0;
      while (i < chars.length) {
        const t = tokens[p];
        if (t !== undefined && t.kind === 'star') {
          starP = p++;
          starI = i;
        } else if (t !== undefined && matchesOne(t, chars[i]!)) {
          p++;
          i++;
        } else if (starP >= 0) {
          // The last star takes one more character; everything after it is tried again from there.
          p = starP + 1;
          i = ++starI;
        } else return false;
      }
      while (tokens[p]?.kind === 'star') p++;
      return p === tokens.length;
    },
  };
}

export interface SearchPoint {
  readonly id: string;
  readonly time: string;
}

export interface SearchVersion {
  readonly type: EntryType;
  readonly size: number;
  /** ISO time of the modification time. */
  readonly mtime: string;
  /** Points holding this version, oldest first. */
  readonly points: SearchPoint[];
}

export interface SearchMatch {
  readonly vm: string;
  readonly path: string;
  readonly versions: SearchVersion[];
}

export interface SearchResult {
  readonly pattern: string;
  readonly matches: SearchMatch[];
  /** Points searched (those with an index). */
  readonly pointsSearched: number;
  /** Points without an index (indexing off at the time, or failed), or with a damaged one. */
  readonly pointsWithoutIndex: Array<SearchPoint & { vm: string; reason: string }>;
  /** Points whose index is sealed (encrypted chain) and whose password is not known: not searched. */
  readonly pointsLocked: Array<SearchPoint & { vm: string; reason: string }>;
  /** True when more paths matched than `limit`. */
  readonly truncated: boolean;
}

export interface SearchablePoint extends SearchPoint {
  readonly vm: string;
  /** The index file (fileIndexPath), or null when the point's folder was not found. */
  readonly indexFile: string | null;
  /** Keys for a sealed index (points of encrypted chains). */
  readonly unlock?: IndexUnlock;
}

/** Searches the indexes of the given points for PATTERN; see docs/formats/file-index.md. */
export async function searchIndexes(points: readonly SearchablePoint[], pattern: string, opts: { limit?: number } = {}): Promise<SearchResult> {
  if (pattern.trim() === '') throw new BulwarkError('the search pattern is empty', { kind: 'invalid' });
  const limit = opts.limit ?? 1000;
  const re = compileGlob(pattern);
  const onPath = pattern.includes('/');
  const byPath = new Map<string, { vm: string; path: string; versions: Map<string, { type: EntryType; size: number; m: number; points: SearchPoint[] }> }>();
  const without: SearchResult['pointsWithoutIndex'] = [];
  const locked: SearchResult['pointsLocked'] = [];
  let searched = 0;
  let truncated = false;
  const ordered = [...points].sort((a, b) => a.time.localeCompare(b.time));
  for (const p of ordered) {
    if (p.indexFile === null) {
      without.push({ id: p.id, time: p.time, vm: p.vm, reason: 'the restore point was not found in its repository' });
      continue;
    }
    // A point's matches count only once its whole index has been read: an index that breaks
    // partway (truncated, damaged) must not cite the point for what it read before the break.
    // Bounded: hits for paths already found, plus at most the room left under `limit` for new ones.
    const hits: FileIndexEntry[] = [];
    let newPaths = 0;
    let cut = false;
    try {
      await readIndex(p.indexFile, (e) => {
        const name = onPath ? e.p.replace(/^[A-Za-z0-9._-]+:/, '') : posix.basename(e.p);
        if (!re.test(name)) return;
        if (!byPath.has(`${p.vm}\0${e.p}`)) {
          if (byPath.size + newPaths >= limit) {
            cut = true;
            return;
          }
          newPaths++;
        }
        hits.push(e);
      }, { ...(p.unlock ? { unlock: p.unlock } : {}), pointId: p.id });
      searched++;
      truncated ||= cut;
      for (const e of hits) {
        const key = `${p.vm}\0${e.p}`;
        let match = byPath.get(key);
        if (!match) {
          match = { vm: p.vm, path: e.p, versions: new Map() };
          byPath.set(key, match);
        }
        const vkey = `${e.t}/${e.s}/${e.m}`;
        let v = match.versions.get(vkey);
        if (!v) {
          v = { type: e.t, size: e.s, m: e.m, points: [] };
          match.versions.set(vkey, v);
        }
        v.points.push({ id: p.id, time: p.time });
      }
    } catch (err) {
      if (err instanceof BulwarkError && (err.kind === 'unauthorized' || err.kind === 'forbidden')) {
        // No password (or a wrong one): refused before any entry was read.
        locked.push({ id: p.id, time: p.time, vm: p.vm, reason: describeError(err) });
        continue;
      }
      const missing = (err instanceof BulwarkError ? err.cause : err) as NodeJS.ErrnoException | undefined;
      without.push({ id: p.id, time: p.time, vm: p.vm, reason: missing?.code === 'ENOENT' ? 'no file index (indexing was off or failed)' : describeError(err) });
    }
  }
  const matches = [...byPath.values()]
    .sort((a, b) => a.vm.localeCompare(b.vm) || a.path.localeCompare(b.path))
    .map((m) => ({
      vm: m.vm,
      path: m.path,
      versions: [...m.versions.values()].map((v) => ({ type: v.type, size: v.size, mtime: new Date(v.m * 1000).toISOString(), points: v.points })),
    }));
  return { pattern, matches, pointsSearched: searched, pointsWithoutIndex: without, pointsLocked: locked, truncated };
}

/**
 * Joins searches over disjoint sets of points (the server's own repositories and each agent's):
 * the same path's versions are joined, each version's points kept oldest first; at most `limit`
 * paths.
 */
export function mergeSearchResults(pattern: string, results: readonly SearchResult[], limit = 1000): SearchResult {
  const byPath = new Map<string, { vm: string; path: string; versions: Map<string, SearchVersion> }>();
  let truncated = results.some((r) => r.truncated);
  for (const r of results) {
    for (const m of r.matches) {
      const key = `${m.vm}\0${m.path}`;
      let match = byPath.get(key);
      if (!match) {
        if (byPath.size >= limit) {
          truncated = true;
          continue;
        }
        match = { vm: m.vm, path: m.path, versions: new Map() };
        byPath.set(key, match);
      }
      for (const v of m.versions) {
        const vkey = `${v.type}/${v.size}/${v.mtime}`;
        const had = match.versions.get(vkey);
        match.versions.set(vkey, had ? { ...had, points: [...had.points, ...v.points] } : { ...v, points: [...v.points] });
      }
    }
  }
  const oldest = (v: SearchVersion): string => v.points.reduce((a, p) => (p.time < a ? p.time : a), '\uffff');
  const matches = [...byPath.values()]
    .sort((a, b) => a.vm.localeCompare(b.vm) || a.path.localeCompare(b.path))
    .map((m) => ({
      vm: m.vm,
      path: m.path,
      versions: [...m.versions.values()].map((v) => ({ ...v, points: [...v.points].sort((a, b) => a.time.localeCompare(b.time)) })).sort((a, b) => oldest(a).localeCompare(oldest(b))),
    }));
  return {
    pattern,
    matches,
    pointsSearched: results.reduce((n, r) => n + r.pointsSearched, 0),
    pointsWithoutIndex: results.flatMap((r) => r.pointsWithoutIndex),
    pointsLocked: results.flatMap((r) => r.pointsLocked),
    truncated,
  };
}
