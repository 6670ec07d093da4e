import { describe, expect, it } from 'vitest';
import { SseParser } from './sse.js';

describe('SseParser', () => {
  it('parses named events with multi-line data, across chunk boundaries', () => {
    const p = new SseParser();
    const text = 'event: session\ndata: {"a":\ndata: 1}\nid: 7\n\n: keep-alive\n\ndata: plain\n\n';
    const events = [];
    for (let i = 0; i < text.length; i += 3) events.push(...p.push(text.slice(i, i + 3)));
    expect(events).toEqual([
      { event: 'session', data: '{"a":\n1}', id: '7' },
      { event: 'message', data: 'plain', id: '7' },
    ]);
  });

  it('accepts CRLF and CR line ends, and a CRLF split between chunks', () => {
    const p = new SseParser();
    expect(p.push('event: x\r')).toEqual([]);
    expect(p.push('\ndata:y\r\n\r')).toEqual([]);
    expect(p.push('\n')).toEqual([{ event: 'x', data: 'y' }]);
    expect(p.push('data: z\r\r')).toEqual([]); // the last CR may be half of a CRLF
    expect(p.push('data: w')).toEqual([{ event: 'message', data: 'z' }]);
  });

  it('drops an event without data and resets the event name', () => {
    const p = new SseParser();
    expect(p.push('event: lonely\n\ndata: d\n\n')).toEqual([{ event: 'message', data: 'd' }]);
  });
});
