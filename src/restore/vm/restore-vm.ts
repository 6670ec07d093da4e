// Full VM restore: brings a whole VM back from a restore point, from the VM configuration stored
// with it, either over the original VM (which must be off; its disks are overwritten in place) or
// as a new VM with a new name, on the same or another host:
// - libvirt: a domain defined from the saved XML with new disk paths, a new UUID and new MACs;
// - plain QEMU: the disks plus the recorded command line rewritten for them, written as
//   `start-vm.sh` into the new VM's folder, which the host's QMP glob places (docs/restore-vm.md).
// Disks are written sparse (raw) or as qcow2 by restoreDisk; `powerOn` starts the VM afterwards.
import { execFile, spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { closeSync, openSync } from 'node:fs';
import { chmod, chown, mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { BulwarkError, describeError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { decodePointMetadata, type PointMetadata } from '../../agent/backup/point-metadata.js';
import { processesHolding } from '../../hypervisor/proc.js';
import { socketAnswers } from '../../hypervisor/socket.js';
import type { Repository } from '../../repository/index.js';
import type { RestoreDiskFormat } from '../disk/restore-disk.js';
import { domainDisks, domainName, domainNvramPath, rewriteDomainXml, setDomainNvram } from './libvirt-config.js';
import { nvramFileName, pointFirmware, requireFirmwareCode, writeNvram } from './firmware.js';
import { repositoryPointSource, type VmPointSource } from './point-source.js';
import { randomMac, recordedDisks, rewriteQemuCommandLine, shellQuote } from './qemu-config.js';

const run = promisify(execFile);
const log = logger('restore-vm');

/** The host the VM is restored to (what `bulwark host add` records). */
export type RestoreVmHost = { readonly kind: 'qemu'; readonly qmpGlob: string } | { readonly kind: 'libvirt'; readonly uri: string };

export interface RestoreVmOptions {
  /** The point's repository on this host; or give `source` (e.g. read from another agent). */
  readonly repository?: Repository;
  readonly source?: VmPointSource;
  readonly pointId: string;
  readonly password?: string;
  readonly host: RestoreVmHost;
  /** A new VM with this name; absent (or the original's name): restore over the original VM. */
  readonly name?: string;
  /** Folder for the new VM's disks (default: the host's convention, see docs/restore-vm.md). */
  readonly storage?: string;
  /** Disk format (default: each disk's original format when it is qcow2 or raw, else qcow2). */
  readonly format?: RestoreDiskFormat;
  readonly powerOn?: boolean;
  /**
   * Report each disk's SHA-256 (`RestoredDisk.sha256`). Off by default: computing it reads every
   * image back and disables the O_DIRECT write path (docs/decisions/0006-restore-image-digest.md).
   */
  readonly imageDigest?: boolean;
  /** Where new plain-QEMU VMs go when the host's QMP glob does not say (`<data>/vms`). */
  readonly defaultVmRoot: string;
  readonly signal?: AbortSignal;
  readonly onProgress?: (p: RestoreVmProgress) => void;
  /** A line for the restore's log (each disk written, the VM defined or started). */
  readonly onLog?: (message: string) => void;
}

export interface RestoreVmProgress {
  readonly disk: string;
  readonly bytesDone: number;
  readonly total: number;
}

export interface RestoredDisk {
  readonly name: string;
  readonly path: string;
  readonly format: RestoreDiskFormat;
  readonly size: number;
  /** SHA-256 of the disk's contents (raw image); only with `imageDigest`. */
  readonly sha256?: string;
}

export interface RestoreVmResult {
  readonly point: string;
  readonly vm: string;
  readonly toOriginal: boolean;
  readonly hypervisor: 'qemu' | 'libvirt';
  readonly disks: readonly RestoredDisk[];
  /** plain QEMU: the VM's folder, start script and QMP socket. */
  readonly vmDir?: string;
  readonly startScript?: string;
  readonly qmpSocket?: string;
  /** libvirt: the domain's UUID. */
  readonly uuid?: string;
  /** A UEFI VM: the firmware code it boots and where its restored variable store (NVRAM) was written. */
  readonly firmware?: { readonly code: string; readonly nvram?: string };
  readonly poweredOn: boolean;
  readonly warnings: readonly string[];
  readonly durationMs: number;
}

async function virsh(uri: string, args: readonly string[], timeoutMs = 120_000): Promise<string> {
  try {
    const { stdout } = await run('virsh', ['-q', '-c', uri, ...args], { timeout: timeoutMs, maxBuffer: 16 << 20 });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string };
    const msg = (e.stderr ?? '').trim() || describeError(err);
    throw new BulwarkError(`virsh ${args[0] ?? ''} failed on ${uri}: ${msg}`, {
      kind: /not found|no domain|failed to get domain/i.test(msg) ? 'not-found' : 'unavailable',
      context: { uri },
      cause: err,
    });
  }
}

/** The state of a libvirt domain, or null when there is none of that name. */
async function domainState(uri: string, name: string): Promise<string | null> {
  try {
    return (await virsh(uri, ['domstate', name])).trim();
  } catch (err) {
    if (err instanceof BulwarkError && err.kind === 'not-found') return null;
    throw err;
  }
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/**
 * Where a new plain-QEMU VM's QMP socket goes so that the host's glob finds it: the glob with its
 * first `*` replaced by the VM's name. Null when the glob has no `*` (it names one VM only).
 */
export function qmpSocketFor(glob: string, name: string): string | null {
  const i = glob.indexOf('*');
  if (i < 0) return null;
  return glob.slice(0, i) + name + glob.slice(i + 1);
}

/** Whether `file` matches the host's QMP glob (`*` within one path component). */
export function globMatches(glob: string, file: string): boolean {
  const re = new RegExp(`^${glob.split('*').map((p) => p.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('[^/]*')}$`);
  return re.test(file);
}

function diskFormat(original: string, wanted: RestoreDiskFormat | undefined): RestoreDiskFormat {
  if (wanted) return wanted;
  return original === 'raw' ? 'raw' : 'qcow2';
}

async function isEmptyOrMissing(dir: string): Promise<boolean> {
  try {
    return (await readdir(dir)).length === 0;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return true;
    throw err;
  }
}

/** Starts `argv` detached from this process (it outlives the server), output to `logFile`. */
export async function launchDetached(argv: readonly string[], logFile: string, qmpSocket: string | undefined): Promise<number> {
  const fd = openSync(logFile, 'a');
  let child;
  try {
    child = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: ['ignore', fd, fd] });
  } finally {
    closeSync(fd);
  }
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  child.once('error', () => undefined);
  child.unref();
  if (!qmpSocket) return child.pid ?? 0;
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (await socketAnswers(qmpSocket)) return child.pid ?? 0;
    const done = await Promise.race([exited.then((c) => ({ code: c })), new Promise<null>((r) => setTimeout(() => r(null), 100))]);
    // A -daemonize'd QEMU exits 0 once its child runs; anything else is a failed start.
    if (done && done.code !== 0) {
      const tail = (await readFile(logFile, 'utf8').catch(() => '')).slice(-1500);
      throw new BulwarkError(`the restored VM did not start (exit ${done.code}): ${tail.trim() || 'no output'}`, { kind: 'internal', context: { log: logFile } });
    }
    if (Date.now() > deadline) throw new BulwarkError(`the restored VM did not open its monitor ${qmpSocket} within 30 s`, { kind: 'unavailable', context: { log: logFile } });
  }
}

