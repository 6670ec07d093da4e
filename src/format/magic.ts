// Magic numbers of every Bulwark on-disk structure: the first bytes of SHA-256 of a versioned
// name (docs/formats/backup-files.md section 1). NEVER change these values: files in the field
// carry them. A new incompatible layout gets a new versioned name and a new magic.

export const FULL_FILE_MAGIC = Buffer.from('7bcf039bd642ef33', 'hex'); // "bulwark full backup file v1"
export const FORWARD_INCREMENT_MAGIC = Buffer.from('7532a6b8f157bb6c', 'hex'); // "bulwark forward increment file v1"
export const REVERSE_INCREMENT_MAGIC = Buffer.from('068a477612fa5664', 'hex'); // "bulwark reverse increment file v1"
export const INDEX_MAGIC = Buffer.from('bcfea2cb8e98c315', 'hex'); // "bulwark backup index v1"
export const RECORD_MAGIC = Buffer.from('2a4681b7', 'hex'); // "bulwark block record v1" (4 bytes)
export const CHAIN_METADATA_MAGIC = Buffer.from('facba866764f440f', 'hex'); // "bulwark chain metadata v1"

/** The versioned names the magics are derived from (used by the test that recomputes them). */
export const MAGIC_NAMES = {
  full: 'bulwark full backup file v1',
  forward: 'bulwark forward increment file v1',
  reverse: 'bulwark reverse increment file v1',
  index: 'bulwark backup index v1',
  record: 'bulwark block record v1',
  chainMetadata: 'bulwark chain metadata v1',
} as const;
