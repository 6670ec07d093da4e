// The `qemu` adapter: VMs run by plain QEMU, reached by QMP sockets matched by a glob. A backup
// takes its point-in-time view by image fleecing: a temporary qcow2 on the host with the disk as
// backing, filled by `blockdev-backup sync=none` (copy-before-write), started in ONE transaction
// with the dirty-bitmap operations of the chain (disable the previous checkpoint's bitmap, add the
// new one), and exported read-only over NBD with the previous bitmap. The guest is frozen through
// its agent around the transaction only (or paused, offline mode).
import { createHash } from 'node:crypto';
import { lstat, mkdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger, type Logger } from '../../common/log.js';
import { runTool } from '../../common/process.js';
import { QmpClient, QmpError } from '../qmp/client.js';
import { describeChanges, planDiskChanges, type BitmapState } from '../cbt/policy.js';
import {
  checkpointName,
  isCheckpointOf,
  validChainId,
  type BackupDiskView,
  type BackupView,
  type BeginBackupOptions,
  type Checkpoint,
  type DiskChanges,
  type Hypervisor,
  type VmInfo,
} from '../types.js';
import {
  disksFromQueryBlock,
  findAgentSocket,
  globFiles,
  processInfo,
  queryBitmaps,
  queryRunState,
  queryStatus,
  socketOwnerPid,
  qmpProcessPid,
  withSavedNvram,
  type BitmapInfo,
  type QemuDisk,
  type QueryBlockEntry,
} from './discovery.js';
import { withFrozenGuest, type FileSystemFreezer } from './freeze.js';
import { openAgentFreezer } from './agent.js';

export interface QemuHypervisorOptions {
  /** Glob of QMP sockets, one per VM, e.g. `/run/vms/*\/qmp.sock`. */
  readonly qmpGlob: string;
  /** Where fleecing images and the NBD socket go. Default `<tmpdir>/bulwark-qemu`. */
  readonly workDir?: string;
  /** The guest agent socket of a VM, when QEMU's own chardev should not be used. */
  readonly agentSocketFor?: (qmpSocket: string) => string | undefined;
  /** Deadline of each QMP command. Default 30 s. */
  readonly qmpTimeoutMs?: number;
}

/** A VM behind one QMP socket, with what the backup needs besides `VmInfo`. */
interface QemuVm {
  readonly info: VmInfo;
  readonly qmpSocket: string;
  readonly disks: QemuDisk[];
  readonly instance: string;
  /** What the backup should say about the VM's flash devices (firmware not saved). */
  readonly firmwareWarnings: readonly string[];
}

/**
 * Where fleecing images and the NBD socket go by default: a folder only this process's user owns,
 * never a shared /tmp path another user could create first (and never a service's private /tmp,
 * which QEMU, in its own mount namespace, would not see).
 */
export function defaultWorkDir(): string {
  if (process.getuid?.() === 0) return '/run/bulwark/qemu';
  const runtime = process.env.XDG_RUNTIME_DIR;
  return runtime ? path.join(runtime, 'bulwark-qemu') : path.join(os.homedir(), '.cache', 'bulwark', 'qemu');
}

/** Creates `dir` (mode 0700) or checks that an existing one is a real folder of ours that others cannot write. */
async function ensurePrivateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const st = await lstat(dir);
  const uid = process.getuid?.();
  if (!st.isDirectory() || (uid !== undefined && st.uid !== uid) || (st.mode & 0o022) !== 0) {
    throw new BulwarkError(`work folder ${dir} is not a private folder of this user (a link, another owner, or writable by others)`, {
      kind: 'forbidden',
      context: { path: dir },
      hint: 'remove it, or set another work folder for the qemu adapter',
    });
  }
}

/** Names of everything one chain's backup creates on one disk (node names must stay < 32 chars). */
function tempNames(chainId: string, disk: string): { node: string; job: string; exportId: string; file: string } {
  const h = createHash('sha256').update(`${chainId}\0${disk}`).digest('hex').slice(0, 12);
  return { node: `bulwark-fl-${h}`, job: `bulwark-job-${chainId}-${disk}`, exportId: `bulwark-${chainId}-${disk}`, file: `${chainId}-${disk}.fleece.qcow2` };
}

