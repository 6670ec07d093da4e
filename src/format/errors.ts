// The one error the format layer throws: bytes that do not decode. It names the structure and
// field so the repository layer can wrap it with the file, disk and restore point it came from.

/** Bytes that do not form a valid structure of the given kind. */
export class FormatError extends Error {
  /** The structure being decoded, e.g. "header page", "block-table entry". */
  readonly structure: string;

  constructor(structure: string, message: string) {
    super(`${structure}: ${message}`);
    this.name = 'FormatError';
    this.structure = structure;
  }
}

/** Throws a FormatError unless `cond` holds. */
export function check(cond: boolean, structure: string, message: string): asserts cond {
  if (!cond) throw new FormatError(structure, message);
}

/** Reads a u64 as a JS number, refusing values past 2^53 (no file or disk is that large). */
export function readU64(buf: Buffer, offset: number, structure: string, field: string): number {
  const v = buf.readBigUInt64LE(offset);
  check(v <= BigInt(Number.MAX_SAFE_INTEGER), structure, `${field} ${v} is too large`);
  return Number(v);
}

export function writeU64(buf: Buffer, offset: number, value: number): void {
  buf.writeBigUInt64LE(BigInt(value), offset);
}
