// The `libvirt` adapter: VMs run by libvirt, reached through `virsh`. A backup is libvirt's
// pull-mode backup (`backup-begin` with scratch files, NBD on a unix socket) that creates the
// chain's next checkpoint in the same step; the guest is frozen by hand around it
// (`domfsfreeze`/`domfsthaw`: libvirt 9 has no --quiesce for backup-begin), or suspended in offline
// mode. libvirt keeps every checkpoint's bitmap recording, so a failed backup only has to delete
// the checkpoint it created; a successful one deletes the previous checkpoint.
import { chown, mkdir, rm, writeFile } from 'node:fs/promises';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger, type Logger } from '../../common/log.js';
import { describeChanges, planDiskChanges, type BitmapState } from '../cbt/policy.js';
import { dirtyBitmapContext } from '../nbd/protocol.js';
import { processInfo, withSavedNvram } from '../qemu/discovery.js';
import { domainFirmware } from './firmware.js';
import { withFrozenGuest, type FileSystemFreezer } from '../qemu/freeze.js';
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
  type VmDisk,
  type VmInfo,
  type VmRunState,
} from '../types.js';
import { attr, elements, escapeXml, startTag, text, Virsh } from './virsh.js';
import { runTool, ToolError } from '../../common/process.js';


export interface LibvirtHypervisorOptions {
  /** libvirt connection URI. Default qemu:///system. */
  readonly uri?: string;
  /**
   * Where scratch files and NBD sockets go; QEMU (user libvirt-qemu) must be able to reach it.
   * Default /var/lib/libvirt/images/bulwark-backup.
   */
  readonly workDir?: string;
  /** The user QEMU runs as (owns the per-backup directory). Default libvirt-qemu, if it exists. */
  readonly qemuUser?: string;
}

interface LibvirtDisk extends VmDisk {
  /** libvirt's device alias (virtio-disk0), which names the QEMU device. */
  readonly alias: string | undefined;
}

export class LibvirtHypervisor implements Hypervisor {
  readonly kind = 'libvirt' as const;
  readonly #virsh: Virsh;
  readonly #workDir: string;
  readonly #qemuUser: string;
  readonly #log: Logger;

  constructor(options: LibvirtHypervisorOptions = {}) {
    this.#virsh = new Virsh(options.uri ?? 'qemu:///system');
    this.#workDir = options.workDir ?? '/var/lib/libvirt/images/bulwark-backup';
    this.#qemuUser = options.qemuUser ?? 'libvirt-qemu';
    this.#log = logger('hypervisor-libvirt', { uri: this.#virsh.uri });
  }

  get virsh(): Virsh {
    return this.#virsh;
  }

  async close(): Promise<void> {
    // virsh runs per call; nothing stays open.
  }

