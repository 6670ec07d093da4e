// The server reads a host agent's report of a full VM restore only after checking its shape: a
// well-formed result passes through as it is; anything else is an error naming the agent, the
// point and the first field that is off (not a TypeError later, in the progress of the restore).
import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { remoteRestoreVmResult } from './recovery.js';

const good = {
  point: 'p1',
  vm: 'web-restored',
  toOriginal: false,
  hypervisor: 'qemu',
  disks: [{ name: 'vda', path: '/srv/vms/web-restored/vda.qcow2', format: 'qcow2', size: 1073741824, sha256: 'ab'.repeat(32) }],
  vmDir: '/srv/vms/web-restored',
  startScript: '/srv/vms/web-restored/start-vm.sh',
  poweredOn: false,
  warnings: ['no guest agent channel'],
  durationMs: 4200,
};

describe('remoteRestoreVmResult', () => {
  it('passes a well-formed result through unchanged (with or without the disks\' digests)', () => {
    expect(remoteRestoreVmResult(structuredClone(good), 'kvm-07', 'p1')).toEqual(good);
    const noDigest = { ...good, disks: good.disks.map(({ sha256: _, ...d }) => d) };
    expect(remoteRestoreVmResult(structuredClone(noDigest), 'kvm-07', 'p1')).toEqual(noDigest);
  });

  it.each([
    ['no disks', { ...good, disks: undefined }, '/disks'],
    ['a disk of an unknown format', { ...good, disks: [{ ...good.disks[0], format: 'vmdk' }] }, '/disks/0/format'],
    ['a disk without its size', { ...good, disks: [{ ...good.disks[0], size: undefined }] }, '/disks/0/size'],
    ['an unknown hypervisor', { ...good, hypervisor: 'xen' }, '/hypervisor'],
    ['warnings that are not a list', { ...good, warnings: 'none' }, '/warnings'],
  ])('refuses %s, naming agent, point and field', (_what, raw, field) => {
    let err: unknown;
    try {
      remoteRestoreVmResult(raw, 'kvm-07', 'p1');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(BulwarkError);
    expect((err as BulwarkError).message).toMatch(/^agent kvm-07 reported the restore of point p1 with a result this server cannot read \(/);
    expect((err as BulwarkError).message).toContain(field);
    expect((err as BulwarkError).context).toEqual({ agent: 'kvm-07', point: 'p1' });
  });

  it('refuses a reply that is not an object', () => {
    expect(() => remoteRestoreVmResult(null, 'kvm-07', 'p1')).toThrow(/agent kvm-07 reported the restore of point p1/);
  });
});
