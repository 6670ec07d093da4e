// The test guest build (scripts/build-test-guest.sh), without booting it: cached by the hash of
// its recipe, and its outputs are what the fixtures rely on (ELF kernel, initramfs with the
// modules, ext4 root labelled guestroot holding the agent, init scripts and checksummed test data).
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { debugfsCat, e2fsckClean, ensureTestGuest, type TestGuestImage } from '../fixtures/guest.js';

const run = promisify(execFile);
let image: TestGuestImage;
let work: string;
let raw: string;

beforeAll(async () => {
  image = await ensureTestGuest();
  work = await mkdtemp(path.join(os.tmpdir(), 'bulwark-guest-build-'));
  raw = path.join(work, 'root.raw');
  await run('qemu-img', ['convert', '-q', '-f', 'qcow2', '-O', 'raw', image.rootImage, raw]);
});

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

describe('test guest build', () => {
  it('is cached by the hash of its recipe and reused', async () => {
    const { stdout: hash } = await run('bash', ['scripts/build-test-guest.sh', '--print-hash']);
    expect(path.basename(image.dir)).toBe(`guest-${hash.trim()}`);
    expect(image.manifest.recipeHash).toBe(hash.trim());
    const { stdout } = await run('bash', ['scripts/build-test-guest.sh']);
    expect(stdout.trim()).toBe(image.dir);
  });

  it('has an ELF kernel and an initramfs with the virtio and ext4 modules in load order', async () => {
    expect((await readFile(image.vmlinux)).subarray(0, 4).toString('hex')).toBe('7f454c46');
    const { stdout } = await run('sh', ['-c', `gzip -dc ${image.initrd} | cpio -i --to-stdout modules.load 2>/dev/null`]);
    const order = stdout.trim().split('\n');
    for (const m of ['virtio_pci.ko', 'virtio_blk.ko', 'virtio_console.ko', 'virtio-rng.ko', 'crc32c_generic.ko', 'ext4.ko']) expect(order).toContain(m);
    expect(order.indexOf('virtio.ko')).toBeLessThan(order.indexOf('virtio_blk.ko'));
    expect(order.indexOf('jbd2.ko')).toBeLessThan(order.indexOf('ext4.ko'));
  });

  it('has a clean ext4 root labelled guestroot with the agent, init scripts and checksummed test data', async () => {
    await e2fsckClean(raw);
    const { stdout: label } = await run('e2label', [raw]);
    expect(label.trim()).toBe('guestroot');
    expect((await debugfsCat(raw, '/sbin/init')).toString()).toContain('org.qemu.guest_agent.0');
    expect((await debugfsCat(raw, '/sbin/shutdown')).toString()).toContain('poweroff -f');
    expect((await debugfsCat(raw, '/usr/sbin/qemu-ga')).subarray(0, 4).toString('hex')).toBe('7f454c46');
    const sums = (await debugfsCat(raw, '/srv/testdata/SHA256SUMS')).toString();
    const files = Object.entries(image.manifest.testdata);
    expect(files.length).toBeGreaterThanOrEqual(6);
    expect(files.map(([f]) => f)).toContain('dir with spaces/file with spaces.txt');
    for (const [file, sum] of files) {
      expect(sums).toContain(`${sum}  ${file}`);
      expect(createHash('sha256').update(await debugfsCat(raw, `/srv/testdata/${file}`)).digest('hex'), file).toBe(sum);
    }
    const { stdout: link } = await run('debugfs', ['-R', 'stat /srv/testdata/link-to-alpha', raw]);
    expect(link).toMatch(/Type: symlink/);
    expect(link).toMatch(/Fast link dest: "alpha.txt"/);
  });
});
