// How an instant recovery VM's QEMU is started so that, once migrated, it outlives the process that
// started it (docs/instant-recovery.md, "After migrate"):
// - in its own session and process group (spawn `detached`), so signals to the server's or
//   agent's process group (Ctrl-C in a terminal, a kill of the group) do not reach it;
// - when that process runs as a systemd service as root, in a transient scope of its own
//   (`systemd-run --scope`): the service's KillMode=control-group kills every process of the
//   service's cgroup on `systemctl stop|restart`, and a scope is a cgroup of its own. systemd-run
//   --scope registers the scope for itself and then execs QEMU, so the child's pid is QEMU's.
// A VM that still runs from the backup is quit by its process on a clean stop (its disk is that
// process's NBD server); a migrated one is left running.
import { existsSync, readFileSync } from 'node:fs';

/** Whether this process runs as a systemd service as root (a VM needs a scope of its own to outlive the service). */
export function systemdService(env: NodeJS.ProcessEnv = process.env): boolean {
  if (env.BULWARK_VM_SCOPE === 'off') return false;
  if (env.BULWARK_VM_SCOPE === 'on') return true;
  if (!env.INVOCATION_ID || process.getuid?.() !== 0 || !existsSync('/run/systemd/system')) return false;
  try {
    // cgroup v2 "0::/system.slice/bulwark-server.service"; v1 has a name=systemd line.
    return /\.service$/m.test(readFileSync('/proc/self/cgroup', 'utf8').trim());
  } catch {
    return false;
  }
}

/** The systemd unit name of a session's VM scope (letters, digits, '.', '_', '-' are valid in unit names). */
export function vmScopeUnit(name: string, id: string): string {
  return `bulwark-ir-${name}-${id}.scope`;
}

/**
 * The argv that starts `argv` (QEMU) as this process should: inside a transient scope when this
 * process is a systemd service, else as is.
 */
export function vmProcessArgv(argv: readonly string[], unit: string, scoped: boolean): string[] {
  if (!scoped) return [...argv];
  return ['systemd-run', '--scope', '--quiet', '--collect', `--unit=${unit}`, `--description=Bulwark instant recovery VM (${unit})`, '--', ...argv];
}
