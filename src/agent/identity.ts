// The agent's identity: its ECDSA P-256 key and the certificate request it sends when it enrolls.
// Kept apart from the server's PKI module: roles share only the wire protocol, never code paths.
import { createHash, webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto);

const keyAlgorithm: webcrypto.EcKeyGenParams = { name: 'ECDSA', namedCurve: 'P-256' };

/** A fresh key pair and a PKCS#10 request signed by it, both PEM. */
export async function createAgentKeyAndCsr(agentName: string): Promise<{ keyPem: string; csrPem: string }> {
  const keys = await webcrypto.subtle.generateKey(keyAlgorithm, true, ['sign', 'verify']);
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: `CN=${agentName.replace(/[,+"\\<>;=]/g, (c) => `\\${c}`)}`,
    keys,
    signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
  });
  const keyDer = await webcrypto.subtle.exportKey('pkcs8', keys.privateKey);
  return {
    keyPem: x509.PemConverter.encode(keyDer, x509.PemConverter.PrivateKeyTag) + '\n',
    csrPem: csr.toString('pem') + '\n',
  };
}

/** SHA-256 of a certificate's DER, `AB:CD:…` (the same form the server prints). */
export function fingerprintOfDer(der: Uint8Array): string {
  return createHash('sha256').update(der).digest('hex').toUpperCase().match(/../g)!.join(':');
}

/** SHA-256 of a PEM certificate's DER, `AB:CD:…`. */
export function fingerprintOfPem(certPem: string): string {
  return fingerprintOfDer(new Uint8Array(x509.PemConverter.decodeFirst(certPem)));
}
