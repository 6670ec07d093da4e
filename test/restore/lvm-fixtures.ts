// Guest disks with LVM2 made by LVM's own tools on a kernel without device-mapper (recipe in
// docs/formats/lvm2-reading.md §8): pvcreate/vgcreate/lvcreate on loop devices over the
// partitions (`--driverloaded n`, `-an -Zn`: metadata only), then each file system is made in a
// file of its own and copied to the extents that `lvs --segments` reports (LVM's word on the
// layout, not our reader's). Loop devices are always detached.
import { execFile } from 'node:child_process';
import { mkdir, open, rm, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
export const MiB = 1024 * 1024;

async function sfdisk(path: string, script: string): Promise<void> {
  const child = execFile('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', path]);
  let err = '';
  child.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  child.stdin!.end(script);
  await new Promise<void>((resolve, reject) => child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`sfdisk exited ${code}: ${err}`)))));
}

interface SegmentReport {
  lv_name: string;
  seg_start_pe: string;
  seg_size_pe: string;
  stripes: string;
  stripe_size: string;
  seg_pe_ranges: string;
}

/** Runs an LVM command confined to our loop devices and a private config dir. */
function lvmRunner(work: string): (args: string[]) => Promise<string> {
  const env = { ...process.env, LVM_SYSTEM_DIR: join(work, 'lvm-etc'), LVM_SUPPRESS_FD_WARNINGS: '1' };
  return async (args) => {
    const [cmd, ...rest] = args;
    const { stdout } = await run(cmd!, ['--driverloaded', 'n', ...rest], { env });
    return stdout;
  };
}

export interface LvmDisks {
  /** MBR disk: p1 (type 8e) is PV 1 of VG `vgt`. */
  readonly mbr: string;
  /** GPT disk: p1 (Linux LVM) is PV 2 of VG `vgt`. */
  readonly gpt: string;
  readonly extentSize: number;
}

/**
 * Builds two disks whose VG `vgt` spans them:
 * - `root` (ext4, 40 MiB): 6 extents on the MBR PV, then 4 more after a 2-extent hole (two segments),
 *   holding `rootTree`;
 * - `data` (xfs, 48 MiB, one run): holding `dataTree`;
 * - `striped` (ext4, 16 MiB): striped over both PVs (64 KiB chunks), holding `dataTree`.
 */
