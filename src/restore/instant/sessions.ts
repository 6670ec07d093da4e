// The instant recovery sessions of one agent process: what `bulwark instant-recovery
// start|migrate|stop` and the session list act on. Each session gets a short id; list() says which
// VMs run from backup (state running-from-backup) and which already run on their own disks.
import { randomBytes } from 'node:crypto';
import { BulwarkError } from '../../common/errors.js';
import { startInstantRecovery, type InstantRecoverySession, type InstantRecoveryState, type StartInstantRecoveryOptions } from './instant-recovery.js';

export interface InstantSessionInfo {
  readonly id: string;
  readonly name: string;
  readonly vm: string;
  readonly pointId: string;
  readonly state: InstantRecoveryState;
  readonly runningFromBackup: boolean;
  readonly startedAt: Date;
  readonly pid: number | undefined;
  /** The session folder and the VM's sockets and console log in it. */
  readonly dir: string;
  readonly qmpSocket: string;
  readonly agentSocket: string;
  readonly consoleLog: string;
  readonly disks: readonly { readonly name: string; readonly size: number; readonly overlay: string; readonly target: string | null }[];
}

export class InstantRecoverySessions {
  readonly #sessions = new Map<string, InstantRecoverySession>();

  async start(options: StartInstantRecoveryOptions): Promise<InstantSessionInfo> {
    for (const s of this.#sessions.values()) {
      if (s.name === options.name) throw new BulwarkError(`an instant recovery named ${options.name} is already running`, { kind: 'conflict' });
    }
    const session = await startInstantRecovery(options);
    const id = `ir-${randomBytes(4).toString('hex')}`;
    this.#sessions.set(id, session);
    return this.info(id);
  }

  get(id: string): InstantRecoverySession {
    const s = this.#sessions.get(id);
    if (!s) throw new BulwarkError(`no instant recovery session ${id}`, { kind: 'not-found', context: { session: id } });
    return s;
  }

  info(id: string): InstantSessionInfo {
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
    return [...this.#sessions.keys()].map((id) => this.info(id));
  }

  async migrate(id: string, targetDir: string): Promise<Record<string, string>> {
    return this.get(id).migrate(targetDir);
  }

  /** Stops the session (VM quit, backup side closed, overlays removed) and forgets it. */
  async stop(id: string): Promise<void> {
    const s = this.get(id);
    try {
      await s.stop();
    } finally {
      this.#sessions.delete(id);
    }
  }

  /** Stops every session (agent shutdown); the first error is thrown after all were tried. */
  async stopAll(): Promise<void> {
    const errors: unknown[] = [];
    for (const id of [...this.#sessions.keys()]) await this.stop(id).catch((e: unknown) => errors.push(e));
    if (errors.length > 0) throw new BulwarkError('stopping instant recovery sessions failed', { kind: 'internal', cause: errors[0] });
  }
}
