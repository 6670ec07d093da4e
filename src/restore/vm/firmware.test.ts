import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nvramFileName, requireFirmwareCode, writeNvram } from './firmware.js';

const run = promisify(execFile);
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-fw-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('restore of a UEFI VM: firmware and variable store', () => {
  it('refuses, naming the VM, point and firmware file and what to install, when this host lacks the firmware', async () => {
    const fw = { firmware: { code: path.join(dir, 'OVMF_CODE_4M.fd'), codeFormat: 'raw' }, nvram: undefined };
    const err = await requireFirmwareCode(fw, 'web1', 'p-1', 'host kvm2').then(() => null, (e: unknown) => e as { message: string; hint: string; kind: string });
    expect(err?.message).toBe(`VM web1 (restore point p-1) boots the UEFI firmware ${fw.firmware.code}, which host kvm2 does not have`);
    expect(err?.hint).toMatch(/apt-get install ovmf/);
    expect(err?.kind).toBe('conflict');
    await writeFile(fw.firmware.code, 'code');
    await expect(requireFirmwareCode(fw, 'web1', 'p-1', 'host kvm2')).resolves.toBeUndefined();
  });
  it('writes the store raw or as qcow2 (byte-exact contents), refuses to replace one unless asked, leaves no temp file', async () => {
    const data = Buffer.alloc(131072, 0x5a);
    data.write('NVRAM', 4096);
    const raw = path.join(dir, nvramFileName('copy', 'raw'));
    expect(path.basename(raw)).toBe('copy_VARS.fd');
    await writeNvram(data, raw, 'raw', false, { vm: 'copy', point: 'p-1' });
    expect((await readFile(raw)).equals(data)).toBe(true);
    await expect(writeNvram(data, raw, 'raw', false, { vm: 'copy', point: 'p-1' })).rejects.toThrow(/copy_VARS.fd of VM copy already exists/);
    await writeNvram(Buffer.alloc(131072, 1), raw, 'raw', true, { vm: 'copy', point: 'p-1' });
    expect((await readFile(raw)).equals(Buffer.alloc(131072, 1))).toBe(true);
    const q = path.join(dir, nvramFileName('copy', 'qcow2'));
    await writeNvram(data, q, 'qcow2', false, { vm: 'copy', point: 'p-1' });
    // Private like the raw one (qemu-img alone writes 0644).
    expect([(await stat(raw)).mode & 0o777, (await stat(q)).mode & 0o777]).toEqual([0o600, 0o600]);
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', q, `${q}.check`]);
    expect((await readFile(`${q}.check`)).equals(data)).toBe(true);
    expect((await readdir(dir)).filter((f) => f.includes('bulwark'))).toEqual([]);
  });
});
