// Helper process for mount.test.ts: mounts a whole-disk image, prints MOUNTED, and waits to be
// killed, so the test can check the exit hook (SIGTERM) and the stale-mount sweeper (SIGKILL).
import { openFileDisk } from '../../src/disk/file-disk.js';
import { mountDisks } from '../../src/restore/mount/mount.js';

const [image, at, runDir] = process.argv.slice(2) as [string, string, string];
const disk = await openFileDisk(image);
await mountDisks([{ name: 'vda', disk }], { at, runDir });
process.stdout.write('MOUNTED\n');
setInterval(() => undefined, 1 << 30);
