// The repository folder tree (docs/formats/backup-files.md section 2): one folder per job, one
// per VM inside it, backup files named by point time and id, one .vbm per VM folder.
import path from 'node:path';

/** Escapes a job or VM name into one safe path component (bytes outside [A-Za-z0-9._-] → %XX). */
export function escapeName(name: string): string {
  if (name.length === 0) throw new Error('empty name');
  let out = '';
  for (const byte of Buffer.from(name, 'utf8')) {
    const c = String.fromCharCode(byte);
    const safe = /[A-Za-z0-9._-]/.test(c) && !(out.length === 0 && c === '.');
    out += safe ? c : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

export function unescapeName(s: string): string {
  return decodeURIComponent(s);
}

export function vmFolder(root: string, job: string, vm: string): string {
  return path.join(root, escapeName(job), escapeName(vm));
}

export function chainMetadataName(vm: string): string {
  return `${escapeName(vm)}.vbm`;
}

export type BackupFileExtension = 'vbk' | 'vib' | 'vrb';
export const BACKUP_FILE_RE = /\.(vbk|vib|vrb)$/;

/** `20261125T145500Z-1a2b3c4d.vbk`: sortable by time, unique by point id. */
export function backupFileName(time: Date, pointId: string, ext: BackupFileExtension): string {
  const stamp = time.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  return `${stamp}-${pointId.slice(0, 8)}.${ext}`;
}
