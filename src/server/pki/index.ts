// The backup server's own certificate authority (ECDSA P-256). It signs the server's TLS
// certificate and the client certificates of enrolled agents, so the server and its agents trust
// each other without any outside PKI. Everything lives in `<data>/pki/`, created once and reused.
import { createHash, webcrypto, X509Certificate as NodeX509Certificate } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import path from 'node:path';
import * as x509 from '@peculiar/x509';
import { BulwarkError } from '../../common/errors.js';
import { logger } from '../../common/log.js';
import { writeFileAtomic as writeAtomically } from '../../storage/local-fs.js';

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;

const crypto = webcrypto;
x509.cryptoProvider.set(crypto);

const log = logger('pki');

const keyAlgorithm: webcrypto.EcKeyGenParams = { name: 'ECDSA', namedCurve: 'P-256' };
const signingAlgorithm: webcrypto.EcdsaParams = { name: 'ECDSA', hash: 'SHA-256' };
const dayMs = 24 * 3600 * 1000;
const caLifetimeDays = 20 * 365;
const serverCertLifetimeDays = 2 * 365;
const agentCertLifetimeDays = 5 * 365;
/** A server certificate this close to expiry is reissued at start-up. */
const renewBeforeDays = 30;
/** Names every server certificate carries so the local console and the local agent can connect. */
const alwaysHostnames = ['localhost', '127.0.0.1', '::1'];

/** File names inside `<data>/pki/`. Keys are PKCS#8 PEM, mode 0600; certificates are PEM. */
export const pkiFiles = {
  caCert: 'ca.crt',
  caKey: 'ca.key',
  serverCert: 'server.crt',
  serverKey: 'server.key',
} as const;

/** The server's PKI as loaded from (or created in) `<data>/pki/`. */
export interface ServerPki {
  /** The directory holding the files of {@link pkiFiles}. */
  dir: string;
  caCertPem: string;
  /** The CA's private key. Needed to issue agent certificates; never leaves the server. */
  caKeyPem: string;
  serverCertPem: string;
  serverKeyPem: string;
  /** SHA-256 of the CA certificate's DER, upper-case hex with colons (`AB:CD:…`). */
  caFingerprint: string;
}

export interface EnsureServerPkiOptions {
  /** DNS names and IP addresses clients use to reach the server; localhost is always included. */
  hostnames: string[];
  /** For tests: the "current" time used for validity periods. */
  now?: Date;
}

/**
 * Loads the server's PKI from `<dataDir>/pki/`, creating the CA on first start. The server
 * certificate is (re)issued when missing, when it lacks one of `opts.hostnames`, or when it
 * expires within 30 days; the CA is never replaced (agents pin it).
 *
 * @example
 * const pki = await ensureServerPki('/var/lib/bulwark', { hostnames: ['backup.example.com'] });
 * https.createServer({ key: pki.serverKeyPem, cert: pki.serverCertPem }, …)
 */
