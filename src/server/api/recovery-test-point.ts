// For route and service tests of VM restores: a real SQLite configuration database, a real
// repository and one restore point of a plain-QEMU VM `vm1` (one raw disk `vda`, restorable
// without qemu-img) recorded in the catalog, with a host `kvm1` whose QMP glob covers the VM.
import path from 'node:path';
import { encodePointMetadata, POINT_METADATA_FORMAT } from '../../agent/backup/point-metadata.js';
import { openRepository } from '../../repository/index.js';
import { DiskModel, iterate } from '../../repository/test-helpers.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import { systemClock, type ServiceContext } from '../services/common.js';
import { createHost, createRepository } from '../services/infrastructure.js';
import { recordRestorePoint } from '../services/sessions.js';

const BS = 262144;

export interface QemuVmPointFixture {
  readonly cdb: ConfigDatabase;
  readonly ctx: ServiceContext;
  readonly pointId: string;
  /** The disk's contents: what a restore of `vda` must write. */
  readonly image: Buffer;
}

/** Creates the database, repository, host and point below `dir` (see the file comment). */
export async function seedQemuVmPoint(dir: string, o: { readonly state?: 'ready' | 'corrupt'; /** Appended to the recorded command line (e.g. a NIC). */ readonly extraArgs?: readonly string[] } = {}): Promise<QemuVmPointFixture> {
  const cdb = await openDatabase({ target: path.join(dir, 'bulwark.db') });
  const ctx: ServiceContext = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  const repo = await openRepository(path.join(dir, 'repo'), { create: true });
  const repositoryId = (await createRepository(ctx, { name: 'main', path: repo.root })).id;
  const vmDir = path.join(dir, 'vms', 'vm1');
  await createHost(ctx, { name: 'kvm1', kind: 'qemu', uri: path.join(dir, 'vms', '*', 'qmp.sock') });
  const commandLine = [
    'qemu-system-x86_64', '-name', 'vm1', '-accel', 'tcg', '-m', '256',
    '-blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'vda-fmt', file: { driver: 'file', filename: path.join(vmDir, 'vda.img') } }),
    '-device', 'virtio-blk-pci,drive=vda-fmt,id=vda',
    '-chardev', `socket,id=qmp0,path=${path.join(vmDir, 'qmp.sock')},server=on,wait=off`, '-mon', 'chardev=qmp0,mode=control',
    ...(o.extraArgs ?? []),
  ];
  const m = new DiskModel(3 * BS + 100, BS);
  const vmConfig = encodePointMetadata({
    format: POINT_METADATA_FORMAT,
    hypervisor: 'qemu',
    vm: { name: 'vm1', id: path.join(vmDir, 'qmp.sock') },
    configuration: { kind: 'qemu', commandLine, blockGraph: [] },
    checkpoint: { chainId: 'c1', name: 'c1-0', time: new Date().toISOString(), disks: { vda: m.size } } as never,
    consistency: 'crash',
    freezeWindowMs: null,
    warnings: [],
  });
  const w = await repo.startRestorePoint({ job: 'j', vm: 'vm1', kind: 'full', blockSize: BS, threads: 0, disks: [{ name: 'vda', size: m.size }], vmConfig });
  await w.writeDisk('vda', iterate(m.change([[0, 'data'], [2, 'zero'], [3, 'data']])));
  const p = await w.commit();
  await recordRestorePoint(ctx, {
    id: p.id, vm: 'vm1', disks: [{ name: 'vda', size: m.size }], time: p.time.toISOString(), type: 'full', chainId: p.chainId, size: p.fileBytes, repositoryId, jobId: null,
    ...(o.state ? { state: o.state } : {}),
  });
  return { cdb, ctx, pointId: p.id, image: Buffer.from(m.bytes) };
}
