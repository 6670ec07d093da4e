// Job backup-method options (issue 6) through the REST API: defaults, round trip into the stored
// job and into the engine's JobDefinition.settings, and validation errors that name the field
// and say what to do. Also the console's day parser.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { daysText, parseDays } from '../../cli/commands/jobs.js';
import { buildApi } from '../api/app.js';
import { openDatabase, type ConfigDatabase } from '../db/connect.js';
import { DatabaseJobEngineStore } from './engine-stores.js';
import { createRepository, registerAgent } from './infrastructure.js';
import { SessionEvents } from './sessions.js';
import { systemClock, type ServiceContext } from './common.js';

let dir: string;
let cdb: ConfigDatabase;
let ctx: ServiceContext;
let app: FastifyInstance;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'bulwark-job-options-'));
  cdb = await openDatabase({ target: join(dir, 'bulwark.db') });
  ctx = { db: cdb.db, engine: cdb.engine, clock: systemClock };
  const runner = { run: async () => ({ sessionId: 'x' }), stop: async () => undefined, close: async () => undefined };
  app = await buildApi({ ctx, runner, events: new SessionEvents(), transport: 'socket', version: 't' });
  await createRepository(ctx, { name: 'main', path: join(dir, 'repo') });
});
afterAll(async () => {
  await app?.close();
  await cdb?.close();
  rmSync(dir, { recursive: true, force: true });
});

const call = (method: 'GET' | 'POST' | 'PATCH', url: string, payload?: object) =>
  app.inject({ method, url: `/api/v1${url}`, ...(payload ? { payload } : {}) });

describe('job backup-method options', () => {
  it('default, round trip, and mapping into JobDefinition.settings', async () => {
    const created = await call('POST', '/jobs', { name: 'plain', vms: ['web1'], repository: 'main' });
    expect(created.statusCode, created.body).toBe(201);
    expect(created.json()).toMatchObject({
      activeFull: null,
      syntheticFull: null,
      healthCheck: null,
      compact: null,
      excludeDisks: [],
      removedVmRetentionDays: 14,
      fileIndex: false,
      multithreadedTransfer: true,
      storage: 'per-vm',
    });

    const r = await call('POST', '/jobs', {
      name: 'weekly',
      vms: ['web1', 'db1'],
      repository: 'main',
      method: 'forward',
      activeFull: { monthDays: [-1] },
      syntheticFull: { weekdays: ['sat'] },
      healthCheck: { weekdays: ['sun'], wholeChain: true },
      compact: { monthDays: [1] },
      excludeDisks: ['db1:vdb', 'vdc'],
      removedVmRetentionDays: 3,
      fileIndex: true,
      multithreadedTransfer: false,
      storage: 'per-job',
    });
    expect(r.statusCode, r.body).toBe(201);
    const job = r.json<{ version: number }>();
    const def = await new DatabaseJobEngineStore(ctx).loadJob('weekly');
    expect(def?.settings).toMatchObject({
      method: 'forward',
      activeFull: { monthDays: [-1] },
      syntheticFull: { weekdays: ['sat'] },
      healthCheck: { weekdays: ['sun'], wholeChain: true },
      compact: { monthDays: [1] },
      excludeDisks: ['db1:vdb', 'vdc'],
      removedVmRetentionDays: 3,
      fileIndex: true,
      multithreadedTransfer: false,
      storage: 'per-job',
    });

    // An edit changes only what it names; clone copies the options.
    const edited = await call('PATCH', '/jobs/weekly', { version: job.version, syntheticFull: null, excludeDisks: [] });
    expect(edited.statusCode, edited.body).toBe(200);
    expect(edited.json()).toMatchObject({ syntheticFull: null, excludeDisks: [], activeFull: { monthDays: [-1] }, fileIndex: true });
    const clone = await call('POST', '/jobs/weekly/clone', { name: 'weekly2' });
    expect(clone.json()).toMatchObject({ activeFull: { monthDays: [-1] }, removedVmRetentionDays: 3, fileIndex: true });
  });

  it('refuses bad options with the field and what to do', async () => {
    const bad = async (body: object, field: string, message: RegExp) => {
      const r = await call('POST', '/jobs', { name: 'bad', vms: ['web1'], repository: 'main', ...body });
      expect(r.statusCode, r.body).toBe(400);
      const e = r.json<{ error: { field?: string; message: string } }>().error;
      expect(e.field).toBe(field);
      expect(e.message).toMatch(message);
    };
    await bad({ method: 'forward', syntheticFull: {} }, 'syntheticFull', /names no day.*weekdays.*null/);
    await bad({ syntheticFull: { weekdays: ['sat'] } }, 'syntheticFull', /forward method only.*set method to forward/);
    await bad({ activeFull: { weekdays: ['sat'] } }, 'activeFull', /forever-forward.*set method to forward/);
    await bad({ method: 'reverse', compact: { monthDays: [0] } }, 'compact.monthDays[0]', /0 is not a day of the month: use 1-31, or -1/);
    await bad({ excludeDisks: ['db9:vdb'] }, 'excludeDisks[0]', /VM "db9" is not one of the job's VMs/);
    await bad({ excludeDisks: ['web1:'] }, 'excludeDisks[0]', /names no disk: write VM:DISK/);
    await bad({ removedVmRetentionDays: -1 }, 'removedVmRetentionDays', /must be >= 0/);
    await bad({ healthCheck: { weekdays: ['someday'] } }, 'healthCheck.weekdays.0', /./);
    // Per-job storage into an agent's repository: the repository agent writes the job's point (agent-link.md).
    await registerAgent(ctx, { name: 'store1', hostname: 'store1', agentVersion: 't', cores: 2, certFingerprint: null });
    await createRepository(ctx, { name: 'far', path: join(dir, 'far'), agent: 'store1' });
    const pj = await call('POST', '/jobs', { name: 'pjfar', vms: ['web1'], repository: 'far', storage: 'per-job' });
    expect(pj.statusCode, pj.body).toBe(201);
    const pv = (await call('POST', '/jobs', { name: 'pv', vms: ['web1'], repository: 'far' })).json<{ version: number }>();
    const moved = await call('PATCH', '/jobs/pv', { version: pv.version, storage: 'per-job' });
    expect(moved.statusCode, moved.body).toBe(200);

    // A method change that leaves a synthetic full without its method is refused too.
    const j = (await call('POST', '/jobs', { name: 'fwd', vms: ['web1'], repository: 'main', method: 'forward', syntheticFull: { weekdays: ['sat'] } })).json<{ version: number }>();
    const r = await call('PATCH', '/jobs/fwd', { version: j.version, method: 'reverse' });
    expect(r.statusCode).toBe(400);
    expect(r.json<{ error: { field: string } }>().error.field).toBe('syntheticFull');
  });

  it('the console parses and prints days', () => {
    expect(parseDays('--active-full')('sat')).toEqual({ weekdays: ['sat'] });
    expect(parseDays('--active-full')('Mon,thursday 1 last')).toEqual({ weekdays: ['mon', 'thu'], monthDays: [1, -1] });
    expect(parseDays('--active-full')('none')).toBeNull();
    expect(() => parseDays('--compact')('32')).toThrow(/--compact: "32" is not a weekday/);
    expect(daysText({ weekdays: ['sat'], monthDays: [1, -1] })).toBe('sat, day 1, last day of the month');
    expect(daysText(null)).toBe('never');
  });
});