export async function ensureServerPki(dataDir: string, opts: EnsureServerPkiOptions): Promise<ServerPki> {
  const dir = path.join(dataDir, 'pki');
  const now = opts.now ?? new Date();
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
  } catch (cause) {
    throw new BulwarkError(`cannot create the PKI directory ${dir}`, {
      kind: 'unavailable',
      context: { path: dir },
      hint: 'check that the data directory is writable',
      cause,
    });
  }
  const file = (name: string): string => path.join(dir, name);

  let caCertPem = await readOptional(file(pkiFiles.caCert));
  let caKeyPem = await readOptional(file(pkiFiles.caKey));
  if (caCertPem === undefined || caKeyPem === undefined) {
    if (caCertPem !== undefined || caKeyPem !== undefined) {
      throw new BulwarkError(`the server CA in ${dir} is incomplete: one of ${pkiFiles.caCert} and ${pkiFiles.caKey} is missing`, {
        kind: 'corrupt',
        context: { path: dir },
        hint: 'restore the missing file from a backup; deleting both creates a new CA, and every agent must then enroll again',
      });
    }
    const ca = await createCa(now);
    caKeyPem = ca.keyPem;
    caCertPem = ca.certPem;
    // Key first: a crash between the two writes leaves "incomplete", never a CA without its key.
    await writeFileAtomic(file(pkiFiles.caKey), caKeyPem, 0o600);
    await writeFileAtomic(file(pkiFiles.caCert), caCertPem, 0o644);
    log.info({ dir }, 'created the server certificate authority');
  }
  const caCert = parseCertificate(caCertPem, file(pkiFiles.caCert));
  const caKey = await importPrivateKey(caKeyPem, file(pkiFiles.caKey));

  const hostnames = [...new Set([...alwaysHostnames, ...opts.hostnames.map((h) => h.trim()).filter((h) => h !== '')])];
  let serverCertPem = await readOptional(file(pkiFiles.serverCert));
  let serverKeyPem = await readOptional(file(pkiFiles.serverKey));
  const reason = serverCertPem === undefined || serverKeyPem === undefined
    ? 'missing'
    : serverCertProblem(serverCertPem, caCertPem, hostnames, now);
  if (reason !== undefined) {
    const keys = await generateKeyPair();
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerial(),
      subject: `CN=${escapeDn(hostnames.find((h) => !alwaysHostnames.includes(h)) ?? 'localhost')}, O=Bulwark backup server`,
      issuer: caCert.subject,
      notBefore: new Date(now.getTime() - 5 * 60_000),
      notAfter: new Date(now.getTime() + serverCertLifetimeDays * dayMs),
      publicKey: keys.publicKey,
      signingKey: caKey,
      signingAlgorithm,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyAgreement, true),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
        new x509.SubjectAlternativeNameExtension(
          hostnames.map((h) => (isIP(h) ? { type: 'ip' as const, value: h } : { type: 'dns' as const, value: h })),
        ),
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
        await x509.AuthorityKeyIdentifierExtension.create(caCert),
      ],
    });
    serverKeyPem = await exportPrivateKeyPem(keys.privateKey);
    serverCertPem = cert.toString('pem') + '\n';
    await writeFileAtomic(file(pkiFiles.serverKey), serverKeyPem, 0o600);
    await writeFileAtomic(file(pkiFiles.serverCert), serverCertPem, 0o644);
    log.info({ dir, hostnames, reason }, 'issued the server TLS certificate');
  }
  return {
    dir,
    caCertPem,
    caKeyPem,
    serverCertPem: serverCertPem!,
    serverKeyPem: serverKeyPem!,
    caFingerprint: certificateFingerprint(caCertPem),
  };
}

/** What {@link issueAgentCertificate} returns: the agent's certificate and the CA to trust. */
export interface IssuedAgentCertificate {
  certPem: string;
  caCertPem: string;
  /** SHA-256 of the issued certificate's DER (hex with colons); the server records it per agent. */
  fingerprint: string;
  serialNumber: string;
  notAfter: Date;
}

/**
 * Signs a client certificate for an agent (CN = agent name, extended key usage clientAuth and
 * serverAuth, the latter for the agent-to-agent data streams).
 *
 * `request` is either a PKCS#10 certificate request (`-----BEGIN CERTIFICATE REQUEST-----`, its
 * signature is verified: the agent proves it holds the key) or the agent's public key
 * (`-----BEGIN PUBLIC KEY-----`, SPKI). The name in the request is ignored: `agentName` wins.
 */
export async function issueAgentCertificate(
  pki: Pick<ServerPki, 'caCertPem' | 'caKeyPem'>,
  request: string,
  agentName: string,
  opts: { now?: Date } = {},
): Promise<IssuedAgentCertificate> {
  assertAgentName(agentName);
  const now = opts.now ?? new Date();
  let publicKey: CryptoKey;
  try {
    if (request.includes(x509.PemConverter.CertificateRequestTag)) {
      const csr = new x509.Pkcs10CertificateRequest(request);
      if (!(await csr.verify())) throw new Error('the request is not signed by the key it carries');
      publicKey = await crypto.subtle.importKey('spki', csr.publicKey.rawData, keyAlgorithm, true, ['verify']);
    } else if (request.includes(x509.PemConverter.PublicKeyTag)) {
      publicKey = await crypto.subtle.importKey('spki', new x509.PublicKey(request).rawData, keyAlgorithm, true, ['verify']);
    } else {
      throw new Error('expected a PEM certificate request or public key');
    }
  } catch (cause) {
    throw new BulwarkError(`the certificate request of agent ${agentName} is not valid: ${describe(cause)}`, {
      kind: 'invalid',
      context: { agent: agentName, field: 'csr' },
      hint: 'the agent must send an ECDSA P-256 PKCS#10 request in PEM',
      cause,
    });
  }
  const caCert = new x509.X509Certificate(pki.caCertPem);
  const caKey = await importPrivateKey(pki.caKeyPem, 'the CA key');
  const serialNumber = randomSerial();
  const notAfter = new Date(now.getTime() + agentCertLifetimeDays * dayMs);
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber,
    subject: `CN=${escapeDn(agentName)}, O=Bulwark agent`,
    issuer: caCert.subject,
    notBefore: new Date(now.getTime() - 5 * 60_000),
    notAfter,
    publicKey,
    signingKey: caKey,
    signingAlgorithm,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyAgreement, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth, x509.ExtendedKeyUsage.serverAuth]),
      await x509.SubjectKeyIdentifierExtension.create(publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(caCert),
    ],
  });
  const certPem = cert.toString('pem') + '\n';
  return { certPem, caCertPem: pki.caCertPem, fingerprint: certificateFingerprint(certPem), serialNumber, notAfter };
}

