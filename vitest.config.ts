// Test tiers: unit tests sit beside the code (milliseconds, no processes); integration and
// end-to-end tests live in test/ and use the real components (QEMU, NBD peers, databases).
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: 'unit',
          include: ['src/**/*.test.ts'],
          testTimeout: 20_000,
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
          globalSetup: ['test/global-setup.ts'],
        },
      },
    ],
  },
});