export class QemuHypervisor implements Hypervisor {
  readonly kind = 'qemu' as const;
  readonly #opts: QemuHypervisorOptions;
  readonly #workDir: string;
  readonly #log: Logger;

  constructor(options: QemuHypervisorOptions) {
    this.#opts = options;
    this.#workDir = options.workDir ?? defaultWorkDir();
    this.#log = logger('hypervisor-qemu');
  }

  async #connect(qmpSocket: string, label?: string): Promise<QmpClient> {
    return QmpClient.connect({
      endpoint: { socketPath: qmpSocket },
      label: label ?? qmpSocket,
      commandTimeoutMs: this.#opts.qmpTimeoutMs ?? 30_000,
      connectTimeoutMs: 5000,
    });
  }

  async #describe(qmpSocket: string, qmp: QmpClient): Promise<QemuVm> {
    const name = (await qmp.execute<{ name?: string }>('query-name')).name ?? path.basename(path.dirname(qmpSocket));
    const uuid = (await qmp.execute<{ UUID: string }>('query-uuid')).UUID;
    const state = await queryRunState(qmp);
    const { disks, firmware, warnings: firmwareWarnings } = disksFromQueryBlock(await qmp.execute<QueryBlockEntry[]>('query-block'));
    const blockGraph = await qmp.execute('query-named-block-nodes', { flat: true });
    const pid = (await socketOwnerPid(qmpSocket)) ?? (await qmpProcessPid(qmp));
    const proc = pid === undefined ? { commandLine: [] as string[], instance: 'unknown' } : await processInfo(pid);
    const info: VmInfo = {
      id: qmpSocket,
      name,
      ...(uuid && uuid !== '00000000-0000-0000-0000-000000000000' ? { uuid } : {}),
      state,
      disks,
      configuration: { kind: 'qemu', commandLine: proc.commandLine, blockGraph, ...(firmware ? { firmware } : {}) },
    };
    return { info, qmpSocket, disks, instance: proc.instance, firmwareWarnings };
  }

  async listVms(): Promise<VmInfo[]> {
    const sockets = await globFiles(this.#opts.qmpGlob);
    const out: VmInfo[] = [];
    for (const s of sockets) {
      let qmp: QmpClient;
      try {
        qmp = await this.#connect(s);
      } catch (err) {
        this.#log.warn({ socket: s, err: describeError(err) }, 'QMP socket does not answer; skipped');
        continue;
      }
      try {
        out.push((await this.#describe(s, qmp)).info);
      } finally {
        await qmp.close();
      }
    }
    return out;
  }

  async #find(nameOrId: string): Promise<string> {
    const sockets = await globFiles(this.#opts.qmpGlob);
    if (sockets.includes(nameOrId)) return nameOrId;
    for (const vm of await this.listVms()) if (vm.name === nameOrId || vm.uuid === nameOrId) return vm.id;
    throw new BulwarkError(`no QEMU VM named ${nameOrId} behind the QMP sockets ${this.#opts.qmpGlob}`, {
      kind: 'not-found',
      context: { vm: nameOrId },
    });
  }

  async getVm(nameOrId: string): Promise<VmInfo> {
    const socket = await this.#find(nameOrId);
    const qmp = await this.#connect(socket);
    try {
      return (await this.#describe(socket, qmp)).info;
    } finally {
      await qmp.close();
    }
  }

  async beginBackup(vmRef: string, options: BeginBackupOptions): Promise<BackupView> {
    if (!validChainId(options.chainId)) {
      throw new BulwarkError(`chain id ${JSON.stringify(options.chainId)} is not usable in bitmap names`, { kind: 'invalid', context: { chain: options.chainId } });
    }
    const socket = await this.#find(vmRef);
    const qmp = await this.#connect(socket);
    try {
      const vm = await this.#describe(socket, qmp);
      const session = new QemuBackup(this.#opts, this.#workDir, qmp, vm, options, this.#log.child({ vm: vm.info.name }));
      return await session.begin();
    } catch (err) {
      await qmp.close().catch(() => undefined);
      throw err;
    }
  }

  async close(): Promise<void> {
    // Connections are per call; nothing stays open.
  }
}

/** Per-disk state of one backup. */
interface DiskState {
  readonly disk: QemuDisk;
  readonly names: ReturnType<typeof tempNames>;
  readonly fleecePath: string;
  readonly changes: DiskChanges;
  /** The previous checkpoint's bitmap as found on the node (undefined: absent). */
  readonly previousBitmap: BitmapInfo | undefined;
  nodeAdded: boolean;
  fileCreated: boolean;
  jobStarted: boolean;
  exported: boolean;
}

class QemuBackup {
  readonly #opts: QemuHypervisorOptions;
  readonly #qmp: QmpClient;
  readonly #vm: QemuVm;
  readonly #options: BeginBackupOptions;
  readonly #log: Logger;
  readonly #vmDir: string;
  readonly #nbdSocket: string;
  readonly #checkpoint: Checkpoint;
  #disks: DiskState[] = [];
  #startedNbdServer = false;
  #transactionDone = false;
  #ended = false;

  constructor(opts: QemuHypervisorOptions, workDir: string, qmp: QmpClient, vm: QemuVm, options: BeginBackupOptions, log: Logger) {
    this.#opts = opts;
    this.#qmp = qmp;
    this.#vm = vm;
    this.#options = options;
    this.#log = log;
    this.#vmDir = path.join(workDir, createHash('sha256').update(vm.qmpSocket).digest('hex').slice(0, 12));
    this.#nbdSocket = path.join(this.#vmDir, 'nbd.sock');
    const sequence = (options.previous?.sequence ?? 0) + 1;
    const selected = this.#selectedDisks();
    this.#checkpoint = {
      chainId: options.chainId,
      name: checkpointName(options.chainId, sequence),
      sequence,
      instance: vm.instance,
      disks: Object.fromEntries(selected.map((d) => [d.name, { size: d.virtualSize }])),
      createdAt: new Date().toISOString(),
    };
  }

  #selectedDisks(): QemuDisk[] {
    const want = this.#options.disks;
    if (!want) return this.#vm.disks;
    const out: QemuDisk[] = [];
    for (const name of want) {
      const d = this.#vm.disks.find((x) => x.name === name);
      if (!d) {
        throw new BulwarkError(`VM ${this.#vm.info.name} has no disk ${name} (it has ${this.#vm.disks.map((x) => x.name).join(', ')})`, {
          kind: 'not-found',
          context: { vm: this.#vm.info.name, disk: name },
        });
      }
      out.push(d);
    }
    return out;
  }

  async begin(): Promise<BackupView> {
    const vmName = this.#vm.info.name;
    const disks = this.#selectedDisks();
    if (disks.length === 0) throw new BulwarkError(`VM ${vmName} has no disks to back up`, { kind: 'invalid', context: { vm: vmName } });
    await ensurePrivateDir(path.dirname(this.#vmDir));
    await ensurePrivateDir(this.#vmDir);
    await this.#sweepLeftovers(disks);
    const bitmaps = await queryBitmaps(this.#qmp);
    const warnings: string[] = [];
    this.#disks = disks.map((disk) => {
      const prevName = this.#options.previous?.name;
      const prev = prevName ? bitmaps.get(disk.nodeName)?.find((b) => b.name === prevName) : undefined;
      const state: BitmapState = prev ? { present: true, inconsistent: prev.inconsistent } : { present: false };
      const changes = planDiskChanges({
        diskName: disk.name,
        virtualSize: disk.virtualSize,
        previous: this.#options.previous,
        fullRequested: this.#options.full === true,
        fullReason: this.#options.fullReason,
        instance: this.#vm.instance,
        bitmap: state,
      });
      if (changes.kind === 'full' && changes.compareDigests) warnings.push(describeChanges(disk.name, changes));
      const names = tempNames(this.#options.chainId, disk.name);
      return {
        disk,
        names,
        fleecePath: path.join(this.#vmDir, names.file),
        changes,
        previousBitmap: prev,
        nodeAdded: false,
        fileCreated: false,
        jobStarted: false,
        exported: false,
      };
    });
    for (const d of this.#disks) this.#log.info({ disk: d.disk.name, changes: d.changes }, describeChanges(d.disk.name, d.changes));

    try {
      for (const d of this.#disks) await this.#addFleeceNode(d);
      let consistency: BackupView['consistency'] = 'crash';
      let freezeWindowMs: number | null = null;
      let pauseWindowMs: number | null = null;
      if (this.#options.mode === 'offline') {
        const wasRunning = (await queryRunState(this.#qmp)) === 'running';
        const t0 = performance.now();
        if (wasRunning) await this.#qmp.execute('stop');
        try {
          await this.#transaction();
        } finally {
          if (wasRunning) await this.#qmp.execute('cont');
        }
        pauseWindowMs = Math.round((performance.now() - t0) * 10) / 10;
        this.#log.info({ pauseWindowMs }, 'VM paused for the snapshot');
      } else {
        const agentSocket = this.#opts.agentSocketFor?.(this.#vm.qmpSocket) ?? (await findAgentSocket(this.#qmp));
        // A paused guest cannot answer its agent (asking waits out the freeze timeout): not asked.
        const status = await queryStatus(this.#qmp);
        const result = await withFrozenGuest(
          vmName,
          async (): Promise<FileSystemFreezer> => {
            if (!agentSocket) throw new BulwarkError(`VM ${vmName} has no guest agent channel (org.qemu.guest_agent.0)`, { kind: 'unavailable' });
            return openAgentFreezer(agentSocket, this.#options.freezeTimeoutMs ?? 10_000);
          },
          () => this.#transaction(),
          {
            require: this.#options.requireGuestProcessing,
            freezeTimeoutMs: this.#options.freezeTimeoutMs ?? 10_000,
            log: this.#log,
            stopped: status.running ? undefined : status.status,
          },
        );
        consistency = result.consistency;
        freezeWindowMs = result.freezeWindowMs;
        warnings.push(...result.warnings);
      }
      await this.#startNbdServer();
      // A UEFI VM's variable store is saved with its configuration, read right after the point in time.
      const vmInfo = await withSavedNvram(this.#vm.info);
      warnings.push(...this.#vm.firmwareWarnings);
      const views: BackupDiskView[] = [];
      for (const d of this.#disks) {
        const bitmaps = d.changes.kind === 'bitmap' ? [{ node: d.disk.nodeName, name: d.changes.bitmap }] : [];
        await this.#qmp.execute('block-export-add', {
          type: 'nbd',
          id: d.names.exportId,
          'node-name': d.names.node,
          name: d.names.exportId,
          writable: false,
          ...(bitmaps.length ? { bitmaps } : {}),
        });
        d.exported = true;
        views.push({ disk: d.disk, nbd: { socketPath: this.#nbdSocket, exportName: d.names.exportId }, size: d.disk.virtualSize, changes: d.changes });
      }
      return {
        vm: vmInfo,
        checkpoint: this.#checkpoint,
        consistency,
        freezeWindowMs,
        pauseWindowMs,
        warnings,
        disks: views,
        commit: () => this.#end(true),
        abort: (reason?: unknown) => this.#end(false, reason),
      };
    } catch (err) {
      await this.#end(false, err);
      throw err instanceof BulwarkError
        ? err
        : new BulwarkError(`backup of VM ${vmName} could not start: ${describeError(err)}`, { kind: 'internal', context: { vm: vmName }, cause: err });
    }
  }

  async #addFleeceNode(d: DiskState): Promise<void> {
    await rm(d.fleecePath, { force: true });
    await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', d.fleecePath, String(d.disk.virtualSize)], `creating the fleecing image of disk ${d.disk.name}`, {
      context: { file: d.fleecePath },
    });
    d.fileCreated = true;
    await this.#qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': d.names.node,
      file: { driver: 'file', filename: d.fleecePath },
      backing: d.disk.nodeName,
    });
    d.nodeAdded = true;
  }

  /** The snapshot: bitmap operations and the start of every fleecing job, atomically. */
  async #transaction(): Promise<void> {
    const actions: Array<{ type: string; data: Record<string, unknown> }> = [];
    for (const d of this.#disks) {
      if (d.changes.kind === 'bitmap') actions.push({ type: 'block-dirty-bitmap-disable', data: { node: d.disk.nodeName, name: d.changes.bitmap } });
      actions.push({
        type: 'block-dirty-bitmap-add',
        data: { node: d.disk.nodeName, name: this.#checkpoint.name, persistent: d.disk.persistentBitmaps },
      });
      actions.push({ type: 'blockdev-backup', data: { 'job-id': d.names.job, device: d.disk.nodeName, target: d.names.node, sync: 'none' } });
    }
    await this.#qmp.execute('transaction', { actions });
    this.#transactionDone = true;
    for (const d of this.#disks) d.jobStarted = true;
  }

  async #startNbdServer(): Promise<void> {
    try {
      await this.#qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: this.#nbdSocket } } });
      this.#startedNbdServer = true;
    } catch (err) {
      // One NBD server per QEMU: another backup of this VM (another chain) started it on the same socket.
      if (!(err instanceof QmpError && err.reason === 'command' && /already running/i.test(err.desc ?? ''))) throw err;
      this.#log.info('NBD server already running in QEMU; adding exports to it');
    }
  }

  /**
   * Leftovers of a backup of this chain that died half-way (Bulwark killed): exports, jobs and
   * fleecing nodes are removed; bitmaps of the chain other than the previous checkpoint's are
   * merged into it (their changes are not lost) and removed, and the previous one re-enabled.
   */
  async #sweepLeftovers(disks: QemuDisk[]): Promise<void> {
    const exports = await this.#qmp.execute<Array<{ id: string }>>('query-block-exports');
    const jobs = await this.#qmp.execute<Array<{ device: string }>>('query-block-jobs');
    const nodes = new Set((await this.#qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true })).map((n) => n['node-name']));
    for (const disk of disks) {
      const n = tempNames(this.#options.chainId, disk.name);
      if (exports.some((e) => e.id === n.exportId)) await this.#delExport(n.exportId);
      if (jobs.some((j) => j.device === n.job)) await this.#cancelJob(n.job);
      if (nodes.has(n.node)) await this.#qmp.execute('blockdev-del', { 'node-name': n.node });
      await rm(path.join(this.#vmDir, n.file), { force: true });
    }
    const bitmaps = await queryBitmaps(this.#qmp);
    const prevName = this.#options.previous?.name;
    for (const disk of disks) {
      const list = bitmaps.get(disk.nodeName) ?? [];
      const prev = prevName ? list.find((b) => b.name === prevName) : undefined;
      let prevRecording = prev?.recording ?? false;
      for (const b of list) {
        if (b.name === prevName || !isCheckpointOf(this.#options.chainId, b.name)) continue;
        // Enable, merge and remove atomically (see #end): no write may fall between them.
        const actions: Array<{ type: string; data: Record<string, unknown> }> = [];
        if (prev && !prev.inconsistent && !b.inconsistent) {
          if (!prevRecording) actions.push({ type: 'block-dirty-bitmap-enable', data: { node: disk.nodeName, name: prev.name } });
          actions.push({ type: 'block-dirty-bitmap-merge', data: { node: disk.nodeName, target: prev.name, bitmaps: [b.name] } });
        }
        actions.push({ type: 'block-dirty-bitmap-remove', data: { node: disk.nodeName, name: b.name } });
        await this.#qmp.execute('transaction', { actions });
        if (actions.length > 1) prevRecording = true;
        this.#log.warn({ disk: disk.name, bitmap: b.name }, 'removed a bitmap left by an unfinished backup of this chain');
      }
      if (prev && !prev.inconsistent && !prevRecording) {
        await this.#qmp.execute('block-dirty-bitmap-enable', { node: disk.nodeName, name: prev.name });
      }
    }
  }

  async #delExport(id: string): Promise<void> {
    const gone = this.#qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === id, 15_000);
    gone.catch(() => undefined);
    try {
      await this.#qmp.execute('block-export-del', { id, mode: 'hard' });
    } catch (err) {
      if (err instanceof QmpError && err.reason === 'command') return; // already gone
      throw err;
    }
    await gone;
  }

  async #cancelJob(job: string): Promise<void> {
    const ended = this.#qmp.waitForEvent('BLOCK_JOB_CANCELLED', (e) => e.data.device === job, 15_000);
    ended.catch(() => undefined);
    try {
      await this.#qmp.execute('block-job-cancel', { device: job, force: true });
    } catch (err) {
      if (err instanceof QmpError && err.reason === 'command') return; // no such job
      throw err;
    }
    await ended;
  }

  /** Ends the backup: cleanup, then keep (success) or merge back (failure) the bitmaps. */
  async #end(success: boolean, reason?: unknown): Promise<void> {
    if (this.#ended) return;
    this.#ended = true;
    if (!success && reason !== undefined) this.#log.warn({ err: describeError(reason) }, 'backup aborted; restoring change tracking');
    const failures: string[] = [];
    const step = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        failures.push(`${what}: ${describeError(err)}`);
        this.#log.error({ step: what, err: describeError(err) }, 'backup cleanup step failed');
      }
    };
    for (const d of this.#disks) {
      if (d.exported) await step(`remove NBD export ${d.names.exportId}`, () => this.#delExport(d.names.exportId));
      if (d.jobStarted) await step(`cancel block job ${d.names.job}`, () => this.#cancelJob(d.names.job));
      if (d.nodeAdded) await step(`remove node ${d.names.node}`, () => this.#qmp.execute('blockdev-del', { 'node-name': d.names.node }));
      if (d.fileCreated) await step(`remove ${d.fleecePath}`, () => rm(d.fleecePath, { force: true }));
    }
    if (this.#startedNbdServer) {
      await step('stop the NBD server', async () => {
        const left = await this.#qmp.execute<unknown[]>('query-block-exports');
        if (left.length === 0) await this.#qmp.execute('nbd-server-stop');
      });
    }
    if (this.#transactionDone) {
      for (const d of this.#disks) {
        const node = d.disk.nodeName;
        const fresh = this.#checkpoint.name;
        if (success) {
          if (d.previousBitmap) await step(`remove bitmap ${d.previousBitmap.name}`, () => this.#qmp.execute('block-dirty-bitmap-remove', { node, name: d.previousBitmap!.name }));
        } else if (d.changes.kind === 'bitmap') {
          // Changes since the snapshot are in the new bitmap; put them back into the previous one.
          // One transaction, previous bitmap enabled first: a guest write landing between separate
          // commands would otherwise be recorded only in the bitmap that is then removed.
          const previous = d.changes.bitmap;
          await step(`merge bitmap ${fresh} back into ${previous}`, () =>
            this.#qmp.execute('transaction', {
              actions: [
                { type: 'block-dirty-bitmap-enable', data: { node, name: previous } },
                { type: 'block-dirty-bitmap-merge', data: { node, target: previous, bitmaps: [fresh] } },
                { type: 'block-dirty-bitmap-remove', data: { node, name: fresh } },
              ],
            }),
          );
        } else {
          // No usable previous bitmap: the next backup reads this disk in full anyway.
          await step(`remove bitmap ${fresh}`, () => this.#qmp.execute('block-dirty-bitmap-remove', { node, name: fresh }));
        }
      }
    }
    await this.#qmp.close().catch(() => undefined);
    if (failures.length) {
      const err = new BulwarkError(`cleanup after the backup of VM ${this.#vm.info.name} left work undone: ${failures.join('; ')}`, {
        kind: 'internal',
        context: { vm: this.#vm.info.name },
      });
      if (success) throw err;
      this.#log.error({ err: err.message }, 'abort cleanup incomplete');
    }
  }
}
