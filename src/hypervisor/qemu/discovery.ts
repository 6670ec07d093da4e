// Finding plain QEMU VMs: QMP sockets matched by a glob, the QEMU process behind a socket (its PID
// from /proc/net/unix + /proc/PID/fd, its command line from /proc/PID/cmdline), and what QMP says
// about the VM's disks and block graph.
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { BulwarkError } from '../../common/errors.js';
import { runTool } from '../../common/process.js';
import { fdHolders } from '../proc.js';
import type { QmpClient } from '../qmp/client.js';
import type { VmDisk, VmFirmware, VmInfo, VmNvram, VmRunState } from '../types.js';

/** Files matching a glob with `*` and `?` inside path segments (no `**`), sorted. */
export async function globFiles(pattern: string): Promise<string[]> {
  const abs = path.resolve(pattern);
  const segments = abs.split('/').filter(Boolean);
  let current = ['/'];
  for (const seg of segments) {
    const next: string[] = [];
    if (!/[*?[]/.test(seg)) {
      for (const dir of current) next.push(path.join(dir, seg));
    } else {
      const re = new RegExp(
        '^' +
          seg
            .split('')
            .map((c) => (c === '*' ? '[^/]*' : c === '?' ? '[^/]' : c.replace(/[.+^${}()|\\\]]/g, '\\$&')))
            .join('') +
          '$',
      );
      for (const dir of current) {
        let names: string[];
        try {
          names = await readdir(dir);
        } catch {
          continue;
        }
        for (const n of names) if (re.test(n) && !n.startsWith('.')) next.push(path.join(dir, n));
      }
    }
    current = next;
  }
  const out: string[] = [];
  for (const p of current) {
    try {
      await stat(p);
      out.push(p);
    } catch {
      // vanished or never existed
    }
  }
  return out.sort();
}

/** PID of the process listening on a unix socket path, from /proc/net/unix and /proc/PID/fd (QEMU processes scanned first). */
export async function socketOwnerPid(socketPath: string): Promise<number | undefined> {
  const table = await readFile('/proc/net/unix', 'utf8');
  const inodes = new Set<string>();
  for (const line of table.split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode Path; St 01 = listening (unconnected server)
    if (cols.length >= 8 && cols.slice(7).join(' ') === socketPath && cols[5] === '01') inodes.add(`socket:[${cols[6]}]`);
  }
  const [owner] = await fdHolders(inodes, { first: true, prefer: (comm) => comm.startsWith('qemu') });
  return owner?.pid;
}

/**
 * The pid of the QEMU behind a QMP connection, asked of QEMU itself: a vCPU's thread id
 * (query-cpus-fast) belongs to the QEMU process (`Tgid` of /proc/TID/status). For a QMP socket
 * file renamed after QEMU bound it (a migrated instant recovery VM, docs/instant-recovery.md),
 * /proc/net/unix still shows the name it was bound under, so socketOwnerPid does not find it.
 */
export async function qmpProcessPid(qmp: QmpClient): Promise<number | undefined> {
  const cpus = await qmp.execute<Array<{ 'thread-id'?: number }>>('query-cpus-fast').catch(() => []);
  for (const c of cpus) {
    if (typeof c['thread-id'] !== 'number') continue;
    const status = await readFile(`/proc/${c['thread-id']}/status`, 'utf8').catch(() => '');
    const tgid = Number(status.match(/^Tgid:\s+(\d+)$/m)?.[1]);
    if (tgid > 0) return tgid;
  }
  return undefined;
}

/** The process's command line (argv) and an identity that changes when the process is restarted. */
export async function processInfo(pid: number): Promise<{ commandLine: string[]; instance: string }> {
  const raw = await readFile(`/proc/${pid}/cmdline`);
  const commandLine = raw.toString('utf8').split('\0');
  if (commandLine[commandLine.length - 1] === '') commandLine.pop();
  const statText = await readFile(`/proc/${pid}/stat`, 'utf8');
  // Field 22 (starttime) counts from after the ")" that ends the command name.
  const fields = statText.slice(statText.lastIndexOf(')') + 2).split(' ');
  return { commandLine, instance: `${pid}@${fields[19] ?? '0'}` };
}

/** One entry of QMP `query-block`. */
export interface QueryBlockEntry {
  device: string;
  qdev?: string;
  inserted?: {
    'node-name'?: string;
    file: string;
    drv: string;
    ro?: boolean;
    image: { filename: string; format: string; 'virtual-size': number };
  };
}

/** A disk and the block node a backup works on. */
export interface QemuDisk extends VmDisk {
  readonly nodeName: string;
}

/**
 * Which system flash device a query-block entry is, or undefined for a disk: `-drive if=pflash`
 * devices are named `pflash0`/`pflash1`; `-machine pflash0=NODE` (libvirt's style) has no device
 * name, but both sit at the qdev path `/machine/system.flash0|1`.
 */
