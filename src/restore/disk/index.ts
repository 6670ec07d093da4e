// Restore of a whole disk of a restore point to an image file (raw sparse or qcow2).
export { restoreDisk, placeRestoredImage, assertImageTarget, type RestoreDiskOptions, type RestoreDiskResult, type RestoreDiskFormat } from './restore-disk.js';
