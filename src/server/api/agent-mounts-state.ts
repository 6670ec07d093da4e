// The mounts agents hold for this server, kept in `<data>/agent-mounts.json`
// (docs/formats/agent-mounts.md), so that a restarted server lists them at once and takes their
// `mount open` and `restore-serve` tasks back before the agents poll it. Also the REST shape of a
// mount (GET /mounts), which the file's entries and the agents' `mount list` answers are checked
// against.
import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { readFile } from 'node:fs/promises';
import { describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { writeFileAtomic } from '../../storage/local-fs.js';

const log = logger('agent-mounts');

export const FileSystemView = Type.Object({
  name: Type.String({ description: 'device-like name: vda (whole disk) or vdb2 (partition 2 of vdb)' }),
  disk: Type.String(),
  partition: Type.Union([Type.Integer(), Type.Null()]),
  type: Type.String(),
  label: Type.Optional(Type.String()),
  uuid: Type.Optional(Type.String()),
  path: Type.String({ description: 'host folder where it is mounted read-only' }),
  mountpoint: Type.Optional(Type.String({ description: 'where the guest mounts it (root, or its /etc/fstab)' })),
});

const mountFields = {
  id: Type.String(),
  point: Type.String(),
  vm: Type.String(),
  time: Type.String(),
  at: Type.String(),
  detached: Type.Boolean(),
  createdAt: Type.String(),
  filesystems: Type.Array(FileSystemView),
  skipped: Type.Array(Type.Object({ name: Type.String(), type: Type.String(), reason: Type.String() })),
  warnings: Type.Array(Type.String()),
  notes: Type.Array(Type.String()),
};

/** A mount as the REST API shows it. */
export const MountInfo = Type.Object({
  ...mountFields,
  agent: Type.Optional(Type.String({ description: 'the agent holding the mount (the mount server; absent: the server process); `at` and the folders are on its host' })),
  host: Type.Optional(Type.String({ description: 'the host named with host' })),
});

/** A mount an agent holds, as its `mount list` reports it (WireHeldMount). */
export const HeldMount = Type.Object({
  ...mountFields,
  agent: Type.Optional(Type.String()),
  host: Type.Optional(Type.String()),
  taskId: Type.String({ minLength: 1 }),
  serve: Type.Optional(Type.Object({ agent: Type.String({ minLength: 1 }), taskId: Type.String({ minLength: 1 }) })),
});
export type HeldMount = Static<typeof HeldMount>;

const STATE_FORMAT = 'bulwark agent mounts v1';

const Entry = Type.Object({ agent: Type.String({ minLength: 1 }), host: Type.Optional(Type.String()), mount: HeldMount });
export type AgentMountEntry = Static<typeof Entry>;

const StateFile = Type.Object({ format: Type.Literal(STATE_FORMAT), mounts: Type.Array(Entry) });

/** The agent mounts of this server, written through to the state file after every change. */
export class AgentMountsState {
  readonly #file: string;
  readonly #entries = new Map<string, AgentMountEntry>();
  /** Writes of the file, one after another. */
  #saving: Promise<void> = Promise.resolve();

  constructor(file: string) {
    this.#file = file;
  }

  get file(): string {
    return this.#file;
  }

  /**
   * The entries of the file a previous server process wrote (start only). A file that cannot be
   * read or is not as specified is logged and yields none: the agents' own lists then say.
   */
  async load(): Promise<AgentMountEntry[]> {
    let raw: unknown;
    try {
      raw = JSON.parse(await readFile(this.#file, 'utf8'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') log.error({ file: this.#file, err: describeError(err) }, 'agent mounts state file unreadable; mounts on agents are found by listing them');
      return [];
    }
    if (!Value.Check(StateFile, raw)) {
      const first = Value.Errors(StateFile, raw).First();
      log.error({ file: this.#file, field: first?.path, err: first?.message }, 'agent mounts state file not as expected; mounts on agents are found by listing them');
      return [];
    }
    for (const e of raw.mounts) this.#entries.set(e.mount.id, e);
    return raw.mounts;
  }

  /** A mount held (or adopted again); written before this resolves. */
  add(entry: AgentMountEntry): Promise<void> {
    this.#entries.set(entry.mount.id, entry);
    return this.#save();
  }

  /** A mount ended (a mount this file does not have: nothing is written). */
  remove(mountId: string): Promise<void> {
    if (!this.#entries.delete(mountId)) return this.#saving;
    return this.#save();
  }

  list(): AgentMountEntry[] {
    return [...this.#entries.values()];
  }

  /** Waits for the writes under way. */
  flushed(): Promise<void> {
    return this.#saving;
  }

  #save(): Promise<void> {
    const state: Static<typeof StateFile> = { format: STATE_FORMAT, mounts: this.list() };
    const text = `${JSON.stringify(state, null, 1)}\n`;
    this.#saving = this.#saving
      .then(() => writeFileAtomic(this.#file, text, { mode: 0o600 }))
      .catch((err: unknown) => log.error({ file: this.#file, err: describeError(err) }, 'could not write the agent mounts state file'));
    return this.#saving;
  }
}