/** SHA-256 of a PEM certificate's DER encoding, upper-case hex bytes joined by colons. */
export function certificateFingerprint(certPem: string): string {
  const der = Buffer.from(x509.PemConverter.decodeFirst(certPem));
  return formatFingerprint(createHash('sha256').update(der).digest());
}

/** `AB:CD:…` from raw digest bytes. */
export function formatFingerprint(digest: Uint8Array): string {
  return Buffer.from(digest).toString('hex').toUpperCase().match(/../g)!.join(':');
}

/** Agent names: what `bulwark agent list` shows and the CN of the agent certificate. */
export const agentNamePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export function assertAgentName(name: string): void {
  if (!agentNamePattern.test(name)) {
    throw new BulwarkError(`agent name ${JSON.stringify(name)} is not valid`, {
      kind: 'invalid',
      context: { field: 'name', agent: name },
      hint: '1 to 63 characters: letters, digits, ".", "_" or "-", starting with a letter or digit',
    });
  }
}

async function createCa(now: Date): Promise<{ certPem: string; keyPem: string }> {
  const keys = await generateKeyPair();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: `CN=Bulwark CA ${randomHex(4)}, O=Bulwark backup server`,
    notBefore: new Date(now.getTime() - 5 * 60_000),
    notAfter: new Date(now.getTime() + caLifetimeDays * dayMs),
    keys,
    signingAlgorithm,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign | x509.KeyUsageFlags.digitalSignature, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certPem: cert.toString('pem') + '\n', keyPem: await exportPrivateKeyPem(keys.privateKey) };
}

/** Why the stored server certificate must be reissued, or undefined when it is fine. */
function serverCertProblem(certPem: string, caCertPem: string, hostnames: string[], now: Date): string | undefined {
  let cert: NodeX509Certificate;
  try {
    cert = new NodeX509Certificate(certPem);
  } catch {
    return 'unreadable';
  }
  if (!cert.checkIssued(new NodeX509Certificate(caCertPem))) return 'issued by another CA';
  if (new Date(cert.validTo).getTime() - now.getTime() < renewBeforeDays * dayMs) return 'expires soon';
  for (const h of hostnames) {
    const ok = isIP(h) ? cert.checkIP(h) !== undefined : cert.checkHost(h, { wildcards: false }) !== undefined;
    if (!ok) return `lacks hostname ${h}`;
  }
  return undefined;
}

async function generateKeyPair(): Promise<CryptoKeyPair> {
  return crypto.subtle.generateKey(keyAlgorithm, true, ['sign', 'verify']);
}

async function exportPrivateKeyPem(key: CryptoKey): Promise<string> {
  const der = await crypto.subtle.exportKey('pkcs8', key);
  return x509.PemConverter.encode(der, x509.PemConverter.PrivateKeyTag) + '\n';
}

async function importPrivateKey(pem: string, where: string): Promise<CryptoKey> {
  try {
    return await crypto.subtle.importKey('pkcs8', x509.PemConverter.decodeFirst(pem), keyAlgorithm, false, ['sign']);
  } catch (cause) {
    throw new BulwarkError(`cannot read the private key ${where}`, { kind: 'corrupt', context: { path: where }, cause });
  }
}

function parseCertificate(pem: string, where: string): x509.X509Certificate {
  try {
    return new x509.X509Certificate(pem);
  } catch (cause) {
    throw new BulwarkError(`cannot read the certificate ${where}`, { kind: 'corrupt', context: { path: where }, cause });
  }
}

async function readOptional(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new BulwarkError(`cannot read ${file}`, { kind: 'unavailable', context: { path: file }, cause: err });
  }
}

/** Temp file, fsync, rename, fsync the directory: a crash never leaves half a key. */
async function writeFileAtomic(file: string, data: string, mode: number): Promise<void> {
  try {
    await writeAtomically(file, data, { mode });
  } catch (cause) {
    throw new BulwarkError(`cannot write ${file}`, { kind: 'unavailable', context: { path: file }, cause });
  }
}

function randomHex(bytes: number): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString('hex');
}

/** A positive 128-bit serial (top bit clear so DER needs no sign byte). */
function randomSerial(): string {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[0] = (b[0]! & 0x7f) | 0x01;
  return Buffer.from(b).toString('hex');
}

/** Escapes RFC 4514 special characters in a DN attribute value. */
function escapeDn(value: string): string {
  return value.replace(/[,+"\\<>;=]/g, (c) => `\\${c}`);
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
