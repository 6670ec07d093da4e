// `bulwark job …`, `bulwark session …`, `bulwark restore-point list`: what to back up, the runs
// (sessions) and what they produced (restore points).
import { Command, InvalidArgumentError, Option } from 'commander';
import { describeError } from '../../common/errors.js';
import { isFinalState } from '../../server/jobs/ports.js';
import type { Job, PeriodicDays, RestorePoint, Session } from '../../server/services/model.js';
import {
  at,
  clientFor,
  collect,
  nonNegativeInt,
  nothingToDo,
  oneOf,
  parseSize,
  positiveInt,
  type CliContext,
  type ItemList,
} from '../context.js';
import { BarView, exitCodeOf, followSession, JsonView, PlainView, runningStep, sessionSummary, stepText, type SessionView } from '../follow.js';
import { formatFields, formatTable, humanDuration, humanRate, humanSize, localTime, printJson } from '../output.js';
import { parseSchedule, parseWindowPart, scheduleText, windowText } from '../schedule-text.js';
import { editWithVersion } from './edit.js';
import { applyJobEncryption, encryptionText, jobPasswordFromOptions, type JobEncryption } from './encryption.js';

const jsonOption = (): Option => new Option('--json', 'print the API object(s) as JSON');

const methods = ['forever-forward', 'forward', 'reverse'] as const;
const compressions = ['zstd', 'lz4', 'none'] as const;

interface JobOptions {
  vm?: string[];
  repo?: string;
  method?: (typeof methods)[number];
  keep?: number;
  keepDays?: number;
  schedule?: string;
  blockSize?: number;
  compress?: (typeof compressions)[number];
  retries?: number;
  retryWait?: number;
  window?: string[];
  timezone?: string;
  requireGuestProcessing?: boolean;
  disabled?: boolean;
  expectVersion?: number;
  json?: boolean;
  activeFull?: PeriodicDays | null;
  syntheticFull?: PeriodicDays | null;
  healthCheck?: PeriodicDays | null;
  wholeChain?: boolean;
  compact?: PeriodicDays | null;
  excludeDisk?: string[];
  removedVmRetention?: number;
  fileIndex?: boolean;
  multithreadedTransfer?: boolean;
  storage?: 'per-vm' | 'per-job';
  proxy?: string;
  encrypt?: boolean;
  passwordHint?: string;
  passwordFile?: string;
}

const weekdays = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'] as const;
const fullWeekdays = ['monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday', 'sunday'];

/** "sat", "mon,thu", "1,15", "last", "sun 1" -> { weekdays, monthDays }; "none" -> null. */
export function parseDays(name: string) {
  return (value: string): PeriodicDays | null => {
    const text = value.trim().toLowerCase();
    if (text === 'none' || text === 'off') return null;
    const days: { weekdays: (typeof weekdays)[number][]; monthDays: number[] } = { weekdays: [], monthDays: [] };
    for (const token of text.split(/[\s,]+/).filter((t) => t !== '')) {
      const wd = weekdays.find((d, i) => token === d || token === fullWeekdays[i]);
      if (wd) days.weekdays.push(wd);
      else if (token === 'last') days.monthDays.push(-1);
      else if (/^\d{1,2}$/.test(token) && Number(token) >= 1 && Number(token) <= 31) days.monthDays.push(Number(token));
      else throw new InvalidArgumentError(`${name}: "${token}" is not a weekday (mon…sun), a day of the month (1-31) or "last"; e.g. "sat", "mon,thu", "1,15", "last", or none`);
    }
    if (days.weekdays.length === 0 && days.monthDays.length === 0) throw new InvalidArgumentError(`${name} names no day: e.g. "sat", "1,15", "last", or none`);
    return { ...(days.weekdays.length > 0 ? { weekdays: days.weekdays } : {}), ...(days.monthDays.length > 0 ? { monthDays: days.monthDays } : {}) };
  };
}

/** { weekdays, monthDays } -> "sat, day 1, last day"; null -> "never". */
export function daysText(d: PeriodicDays | null | undefined): string {
  if (!d) return 'never';
  const parts = [...(d.weekdays ?? []), ...(d.monthDays ?? []).map((n) => (n === -1 ? 'last day of the month' : `day ${n}`))];
  return parts.join(', ');
}