/** Restores a whole VM; see the file comment. */
export async function restoreVm(o: RestoreVmOptions): Promise<RestoreVmResult> {
  const started = Date.now();
  const source = o.source ?? (o.repository ? repositoryPointSource(o.repository, o.pointId, o.password) : undefined);
  if (!source) throw new BulwarkError('restoreVm needs a repository or a point source', { kind: 'internal' });
  const described = await source.describe();
  const meta: PointMetadata | null = decodePointMetadata(described.config);
  const sizes = described.disks.map((d) => ({ name: d.name, size: d.size }));
  if (!meta) {
    throw new BulwarkError(`restore point ${o.pointId} stores no VM configuration`, {
      kind: 'invalid',
      context: { point: o.pointId },
      hint: 'restore its disks one by one with `bulwark restore disk`',
    });
  }
  if (meta.configuration.kind !== o.host.kind) {
    throw new BulwarkError(`restore point ${o.pointId} holds a ${meta.configuration.kind} VM; host is ${o.host.kind}`, {
      kind: 'invalid',
      hint: `choose a ${meta.configuration.kind} host with --host`,
    });
  }
  const original = meta.vm.name;
  const toOriginal = o.name === undefined || o.name === original;
  if (!toOriginal && !NAME_RE.test(o.name)) {
    throw new BulwarkError(`name "${o.name}" may only use letters, digits, '.', '_' and '-' (at most 63)`, { kind: 'invalid', context: { field: 'name' } });
  }
  const name = toOriginal ? original : o.name;
  // A UEFI VM: its firmware must be on this host, and its saved variable store is written for it.
  const fw = pointFirmware(meta, o.pointId);
  if (fw) await requireFirmwareCode(fw, original, o.pointId, 'this host');
  const nvramData = (what: string): { data: Buffer; format: string } | undefined => {
    const nv = fw?.firmware.nvram;
    if (!fw || !nv) return undefined;
    if (!fw.nvram) {
      throw new BulwarkError(`restore point ${o.pointId} of VM ${original} records the UEFI variable store ${nv.path} but did not save it`, {
        kind: 'corrupt',
        context: { point: o.pointId, vm: original, file: nv.path },
        hint: `restore from a newer point of this VM (${what})`,
      });
    }
    return { data: fw.nvram, format: nv.format };
  };
  const firmwareResult = (nvram: string | undefined): Pick<RestoreVmResult, 'firmware'> =>
    fw ? { firmware: { code: fw.firmware.code, ...(nvram ? { nvram } : {}) } } : {};
  const total = sizes.reduce((a, d) => a + d.size, 0);
  let doneBefore = 0;
  const restoreOne = async (disk: string, to: string, format: RestoreDiskFormat, overwrite: boolean): Promise<RestoredDisk> => {
    const size = sizes.find((d) => d.name === disk)?.size ?? 0;
    const r = await source.writeDisk({ disk, to, format, overwrite, digest: o.imageDigest === true, signal: o.signal, onProgress: (done) => o.onProgress?.({ disk, bytesDone: doneBefore + done, total }) });
    doneBefore += size;
    o.onLog?.(`disk ${disk} restored to ${r.path} (${r.format}, ${r.size} bytes)`);
    return { name: disk, path: r.path, format: r.format, size: r.size, ...(r.sha256 !== undefined ? { sha256: r.sha256 } : {}) };
  };
  const putNvram = async (nv: { data: Buffer; format: string }, to: string, overwrite: boolean): Promise<void> => {
    await writeNvram(nv.data, to, nv.format, overwrite, { vm: name, point: o.pointId });
    o.onLog?.(`UEFI variable store restored to ${to} (${nv.format}, ${nv.data.length} bytes)`);
  };
  const warnings: string[] = [];
  const base = { point: o.pointId, vm: name, toOriginal, warnings };

  switch (meta.configuration.kind) {
    case 'qemu': {
      if (o.host.kind !== 'qemu') throw new BulwarkError('unreachable', { kind: 'internal' });
      const argv = meta.configuration.commandLine;
      if (argv.length === 0) throw new BulwarkError(`restore point ${o.pointId} recorded no QEMU command line for VM ${original}`, { kind: 'invalid' });
      const recorded = recordedDisks(argv, meta.configuration.blockGraph, sizes.map((d) => d.name));
      for (const d of sizes) {
        if (!recorded.some((r) => r.name === d.name)) {
          throw new BulwarkError(`the recorded command line of VM ${original} has no disk ${d.name}`, { kind: 'corrupt', context: { point: o.pointId, disk: d.name } });
        }
      }
      const oldQmp = meta.vm.id;
      if (toOriginal) {
        if (await socketAnswers(oldQmp)) {
          throw new BulwarkError(`VM ${original} is running (its QMP socket ${oldQmp} answers): shut it down before restoring over it`, {
            kind: 'conflict',
            context: { vm: original },
            hint: 'or restore it as a new VM with --name NEW',
          });
        }
        const targets = sizes.map((d) => recorded.find((r) => r.name === d.name)!);
        for (const t of targets) {
          if (o.format && o.format !== diskFormat(t.format, undefined)) {
            throw new BulwarkError(`--format ${o.format}: the original VM ${original} uses ${t.format} for disk ${t.name}`, { kind: 'invalid', context: { field: 'format' }, hint: 'leave out --format, or restore as a new VM with --name' });
          }
        }
        const nvram = nvramData('over the original');
        const nvramPath = fw?.firmware.nvram?.path;
        const holders = await processesHolding([...targets.map((t) => t.imagePath), ...(nvramPath ? [nvramPath] : [])]);
        if (holders.length > 0) {
          const h = holders[0]!;
          throw new BulwarkError(`VM ${original} is not off: ${h.file} is open in process ${h.pid} (${h.comm})`, { kind: 'conflict', context: { vm: original, pid: h.pid } });
        }
        const disks: RestoredDisk[] = [];
        for (const t of targets) {
          // The original's folder may be gone with the VM.
          await mkdir(path.dirname(t.imagePath), { recursive: true });
          disks.push(await restoreOne(t.name, t.imagePath, diskFormat(t.format, undefined), true));
        }
        if (nvram && nvramPath) await putNvram(nvram, nvramPath, true);
        let poweredOn = false;
        if (o.powerOn) {
          await launchDetached(argv, path.join(path.dirname(oldQmp), 'qemu-restore.log'), oldQmp);
          poweredOn = true;
        }
        log.info({ point: o.pointId, vm: original, disks: disks.map((d) => d.path) }, 'VM restored over the original');
        return { ...base, hypervisor: 'qemu', disks, qmpSocket: oldQmp, ...firmwareResult(nvramPath), poweredOn, durationMs: Date.now() - started };
      }
      // A new VM: its folder is where the host's glob expects its QMP socket.
      let newQmp = qmpSocketFor(o.host.qmpGlob, name);
      let vmDir: string;
      if (newQmp && path.dirname(newQmp) !== path.dirname(o.host.qmpGlob)) vmDir = path.dirname(newQmp);
      else vmDir = path.join(o.defaultVmRoot, name);
      if (!newQmp) {
        newQmp = path.join(vmDir, 'qmp.sock');
        warnings.push(`host QMP glob ${o.host.qmpGlob} has no '*': the new VM's socket ${newQmp} is not behind it (add a host for it to back it up)`);
      }
      const storage = o.storage ?? vmDir;
      if (await socketAnswers(newQmp)) throw new BulwarkError(`a VM already answers on ${newQmp}`, { kind: 'conflict', context: { vm: name } });
      if (!(await isEmptyOrMissing(vmDir))) {
        throw new BulwarkError(`the new VM's folder ${vmDir} already exists and is not empty`, { kind: 'conflict', context: { vm: name, dir: vmDir }, hint: 'choose another --name' });
      }
      await mkdir(vmDir, { recursive: true, mode: 0o750 });
      await mkdir(storage, { recursive: true, mode: 0o750 });
      const created: string[] = [];
      try {
        const nvram = nvramData('as a new VM');
        const nvramFrom = fw?.firmware.nvram?.path;
        const nvramTo = nvram ? path.join(storage, nvramFileName(name, nvram.format)) : undefined;
        const disks: RestoredDisk[] = [];
        const plan = new Map<string, { path: string; format: string }>();
        for (const d of sizes) {
          const r = recorded.find((x) => x.name === d.name)!;
          const format = diskFormat(r.format, o.format);
          plan.set(d.name, { path: path.join(storage, `${d.name}.${format}`), format });
        }
        const newArgv = rewriteQemuCommandLine(argv, recorded, {
          name,
          disks: plan,
          fromDir: path.dirname(oldQmp),
          toDir: vmDir,
          qmpSocket: { from: oldQmp, to: newQmp },
          uuid: randomUUID(),
          newMac: () => randomMac(randomBytes),
          ...(nvramFrom && nvramTo ? { nvram: { from: nvramFrom, to: nvramTo } } : {}),
        });
        for (const d of sizes) {
          const p = plan.get(d.name)!;
          created.push(p.path);
          disks.push(await restoreOne(d.name, p.path, p.format as RestoreDiskFormat, false));
        }
        if (nvram && nvramTo) {
          created.push(nvramTo);
          await putNvram(nvram, nvramTo, false);
        }
        const startScript = path.join(vmDir, 'start-vm.sh');
        await writeFile(
          path.join(vmDir, 'vm.json'),
          `${JSON.stringify({ format: 'bulwark-restored-vm/1', name, restoredFrom: { point: o.pointId, vm: original }, qmpSocket: newQmp, commandLine: newArgv, disks, ...firmwareResult(nvramTo) }, null, 2)}\n`,
        );
        await writeFile(startScript, `#!/bin/sh\n# VM ${name}, restored by Bulwark from restore point ${o.pointId} of VM ${original}.\nexec ${shellQuote(newArgv)}\n`);
        await chmod(startScript, 0o755);
        let poweredOn = false;
        if (o.powerOn) {
          await launchDetached(['/bin/sh', startScript], path.join(vmDir, 'qemu.log'), newQmp);
          poweredOn = true;
        }
        log.info({ point: o.pointId, vm: name, from: original, dir: vmDir }, 'VM restored as a new VM');
        return { ...base, hypervisor: 'qemu', disks, vmDir, startScript, qmpSocket: newQmp, ...firmwareResult(nvramTo), poweredOn, durationMs: Date.now() - started };
      } catch (err) {
        for (const f of created) await rm(f, { force: true });
        if (await isEmptyOrMissing(vmDir).catch(() => false)) await rm(vmDir, { recursive: true, force: true });
        else for (const f of ['vm.json', 'start-vm.sh']) await rm(path.join(vmDir, f), { force: true });
        throw err;
      }
    }
    case 'libvirt': {
      if (o.host.kind !== 'libvirt') throw new BulwarkError('unreachable', { kind: 'internal' });
      const uri = o.host.uri;
      let xml = meta.configuration.domainXml;
      const recorded = domainDisks(xml);
      for (const d of sizes) {
        if (!recorded.some((r) => r.name === d.name)) throw new BulwarkError(`the stored domain XML of VM ${original} has no disk ${d.name}`, { kind: 'corrupt' });
      }
      const state = await domainState(uri, name);
      if (toOriginal) {
        if (state !== null && state !== 'shut off') {
          throw new BulwarkError(`VM ${original} is ${state}: shut it down before restoring over it`, { kind: 'conflict', context: { vm: original }, hint: 'or restore it as a new VM with --name NEW' });
        }
        const targets = sizes.map((d) => recorded.find((r) => r.name === d.name)!);
        for (const t of targets) {
          if (o.format && o.format !== diskFormat(t.format, undefined)) {
            throw new BulwarkError(`--format ${o.format}: the original VM ${original} uses ${t.format} for disk ${t.name}`, { kind: 'invalid', context: { field: 'format' } });
          }
        }
        const nvram = nvramData('over the original');
        // The store goes where the domain keeps it: its current definition's, else the recorded one.
        const nvramPath = nvram
          ? ((state !== null ? domainNvramPath(await virsh(uri, ['dumpxml', '--inactive', name])) : undefined) ?? fw?.firmware.nvram?.path)
          : undefined;
        const holders = await processesHolding([...targets.map((t) => t.imagePath), ...(nvramPath ? [nvramPath] : [])]);
        if (holders.length > 0) {
          const h = holders[0]!;
          throw new BulwarkError(`VM ${original} is not off: ${h.file} is open in process ${h.pid} (${h.comm})`, { kind: 'conflict' });
        }
        const disks: RestoredDisk[] = [];
        for (const t of targets) {
          await mkdir(path.dirname(t.imagePath), { recursive: true });
          disks.push(await restoreOne(t.name, t.imagePath, diskFormat(t.format, undefined), true));
        }
        if (nvram && nvramPath) {
          await mkdir(path.dirname(nvramPath), { recursive: true });
          await putNvram(nvram, nvramPath, true);
          // A definition without <nvram> (libvirt chose it at start) names the restored store explicitly.
          if (state === null && domainNvramPath(xml) === undefined) xml = setDomainNvram(xml, nvramPath);
        }
        if (state !== null) {
          const dropped = await dropStaleCheckpoints(uri, name);
          if (dropped.length > 0) o.onLog?.(`checkpoint metadata of the replaced disks dropped: ${dropped.join(', ')}`);
        }
        if (state === null) await defineDomain(uri, xml, path.dirname(targets[0]?.imagePath ?? '/tmp'));
        if (o.powerOn) await virsh(uri, ['start', name]);
        return { ...base, hypervisor: 'libvirt', disks, ...(meta.vm.uuid ? { uuid: meta.vm.uuid } : {}), ...firmwareResult(nvramPath), poweredOn: o.powerOn === true, durationMs: Date.now() - started };
      }
      if (state !== null) throw new BulwarkError(`a libvirt domain named ${name} already exists on ${uri}`, { kind: 'conflict', context: { vm: name }, hint: 'choose another --name' });
      const storage = o.storage ?? path.join('/var/lib/libvirt/images', name);
      if (!(await isEmptyOrMissing(storage))) throw new BulwarkError(`storage folder ${storage} is not empty`, { kind: 'conflict', hint: 'choose another --storage' });
      await mkdir(storage, { recursive: true, mode: 0o755 });
      const created: string[] = [];
      try {
        const plan = new Map<string, { path: string; format: string }>();
        for (const d of sizes) {
          const r = recorded.find((x) => x.name === d.name)!;
          const format = diskFormat(r.format, o.format);
          plan.set(d.name, { path: path.join(storage, `${d.name}.${format}`), format });
        }
        const uuid = randomUUID();
        const firstDir = path.dirname(recorded[0]?.imagePath ?? '/nonexistent/x');
        const nvram = nvramData('as a new VM');
        const nvramTo = nvram ? path.join(storage, nvramFileName(name, nvram.format)) : undefined;
        const newXml = rewriteDomainXml(xml, { name, uuid, disks: plan, fromDir: firstDir, toDir: storage, newMac: () => randomMac(randomBytes), ...(nvramTo ? { nvram: nvramTo } : {}) });
        if (domainName(newXml) !== name) throw new BulwarkError('rewritten domain XML lost its name', { kind: 'internal' });
        const disks: RestoredDisk[] = [];
        for (const d of sizes) {
          const p = plan.get(d.name)!;
          created.push(p.path);
          disks.push(await restoreOne(d.name, p.path, p.format as RestoreDiskFormat, false));
        }
        let t = Date.now();
        await copyBootFiles(newXml, firstDir, storage);
        if (nvram && nvramTo) await putNvram(nvram, nvramTo, false);
        await giveToQemuUser(storage);
        const copyMs = Date.now() - t;
        t = Date.now();
        await defineDomain(uri, newXml, storage);
        const defineMs = Date.now() - t;
        t = Date.now();
        if (o.powerOn) await virsh(uri, ['start', name]);
        log.info({ vm: name, copyMs, defineMs, startMs: Date.now() - t }, 'libvirt domain defined');
        return { ...base, hypervisor: 'libvirt', disks, uuid, ...firmwareResult(nvramTo), poweredOn: o.powerOn === true, durationMs: Date.now() - started };
      } catch (err) {
        for (const f of created) await rm(f, { force: true });
        await rm(storage, { recursive: true, force: true }).catch(() => undefined);
        throw err;
      }
    }
    default:
      throw new BulwarkError('unknown VM configuration kind', { kind: 'corrupt' });
  }
}

