// Integration-tier global setup: shared fixtures that are expensive to make (a PostgreSQL
// cluster, the test guest) are started once per run here and handed to tests with `provide`.
import type { TestProject } from 'vitest/node';

export default async function setup(_project: TestProject): Promise<() => Promise<void>> {
  const teardowns: Array<() => Promise<void>> = [];
  return async () => {
    for (const t of teardowns.reverse()) await t();
  };
}
