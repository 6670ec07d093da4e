// The instant recovery sessions of one agent process: what `bulwark instant-recovery
// start|migrate|stop` and the session list act on. Each session gets a short id; list() says which
// VMs run from backup (state running-from-backup) and which already run on their own disks.
//
// A session migrated with a place for the VM (`migrate(id, storage, { vmDir })`) becomes an
// independent VM of its host: its sockets, logs and (UEFI) variable store are moved (renamed) out
// of the session folder into the VM's folder, the session lets go of the QEMU process, and the VM
// is recorded in the state file (docs/formats/instant-recoveries.md, "Migrated instant recovery
// VMs"). stopAll() (a process stop) leaves it running; a new process reads the file (load()) and
// lists it again as migrated; stop(id) quits it and forgets it (its folder and disks stay).
import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { lstat, mkdir, readFile, rename, rm, rmdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { QmpClient } from '../../hypervisor/qmp/client.js';
import { writeFileAtomic } from '../../storage/local-fs.js';
import { startInstantRecovery, type InstantRecoverySession, type InstantRecoveryState, type StartInstantRecoveryOptions } from './instant-recovery.js';

const log = logger('instant-recovery');

export interface InstantSessionInfo {
  readonly id: string;
  readonly name: string;
  readonly vm: string;
  readonly pointId: string;
  readonly state: InstantRecoveryState;
  readonly runningFromBackup: boolean;
  readonly startedAt: Date;
  readonly pid: number | undefined;
  /** The session folder and the VM's sockets and console log in it; after a migrate with a place, the VM's folder. */
  readonly dir: string;
  readonly qmpSocket: string;
  readonly agentSocket: string;
  readonly consoleLog: string;
  readonly disks: readonly { readonly name: string; readonly size: number; readonly overlay: string; readonly target: string | null }[];
  /** A migrated VM: the host name its migrate was given (kept across restarts). */
  readonly host?: string;
}

/** Where a migrated VM goes: its folder (sockets, logs) and its QMP socket (default `vmDir/qmp.sock`). */
export interface MigratePlace {
  readonly vmDir: string;
  readonly qmpSocket?: string | undefined;
  /** The server's name of the host (recorded, reported with the VM). */
  readonly host?: string | undefined;
}

const STATE_FORMAT = 'bulwark instant recovery vms v1';
const MigratedRecord = Type.Object({
  id: Type.String(),
  name: Type.String(),
  vm: Type.String(),
  pointId: Type.String(),
  startedAt: Type.String(),
  migratedAt: Type.String(),
  pid: Type.Union([Type.Integer(), Type.Null()]),
  processStart: Type.Union([Type.String(), Type.Null()]),
  dir: Type.String(),
  qmpSocket: Type.String(),
  agentSocket: Type.String(),
  consoleLog: Type.String(),
  qemuLog: Type.String(),
  nvram: Type.Optional(Type.String()),
  disks: Type.Array(Type.Object({ name: Type.String(), size: Type.Number(), overlay: Type.String(), target: Type.String() })),
  host: Type.Optional(Type.String()),
});
type MigratedRecord = Static<typeof MigratedRecord>;
const StateFile = Type.Object({ format: Type.Literal(STATE_FORMAT), vms: Type.Array(MigratedRecord) });

/** `PID@STARTTIME` of a live (not zombie) process, or undefined when there is none with that pid. */
export function processStart(pid: number): string | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // Fields after the ")" that ends the command name: state is field 3, starttime field 22.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  if (fields[0] === 'Z' || fields[0] === 'X') return undefined;
  return `${pid}@${fields[19] ?? '0'}`;
}