export function flashUnit(b: Pick<QueryBlockEntry, 'device' | 'qdev'>): number | undefined {
  const m = b.qdev?.match(/^\/machine\/system\.flash(\d+)$/) ?? b.device.match(/^pflash(\d+)$/);
  return m ? Number(m[1]) : undefined;
}

/**
 * The VM's disks and its UEFI firmware from a query-block answer. Flash devices are never disks:
 * unit 0 is the firmware code (the host's file, recorded by path), unit 1 the VM's variable store
 * (saved with the configuration, not as a disk). Disks are named by device id, else backend name,
 * else node name.
 */
export function disksFromQueryBlock(blocks: readonly QueryBlockEntry[]): { disks: QemuDisk[]; firmware: VmFirmware | undefined; warnings: string[] } {
  const disks: QemuDisk[] = [];
  const flash = new Map<number, NonNullable<QueryBlockEntry['inserted']>>();
  const warnings: string[] = [];
  for (const b of blocks) {
    const ins = b.inserted;
    if (!ins || !ins['node-name']) continue;
    const unit = flashUnit(b);
    if (unit !== undefined) {
      flash.set(unit, ins);
      continue;
    }
    const qdevId = b.qdev?.match(/^\/machine\/peripheral\/([^/]+)/)?.[1];
    const name = qdevId ?? (b.device || ins['node-name']);
    disks.push({
      name,
      targetDev: qdevId ?? b.qdev ?? b.device,
      imagePath: ins.image.filename,
      format: ins.image.format,
      virtualSize: ins.image['virtual-size'],
      nodeName: ins['node-name'],
      persistentBitmaps: ins.image.format === 'qcow2',
    });
  }
  const code = flash.get(0);
  if (!code) {
    if (flash.size > 0) warnings.push(`flash device(s) ${[...flash.keys()].map((u) => `pflash${u}`).join(', ')} without firmware code in pflash0: not saved`);
    return { disks, firmware: undefined, warnings };
  }
  if (code.ro === false && !flash.has(1)) {
    warnings.push(`firmware ${code.image.filename} is one writable flash (code and variables together): its variables are not saved; only its path is recorded`);
  }
  const vars = flash.get(1);
  const nvram: VmNvram | undefined = vars ? { path: vars.image.filename, format: vars.image.format } : undefined;
  return { disks, firmware: { code: code.image.filename, codeFormat: code.image.format, ...(nvram ? { nvram } : {}) }, warnings };
}

/** The VM's disks from query-block (flash devices are firmware, not disks: see disksFromQueryBlock). */
export async function queryDisks(qmp: QmpClient): Promise<QemuDisk[]> {
  return disksFromQueryBlock(await qmp.execute<QueryBlockEntry[]>('query-block')).disks;
}

/** Largest UEFI variable store saved with a point (OVMF's are 128 KiB or 528 KiB). */
export const MAX_NVRAM_BYTES = 4 * 1024 * 1024;
/**
 * Largest compressed store: the configuration crosses the data-mover protocol in one control
 * frame (at most 1 MiB, base64 of the JSON that holds this base64), with room for the rest.
 */
export const MAX_NVRAM_GZIP_BYTES = 256 * 1024;

/**
 * Reads a VM's variable store as raw bytes (a qcow2 store through `qemu-img convert -U`, which
 * reads while QEMU holds the file), for the configuration a backup saves. Fails, naming the VM
 * and the file, when it is missing or larger than MAX_NVRAM_BYTES.
 */