function jobFields(o: JobOptions): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  if (o.vm) body.vms = o.vm;
  if (o.repo !== undefined) body.repository = o.repo;
  if (o.method !== undefined) body.method = o.method;
  if (o.keep !== undefined) body.retention = { points: o.keep };
  if (o.keepDays !== undefined) body.retention = { days: o.keepDays };
  if (o.schedule !== undefined) body.schedule = parseSchedule(o.schedule, o.timezone);
  if (o.blockSize !== undefined) body.blockSize = o.blockSize;
  if (o.compress !== undefined) body.compression = o.compress;
  if (o.retries !== undefined || o.retryWait !== undefined) body.retries = { count: o.retries ?? 0, waitMinutes: o.retryWait ?? 10 };
  if (o.window !== undefined) {
    body.window = o.window.includes('none') ? null : { allow: o.window.map(parseWindowPart), ...(o.timezone ? { timeZone: o.timezone } : {}) };
  }
  if (o.requireGuestProcessing !== undefined) body.requireGuestProcessing = o.requireGuestProcessing;
  if (o.disabled) body.enabled = false;
  if (o.activeFull !== undefined) body.activeFull = o.activeFull;
  if (o.syntheticFull !== undefined) body.syntheticFull = o.syntheticFull;
  if (o.healthCheck !== undefined) body.healthCheck = o.healthCheck === null ? null : { ...o.healthCheck, ...(o.wholeChain ? { wholeChain: true } : {}) };
  if (o.compact !== undefined) body.compact = o.compact;
  if (o.excludeDisk !== undefined) body.excludeDisks = o.excludeDisk.includes('none') ? [] : o.excludeDisk;
  if (o.removedVmRetention !== undefined) body.removedVmRetentionDays = o.removedVmRetention;
  if (o.fileIndex !== undefined) body.fileIndex = o.fileIndex;
  if (o.multithreadedTransfer !== undefined) body.multithreadedTransfer = o.multithreadedTransfer;
  if (o.storage !== undefined) body.storage = o.storage;
  if (o.proxy !== undefined) body.proxy = o.proxy === 'auto' ? null : o.proxy;
  return body;
}

const retention = (j: Job): string => ('points' in j.retention ? `${j.retention.points} points` : `${j.retention.days} days`);

const duration = (s: { startedAt?: string | undefined; endedAt?: string | undefined }): string =>
  s.startedAt ? humanDuration(((s.endedAt ? new Date(s.endedAt) : new Date()).getTime() - new Date(s.startedAt).getTime()) / 1000) : '-';

function viewFor(ctx: CliContext, json: boolean, everyUpdate: boolean): SessionView {
  if (json) return new JsonView(ctx.output, everyUpdate);
  return ctx.tty ? new BarView(ctx.output) : new PlainView(ctx.output);
}