/**
 * Kernel/initrd files that the original kept next to its disks were moved into the new folder by
 * the XML rewrite: copy them there when the original's are still present.
 */
async function copyBootFiles(xml: string, fromDir: string, toDir: string): Promise<void> {
  for (const tag of ['kernel', 'initrd', 'loader', 'nvram']) {
    const m = xml.match(new RegExp(`<${tag}(?:\\s[^>]*)?>([^<]+)</${tag}>`));
    const p = m?.[1];
    if (!p || !p.startsWith(`${toDir}/`)) continue;
    const src = path.join(fromDir, path.relative(toDir, p));
    if (await stat(src).then(() => true, () => false)) await run('cp', ['--reflink=auto', '--sparse=always', src, p]);
  }
}

/**
 * libvirt's QEMU runs as its own user (libvirt-qemu on Debian) and creates files next to the disks
 * (serial logs): the new VM's folder is handed to it. libvirt relabels the disks themselves at start.
 */
async function giveToQemuUser(dir: string): Promise<void> {
  try {
    const uid = Number((await run('id', ['-u', 'libvirt-qemu'])).stdout.trim());
    const gid = Number((await run('id', ['-g', 'libvirt-qemu'])).stdout.trim());
    await chown(dir, uid, gid);
  } catch (err) {
    log.debug({ dir, err: describeError(err) }, 'no libvirt-qemu user: folder left as it is');
  }
}

