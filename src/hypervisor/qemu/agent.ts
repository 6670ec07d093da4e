// The guest agent as a FileSystemFreezer for the qemu adapter: one connection opened (and
// synchronized) before the freeze, so the freeze window holds only the freeze, the snapshot and
// the thaw.
import { QgaClient } from '../qga/client.js';
import type { FileSystemFreezer } from './freeze.js';

export async function openAgentFreezer(socketPath: string, timeoutMs: number, label?: string): Promise<FileSystemFreezer> {
  const qga = await QgaClient.connect({ socketPath, timeoutMs, ...(label ? { label } : {}) });
  return {
    freeze: (ms) => qga.fsfreezeFreeze({ timeoutMs: ms }),
    thaw: (ms) => qga.fsfreezeThaw({ timeoutMs: ms }),
    close: () => qga.close(),
  };
}