export function jobCommand(ctx: CliContext): Command {
  const job = new Command('job').description('backup jobs: what to back up, where, how and when');

  const withJobOptions = (c: Command): Command =>
    c
      .option('--vm <vm...>', 'VM names (repeat or list several)', collect)
      .option('--repo <name>', 'target repository')
      .addOption(new Option('--method <method>', 'backup method').argParser(oneOf('--method', methods)))
      .addOption(new Option('--keep <n>', 'keep this many restore points').argParser(positiveInt('--keep')).conflicts('keepDays'))
      .addOption(new Option('--keep-days <d>', 'keep restore points this many days').argParser(positiveInt('--keep-days')))
      .option('--schedule <when>', 'cron expression, "daily HH:MM [mon,…]", "monthly HH:MM day N|last|first WEEKDAY", "every 30m|4h", "after JOB", or none')
      .option('--timezone <tz>', 'IANA time zone of the schedule and window (default: the server\'s)')
      .option('--proxy <agent>', 'the agent that moves the data (pinned proxy), or "auto": an agent on the VM host, else the least busy one')
      .option('--block-size <size>', 'block size: 256K, 512K, 1M or 4M (4M for deduplicating storage)', parseSize('--block-size'))
      .addOption(new Option('--compress <codec>', 'compression').argParser(oneOf('--compress', compressions)))
      .option('--retries <n>', 'retry a failed run this many times', nonNegativeInt('--retries'))
      .option('--retry-wait <minutes>', 'minutes between retries', nonNegativeInt('--retry-wait'))
      .option('--window <[days ]HH:MM-HH:MM>', 'hours the job may run, e.g. "mon,tue 22:00-06:00" (repeatable; a run still going at the end is stopped), or none', collect)
      .option('--require-guest-processing', 'fail instead of falling back to crash-consistent when the guest cannot be quiesced')
      .option('--active-full <days>', 'read everything from the source again on these days: "sat", "mon,thu", "1,15", "last" (day of month), or none', parseDays('--active-full'))
      .option('--synthetic-full <days>', 'forward method: build a full in the repository from the chain on these days (same forms), or none', parseDays('--synthetic-full'))
      .option('--health-check <days>', 'verify the latest restore point\'s blocks and metadata on these days (same forms), or none', parseDays('--health-check'))
      .option('--whole-chain', 'with --health-check: verify every restore point of the chain, not only the latest')
      .option('--compact <days>', 'rewrite the full without blocks nothing references on these days (same forms), or none', parseDays('--compact'))
      .option('--exclude-disk <VM:DISK|DISK...>', 'do not back up this disk (of one VM, or of every VM); repeatable; none = back up all', collect)
      .option('--removed-vm-retention <days>', 'days a VM removed from the job keeps its restore points (default 14)', nonNegativeInt('--removed-vm-retention'))
      .option('--file-index', 'index the guest\'s files after each backup (for search and file restore)')
      .option('--no-file-index', 'do not index guest files')
      .option('--multithreaded-transfer', 'between agents, send each task over several parallel TCP streams (5, the default)')
      .option('--no-multithreaded-transfer', 'between agents, one TCP stream per task')
      .addOption(new Option('--storage <mode>', 'per-vm: a chain per VM (default); per-job: all VMs of the job in one file set per restore point').choices(['per-vm', 'per-job']))
      .option('--encrypt', 'encrypt new chains (from the next full) with a password the server keeps sealed: asked twice, or --password-file')
      .option('--no-encrypt', 'new chains are not encrypted (older ones keep their password, still known to the server)')
      .option('--password-hint <text>', 'with --encrypt: shown when a wrong password is given (never the password)')
      .option('--password-file <file>', 'with --encrypt: read the password from the first line of FILE')
      .addOption(jsonOption());

  withJobOptions(
    job
      .command('create')
      .description('create a backup job')
      .argument('<name>')
      .option('--disabled', 'create it disabled (its schedule does not run)'),
  ).action(async (name: string, o: JobOptions, cmd: Command) => {
    if (!o.vm || o.vm.length === 0) cmd.error('error: required option \'--vm <vm...>\' not specified', { exitCode: 2, code: 'bulwark.usage' });
    if (!o.repo) cmd.error('error: required option \'--repo <name>\' not specified', { exitCode: 2, code: 'bulwark.usage' });
    const password = await jobPasswordFromOptions(cmd, name, o);
    const j = await (await clientFor(ctx, cmd)).post<Job>('/jobs', { name, ...jobFields(o) });
    const enc = await applyJobEncryption(ctx, cmd, j.name, o, password);
    if (o.json) printJson(ctx.output, j);
    else ctx.output.out(`job ${j.name} created (${j.vms.join(', ')} -> ${j.repository}, ${scheduleText(j.schedule)}${enc?.encrypted ? ', encrypted' : ''})\n`);
  });

  job
    .command('list')
    .description('list jobs')
    .addOption(jsonOption())
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<Job>>('/jobs');
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'name', value: (j) => j.name },
          { header: 'vms', value: (j) => j.vms },
          { header: 'repository', value: (j) => j.repository },
          { header: 'method', value: (j) => j.method },
          { header: 'retention', value: retention },
          { header: 'schedule', value: (j) => scheduleText(j.schedule) },
          { header: 'enabled', value: (j) => j.enabled },
          { header: 'running', value: (j) => j.running },
        ]),
      );
    });

  job
    .command('show')
    .description('show one job')
    .argument('<name>')
    .addOption(jsonOption())
    .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const j = await client.get<Job>(at('/jobs', name));
      if (o.json) return printJson(ctx.output, j);
      // The job is shown even when its encryption setting cannot be read; the reason is shown with it.
      const enc = await client.get<JobEncryption>(at('/jobs', name, 'encryption')).then(
        (e) => encryptionText(e),
        (err: unknown) => `unknown (${describeError(err)})`,
      );
      ctx.output.out(
        formatFields([
          ['name', j.name],
          ['id', j.id],
          ['vms', j.vms],
          ['repository', j.repository],
          ['method', j.method],
          ['retention', retention(j)],
          ['block size', humanSize(j.blockSize)],
          ['compression', j.compression],
          ['schedule', scheduleText(j.schedule)],
          ['window', windowText(j.window)],
          ['retries', `${j.retries.count} (every ${j.retries.waitMinutes} min)`],
          ['guest processing', j.requireGuestProcessing ? 'required' : 'when possible'],
          ['proxy', j.proxy ?? 'automatic'],
          ['active full', daysText(j.activeFull)],
          ['synthetic full', daysText(j.syntheticFull)],
          ['health check', j.healthCheck ? `${daysText(j.healthCheck)}${j.healthCheck.wholeChain ? ' (whole chain)' : ' (latest point)'}` : 'never'],
          ['compact full', daysText(j.compact)],
          ['excluded disks', j.excludeDisks.length > 0 ? j.excludeDisks : '(none)'],
          ['removed VMs kept', `${j.removedVmRetentionDays} days`],
          ['file index', j.fileIndex],
          ['multithreaded transfer', j.multithreadedTransfer ? 'on (5 streams per task between agents)' : 'off (1 stream per task)'],
          ['storage', j.storage === 'per-job' ? 'one file set per job' : 'one chain per VM'],
          ['encryption', enc],
          ['enabled', j.enabled],
          ['running', j.running],
          ['version', j.version],
          ['created', localTime(j.createdAt)],
          ['updated', localTime(j.updatedAt)],
        ]),
      );
    });

  withJobOptions(
    job
      .command('edit')
      .description('change a job')
      .argument('<name>')
      .option('--expect-version <n>', 'refuse the edit unless the job still has this version (see show --json)', positiveInt('--expect-version')),
  ).action(async (name: string, o: JobOptions, cmd: Command) => {
    const patch = jobFields(o);
    if (Object.keys(patch).length === 0 && o.encrypt === undefined) throw nothingToDo(`job edit ${name}`, 'the job options (see `bulwark job edit --help`)');
    const password = await jobPasswordFromOptions(cmd, name, o);
    const client = await clientFor(ctx, cmd);
    const j = Object.keys(patch).length > 0 ? await editWithVersion<Job>(client, at('/jobs', name), patch, o.expectVersion) : await client.get<Job>(at('/jobs', name));
    const enc = await applyJobEncryption(ctx, cmd, j.name, o, password);
    if (o.json) printJson(ctx.output, j);
    else ctx.output.out(`job ${j.name} changed (version ${j.version})${enc ? `; encryption ${encryptionText(enc)}` : ''}\n`);
  });

  job
    .command('delete')
    .alias('remove')
    .description('delete a job (refused while it runs; its restore points stay)')
    .argument('<name>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await (await clientFor(ctx, cmd)).delete(at('/jobs', name));
      ctx.output.out(`job ${name} deleted\n`);
    });

  for (const [verb, text] of [
    ['enable', 'let the job run on its schedule'],
    ['disable', 'stop the job running on its schedule (manual runs still work)'],
  ] as const) {
    job
      .command(verb)
      .description(text)
      .argument('<name>')
      .addOption(jsonOption())
      .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
        const j = await (await clientFor(ctx, cmd)).post<Job>(at('/jobs', name, verb), {});
        if (o.json) printJson(ctx.output, j);
        else ctx.output.out(`job ${name} ${verb}d\n`);
      });
  }

  job
    .command('clone')
    .description('copy a job under a new name')
    .argument('<name>')
    .argument('<new-name>')
    .addOption(jsonOption())
    .action(async (name: string, newName: string, o: { json?: boolean }, cmd: Command) => {
      const j = await (await clientFor(ctx, cmd)).post<Job>(at('/jobs', name, 'clone'), { name: newName });
      if (o.json) printJson(ctx.output, j);
      else ctx.output.out(`job ${name} cloned to ${j.name}\n`);
    });

  job
    .command('run')
    .alias('start')
    .description('start a job now')
    .argument('<name>')
    .option('--full', 'make a full backup instead of an incremental one')
    .option('--wait', 'follow the session until it ends (exit 0 on success or warning, 1 otherwise)')
    .addOption(jsonOption())
    .action(async (name: string, o: { full?: boolean; wait?: boolean; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const { sessionId } = await client.post<{ sessionId: string }>(at('/jobs', name, 'run'), o.full ? { full: true } : {});
      if (!o.wait) {
        if (o.json) printJson(ctx.output, { sessionId });
        else ctx.output.out(`job ${name} started: session ${sessionId}\n  follow it with: bulwark session show ${sessionId} --follow\n`);
        return;
      }
      if (!o.json) ctx.output.out(`job ${name} started: session ${sessionId}\n`);
      const s = await followSession(client, sessionId, { view: viewFor(ctx, o.json ?? false, false), reconnectLimitMs: ctx.reconnectLimitMs });
      ctx.exitCode = exitCodeOf(s.state);
    });

  job
    .command('health-check')
    .description('verify the job\'s restore points now, as a session: damaged blocks are named in its log and repaired by the next run')
    .argument('<name>')
    .option('--whole-chain', 'verify every restore point of each chain, not only the latest')
    .option('--wait', 'follow the session until it ends')
    .addOption(jsonOption())
    .action(async (name: string, o: { wholeChain?: boolean; wait?: boolean; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const { sessionId } = await client.post<{ sessionId: string }>(at('/jobs', name, 'health-check'), o.wholeChain ? { wholeChain: true } : {});
      if (!o.wait) {
        if (o.json) printJson(ctx.output, { sessionId });
        else ctx.output.out(`health check of job ${name} started: session ${sessionId}\n  follow it with: bulwark session show ${sessionId} --follow\n`);
        return;
      }
      if (!o.json) ctx.output.out(`health check of job ${name} started: session ${sessionId}\n`);
      const s = await followSession(client, sessionId, { view: viewFor(ctx, o.json ?? false, false), reconnectLimitMs: ctx.reconnectLimitMs });
      ctx.exitCode = exitCodeOf(s.state);
    });

  return job;
}

/** How each run kind reads in `session show` (the run plans of src/repository/plan/plan-run.ts). */
const RUN_KINDS: Record<string, string> = {
  full: 'full',
  incremental: 'incremental',
  'synthetic-full': 'incremental, then synthetic full',
  reverse: 'reverse incremental',
};

/**
 * What a job run backed up: the kinds its VMs' runs took, from their plan lines in the log
 * ("this run: full (no restore point yet)"), in order, each once; "(full requested)" when
 * `job run --full` asked for it. Undefined when no run was planned (nothing started, a simulation).
 */
export function backupRunText(s: Pick<Session, 'full' | 'log'>): string | undefined {
  const kinds: string[] = [];
  for (const line of s.log) {
    const kind = /\bthis run: ([a-z-]+) \(/.exec(line.message)?.[1];
    const text = kind === undefined ? undefined : RUN_KINDS[kind];
    if (text !== undefined && !kinds.includes(text)) kinds.push(text);
  }
  if (kinds.length === 0) return s.full ? 'full requested' : undefined;
  return `${kinds.join('; ')}${s.full ? ' (full requested)' : ''}`;
}

/** A job run's job, state and what it backed up; a restore's VM, point, agent and state (an instant recovery's: from backup or not). */
function sessionSubjectFields(s: Session, state: string): Array<[string, unknown]> {
  if (s.kind === 'health-check') return [['job', s.jobName], ['state', s.state]];
  if (s.kind === undefined || s.kind === 'backup') {
    return [['job', s.jobName], ['state', s.state], ['backup', backupRunText(s)]];
  }
  return [
    ['vm', s.vm],
    ['point', s.point],
    ['agent', s.agent ?? 'this server'],
    ['state', state],
    ...(s.kind === 'instant-recovery' ? ([['from backup', s.runningFromBackup ? 'yes' : 'no'], ['instant recovery', s.ref]] as Array<[string, unknown]>) : []),
    ...(s.kind === 'restore-vm' ? ([['VM restore', s.ref]] as Array<[string, unknown]>) : []),
  ];
}

export function sessionCommand(ctx: CliContext): Command {
  const session = new Command('session').description('job runs, restores and instant recoveries: state, progress, tasks and log');
  /** What a session is about: the job of a job run, the VM of a restore. */
  const subject = (s: Session): string => (s.kind === undefined || s.kind === 'backup' || s.kind === 'health-check' ? s.jobName : (s.vm ?? ''));
  /** The state, or an instant recovery's status in words ("running from backup", "migrated", "stopped"). */
  const stateText = (s: Session): string => (s.kind === 'instant-recovery' && s.status ? s.status.replace(/-/g, ' ') : s.state);

  session
    .command('list')
    .description('list sessions, newest first: job runs, restores, instant recoveries (state "running from backup": the VM runs from the backup now)')
    .option('--job <name>', 'only this job\'s sessions')
    .addOption(new Option('--kind <kind>', 'only sessions of this kind').choices(['backup', 'health-check', 'restore-vm', 'restore-disk', 'restore-files', 'instant-recovery']))
    .option('--limit <n>', 'at most this many', positiveInt('--limit'))
    .addOption(jsonOption())
    .action(async (o: { job?: string; kind?: string; limit?: number; json?: boolean }, cmd: Command) => {
      const { items } = await (await clientFor(ctx, cmd)).get<ItemList<Session>>('/sessions', { job: o.job, kind: o.kind, limit: o.limit });
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'id', value: (s) => s.id },
          { header: 'kind', value: (s) => s.kind ?? 'backup' },
          { header: 'job/vm', value: subject },
          { header: 'state', value: stateText },
          { header: 'agent', value: (s) => s.agent },
          { header: 'started', value: (s) => localTime(s.startedAt) },
          { header: 'duration', value: duration, align: 'right' },
          { header: 'progress', value: (s) => `${s.progress.percent.toFixed(0)}%`, align: 'right' },
          { header: 'read', value: (s) => humanSize(s.progress.bytesRead), align: 'right' },
          { header: 'transferred', value: (s) => humanSize(s.progress.bytesTransferred), align: 'right' },
          { header: 'stored', value: (s) => humanSize(s.progress.bytesStored), align: 'right' },
        ]),
      );
    });

  session
    .command('show')
    .description('show a session with its tasks and log; --follow streams it until it ends')
    .argument('<id>')
    .option('--follow', 'stream progress until the session ends (exit 0 on success or warning, 1 otherwise)')
    .addOption(jsonOption())
    .action(async (id: string, o: { follow?: boolean; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      if (o.follow) {
        const s = await followSession(client, id, { view: viewFor(ctx, o.json ?? false, true), reconnectLimitMs: ctx.reconnectLimitMs });
        ctx.exitCode = exitCodeOf(s.state);
        return;
      }
      const s = await client.get<Session>(at('/sessions', id));
      if (o.json) return printJson(ctx.output, s);
      ctx.output.out(
        formatFields([
          ['id', s.id],
          ['kind', s.kind ?? 'backup'],
          ...sessionSubjectFields(s, stateText(s)),
          ['started', localTime(s.startedAt)],
          ['ended', localTime(s.endedAt)],
          ['duration', duration(s)],
          ['progress', `${s.progress.percent.toFixed(0)}%`],
          ['read', humanSize(s.progress.bytesRead)],
          ['transferred', humanSize(s.progress.bytesTransferred)],
          ['stored', humanSize(s.progress.bytesStored)],
          ['rate', humanRate(s.progress.processingRate)],
          // The chain maintenance step a task runs now (merge, synthetic-full, compact, inject, health-check).
          ['maintenance', runningStep(s)?.text],
          ['reason', s.reason],
          // Bottleneck statistics (docs/resource-scheduling.md): busy share per stage, the busiest named.
          ['stages', s.stages?.summary ?? 'not measured'],
        ]),
      );
      ctx.output.out('\ntasks:\n');
      ctx.output.out(
        formatTable(s.tasks, [
          { header: 'vm', value: (t) => t.vm },
          { header: 'disk', value: (t) => t.disk },
          { header: 'state', value: (t) => t.state },
          { header: 'progress', value: (t) => `${t.progress.percent.toFixed(0)}%`, align: 'right' },
          { header: 'read', value: (t) => humanSize(t.progress.bytesRead), align: 'right' },
          { header: 'step', value: (t) => (t.progress.step ? stepText(t.progress.step) : undefined) },
          { header: 'duration', value: duration, align: 'right' },
          { header: 'proxy', value: (t) => t.proxy },
          { header: 'bottleneck', value: (t) => (t.stages?.bottleneck ? `${t.stages.bottleneck.charAt(0).toUpperCase()}${t.stages.bottleneck.slice(1)} ${Math.round(t.stages.shares[t.stages.bottleneck] * 100)}%` : undefined) },
          { header: 'message', value: (t) => t.message },
        ]),
      );
      ctx.output.out('\nlog:\n');
      for (const line of s.log) ctx.output.out(`${localTime(line.time)}  ${line.level.padEnd(7)}  ${line.message}\n`);
      if (s.log.length === 0) ctx.output.out('(none)\n');
    });

  session
    .command('stop')
    .description('stop a running session')
    .argument('<id>')
    .option('--wait', 'wait until it has stopped')
    .addOption(jsonOption())
    .action(async (id: string, o: { wait?: boolean; json?: boolean }, cmd: Command) => {
      const client = await clientFor(ctx, cmd);
      const reply = await client.post<Session | undefined>(at('/sessions', id, 'stop'), {});
      if (o.wait) {
        const s = await followSession(client, id, { view: viewFor(ctx, o.json ?? false, false), reconnectLimitMs: ctx.reconnectLimitMs });
        if (!o.json) ctx.output.out(`${sessionSummary(s)}\n`);
        return;
      }
      if (o.json) printJson(ctx.output, reply ?? { id });
      // The server answers once the session has ended (a job run, a disk restore): say how.
      else if (reply && isFinalState(reply.state)) ctx.output.out(`session ${id}: ${reply.state}${reply.reason ? ` (${reply.reason})` : ''}\n`);
      else ctx.output.out(`session ${id}: stop requested\n`);
    });

  return session;
}