  async listVms(): Promise<VmInfo[]> {
    const names = (await this.#virsh.run(['list', '--all', '--name'])).split('\n').map((s) => s.trim()).filter(Boolean);
    const out: VmInfo[] = [];
    for (const n of names) {
      try {
        out.push((await this.#describe(n)).info);
      } catch (err) {
        if (err instanceof ToolError && err.kind === 'not-found') continue; // went away meanwhile
        throw err;
      }
    }
    return out;
  }

  async getVm(nameOrId: string): Promise<VmInfo> {
    return (await this.#describe(nameOrId)).info;
  }

  async #describe(nameOrId: string): Promise<{ info: VmInfo; disks: LibvirtDisk[]; liveXml: string }> {
    let liveXml: string;
    try {
      liveXml = await this.#virsh.run(['dumpxml', nameOrId]);
    } catch (err) {
      if (err instanceof ToolError && err.kind === 'not-found') {
        throw new BulwarkError(`no libvirt domain ${nameOrId} on ${this.#virsh.uri}`, { kind: 'not-found', context: { vm: nameOrId }, cause: err });
      }
      throw err;
    }
    const name = text(liveXml, 'name') ?? nameOrId;
    const uuid = text(liveXml, 'uuid');
    const stateText = (await this.#virsh.run(['domstate', name])).trim();
    const state: VmRunState = stateText === 'running' ? 'running' : stateText === 'paused' ? 'paused' : stateText === 'shut off' ? 'shut-off' : 'other';
    const disks: LibvirtDisk[] = [];
    for (const d of elements(liveXml, 'disk')) {
      const open = startTag(d, 'disk') ?? '';
      if (attr(open, 'device') !== 'disk') continue;
      const target = attr(startTag(d, 'target') ?? '', 'dev');
      const source = startTag(d, 'source');
      const file = source ? (attr(source, 'file') ?? attr(source, 'dev') ?? attr(source, 'name')) : undefined;
      if (!target || !file) continue;
      const format = attr(startTag(d, 'driver') ?? '', 'type') ?? 'raw';
      let size = 0;
      if (state === 'running' || state === 'paused') {
        const info = await this.#virsh.run(['domblkinfo', name, target]);
        size = Number(info.match(/Capacity:\s+(\d+)/)?.[1] ?? 0);
      } else {
        const stdout = await runTool('qemu-img', ['info', '--output=json', '-U', file], `qemu-img info of disk ${target} of VM ${name}`, { context: { vm: name, disk: target, file } });
        size = (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
      }
      disks.push({
        name: target,
        targetDev: target,
        imagePath: file,
        format,
        virtualSize: size,
        persistentBitmaps: format === 'qcow2',
        alias: attr(startTag(d, 'alias') ?? '', 'name'),
      });
    }
    const domainXml = await this.#virsh.run(['dumpxml', '--inactive', '--security-info', name]).catch(() => liveXml);
    // The live XML names the firmware libvirt resolved (e.g. from `<os firmware='efi'>`).
    const firmware = domainFirmware(liveXml) ?? domainFirmware(domainXml);
    const info: VmInfo = { id: uuid ?? name, name, ...(uuid ? { uuid } : {}), state, disks, configuration: { kind: 'libvirt', domainXml, ...(firmware ? { firmware } : {}) } };
    return { info, disks, liveXml };
  }

  /** QEMU's pid and start time for this domain (changes when the domain is restarted). */
  async #instance(name: string, liveXml: string): Promise<string> {
    const pid = Number((await readFile(`/run/libvirt/qemu/${name}.pid`, 'utf8').catch(() => '')).trim());
    if (pid > 0) {
      try {
        return (await processInfo(pid)).instance;
      } catch {
        // not visible from here
      }
    }
    return `domain-id-${attr(startTag(liveXml, 'domain') ?? '', 'id') ?? 'none'}`;
  }

  /** Dirty bitmaps QEMU holds for a disk (by device alias), through the QEMU monitor. */
  async #qemuBitmaps(name: string, alias: string | undefined): Promise<Array<{ name: string; inconsistent: boolean }> | undefined> {
    if (!alias) return undefined;
    try {
      const blocks = JSON.parse(await this.#virsh.run(['qemu-monitor-command', name, '{"execute":"query-block"}'])) as {
        return: Array<{ qdev?: string; inserted?: { 'node-name'?: string } }>;
      };
      const node = blocks.return.find((b) => b.qdev?.includes(`/${alias}/`) || b.qdev === alias)?.inserted?.['node-name'];
      if (!node) return undefined;
      const nodes = JSON.parse(await this.#virsh.run(['qemu-monitor-command', name, '{"execute":"query-named-block-nodes","arguments":{"flat":true}}'])) as {
        return: Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name?: string; inconsistent?: boolean }> }>;
      };
      const bitmaps = nodes.return.find((n) => n['node-name'] === node)?.['dirty-bitmaps'] ?? [];
      return bitmaps.filter((b) => b.name !== undefined).map((b) => ({ name: b.name!, inconsistent: b.inconsistent ?? false }));
    } catch (err) {
      this.#log.debug({ vm: name, err: describeError(err) }, 'cannot inspect QEMU bitmaps; trusting libvirt checkpoints');
      return undefined;
    }
  }

  async beginBackup(vmRef: string, options: BeginBackupOptions): Promise<BackupView> {
    if (!validChainId(options.chainId)) {
      throw new BulwarkError(`chain id ${JSON.stringify(options.chainId)} is not usable in checkpoint names`, { kind: 'invalid', context: { chain: options.chainId } });
    }
    const { info, disks: allDisks, liveXml } = await this.#describe(vmRef);
    const vm = info.name;
    const log = this.#log.child({ vm });
    if (info.state !== 'running' && info.state !== 'paused') {
      throw new BulwarkError(`libvirt domain ${vm} is ${info.state}; pull-mode backup needs it running`, { kind: 'conflict', context: { vm } });
    }
    const disks = options.disks
      ? options.disks.map((n) => {
          const d = allDisks.find((x) => x.name === n);
          if (!d) throw new BulwarkError(`domain ${vm} has no disk ${n}`, { kind: 'not-found', context: { vm, disk: n } });
          return d;
        })
      : allDisks;
    if (disks.length === 0) throw new BulwarkError(`domain ${vm} has no disks to back up`, { kind: 'invalid', context: { vm } });
    const dir = path.join(this.#workDir, `${vm}-${options.chainId}`);
    const socketPath = path.join(dir, 'nbd.sock');
    await this.#sweepLeftovers(vm, options, dir);
    // QEMU (another user) must traverse the work dir and own the backup's own dir.
    await mkdir(this.#workDir, { recursive: true, mode: 0o711 });
    await mkdir(dir, { mode: 0o750 });
    await this.#chownToQemu(dir);

    const instance = await this.#instance(vm, liveXml);
    const checkpoints = new Set((await this.#virsh.run(['checkpoint-list', vm, '--name'])).split('\n').map((s) => s.trim()).filter(Boolean));
    const sequence = (options.previous?.sequence ?? 0) + 1;
    const checkpoint: Checkpoint = {
      chainId: options.chainId,
      name: checkpointName(options.chainId, sequence),
      sequence,
      instance,
      disks: Object.fromEntries(disks.map((d) => [d.name, { size: d.virtualSize }])),
      createdAt: new Date().toISOString(),
    };
    const prevName = options.previous?.name;
    const plans: Array<{ disk: LibvirtDisk; changes: DiskChanges }> = [];
    for (const disk of disks) {
      let state: BitmapState = { present: false };
      if (prevName && checkpoints.has(prevName)) {
        const qb = await this.#qemuBitmaps(vm, disk.alias);
        const b = qb?.find((x) => x.name === prevName);
        state = qb === undefined ? { present: true, inconsistent: false } : b ? { present: true, inconsistent: b.inconsistent } : { present: false };
      }
      const changes = planDiskChanges({
        diskName: disk.name,
        virtualSize: disk.virtualSize,
        previous: options.previous,
        fullRequested: options.full === true,
        fullReason: options.fullReason,
        instance,
        bitmap: state,
      });
      plans.push({ disk, changes });
      log.info({ disk: disk.name, changes }, describeChanges(disk.name, changes));
    }
    const warnings = plans.filter((p) => p.changes.kind === 'full' && p.changes.compareDigests).map((p) => describeChanges(p.disk.name, p.changes));

    const backupXml = [
      `<domainbackup mode='pull'>`,
      `  <server transport='unix' socket='${escapeXml(socketPath)}'/>`,
      `  <disks>`,
      ...allDisks.map((d) => {
        const p = plans.find((x) => x.disk.name === d.name);
        if (!p) return `    <disk name='${escapeXml(d.name)}' backup='no'/>`;
        const mode = p.changes.kind === 'bitmap' ? `backupmode='incremental' incremental='${escapeXml(p.changes.bitmap)}'` : `backupmode='full'`;
        return (
          `    <disk name='${escapeXml(d.name)}' backup='yes' type='file' ${mode}><driver type='qcow2'/>` +
          `<scratch file='${escapeXml(path.join(dir, `scratch-${d.name}.qcow2`))}'/></disk>`
        );
      }),
      `  </disks>`,
      `</domainbackup>`,
    ].join('\n');
    const checkpointXml = [
      `<domaincheckpoint><name>${escapeXml(checkpoint.name)}</name><description>Bulwark chain ${escapeXml(options.chainId)}</description><disks>`,
      ...allDisks.map((d) => `<disk name='${escapeXml(d.name)}' checkpoint='${plans.some((p) => p.disk.name === d.name) ? 'bitmap' : 'no'}'/>`),
      `</disks></domaincheckpoint>`,
    ].join('');
    const backupXmlPath = path.join(dir, 'backup.xml');
    const checkpointXmlPath = path.join(dir, 'checkpoint.xml');
    await writeFile(backupXmlPath, backupXml);
    await writeFile(checkpointXmlPath, checkpointXml);

    let started = false;
    const end = async (success: boolean, reason?: unknown): Promise<void> => {
      if (!success && reason !== undefined) log.warn({ err: describeError(reason) }, 'backup aborted; removing its checkpoint');
      const failures: string[] = [];
      const step = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
        try {
          await fn();
        } catch (err) {
          failures.push(`${what}: ${describeError(err)}`);
          log.error({ step: what, err: describeError(err) }, 'backup cleanup step failed');
        }
      };
      if (started) {
        await step('end the backup job', () => this.#abortJob(vm));
        if (success) {
          if (prevName) await step(`delete checkpoint ${prevName}`, () => this.#deleteCheckpoint(vm, prevName));
        } else {
          // Every libvirt checkpoint bitmap keeps recording: dropping the new one loses nothing.
          await step(`delete checkpoint ${checkpoint.name}`, () => this.#deleteCheckpoint(vm, checkpoint.name));
        }
      }
      await step(`remove ${dir}`, () => rm(dir, { recursive: true, force: true }));
      if (failures.length && success) {
        throw new BulwarkError(`cleanup after the backup of domain ${vm} left work undone: ${failures.join('; ')}`, { kind: 'internal', context: { vm } });
      }
    };

    try {
      let consistency: BackupView['consistency'] = 'crash';
      let freezeWindowMs: number | null = null;
      let pauseWindowMs: number | null = null;
      const begin = async (): Promise<void> => {
        await this.#virsh.run(['backup-begin', vm, '--backupxml', backupXmlPath, '--checkpointxml', checkpointXmlPath]);
        started = true;
      };
      if (options.mode === 'offline') {
        const wasRunning = info.state === 'running';
        const t0 = performance.now();
        if (wasRunning) await this.#virsh.run(['suspend', vm]);
        try {
          await begin();
        } finally {
          if (wasRunning) await this.#virsh.run(['resume', vm]);
        }
        pauseWindowMs = Math.round((performance.now() - t0) * 10) / 10;
      } else {
        const timeout = options.freezeTimeoutMs ?? 10_000;
        const freezer: FileSystemFreezer = {
          freeze: async (ms) => Number((await this.#virsh.run(['domfsfreeze', vm], ms)).match(/Froze (\d+)/)?.[1] ?? 0),
          thaw: async (ms) => Number((await this.#virsh.run(['domfsthaw', vm], ms)).match(/Thawed (\d+)/)?.[1] ?? 0),
          close: async () => undefined,
        };
        const r = await withFrozenGuest(vm, async () => freezer, begin, { require: options.requireGuestProcessing, freezeTimeoutMs: timeout, log, stopped: info.state === 'paused' ? 'paused' : undefined });
        consistency = r.consistency;
        freezeWindowMs = r.freezeWindowMs;
        warnings.push(...r.warnings);
      }
      // A UEFI domain's variable store is saved with its configuration, read right after the point in time.
      const vmInfo = await withSavedNvram(info);
      const dumped = await this.#virsh.run(['backup-dumpxml', vm]);
      const views: BackupDiskView[] = plans.map(({ disk, changes }) => {
        const el = elements(dumped, 'disk').find((e) => attr(startTag(e, 'disk') ?? '', 'name') === disk.name);
        const open = startTag(el ?? '', 'disk') ?? '';
        const exportName = attr(open, 'exportname') ?? disk.name;
        const exportBitmap = attr(open, 'exportbitmap');
        let c = changes;
        if (changes.kind === 'bitmap') {
          if (!exportBitmap) throw new BulwarkError(`libvirt exported disk ${disk.name} of ${vm} without its bitmap`, { kind: 'internal', context: { vm, disk: disk.name } });
          c = { kind: 'bitmap', bitmap: changes.bitmap, context: dirtyBitmapContext(exportBitmap) };
        }
        return { disk, nbd: { socketPath, exportName }, size: disk.virtualSize, changes: c };
      });
      let ended = false;
      return {
        vm: vmInfo,
        checkpoint,
        consistency,
        freezeWindowMs,
        pauseWindowMs,
        warnings,
        disks: views,
        commit: async () => {
          if (ended) return;
          ended = true;
          await end(true);
        },
        abort: async (reason?: unknown) => {
          if (ended) return;
          ended = true;
          await end(false, reason);
        },
      };
    } catch (err) {
      await end(false, err);
      throw err;
    }
  }

  async #chownToQemu(dir: string): Promise<void> {
    try {
      const uid = await runTool('id', ['-u', this.#qemuUser], `looking up user ${this.#qemuUser}`);
      const gid = await runTool('id', ['-g', this.#qemuUser], `looking up group of ${this.#qemuUser}`);
      await chown(dir, Number(uid), Number(gid));
    } catch (err) {
      this.#log.debug({ dir, err: describeError(err) }, `cannot give ${dir} to ${this.#qemuUser}; QEMU may not reach it`);
    }
  }

  /** Ends the domain's backup job (pull mode never ends by itself); no job is fine. */
  async #abortJob(vm: string): Promise<void> {
    try {
      await this.#virsh.run(['domjobabort', vm]);
    } catch (err) {
      if (err instanceof ToolError && /no job is active|not active/i.test(err.stderr)) return;
      throw err;
    }
    // Wait until libvirt reports no job (it removes scratch files and the NBD server then).
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      const info = await this.#virsh.run(['domjobinfo', vm]).catch(() => '');
      if (!/Job type:\s+(Unbounded|Bounded)/.test(info)) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new BulwarkError(`the backup job of domain ${vm} did not end within 30 s`, { kind: 'unavailable', context: { vm } });
  }

  async #deleteCheckpoint(vm: string, name: string): Promise<void> {
    try {
      await this.#virsh.run(['checkpoint-delete', vm, name]);
    } catch (err) {
      if (err instanceof ToolError && /not found|no domain checkpoint/i.test(err.stderr)) return;
      throw err;
    }
  }

  /** A backup of this chain that died half-way: end its job, drop checkpoints newer than the previous one. */
  async #sweepLeftovers(vm: string, options: BeginBackupOptions, dir: string): Promise<void> {
    const job = await this.#virsh.run(['domjobinfo', vm]).catch(() => '');
    if (/Operation:\s+Backup/.test(job)) {
      const xml = await this.#virsh.run(['backup-dumpxml', vm]).catch(() => '');
      if (xml.includes(dir)) {
        this.#log.warn({ vm }, 'ending a backup job left by an unfinished backup of this chain');
        await this.#abortJob(vm);
      } else {
        throw new BulwarkError(`domain ${vm} is already being backed up by another job`, { kind: 'conflict', context: { vm } });
      }
    }
    const names = (await this.#virsh.run(['checkpoint-list', vm, '--name'])).split('\n').map((s) => s.trim()).filter(Boolean);
    for (const n of names) {
      if (n !== options.previous?.name && isCheckpointOf(options.chainId, n)) {
        this.#log.warn({ vm, checkpoint: n }, 'deleting a checkpoint left by an unfinished backup of this chain');
        await this.#deleteCheckpoint(vm, n);
      }
    }
    await rm(dir, { recursive: true, force: true });
  }
}
