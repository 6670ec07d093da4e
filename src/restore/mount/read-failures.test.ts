// damagedRead: an EIO from a mounted restore point, said as what it is (pure).
import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../../common/errors.js';
import { damagedRead } from './mount.js';

const eio = (path: string): NodeJS.ErrnoException => Object.assign(new Error(`EIO: i/o error, open '${path}'`), { code: 'EIO', path });

describe('damagedRead', () => {
  const at = '/run/m/1';
  it('damaged blocks: kind corrupt, the path as the mount shows it, every failed block named', () => {
    const e = damagedRead(new BulwarkError(`cannot copy ${at}/vda/whole-ext4/a.bin`, { context: { path: `${at}/vda/whole-ext4/a.bin` }, cause: eio(`${at}/vda/whole-ext4/a.bin`) }), {
      at,
      readFailures: [{ message: 'vda: damaged block in x.vbk: disk vda, block 17 (disk offset 4456448)', damaged: true }],
    });
    expect(e?.kind).toBe('corrupt');
    expect(e?.message).toBe('reading vda/whole-ext4/a.bin from the restore point failed: the backup holds damaged data there: vda: damaged block in x.vbk: disk vda, block 17 (disk offset 4456448)');
    expect(e?.hint).toMatch(/another restore point/);
  });
  it('a source that could not be read is not called damage', () => {
    const e = damagedRead(eio(`${at}/vda/x`), { at, readFailures: [{ message: 'vda: agent repo1 is offline', damaged: false }] }, '/srv/x');
    expect(e?.kind).toBe('internal');
    expect(e?.message).toBe('reading /srv/x from the restore point failed: the restore point could not be read: vda: agent repo1 is offline');
    expect(e?.hint).toMatch(/reached/);
  });
  it('nothing recorded: says so; other errors are not its business', () => {
    expect(damagedRead(eio('/elsewhere/y'), { at, readFailures: [] })?.message).toBe('reading /elsewhere/y from the restore point failed: an input/output error (no failed read of the restore point was recorded: see the server log)');
    expect(damagedRead(Object.assign(new Error('nope'), { code: 'ENOENT' }), { at, readFailures: [] })).toBeUndefined();
  });
});