/**
 * The checkpoints of a domain restored over name dirty bitmaps inside the disk images the restore
 * has just replaced (restored images carry none). Their metadata is dropped (`checkpoint-delete
 * --metadata`: the images are not touched), children first, so that libvirt neither keeps
 * checkpoints it cannot delete (a backup that ends would fail to merge a bitmap that is gone, and
 * `virsh undefine` refuses a domain with checkpoints) nor offers them for an incremental backup.
 * The chain's next backup finds its checkpoint gone and reads the whole disk, comparing block
 * digests with the previous point. Returns the names dropped.
 */
async function dropStaleCheckpoints(uri: string, name: string): Promise<string[]> {
  const names = (await virsh(uri, ['checkpoint-list', name, '--name', '--topological'])).split('\n').map((n) => n.trim()).filter(Boolean);
  for (const n of [...names].reverse()) await virsh(uri, ['checkpoint-delete', name, n, '--metadata']);
  if (names.length > 0) log.info({ vm: name, checkpoints: names }, 'checkpoint metadata of the replaced disks dropped');
  return names;
}

async function defineDomain(uri: string, xml: string, dir: string): Promise<void> {
  const file = path.join(dir, `.bulwark-define-${process.pid}-${Date.now()}.xml`);
  await writeFile(file, xml);
  try {
    await virsh(uri, ['define', file]);
  } finally {
    await rm(file, { force: true });
  }
}