export async function readNvram(nvram: VmNvram, vm: string): Promise<VmNvram> {
  const context = { vm, file: nvram.path };
  const tooBig = (size: number): BulwarkError =>
    new BulwarkError(`the UEFI variable store ${nvram.path} of VM ${vm} is ${size} bytes, more than the ${MAX_NVRAM_BYTES} bytes a backup saves with the VM configuration`, {
      kind: 'invalid',
      context,
      hint: 'a UEFI variable store is normally 128-528 KiB: check that this flash device really is the VM\'s NVRAM',
    });
  let data: Buffer;
  try {
    if (nvram.format === 'raw') {
      const st = await stat(nvram.path);
      if (st.size > MAX_NVRAM_BYTES) throw tooBig(st.size);
      data = await readFile(nvram.path);
    } else {
      const info = JSON.parse(await runTool('qemu-img', ['info', '--output=json', '-U', '-f', nvram.format, nvram.path], `qemu-img info of the UEFI variable store of VM ${vm}`, { context })) as { 'virtual-size': number };
      if (info['virtual-size'] > MAX_NVRAM_BYTES) throw tooBig(info['virtual-size']);
      const dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-nvram-'));
      try {
        const raw = path.join(dir, 'nvram.raw');
        await runTool('qemu-img', ['convert', '-U', '-f', nvram.format, '-O', 'raw', nvram.path, raw], `qemu-img convert of the UEFI variable store of VM ${vm}`, { context });
        data = await readFile(raw);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    }
  } catch (err) {
    if (err instanceof BulwarkError) throw err;
    throw new BulwarkError(`cannot read the UEFI variable store ${nvram.path} of VM ${vm}: ${(err as Error).message}`, {
      kind: (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'not-found' : 'unavailable',
      context,
      hint: 'the backup saves the VM\'s NVRAM with its configuration; the agent must be able to read the file',
      cause: err,
    });
  }
  const gz = gzipSync(data, { level: 9 });
  if (gz.length > MAX_NVRAM_GZIP_BYTES) {
    throw new BulwarkError(`the UEFI variable store ${nvram.path} of VM ${vm} compresses to ${gz.length} bytes, more than the ${MAX_NVRAM_GZIP_BYTES} bytes a backup saves with the VM configuration`, {
      kind: 'invalid',
      context,
      hint: 'a UEFI variable store is mostly erased flash and compresses to a few KiB: check that this flash device really is the VM\'s NVRAM',
    });
  }
  return { path: nvram.path, format: nvram.format, contents: { gzip: gz.toString('base64'), sha256: createHash('sha256').update(data).digest('hex'), size: data.length } };
}

/**
 * The VM as a backup stores it: when it has a UEFI variable store, the store's contents read now
 * (the point in time of the backup) go into its configuration. Other VMs are returned unchanged.
 */
export async function withSavedNvram(vm: VmInfo): Promise<VmInfo> {
  const fw = vm.configuration.firmware;
  if (!fw?.nvram) return vm;
  const firmware: VmFirmware = { ...fw, nvram: await readNvram(fw.nvram, vm.name) };
  return { ...vm, configuration: { ...vm.configuration, firmware } };
}

/** What QEMU reports about one dirty bitmap. */
export interface BitmapInfo {
  readonly name: string;
  readonly recording: boolean;
  readonly persistent: boolean;
  readonly inconsistent: boolean;
  readonly busy: boolean;
  readonly count: number;
}

/** Dirty bitmaps of each block node, by node name (query-named-block-nodes). */
export async function queryBitmaps(qmp: QmpClient): Promise<Map<string, BitmapInfo[]>> {
  const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<Partial<BitmapInfo> & { name: string }> }>>(
    'query-named-block-nodes',
    { flat: true },
  );
  const out = new Map<string, BitmapInfo[]>();
  for (const n of nodes) {
    out.set(
      n['node-name'],
      (n['dirty-bitmaps'] ?? []).map((b) => ({
        name: b.name,
        recording: b.recording ?? false,
        persistent: b.persistent ?? false,
        inconsistent: b.inconsistent ?? false,
        busy: b.busy ?? false,
        count: b.count ?? 0,
      })),
    );
  }
  return out;
}

/** QEMU's own run state (query-status): `running`, or why not (`paused`, `prelaunch`, `suspended`, `io-error`, …). */
export async function queryStatus(qmp: QmpClient): Promise<{ readonly running: boolean; readonly status: string }> {
  const s = await qmp.execute<{ status: string; running: boolean }>('query-status');
  return { running: s.running, status: s.status };
}

/** The VM's run state from query-status. */
export async function queryRunState(qmp: QmpClient): Promise<VmRunState> {
  const s = await queryStatus(qmp);
  if (s.running) return 'running';
  if (s.status === 'paused' || s.status === 'suspended' || s.status === 'prelaunch') return 'paused';
  if (s.status === 'shutdown') return 'shut-off';
  return 'other';
}

/**
 * The unix socket of the guest agent: the chardev behind the virtserialport named
 * org.qemu.guest_agent.0, when QEMU listens on it (server=on).
 */
export async function findAgentSocket(qmp: QmpClient): Promise<string | undefined> {
  const chardevs = await qmp.execute<Array<{ label: string; filename: string }>>('query-chardev');
  for (const base of ['/machine/peripheral', '/machine/peripheral-anon']) {
    let children: Array<{ name: string; type: string }>;
    try {
      children = await qmp.execute('qom-list', { path: base });
    } catch {
      continue;
    }
    for (const c of children) {
      if (c.type !== 'child<virtserialport>') continue;
      const dev = `${base}/${c.name}`;
      const portName = await qmp.execute<string>('qom-get', { path: dev, property: 'name' }).catch(() => '');
      if (portName !== 'org.qemu.guest_agent.0') continue;
      const chardev = await qmp.execute<string>('qom-get', { path: dev, property: 'chardev' }).catch(() => '');
      const cd = chardevs.find((x) => x.label === chardev);
      // e.g. "disconnected:unix:/run/vm1/qga.sock,server=on" (disconnected: no client right now)
      const m = cd?.filename.match(/^(?:disconnected:)?unix:([^,]+)/);
      if (m) return m[1];
    }
  }
  return undefined;
}
