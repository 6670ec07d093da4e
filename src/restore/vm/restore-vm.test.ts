import { describe, expect, it } from 'vitest';
import { globMatches, qmpSocketFor } from './restore-vm.js';

describe('where a new plain-QEMU VM goes', () => {
  it.each([
    ['/run/vms/*/qmp.sock', 'web2', '/run/vms/web2/qmp.sock'],
    ['/run/vms/*.qmp', 'web2', '/run/vms/web2.qmp'],
    ['/run/vms/web1/qmp.sock', 'web2', null],
  ])('glob %s, name %s -> %s', (glob, name, socket) => {
    expect(qmpSocketFor(glob, name)).toBe(socket);
  });
  it('matches a socket against a host glob, * within one path component', () => {
    expect(globMatches('/run/vms/*/qmp.sock', '/run/vms/web1/qmp.sock')).toBe(true);
    expect(globMatches('/run/vms/*/qmp.sock', '/run/vms/a/b/qmp.sock')).toBe(false);
    expect(globMatches('/run/vms/*.qmp', '/run/vms/web.1.qmp')).toBe(true);
    expect(globMatches('/run/vms/web1/qmp.sock', '/run/vms/web1/qmp.sock')).toBe(true);
  });
});
