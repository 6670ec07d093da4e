import { X509Certificate, createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createAgentKeyAndCsr } from '../../agent/identity.js';
import { BulwarkError } from '../../common/errors.js';
import { certificateFingerprint, ensureServerPki, issueAgentCertificate, pkiFiles } from './index.js';

let dataDir: string;
beforeEach(async () => {
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'bulwark-pki-'));
});
afterEach(async () => {
  await rm(dataDir, { recursive: true, force: true });
});

describe('ensureServerPki', () => {
  it('creates the CA and server certificate once, with private keys mode 0600, and reuses them', async () => {
    const first = await ensureServerPki(dataDir, { hostnames: ['backup.example.com', '10.1.2.3'] });
    const dir = path.join(dataDir, 'pki');
    for (const f of [pkiFiles.caKey, pkiFiles.serverKey]) expect((await stat(path.join(dir, f))).mode & 0o777).toBe(0o600);
    expect(await readFile(path.join(dir, pkiFiles.caCert), 'utf8')).toBe(first.caCertPem);

    const cert = new X509Certificate(first.serverCertPem);
    expect(cert.checkHost('backup.example.com')).toBe('backup.example.com');
    expect(cert.checkHost('localhost')).toBe('localhost');
    expect(cert.checkIP('10.1.2.3')).toBe('10.1.2.3');
    expect(cert.checkIssued(new X509Certificate(first.caCertPem))).toBe(true);
    expect(new X509Certificate(first.caCertPem).ca).toBe(true);

    const second = await ensureServerPki(dataDir, { hostnames: ['backup.example.com'] });
    expect(second).toEqual(first);
  });

  it('computes the CA fingerprint as SHA-256 of the DER in colon hex', async () => {
    const pki = await ensureServerPki(dataDir, { hostnames: [] });
    const der = new X509Certificate(pki.caCertPem).raw;
    const hex = createHash('sha256').update(der).digest('hex').toUpperCase();
    expect(pki.caFingerprint.replaceAll(':', '')).toBe(hex);
    expect(pki.caFingerprint).toBe(new X509Certificate(pki.caCertPem).fingerprint256);
    expect(certificateFingerprint(pki.caCertPem)).toBe(pki.caFingerprint);
  });

  it('reissues the server certificate for a new hostname, keeping the CA', async () => {
    const first = await ensureServerPki(dataDir, { hostnames: ['a.example'] });
    const second = await ensureServerPki(dataDir, { hostnames: ['a.example', 'b.example'] });
    expect(second.caCertPem).toBe(first.caCertPem);
    expect(second.serverCertPem).not.toBe(first.serverCertPem);
    expect(new X509Certificate(second.serverCertPem).checkHost('b.example')).toBe('b.example');
  });

  it('reissues a server certificate that expires within 30 days', async () => {
    const first = await ensureServerPki(dataDir, { hostnames: [] });
    const later = new Date(Date.now() + 2 * 365 * 24 * 3600 * 1000 - 10 * 24 * 3600 * 1000);
    const second = await ensureServerPki(dataDir, { hostnames: [], now: later });
    expect(second.serverCertPem).not.toBe(first.serverCertPem);
  });

  it('refuses a CA certificate without its key instead of silently replacing it', async () => {
    await ensureServerPki(dataDir, { hostnames: [] });
    await unlink(path.join(dataDir, 'pki', pkiFiles.caKey));
    const err = await ensureServerPki(dataDir, { hostnames: [] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BulwarkError);
    expect((err as BulwarkError).kind).toBe('corrupt');
    expect((err as BulwarkError).message).toContain('ca.key');
  });

  it('names the data directory when it cannot be written', async () => {
    const file = path.join(dataDir, 'not-a-dir');
    await writeFile(file, 'x');
    await expect(ensureServerPki(file, { hostnames: [] })).rejects.toThrow(/not-a-dir/);
  });
});

describe('issueAgentCertificate', () => {
  it('issues a client certificate named after the agent for a CSR or a bare public key', async () => {
    const pki = await ensureServerPki(dataDir, { hostnames: [] });
    const { csrPem } = await createAgentKeyAndCsr('whatever');
    const issued = await issueAgentCertificate(pki, csrPem, 'proxy-01');
    const cert = new X509Certificate(issued.certPem);
    expect(cert.subject).toContain('CN=proxy-01');
    expect(cert.checkIssued(new X509Certificate(pki.caCertPem))).toBe(true);
    expect(cert.keyUsage).toContain('1.3.6.1.5.5.7.3.2');
    expect(issued.fingerprint).toBe(cert.fingerprint256);

    const spki = cert.publicKey.export({ type: 'spki', format: 'pem' }).toString();
    const again = await issueAgentCertificate(pki, spki, 'proxy-02');
    expect(new X509Certificate(again.certPem).subject).toContain('CN=proxy-02');
  });

  it('refuses a tampered CSR, garbage, and a bad agent name', async () => {
    const pki = await ensureServerPki(dataDir, { hostnames: [] });
    const { csrPem } = await createAgentKeyAndCsr('a');
    const lines = csrPem.trim().split('\n');
    const mid = lines[3]!;
    lines[3] = mid.slice(0, 10) + (mid[10] === 'A' ? 'B' : 'A') + mid.slice(11);
    await expect(issueAgentCertificate(pki, lines.join('\n'), 'a')).rejects.toThrow(/certificate request of agent a is not valid/);
    await expect(issueAgentCertificate(pki, 'hello', 'a')).rejects.toThrow(/not valid/);
    await expect(issueAgentCertificate(pki, csrPem, 'bad name')).rejects.toThrow(/agent name/);
  });
});