/** The recorded VM's pid while that very process runs (pids are reused). */
function runningPid(r: MigratedRecord): number | undefined {
  return r.pid !== null && r.processStart !== null && processStart(r.pid) === r.processStart ? r.pid : undefined;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Whether `p` is `dir` or inside it. */
const within = (dir: string, p: string): boolean => {
  const rel = path.relative(dir, p);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
};

export interface InstantRecoverySessionsOptions {
  /** Where migrated VMs are recorded (`<data>/instant-recovery-vms.json`); absent: not recorded (a library use). */
  readonly stateFile?: string | undefined;
}

export class InstantRecoverySessions {
  readonly #sessions = new Map<string, InstantRecoverySession>();
  readonly #migrated = new Map<string, MigratedRecord>();
  readonly #stateFile: string | undefined;
  #saving: Promise<void> = Promise.resolve();

  constructor(o: InstantRecoverySessionsOptions = {}) {
    this.#stateFile = o.stateFile;
  }

  /**
   * Reads the migrated VMs a previous process of this agent recorded (once, at start); they are
   * listed as migrated, with their pid while their QEMU still runs. Returns how many.
   */
  async load(): Promise<number> {
    const file = this.#stateFile;
    if (!file) return 0;
    let raw: unknown;
    try {
      raw = JSON.parse(await readFile(file, 'utf8'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') log.error({ file, err: describeError(err) }, 'migrated instant recovery VMs file unreadable; those VMs run on but are not listed');
      return 0;
    }
    if (!Value.Check(StateFile, raw)) {
      const first = Value.Errors(StateFile, raw).First();
      log.error({ file, field: first?.path, err: first?.message }, 'migrated instant recovery VMs file not as expected; those VMs run on but are not listed');
      return 0;
    }
    for (const r of raw.vms) if (!this.#sessions.has(r.id)) this.#migrated.set(r.id, r);
    log.info({ vms: raw.vms.length, running: raw.vms.filter((r) => runningPid(r) !== undefined).length }, 'migrated instant recovery VMs read');
    return raw.vms.length;
  }

  #save(): Promise<void> {
    const file = this.#stateFile;
    if (!file) return Promise.resolve();
    const state: Static<typeof StateFile> = { format: STATE_FORMAT, vms: [...this.#migrated.values()] };
    this.#saving = this.#saving
      .then(() => writeFileAtomic(file, `${JSON.stringify(state, null, 1)}\n`, { mode: 0o600 }))
      .catch((err: unknown) => log.error({ file, err: describeError(err) }, 'could not write the migrated instant recovery VMs file: after a restart of this process they are not listed'));
    return this.#saving;
  }

  async start(options: StartInstantRecoveryOptions): Promise<InstantSessionInfo> {
    for (const s of this.#sessions.values()) {
      if (s.name === options.name) throw new BulwarkError(`an instant recovery named ${options.name} is already running`, { kind: 'conflict' });
    }
    for (const [id, r] of this.#migrated) {
      if (r.name === options.name) {
        throw new BulwarkError(`a VM named ${options.name} exists: instant recovery ${id}, migrated to ${r.dir}`, {
          kind: 'conflict',
          hint: `choose another --name (or \`bulwark instant-recovery stop ${id}\` to quit that VM)`,
        });
      }
    }
    const session = await startInstantRecovery(options);
    const id = `ir-${randomBytes(4).toString('hex')}`;
    this.#sessions.set(id, session);
    return this.info(id);
  }

  /** A session that still belongs to this process (running from the backup, or migrated without a place). */
  get(id: string): InstantRecoverySession {
    const s = this.#sessions.get(id);
    if (s) return s;
    const m = this.#migrated.get(id);
    if (m) {
      throw new BulwarkError(`instant recovery ${id} was migrated: VM ${m.name} runs on its own disks as a VM of its host (QMP ${m.qmpSocket})`, { kind: 'conflict', context: { session: id } });
    }
    throw new BulwarkError(`no instant recovery session ${id}`, { kind: 'not-found', context: { session: id } });
  }

  info(id: string): InstantSessionInfo {
    const m = this.#migrated.get(id);
    if (m) {
      return {
        id,
        name: m.name,
        vm: m.vm,
        pointId: m.pointId,
        state: 'migrated',
        runningFromBackup: false,
        startedAt: new Date(m.startedAt),
        pid: runningPid(m),
        dir: m.dir,
        qmpSocket: m.qmpSocket,
        agentSocket: m.agentSocket,
        consoleLog: m.consoleLog,
        disks: m.disks.map((d) => ({ ...d })),
        ...(m.host !== undefined ? { host: m.host } : {}),
      };
    }
    const s = this.get(id);
    return {
      id,
      name: s.name,
      vm: s.vm,
      pointId: s.pointId,
      state: s.state,
      runningFromBackup: s.servingBackup,
      startedAt: new Date(s.launchedAt),
      pid: s.pid,
      dir: s.dir,
      qmpSocket: s.qmpSocket,
      agentSocket: s.agentSocket,
      consoleLog: s.consoleLog,
      disks: s.disks.map((d) => ({ name: d.name, size: d.size, overlay: d.overlay, target: d.target ?? null })),
    };
  }

  list(): InstantSessionInfo[] {
    return [...this.#sessions.keys(), ...this.#migrated.keys()].map((id) => this.info(id));
  }

  /**
   * Mirrors the session's disks into `storage` while the VM runs (see the session's migrate()).
   * With `place`, the VM then becomes a VM of its own: its QMP and guest agent sockets, console
   * and QEMU logs and variable store move (rename) to `place` (checked before any data moves: the
   * names free, one file system), the session folder goes, and it is recorded (state file). Returns
   * the new disk paths by disk name.
   */
  async migrate(id: string, storage: string, place?: MigratePlace): Promise<Record<string, string>> {
    const s = this.get(id);
    if (!place) return s.migrate(storage);
    const vmDir = place.vmDir;
    const qmpSocket = place.qmpSocket ?? path.join(vmDir, 'qmp.sock');
    const moves: { what: string; from: string; to: string }[] = [
      { what: 'QMP socket', from: s.qmpSocket, to: qmpSocket },
      { what: 'guest agent socket', from: s.agentSocket, to: path.join(vmDir, 'qga.sock') },
      { what: 'console log', from: s.consoleLog, to: path.join(vmDir, 'console.log') },
      { what: 'QEMU log', from: path.join(s.dir, 'qemu.log'), to: path.join(vmDir, 'qemu.log') },
      ...(s.nvram ? [{ what: 'UEFI variable store', from: s.nvram, to: path.join(vmDir, 'nvram.fd') }] : []),
    ];
    const created = await this.#checkPlace(s, storage, vmDir, moves);
    let disks: Record<string, string>;
    try {
      disks = await s.migrate(storage);
    } catch (err) {
      for (const d of created.reverse()) await rmdir(d).catch(() => undefined);
      throw err;
    }
    const pid = s.pid;
    const started = pid !== undefined ? (processStart(pid) ?? null) : null;
    const failed: string[] = [];
    const at = new Map<string, string>();
    for (const m of moves) {
      try {
        await rename(m.from, m.to);
        at.set(m.from, m.to);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') at.set(m.from, m.to);
        else failed.push(`${m.what} ${m.from}: ${describeError(err)}`);
      }
    }
    const now = (p: string): string => at.get(p) ?? p;
    await s.release();
    this.#sessions.delete(id);
    this.#migrated.set(id, {
      id,
      name: s.name,
      vm: s.vm,
      pointId: s.pointId,
      startedAt: new Date(s.launchedAt).toISOString(),
      migratedAt: new Date().toISOString(),
      pid: pid ?? null,
      processStart: started,
      dir: vmDir,
      qmpSocket: now(s.qmpSocket),
      agentSocket: now(s.agentSocket),
      consoleLog: now(s.consoleLog),
      qemuLog: now(path.join(s.dir, 'qemu.log')),
      ...(s.nvram ? { nvram: now(s.nvram) } : {}),
      disks: s.disks.map((d) => ({ name: d.name, size: d.size, overlay: d.overlay, target: disks[d.name] ?? d.target ?? '' })),
      ...(place.host !== undefined ? { host: place.host } : {}),
    });
    await this.#save();
    if (failed.length > 0) {
      throw new BulwarkError(`instant recovery ${s.name} was migrated (it runs on its own disks), but its files could not all leave the session folder ${s.dir}: ${failed.join('; ')}`, {
        kind: 'internal',
        context: { session: id, dir: s.dir },
        hint: `the VM needs them while it runs: do not remove ${s.dir}`,
      });
    }
    await rm(s.dir, { recursive: true, force: true });
    log.info({ session: id, vm: s.name, dir: vmDir, qmpSocket, pid }, 'migrated VM is a VM of its own now');
    return disks;
  }

  /** Refuses a place the VM's files cannot move to; returns the folders it created (removed again if the migrate fails). */
  async #checkPlace(s: InstantRecoverySession, storage: string, vmDir: string, moves: readonly { what: string; to: string }[]): Promise<string[]> {
    for (const [field, p] of [['VM folder', vmDir], ['storage', storage], ['QMP socket', moves[0]!.to]] as const) {
      if (!path.isAbsolute(p)) throw new BulwarkError(`${field} ${p} is not an absolute path`, { kind: 'invalid' });
      if (within(s.dir, p)) throw new BulwarkError(`${field} ${p} is inside the instant recovery folder ${s.dir}, which goes after the migrate`, { kind: 'invalid', context: { session: s.name } });
    }
    const created: string[] = [];
    for (const d of new Set([vmDir, path.dirname(moves[0]!.to)])) {
      const first = await mkdir(d, { recursive: true, mode: 0o750 });
      if (first) created.push(first);
    }
    const fail = async (err: BulwarkError): Promise<never> => {
      for (const d of [...created].reverse()) await rmdir(d).catch(() => undefined);
      throw err;
    };
    for (const m of moves) {
      const taken = await lstat(m.to).then(() => true, () => false);
      if (taken) {
        return fail(new BulwarkError(`cannot migrate instant recovery ${s.name}: ${m.to} (its ${m.what}) already exists`, {
          kind: 'conflict',
          context: { session: s.name, file: m.to },
          hint: 'another VM of that name may live there: stop or remove it, or start the instant recovery under another --name',
        }));
      }
    }
    const dev = (await stat(s.dir)).dev;
    for (const d of new Set([vmDir, path.dirname(moves[0]!.to)])) {
      if ((await stat(d)).dev !== dev) {
        return fail(new BulwarkError(`cannot migrate instant recovery ${s.name}: ${d} is on another file system than its session folder ${s.dir}; the running VM's sockets and logs can only be moved (renamed) within one file system`, {
          kind: 'invalid',
          context: { session: s.name, dir: d },
          hint: "put the host's QMP socket folders (its --qemu glob) on the file system of the data folder; --storage may name any folder for the disks",
        }));
      }
    }
    return created;
  }

  /** Stops the session (VM quit, backup side closed, overlays removed) and forgets it; a migrated VM is quit and forgotten (its folder and disks stay). */
  async stop(id: string): Promise<void> {
    const m = this.#migrated.get(id);
    if (m) {
      await this.#quitMigrated(m);
      this.#migrated.delete(id);
      await this.#save();
      return;
    }
    const s = this.get(id);
    try {
      await s.stop();
    } finally {
      this.#sessions.delete(id);
    }
  }

  /** A migrated VM leaves the list (and the state file) and runs on, untouched. */
  async forget(id: string): Promise<void> {
    const m = this.#migrated.get(id);
    if (!m) {
      this.get(id);
      throw new BulwarkError(`instant recovery ${id} runs from the backup: only a migrated VM can be forgotten (stop it instead)`, { kind: 'conflict', context: { session: id } });
    }
    this.#migrated.delete(id);
    await this.#save();
    log.info({ session: id, vm: m.name, qmp: m.qmpSocket }, 'migrated VM forgotten; it runs on');
  }

  async #quitMigrated(m: MigratedRecord): Promise<void> {
    const pid = runningPid(m);
    if (pid !== undefined) {
      const qmp = await QmpClient.connect({ endpoint: { socketPath: m.qmpSocket }, label: `VM ${m.name}`, connectTimeoutMs: 5000 }).catch((err: unknown) => {
        log.warn({ vm: m.name, qmp: m.qmpSocket, err: describeError(err) }, 'migrated VM: QMP not reachable, killing its QEMU');
        return undefined;
      });
      if (qmp) {
        await qmp.execute('quit', {}, { timeoutMs: 5000 }).catch(() => undefined);
        await qmp.close().catch(() => undefined);
      }
      for (let i = 0; i < 100 && runningPid(m) !== undefined; i++) await sleep(100);
      if (runningPid(m) !== undefined) {
        process.kill(pid, 'SIGKILL');
        for (let i = 0; i < 50 && runningPid(m) !== undefined; i++) await sleep(100);
      }
      if (runningPid(m) !== undefined) throw new BulwarkError(`VM ${m.name} (pid ${pid}) did not end after SIGKILL`, { kind: 'internal', context: { vm: m.name, pid } });
    }
    // QEMU unlinks its sockets by the names it bound them to (the session folder's): these remain.
    await rm(m.qmpSocket, { force: true });
    await rm(m.agentSocket, { force: true });
  }

  /**
   * Process shutdown: every session that runs from the backup is stopped (its disk is this
   * process's NBD server); migrated VMs run on. The first error is thrown after all were tried.
   */
  async stopAll(): Promise<void> {
    const errors: unknown[] = [];
    for (const id of [...this.#sessions.keys()]) await this.stop(id).catch((e: unknown) => errors.push(e));
    if (this.#migrated.size > 0) log.info({ vms: [...this.#migrated.values()].map((m) => m.name) }, 'migrated instant recovery VMs left running');
    await this.#saving.catch(() => undefined);
    if (errors.length > 0) throw new BulwarkError('stopping instant recovery sessions failed', { kind: 'internal', cause: errors[0] });
  }
}