export function restorePointCommand(ctx: CliContext): Command {
  const rp = new Command('restore-point').description('restore points in the catalog');

  rp.command('list')
    .description('list restore points: by VM, each VM\'s newest first (state corrupt: a health check found damage)')
    .option('--vm <vm>', 'only this VM\'s restore points')
    .option('--repo <name>', 'only those in this repository')
    .addOption(jsonOption())
    .action(async (o: { vm?: string; repo?: string; json?: boolean }, cmd: Command) => {
      const reply = await (await clientFor(ctx, cmd)).get<ItemList<RestorePoint>>('/restore-points', { vm: o.vm });
      const items = o.repo ? reply.items.filter((p) => p.repository === o.repo) : reply.items;
      if (o.json) return printJson(ctx.output, items);
      ctx.output.out(
        formatTable(items, [
          { header: 'id', value: (p) => p.id },
          { header: 'vm', value: (p) => p.vm },
          { header: 'time', value: (p) => localTime(p.time) },
          { header: 'type', value: (p) => p.type },
          { header: 'disks', value: (p) => p.disks.map((d) => d.name) },
          { header: 'size', value: (p) => humanSize(p.size), align: 'right' },
          { header: 'state', value: (p) => p.state },
          { header: 'repository', value: (p) => p.repository },
          { header: 'job', value: (p) => p.job },
          { header: 'encrypted', value: (p) => (p.encrypted ? (p.keyKnown ? 'yes' : 'yes, password needed') : 'no') },
        ]),
      );
    });

  rp.command('show')
    .description('show one restore point')
    .argument('<id>')
    .addOption(jsonOption())
    .action(async (id: string, o: { json?: boolean }, cmd: Command) => {
      const p = await (await clientFor(ctx, cmd)).get<RestorePoint>(at('/restore-points', id));
      if (o.json) return printJson(ctx.output, p);
      ctx.output.out(
        formatFields([
          ['id', p.id],
          ['vm', p.vm],
          ['time', localTime(p.time)],
          ['type', p.type],
          ['state', p.state],
          ['size', humanSize(p.size)],
          ['repository', p.repository],
          ['job', p.job],
          ['session', p.sessionId],
          ['chain', p.chainId],
          ['encrypted', p.encrypted ? (p.keyKnown ? 'yes (the server knows the password)' : 'yes: the server does not know the password; restores ask for it') : 'no'],
          ...(p.encrypted ? [['password hint', p.passwordHint ?? '(none)'] as [string, string]] : []),
        ]),
      );
      ctx.output.out(formatTable(p.disks, [
        { header: 'disk', value: (d) => d.name },
        { header: 'size', value: (d) => humanSize(d.size), align: 'right' },
      ]));
    });

  return rp;
}
