// Which agent moves a disk's data (the "proxy"): the one pinned by the job; otherwise an agent on
// the VM's own host (it reads the disk locally; the agent that found the disk first); otherwise
// the least busy agent that can reach the disk's storage. Pure: the caller passes every agent's state and gets a choice or reasons.

/** An agent as proxy selection sees it. */
export interface ProxyCandidate {
  readonly name: string;
  /** The hypervisor host the agent runs on. */
  readonly host: string;
  /** Further hypervisor hosts it reads disks of as an on-host proxy (the hosts it serves). */
  readonly hosts?: readonly string[] | undefined;
  readonly online: boolean;
  /** Concurrent task limit (default: the agent's CPU cores, see `defaultMaxTasks`). */
  readonly maxTasks: number;
  /** Tasks it runs now. */
  readonly running: number;
  /** Shared storage (ids) it can read disks from without being on the VM's host. */
  readonly reaches: readonly string[];
}

/** What a task needs from a proxy. */
export interface ProxyNeed {
  readonly vm: string;
  readonly disk: string;
  /** The host the VM runs on. */
  readonly vmHost: string;
  /** The storage the disk lives on, when it is shared storage another host can reach. */
  readonly storage?: string | undefined;
  /** A proxy pinned by the job. */
  readonly pinned?: string | undefined;
  /**
   * The agent whose hypervisor connection found the disk (`DiskRef.location.agent`): it certainly
   * reads it locally, so among the on-host agents with a free slot it goes first.
   */
  readonly foundBy?: string | undefined;
}

export type ProxySelection =
  | { readonly kind: 'selected'; readonly proxy: string; readonly via: 'pinned' | 'on-host' | 'off-host' }
  /** A capable proxy exists but all capable ones are at their task limit: queue the task. */
  | { readonly kind: 'wait'; readonly reasons: readonly string[] }
  /** No proxy can ever serve the task as things are: fail it with the reasons. */
  | { readonly kind: 'none'; readonly reasons: readonly string[] };

/** The default task limit of an agent: one task per CPU core, at least one. */
export function defaultMaxTasks(cpuCores: number): number {
  return Math.max(1, Math.floor(cpuCores));
}

function canReach(p: ProxyCandidate, need: ProxyNeed): boolean {
  return onHost(p, need) || (need.storage !== undefined && p.reaches.includes(need.storage));
}

function onHost(p: ProxyCandidate, need: ProxyNeed): boolean {
  return p.host === need.vmHost || (p.hosts?.includes(need.vmHost) ?? false);
}

function full(p: ProxyCandidate): boolean {
  return p.running >= p.maxTasks;
}

/** Least busy first: lowest share of its slots in use, then fewest tasks, then name (stable). */
function lessBusy(a: ProxyCandidate, b: ProxyCandidate): number {
  return a.running / a.maxTasks - b.running / b.maxTasks || a.running - b.running || a.name.localeCompare(b.name);
}

export function selectProxy(need: ProxyNeed, candidates: readonly ProxyCandidate[]): ProxySelection {
  const what = `disk ${need.disk} of VM ${need.vm}`;
  if (need.pinned !== undefined) {
    const p = candidates.find((c) => c.name === need.pinned);
    if (!p) return { kind: 'none', reasons: [`proxy ${need.pinned} pinned by the job does not exist`] };
    if (!p.online) return { kind: 'none', reasons: [`proxy ${p.name} pinned by the job is offline`] };
    if (!canReach(p, need)) {
      return { kind: 'none', reasons: [`proxy ${p.name} pinned by the job is not on host ${need.vmHost} and cannot reach the storage of ${what}`] };
    }
    if (full(p)) return { kind: 'wait', reasons: [`proxy ${p.name} is at its task limit (${p.running} of ${p.maxTasks})`] };
    return { kind: 'selected', proxy: p.name, via: 'pinned' };
  }
  const reasons: string[] = [];
  const capable: ProxyCandidate[] = [];
  for (const p of candidates) {
    if (!canReach(p, need)) reasons.push(`proxy ${p.name} is not on host ${need.vmHost} and cannot reach the storage of ${what}`);
    else if (!p.online) reasons.push(`proxy ${p.name} is offline`);
    else capable.push(p);
  }
  if (candidates.length === 0) reasons.push('no agents are registered');
  if (capable.length === 0) return { kind: 'none', reasons };
  const free = capable.filter((p) => !full(p));
  const local = free.filter((p) => onHost(p, need)).sort((a, b) => Number(b.name === need.foundBy) - Number(a.name === need.foundBy) || lessBusy(a, b));
  if (local[0]) return { kind: 'selected', proxy: local[0].name, via: 'on-host' };
  const offHost = free.sort(lessBusy);
  if (offHost[0]) return { kind: 'selected', proxy: offHost[0].name, via: 'off-host' };
  return { kind: 'wait', reasons: capable.map((p) => `proxy ${p.name} is at its task limit (${p.running} of ${p.maxTasks})`) };
}