export async function makeLvmDisks(work: string, rootTree: string, dataTree: string): Promise<LvmDisks> {
  const mbr = join(work, 'lvm-mbr.raw');
  const gpt = join(work, 'lvm-gpt.raw');
  for (const [p, size] of [[mbr, 120 * MiB], [gpt, 40 * MiB]] as const) {
    await writeFile(p, '');
    await truncate(p, size);
  }
  await sfdisk(mbr, 'label: dos\nstart=2048,type=8e\n');
  await sfdisk(gpt, 'label: gpt\nstart=2048,size=36MiB,type=E6D6D379-F507-44C2-A23C-238F2A3DF928,name="lvm pv"\n');
  const partitions = { [mbr]: { offset: MiB, size: 119 * MiB }, [gpt]: { offset: MiB, size: 36 * MiB } };
  const loops: string[] = [];
  try {
    for (const image of [mbr, gpt]) {
      const { offset, size } = partitions[image]!;
      loops.push((await run('losetup', ['--find', '--show', '--offset', String(offset), '--sizelimit', String(size), image])).stdout.trim());
    }
    const [la, lb] = loops as [string, string];
    await mkdir(join(work, 'lvm-etc'), { recursive: true });
    await writeFile(
      join(work, 'lvm-etc', 'lvm.conf'),
      `devices { use_devicesfile = 0 obtain_device_list_from_udev = 0 filter = [ "a|^${la}$|", "a|^${lb}$|", "r|.*|" ] }\n` +
        'activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n' +
        `global { use_lvmlockd = 0 locking_dir = "${join(work, 'lvm-lock')}" }\n` +
        'backup { backup = 0 archive = 0 }\n',
    );
    const lvm = lvmRunner(work);
    await lvm(['pvcreate', '--yes', la, lb]);
    await lvm(['vgcreate', 'vgt', la, lb]);
    const create = ['-an', '-Zn', '--yes'];
    await lvm(['lvcreate', ...create, '-n', 'root', '-L', '24M', 'vgt', la]);
    await lvm(['lvcreate', ...create, '-n', 'hole', '-L', '8M', 'vgt', la]);
    await lvm(['lvextend', '-L', '+16M', 'vgt/root', la]);
    await lvm(['lvcreate', ...create, '-n', 'data', '-L', '48M', 'vgt', la]);
    await lvm(['lvremove', '--yes', 'vgt/hole']);
    await lvm(['lvcreate', ...create, '-n', 'striped', '-i', '2', '-I', '64k', '-L', '16M', 'vgt', la, lb]);
    const report = JSON.parse(await lvm(['lvs', '--reportformat', 'json', '--segments', '-o', 'lv_name,seg_start_pe,seg_size_pe,stripes,stripe_size,seg_pe_ranges', '--units', 'b', '--nosuffix', 'vgt'])) as {
      report: Array<{ seg: SegmentReport[] }>;
    };
    const extentSize = Number((await lvm(['vgs', '--noheadings', '-o', 'vg_extent_size', '--units', 'b', '--nosuffix', 'vgt'])).trim());
    const peStart = Number((await lvm(['pvs', '--noheadings', '-o', 'pe_start', '--units', 'b', '--nosuffix', la])).trim());
    const segs = report.report[0]!.seg;
    if (segs.filter((s) => s.lv_name === 'root').length !== 2) throw new Error(`root should have two segments: ${JSON.stringify(segs)}`);

    // Each file system in a file of its own, then copied where LVM says the LV's extents are.
    const fsFile = join(work, 'lv.img');
    const place = async (lv: string, size: number, make: (file: string) => Promise<void>): Promise<void> => {
      await writeFile(fsFile, '');
      await truncate(fsFile, size);
      await make(fsFile);
      const src = await open(fsFile, 'r');
      try {
        for (const s of segs.filter((x) => x.lv_name === lv)) {
          const ranges = s.seg_pe_ranges.split(' ').map((r) => {
            const m = /^(.*):(\d+)-(\d+)$/.exec(r)!;
            const image = m[1] === la ? mbr : gpt;
            return { image, at: partitions[image]!.offset + peStart + Number(m[2]) * extentSize };
          });
          const segStart = Number(s.seg_start_pe) * extentSize;
          const segBytes = Number(s.seg_size_pe) * extentSize;
          if (ranges.length === 1) {
            // One run: dd keeps holes (every offset here is a whole MiB).
            const r = ranges[0]!;
            await run('dd', [`if=${fsFile}`, `of=${r.image}`, 'bs=1M', `skip=${segStart / MiB}`, `seek=${r.at / MiB}`, `count=${segBytes / MiB}`, 'conv=sparse,notrunc', 'status=none']);
            continue;
          }
          const chunk = Number(s.stripe_size);
          for (let o = 0; o < segBytes; o += chunk) {
            const c = o / chunk;
            const r = ranges[c % ranges.length]!;
            const at = r.at + Math.floor(c / ranges.length) * chunk;
            const buf = Buffer.alloc(chunk);
            await src.read(buf, 0, chunk, segStart + o);
            const dst = await open(r.image, 'r+');
            try {
              await dst.write(buf, 0, chunk, at);
            } finally {
              await dst.close();
            }
          }
        }
      } finally {
        await src.close();
      }
    };
    await place('root', 40 * MiB, async (f) => void (await run('mkfs.ext4', ['-q', '-F', '-L', 'lvroot', '-d', rootTree, f])));
    await place('striped', 16 * MiB, async (f) => void (await run('mkfs.ext4', ['-q', '-F', '-L', 'stripes', '-d', dataTree, f])));
    await place('data', 48 * MiB, async (f) => {
      // mkfs.xfs refuses file systems under 300 MB unless it runs under fstests (these variables);
      // the kernel mounts small ones fine, and the test stays small.
      await run('mkfs.xfs', ['-q', '-L', 'lvdata', f], { env: { ...process.env, TEST_DIR: '1', TEST_DEV: '1', QA_CHECK_FS: '1' } });
      const mnt = join(work, 'lvm-xfs-mnt');
      await mkdir(mnt, { recursive: true });
      await run('mount', ['-o', 'loop', f, mnt]);
      try {
        await run('cp', ['-a', `${dataTree}/.`, mnt]);
      } finally {
        await run('umount', [mnt]);
        await rm(mnt, { recursive: true });
      }
    });
    await rm(fsFile);
    return { mbr, gpt, extentSize };
  } finally {
    for (const l of loops) await run('losetup', ['-d', l]).catch(() => undefined);
  }
}
