// The agent link's events body is the wire boundary: each event type's fields are checked before the
// broker sees them (docs/formats/agent-link.md, "Tasks").
import { Value } from '@sinclair/typebox/value';
import { describe, expect, it } from 'vitest';
import { EventsBody } from './routes.js';

const busy = { source: 1, proxy: 2, network: 3, target: 4, throttling: 0 };

describe('EventsBody', () => {
  it.each([
    ['progress', { type: 'progress', progress: { bytesRead: 1 }, stageTimes: busy }],
    ['log', { type: 'log', level: 'warning', message: 'disk vdb: slow', disk: 'vdb' }],
    ['ready (per VM)', { type: 'ready', port: 4000, host: '10.0.0.2', previous: null }],
    ['ready (per job)', { type: 'ready', port: 4000, previous: null, vms: { a: null, b: { chainId: 'c' } }, blockSize: 1 << 20 }],
    ['result ok', { type: 'result', ok: true, value: { disks: [] }, stageTimes: busy }],
    ['result ok without a value', { type: 'result', ok: true }],
    ['result failed', { type: 'result', ok: false, error: { kind: 'unavailable', message: 'VM a is off', hint: 'start it' } }],
    ['a newer agent\'s extra field', { type: 'log', level: 'info', message: 'm', extra: 1 }],
  ])('accepts %s', (_name, event) => {
    expect(Value.Check(EventsBody, { events: [event] })).toBe(true);
  });

  it.each([
    ['an unknown type', { type: 'done' }],
    ['progress without its counters', { type: 'progress' }],
    ['a log line without a message', { type: 'log', level: 'info' }],
    ['a log line of an unknown level', { type: 'log', level: 'debug', message: 'm' }],
    ['ready without a port', { type: 'ready', previous: null }],
    ['ready with a port out of range', { type: 'ready', port: 70000, previous: null }],
    ['ready without previous', { type: 'ready', port: 1 }],
    ['a failed result without its error', { type: 'result', ok: false }],
    ['a failed result whose error has no message', { type: 'result', ok: false, error: { kind: 'internal' } }],
    ['stage times that are not numbers', { type: 'progress', progress: {}, stageTimes: { source: 'x' } }],
  ])('refuses %s', (_name, event) => {
    expect(Value.Check(EventsBody, { events: [event] })).toBe(false);
  });

  it('refuses more than 1000 events in one post and fields beside events', () => {
    const log = { type: 'log', level: 'info', message: 'm' };
    expect(Value.Check(EventsBody, { events: Array.from({ length: 1000 }, () => log) })).toBe(true);
    expect(Value.Check(EventsBody, { events: Array.from({ length: 1001 }, () => log) })).toBe(false);
    expect(Value.Check(EventsBody, { events: [], other: 1 })).toBe(false);
  });
});
