// `restore files` options that belong to one destination only are refused with the other, before
// any server is asked: `--conflict keep-both --to DIR` restored with the default (conflicts fail),
// `--to-guest --overwrite` with --conflict fail, both silently.
import { describe, expect, it } from 'vitest';
import type { CliContext } from '../context.js';
import { runConsole } from '../program.js';

async function bulwark(...argv: string[]): Promise<{ code: number; err: string }> {
  let err = '';
  const ctx: CliContext = { output: { out: () => undefined, err: (s) => (err += s) }, env: { BULWARK_DATA: '/nonexistent', BULWARK_CONFIG: '/nonexistent' }, tty: false, reconnectLimitMs: 1000, exitCode: 0 };
  return { code: await runConsole(ctx, argv), err };
}

describe('restore files: options of the other destination', () => {
  it('--conflict with --to, and --overwrite with --to-guest, are usage errors naming the right option', async () => {
    const a = await bulwark('restore', 'files', 'web@latest', '--path', '/etc/hostname', '--to', '/tmp/x', '--conflict', 'keep-both');
    expect(a).toMatchObject({ code: 2 });
    expect(a.err).toMatch(/--conflict goes with --to-guest[\s\S]*--overwrite replaces it/);
    const b = await bulwark('restore', 'files', 'web@latest', '--path', '/etc/hostname', '--to-guest', '--overwrite');
    expect(b).toMatchObject({ code: 2 });
    expect(b.err).toMatch(/--overwrite goes with --to DIR[\s\S]*--conflict overwrite/);
    // The defaults alone are no reason to refuse: this one gets as far as looking for the server.
    const c = await bulwark('restore', 'files', 'web@latest', '--path', '/etc/hostname', '--to', '/tmp/x');
    expect(c.err).not.toMatch(/goes with/);
  });
});
