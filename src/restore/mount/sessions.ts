// The mount server's sessions: restore points mounted for browsing, by id. A mount is held by
// the console that asked for it (a `hold` stream) and undone when the last holder goes, unless it
// was detached (then it lives until `unmount ID` or server stop). A held mount that nobody comes
// to hold within the grace time is undone too, so a console killed right after asking leaves
// nothing. closeAll() runs at server stop.
import { randomUUID } from 'node:crypto';
import { readdir, rmdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import type { Repository } from '../../repository/index.js';
import { describeFileSystems, mountPoint, openRepositoryPoint, type FileSystemView, type MountablePoint, type PointIdentity, type PointMount } from './point-mount.js';
import { fsName } from './guest-paths.js';

const log = logger('mount-sessions');

export interface MountSessionInfo {
  readonly id: string;
  readonly point: string;
  readonly vm: string;
  /** Time of the restore point. */
  readonly time: string;
  readonly at: string;
  readonly detached: boolean;
  readonly createdAt: string;
  readonly filesystems: FileSystemView[];
  readonly skipped: Array<{ name: string; type: string; reason: string }>;
  readonly warnings: string[];
  /** How guest paths were placed (root recognised or not, fstab lines that matched nothing). */
  readonly notes: string[];
  /** The agent that holds the mount (the mount server), when it is not this process. */
  readonly agent?: string;
  /** The host named with --host, when one was. */
  readonly host?: string;
}

export interface OpenMountOptions {
  /** The point in a repository here (with pointId and password), or `source`: disks read elsewhere. */
  readonly repository?: Repository;
  readonly pointId: string;
  /** The point's disks, read from wherever they are (another agent's repository: restore-reader.ts); taken over. */
  readonly source?: MountablePoint;
  /** The mount's id (default a new UUID; an agent uses the server's). */
  readonly id?: string;
  /** Folder to mount under; default `<defaultRoot>/<vm>-<time>-<short id>`. */
  readonly at?: string;
  readonly detached?: boolean;
  /** Password of an encrypted point (the server resolves it: docs/encryption.md). */
  readonly password?: string;
}

interface Entry {
  info: MountSessionInfo;
  /** The live mount in this process, or undefined for a mount another process (an agent) holds. */
  mount: PointMount<PointIdentity> | undefined;
  /** Undoes a mount held elsewhere (registered with adopt). */
  closeRemote: (() => Promise<void>) | undefined;
  holders: number;
  graceTimer: NodeJS.Timeout | undefined;
  /** Set once unmounting started; the entry stays listed until it is done. */
  closing: Promise<MountSessionInfo> | undefined;
}

export class MountSessions {
  readonly #entries = new Map<string, Entry>();
  readonly #defaultRoot: string;
  readonly #runDir: string | undefined;
  readonly #graceMs: number;

  constructor(opts: { defaultRoot: string; runDir?: string; graceMs?: number }) {
    this.#defaultRoot = opts.defaultRoot;
    this.#runDir = opts.runDir;
    this.#graceMs = opts.graceMs ?? 60_000;
  }

  async open(o: OpenMountOptions): Promise<MountSessionInfo> {
    const id = o.id ?? randomUUID();
    let source = o.source;
    if (!source) {
      if (!o.repository) throw new BulwarkError(`mount of restore point ${o.pointId}: no repository and no source`, { kind: 'internal' });
      source = await openRepositoryPoint(o.repository, o.pointId, o.password !== undefined ? { password: o.password } : {});
    }
    let at: string;
    try {
      const stamp = source.point.time.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
      at = resolve(o.at ?? join(this.#defaultRoot, `${source.point.vm.replace(/[^A-Za-z0-9._-]/g, '_')}-${stamp}-${id.slice(0, 8)}`));
      await assertEmptyOrMissing(at);
    } catch (err) {
      await source.close();
      throw err;
    }
    const mount = await mountPoint(source, { at, ...(this.#runDir !== undefined ? { runDir: this.#runDir } : {}) });
    const info: MountSessionInfo = {
      id,
      point: mount.point.id,
      vm: mount.point.vm,
      time: mount.point.time.toISOString(),
      at,
      detached: o.detached ?? false,
      createdAt: new Date().toISOString(),
      filesystems: describeFileSystems(mount),
      skipped: mount.mount.skipped.map((s) => ({ name: fsName(s), type: s.type, reason: s.reason })),
      warnings: [...mount.mount.warnings],
      notes: [...mount.layout.notes],
    };
    this.#add({ info, mount, closeRemote: undefined, holders: 0, graceTimer: undefined, closing: undefined });
    log.info({ id, point: info.point, vm: info.vm, at, filesystems: info.filesystems.length }, 'restore point mounted');
    return info;
  }

  /**
   * Lists (and holds, as open() does) a mount another process holds — an agent's mount server;
   * `close` undoes it there. When it ends by itself (its agent went away), call forget().
   */
  adopt(info: MountSessionInfo, close: () => Promise<void>): MountSessionInfo {
    this.#add({ info, mount: undefined, closeRemote: close, holders: 0, graceTimer: undefined, closing: undefined });
    return info;
  }

  /** Drops a mount that ended by itself (an adopted one whose agent let go); no unmount is tried. */
  forget(id: string): void {
    const e = this.#entries.get(id);
    if (!e) return;
    clearTimeout(e.graceTimer);
    this.#entries.delete(id);
  }

  #add(entry: Entry): void {
    const { id, at } = entry.info;
    this.#entries.set(id, entry);
    if (!entry.info.detached) {
      entry.graceTimer = setTimeout(() => {
        if (entry.holders === 0) {
          log.warn({ id, at }, 'nobody held the mount in time; unmounting');
          void this.close(id).catch((err: unknown) => log.error({ id, at, err: describeError(err) }, 'unmount failed: the mount stays listed; undo it with `bulwark mount unmount ID`'));
        }
      }, this.#graceMs);
      entry.graceTimer.unref();
    }
  }

  list(): MountSessionInfo[] {
    return [...this.#entries.values()].map((e) => e.info);
  }

  get(id: string): MountSessionInfo {
    return this.#entry(id).info;
  }

  /** The live mount (for copying out). */
  pointMount(id: string): PointMount<PointIdentity> {
    const e = this.#entry(id);
    if (!e.mount) throw new BulwarkError(`mount ${id} is held by agent ${e.info.agent ?? '?'}, not by this process`, { kind: 'invalid', context: { mount: id } });
    return e.mount;
  }

  /**
   * Registers a holder (a console waiting on the mount); the returned function releases it.
   * When the last holder of a mount that is not detached lets go, the mount is undone.
   */
  hold(id: string): () => void {
    const e = this.#entry(id);
    e.holders++;
    clearTimeout(e.graceTimer);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      e.holders--;
      if (e.holders === 0 && !e.info.detached && this.#entries.get(e.info.id) === e && !e.closing) {
        log.info({ id, at: e.info.at }, 'the console holding the mount went away; unmounting');
        void this.close(e.info.id).catch((err: unknown) => log.error({ id, err: describeError(err) }, 'unmount failed'));
      }
    };
  }

  /** Unmounts and forgets a mount (listed until the unmount is done). */
  close(id: string): Promise<MountSessionInfo> {
    const e = this.#entry(id);
    clearTimeout(e.graceTimer);
    e.closing ??= (async () => {
      try {
        if (e.mount) await e.mount.close();
        else await e.closeRemote?.();
      } catch (err) {
        // Maybe still mounted: it stays listed, and `mount unmount ID` tries again (forgetting it
        // here hid a mount that was still there, and the retry said "no mount ID").
        e.closing = undefined;
        throw err;
      }
      this.#entries.delete(e.info.id);
      log.info({ id: e.info.id, at: e.info.at }, 'restore point unmounted');
      return e.info;
    })();
    return e.closing;
  }

  /** Unmounts everything (server stop). */
  async closeAll(): Promise<void> {
    for (const id of [...this.#entries.keys()]) {
      await this.close(id).catch((err: unknown) => log.error({ id, err: describeError(err) }, 'unmount at server stop failed'));
    }
    await rmdir(this.#defaultRoot).catch(() => undefined);
  }

  #entry(id: string): Entry {
    const e = this.#entries.get(id) ?? [...this.#entries.values()].find((x) => x.info.id.startsWith(id) && id.length >= 8);
    if (!e) throw new BulwarkError(`no mount ${id}`, { kind: 'not-found', context: { mount: id }, hint: 'list them with `bulwark mount list`' });
    return e;
  }
}

async function assertEmptyOrMissing(dir: string): Promise<void> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new BulwarkError(`cannot mount under ${dir}`, { kind: 'invalid', context: { at: dir }, cause: err });
  }
  if (names.length > 0) throw new BulwarkError(`${dir} is not empty`, { kind: 'conflict', context: { at: dir }, hint: 'mount under a new or empty folder' });
}
