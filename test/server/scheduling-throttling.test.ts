// Network throttling rules through the real server and console: add, list, show, edit (with
// versions), remove; validation errors name the field; what the API stores is what limitFor sees.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inProcessConsole } from '../fixtures/console.js';
import { startServer, type RunningServer } from '../../src/server/main.js';
import { limitFor } from '../../src/server/resources/throttling-rules.js';
import { listThrottlingRules, policyRule } from '../../src/server/services/throttling.js';
import { call } from './http.js';

const tmp = mkdtempSync(join(tmpdir(), 'bulwark-throttling-'));
let server: RunningServer;

const bulwark = inProcessConsole(() => ({ env: { BULWARK_CONFIG: join(tmp, 'cli') }, prefix: ['--server', `unix:${server.socketPath}`] })).run;

beforeAll(async () => {
  server = await startServer({ dataDir: join(tmp, 'data'), listen: 'none', print: () => undefined, configBackupAt: false, simulate: true });
});
afterAll(async () => {
  await server?.close();
  rmSync(tmp, { recursive: true, force: true });
});

describe('bulwark throttling', () => {
  it('add, list, show, edit, remove; the stored rules drive limitFor', async () => {
    const add = await bulwark('throttling', 'add', '--source', '10.1.0.0/16', '--target', '10.2.0.0/16,10.3.0.5-10.3.0.9', '--mbps', '100', '--days', 'mon-fri', '--hours', '8:00-18:00');
    expect(add).toMatchObject({ code: 0, err: '' });
    expect(add.out).toContain('throttling rule rule-1 added: 10.1.0.0/16 <-> 10.2.0.0/16,10.3.0.5-10.3.0.9 at most 100 Mbit/s, mon,tue,wed,thu,fri 08:00-18:00');
    expect((await bulwark('throttling', 'add', '--name', 'wan', '--source', '10.1.0.0/16', '--target', '10.9.0.1', '--mbps', '40')).code).toBe(0);

    const list = await bulwark('throttling', 'list', '--json');
    const items = JSON.parse(list.out) as Array<{ name: string; mbps: number; schedule: unknown; version: number }>;
    expect(items.map((r) => [r.name, r.mbps])).toEqual([['rule-1', 100], ['wan', 40]]);
    expect(items[0]!.schedule).toEqual({ days: ['mon', 'tue', 'wed', 'thu', 'fri'], from: '08:00', to: '18:00' });
    expect((await bulwark('throttling', 'list')).out).toMatch(/wan\s+10\.1\.0\.0\/16\s+10\.9\.0\.1\s+40\s+always\s+yes/);

    const monday10 = new Date('2026-11-23T10:00:00Z');
    const rules = (await listThrottlingRules(server.context)).map(policyRule);
    expect(limitFor(rules, '10.2.0.7', '10.1.4.4', monday10, 'UTC')?.mbps).toBe(100);
    expect(limitFor(rules, '10.2.0.7', '10.1.4.4', new Date('2026-11-28T10:00:00Z'), 'UTC')).toBeUndefined();

    const edit = await bulwark('throttling', 'edit', 'rule-1', '--mbps', '25', '--always');
    expect(edit).toMatchObject({ code: 0, err: '' });
    expect(edit.out).toContain('changed (version 2)');
    const after = (await listThrottlingRules(server.context)).map(policyRule);
    expect(limitFor(after, '10.2.0.7', '10.1.4.4', new Date('2026-11-28T10:00:00Z'), 'UTC')?.mbps).toBe(25);

    // An edit against the version read before someone else's edit is refused.
    const stale = await bulwark('throttling', 'edit', 'rule-1', '--mbps', '30', '--expect-version', '1');
    expect(stale.code).toBe(1);
    expect(stale.err).toContain('changed by someone else since you read it');

    expect((await bulwark('throttling', 'edit', 'wan', '--disable')).code).toBe(0);
    expect((await bulwark('throttling', 'show', 'wan')).out).toMatch(/enabled:\s+no/);
    expect((await bulwark('throttling', 'remove', 'wan')).out).toBe('throttling rule wan removed\n');
    expect((await bulwark('throttling', 'show', 'wan')).code).toBe(1);
  });

  it('validation errors name the field, at the API and in the console', async () => {
    const sock = { socketPath: server.socketPath };
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ source: '10.0.0.0/40', target: '10.2.0.0/16', mbps: 10 }, 'source'],
      [{ source: '10.0.0.0/8', target: 'somewhere', mbps: 10 }, 'target'],
      [{ source: '10.0.0.0/8', target: '10.2.0.0/16', mbps: -1 }, 'mbps'],
      [{ source: '10.0.0.0/8', target: '10.2.0.0/16', mbps: 10, schedule: { days: ['mon'], from: '25:00', to: '06:00' } }, 'from'],
      [{ source: '10.0.0.0/8', target: '10.2.0.0/16', mbps: 10, schedule: { days: ['someday'], from: '01:00', to: '06:00' } }, 'schedule.days'],
    ];
    for (const [body, field] of cases) {
      const r = await call(sock, 'POST', '/api/v1/throttling-rules', body);
      expect(r.status, JSON.stringify(body)).toBe(400);
      expect(r.json<{ error: { field?: string } }>().error.field).toContain(field);
    }
    const cli = await bulwark('throttling', 'add', '--source', '10.0.0.300', '--target', '10.2.0.0/16', '--mbps', '10');
    expect(cli.code).toBe(2);
    expect(cli.err).toContain('source: "10.0.0.300" is not an IP address');
    expect((await bulwark('throttling', 'add', '--source', '10.0.0.1', '--target', '10.0.0.2', '--mbps', 'fast')).code).toBe(2);
  });
});
