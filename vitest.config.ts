// Test tiers: unit tests sit beside the code (milliseconds, no processes); integration and
// end-to-end tests live in test/ and use the real components (QEMU, NBD peers, databases).
import { defineConfig } from 'vitest/config';
import LongestFirstSequencer from './test/fixtures/sequencer.js';

export default defineConfig({
  test: {
    // Longest files first (test/fixtures/durations.json), so no long file starts last.
    sequence: { sequencer: LongestFirstSequencer },
    projects: [
      {
        test: {
          name: 'unit',
          include: ['src/**/*.test.ts'],
          testTimeout: 20_000,
          // Both cores (vitest's default is one worker fewer than the CPUs: one, here).
          maxWorkers: 2,
          // Unit tests run first, on their own; the integration tier runs after them.
          sequence: { groupOrder: 0 },
        },
      },
      {
        test: {
          name: 'integration',
          include: ['test/**/*.test.ts'],
          testTimeout: 180_000,
          hookTimeout: 300_000,
          pool: 'forks',
          maxWorkers: 2,
          sequence: { groupOrder: 1 },
          globalSetup: ['test/global-setup.ts'],
        },
      },
    ],
  },
});
