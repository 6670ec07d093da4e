// UUIDs are strings in the API and JSON, 16 raw bytes in binary structures.
import { check } from './errors.js';

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export const NIL_UUID = '00000000-0000-0000-0000-000000000000';

export function isUuid(s: string): boolean {
  return UUID_RE.test(s);
}

export function uuidToBytes(id: string, structure = 'uuid'): Buffer {
  check(UUID_RE.test(id), structure, `not a UUID: ${JSON.stringify(id)}`);
  return Buffer.from(id.replace(/-/g, ''), 'hex');
}

export function bytesToUuid(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}
