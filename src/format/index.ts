// Byte-level structures of Bulwark's repository files (docs/formats/backup-files.md).
// Pure: no I/O, imports nothing of ours.
export * from './errors.js';
export * from './magic.js';
export * from './uuid.js';
export * from './header.js';
export * from './commit-slot.js';
export * from './record.js';
export * from './block-table.js';
export * from './backup-index.js';
export * from './chain-metadata.js';
