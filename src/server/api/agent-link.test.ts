import { describe, expect, it } from 'vitest';
import { createEnrollmentToken, effectiveAgentState, InMemoryAgentLinkStore, parseEnrollmentToken } from './agent-link.js';

const pki = { caFingerprint: Array.from({ length: 32 }, (_, i) => i.toString(16).padStart(2, '0').toUpperCase()).join(':') };

describe('enrollment tokens', () => {
  it('carry the id, the secret and the CA fingerprint; the store keeps only a hash', async () => {
    const store = new InMemoryAgentLinkStore();
    const now = new Date('2026-03-02T10:00:00Z');
    const created = await createEnrollmentToken(store, pki, { name: 'kvm-07', now, ttlSeconds: 3600 });
    expect(created.token).toMatch(/^bwe1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}\.[0-9a-f]{64}$/);
    expect(created.expiresAt.toISOString()).toBe('2026-03-02T11:00:00.000Z');
    const parsed = parseEnrollmentToken(created.token);
    expect(parsed.id).toBe(created.id);
    expect(parsed.caFingerprint).toBe(pki.caFingerprint);
    const rec = store.tokens.get(created.id)!;
    expect(rec.agentName).toBe('kvm-07');
    expect(rec.tokenHash).toMatch(/^[0-9a-f]{64}$/);
    expect(JSON.stringify(rec)).not.toContain(parsed.secret);
    expect(await store.markEnrollmentTokenUsed(created.id, now)).toBe(true);
    expect(await store.markEnrollmentTokenUsed(created.id, now)).toBe(false);
  });

  it('refuse malformed text and bad names', async () => {
    expect(() => parseEnrollmentToken('bwe1.nothex.x.y')).toThrow(/malformed/);
    await expect(createEnrollmentToken(new InMemoryAgentLinkStore(), pki, { name: 'no spaces' })).rejects.toThrow(/agent name "no spaces" is not valid/);
    await expect(createEnrollmentToken(new InMemoryAgentLinkStore(), pki, { ttlSeconds: 0 })).rejects.toThrow(/not positive/);
  });
});

describe('effectiveAgentState', () => {
  const now = new Date('2026-03-02T10:00:00Z');
  const ago = (s: number) => new Date(now.getTime() - s * 1000);
  it.each([
    ['online', ago(30), 'online'],
    ['online', ago(90), 'online'],
    ['online', ago(91), 'offline'],
    ['online', null, 'offline'],
    ['revoked', ago(1), 'revoked'],
    ['pending', null, 'pending'],
  ] as const)('%s, last seen %s -> %s', (stored, seen, expected) => {
    expect(effectiveAgentState(stored, seen, now, 30)).toBe(expected);
  });
});
