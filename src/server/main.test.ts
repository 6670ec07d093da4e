import { describe, expect, it } from 'vitest';
import { BulwarkError } from '../common/errors.js';
import { parseListen } from './main.js';

describe('parseListen', () => {
  it.each([
    ['127.0.0.1:9392', { host: '127.0.0.1', port: 9392 }],
    ['0.0.0.0:1', { host: '0.0.0.0', port: 1 }],
    ['[::1]:9392', { host: '::1', port: 9392 }],
    ['backup.example.com:443', { host: 'backup.example.com', port: 443 }],
    [':9000', { host: '127.0.0.1', port: 9000 }],
    ['9000', { host: '127.0.0.1', port: 9000 }],
  ])('%s', (text, want) => expect(parseListen(text)).toEqual(want));

  it.each(['localhost', '1.2.3.4:', '1.2.3.4:70000', '::1:9392', 'host:port'])('refuses %s naming --listen', (text) => {
    try {
      parseListen(text);
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(BulwarkError);
      expect((err as BulwarkError).kind).toBe('invalid');
      expect((err as BulwarkError).message).toContain('--listen');
    }
  });
});
