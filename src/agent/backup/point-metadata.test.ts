import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { decodePointMetadata, encodePointMetadata, POINT_METADATA_FORMAT, savedNvram, type PointMetadata } from './point-metadata.js';

const vars = Buffer.from('UEFI variables '.repeat(1000));
const meta = (contents: { gzip: string; sha256: string; size: number } | undefined): PointMetadata => ({
  format: POINT_METADATA_FORMAT,
  hypervisor: 'qemu',
  vm: { name: 'web1', id: '/vms/web1/qmp.sock' },
  configuration: {
    kind: 'qemu',
    commandLine: ['qemu-system-x86_64'],
    blockGraph: [],
    firmware: { code: '/usr/share/OVMF/OVMF_CODE.fd', codeFormat: 'raw', nvram: { path: '/vms/web1/vars.fd', format: 'raw', ...(contents ? { contents } : {}) } },
  },
  checkpoint: { chainId: 'c', name: 'bulwark-c-1', sequence: 1, instance: '1@2', disks: {}, createdAt: '2026-11-26T00:00:00Z' },
  consistency: 'crash',
  freezeWindowMs: null,
  warnings: [],
});

describe('the UEFI variable store saved with a point', () => {
  const good = { gzip: gzipSync(vars).toString('base64'), sha256: createHash('sha256').update(vars).digest('hex'), size: vars.length };
  it('round-trips through the stored field and is checked against its SHA-256', () => {
    const back = decodePointMetadata(encodePointMetadata(meta(good)))!;
    expect(savedNvram(back, 'p1')!.equals(vars)).toBe(true);
  });
  it('is absent for a point that saved none', () => {
    expect(savedNvram(meta(undefined), 'p1')).toBeUndefined();
  });
  it('fails, naming the point, VM and file, when the contents do not match', () => {
    const flipped = Buffer.from(vars);
    flipped.writeUInt8(flipped.readUInt8(7) ^ 1, 7);
    expect(() => savedNvram(meta({ ...good, gzip: gzipSync(flipped).toString('base64') }), 'p1')).toThrow(/vars\.fd\) saved with restore point p1 of VM web1 is damaged/);
    expect(() => savedNvram(meta({ ...good, gzip: good.gzip.slice(0, 20) }), 'p1')).toThrow(/damaged/);
    expect(() => savedNvram(meta({ ...good, size: good.size + 1 }), 'p1')).toThrow(/damaged/);
  });
});
