// The server CA's certificates in real TLS handshakes (node:tls over loopback): server
// authentication, mutual authentication with an enrolled agent's certificate, and refusal of a
// certificate from another CA.
import { mkdtemp, rm } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createAgentKeyAndCsr } from '../../src/agent/identity.js';
import { ensureServerPki, issueAgentCertificate, type ServerPki } from '../../src/server/pki/index.js';

let tmp: string;
let pki: ServerPki;
let otherPki: ServerPki;
let server: tls.Server;
let port: number;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'bulwark-pki-tls-'));
  pki = await ensureServerPki(path.join(tmp, 'server'), { hostnames: ['backup.test'] });
  otherPki = await ensureServerPki(path.join(tmp, 'other'), { hostnames: [] });
  server = tls.createServer(
    { key: pki.serverKeyPem, cert: pki.serverCertPem, ca: [pki.caCertPem], requestCert: true, rejectUnauthorized: false },
    (socket) => {
      const peer = socket.getPeerCertificate();
      socket.end(socket.authorized ? `hello ${String(peer.subject.CN)}` : `anonymous (${String(socket.authorizationError)})`);
    },
  );
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as AddressInfo).port;
});

afterAll(async () => {
  await new Promise<void>((resolve) => server.close(() => resolve()));
  await rm(tmp, { recursive: true, force: true });
});

/** Connects, returns what the server says, or throws the handshake error. */
async function talk(options: tls.ConnectionOptions): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, ...options });
    let text = '';
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => (text += d));
    socket.on('end', () => resolve(text));
    socket.on('error', reject);
  });
}

describe('server PKI over TLS', () => {
  it('authenticates the server to a client that trusts the CA, by each of its names', async () => {
    expect(await talk({ ca: pki.caCertPem, servername: 'backup.test' })).toMatch(/^anonymous/);
    expect(await talk({ ca: pki.caCertPem, servername: 'localhost' })).toMatch(/^anonymous/);
    expect(await talk({ ca: pki.caCertPem })).toMatch(/^anonymous/); // 127.0.0.1 as an IP SAN
  });

  it('is refused by a client that trusts another CA, or checks another name', async () => {
    await expect(talk({ ca: otherPki.caCertPem, servername: 'localhost' })).rejects.toThrow(/self.signed|unable to verify|issuer/i);
    await expect(talk({ ca: pki.caCertPem, servername: 'elsewhere.test' })).rejects.toThrow(/altnames|hostname/i);
  });

  it('mutually authenticates an agent holding a certificate issued for its CSR', async () => {
    const { keyPem, csrPem } = await createAgentKeyAndCsr('ignored-name');
    const issued = await issueAgentCertificate(pki, csrPem, 'agent-1');
    expect(issued.caCertPem).toBe(pki.caCertPem);
    expect(issued.fingerprint).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
    expect(await talk({ ca: pki.caCertPem, servername: 'localhost', key: keyPem, cert: issued.certPem })).toBe('hello agent-1');
  });

  it('does not authorize an agent certificate from another CA', async () => {
    const { keyPem, csrPem } = await createAgentKeyAndCsr('intruder');
    const foreign = await issueAgentCertificate(otherPki, csrPem, 'intruder');
    const reply = await talk({ ca: pki.caCertPem, servername: 'localhost', key: keyPem, cert: foreign.certPem });
    expect(reply).toMatch(/^anonymous \((UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT)\)$/);
  });

  it('refuses the server certificate as a client certificate signed for an agent it is not', async () => {
    // The server's key with an agent cert issued for another key must fail the handshake.
    const { csrPem } = await createAgentKeyAndCsr('x');
    const issued = await issueAgentCertificate(pki, csrPem, 'x');
    await expect(talk({ ca: pki.caCertPem, servername: 'localhost', key: pki.serverKeyPem, cert: issued.certPem })).rejects.toThrow(
      /key values mismatch|KEY_VALUES_MISMATCH/i,
    );
  });
});
