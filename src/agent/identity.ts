// The agent's identity: its ECDSA P-256 key and the certificate request it sends when it enrolls.
// Kept apart from the server's PKI module: roles share only the wire protocol, never code paths.
import { createHash, webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto);

const keyAlgorithm: webcrypto.EcKeyGenParams = { name: 'ECDSA', namedCurve: 'P-256' };

/** A fresh key pair and a PKCS#10 request signed by it, both PEM. */
export async function createAgentKeyAndCsr(agentName: string): Promise<{ keyPem: string; csrPem: string }> {
  const keyPem = await createAgentKey();
  return { keyPem, csrPem: await createCsr(keyPem, agentName) };
}

/** A fresh ECDSA P-256 private key, PKCS#8 PEM. */
export async function createAgentKey(): Promise<string> {
  const keys = await webcrypto.subtle.generateKey(keyAlgorithm, true, ['sign', 'verify']);
  const keyDer = await webcrypto.subtle.exportKey('pkcs8', keys.privateKey);
  return x509.PemConverter.encode(keyDer, x509.PemConverter.PrivateKeyTag) + '\n';
}

/** A PKCS#10 request for `agentName`, signed by the PKCS#8 PEM key. */
export async function createCsr(keyPem: string, agentName: string): Promise<string> {
  const der = x509.PemConverter.decodeFirst(keyPem);
  const privateKey = await webcrypto.subtle.importKey('pkcs8', der, keyAlgorithm, true, ['sign']);
  // WebCrypto cannot derive a public key from a private one; the JWK form carries both points.
  const { d: _d, key_ops: _ops, ...publicJwk } = await webcrypto.subtle.exportKey('jwk', privateKey);
  const publicKey = await webcrypto.subtle.importKey('jwk', publicJwk, keyAlgorithm, true, ['verify']);
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: `CN=${agentName.replace(/[,+"\\<>;=]/g, (c) => `\\${c}`)}`,
    keys: { privateKey, publicKey },
    signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
  });
  return csr.toString('pem') + '\n';
}

/** SHA-256 of a certificate's DER, `AB:CD:…` (the same form the server prints). */
export function fingerprintOfDer(der: Uint8Array): string {
  return createHash('sha256').update(der).digest('hex').toUpperCase().match(/../g)!.join(':');
}

/** SHA-256 of a PEM certificate's DER, `AB:CD:…`. */
export function fingerprintOfPem(certPem: string): string {
  return fingerprintOfDer(new Uint8Array(x509.PemConverter.decodeFirst(certPem)));
}
