// Integration-tier global setup: shared fixtures that are expensive to make (a PostgreSQL
// cluster, the test guest) are started once per run here and handed to tests with `provide`.
import type { TestProject } from 'vitest/node';
import { stopTestLibvirtd } from './fixtures/libvirt.js';
import { startPostgres } from './fixtures/postgres.js';

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const teardowns: Array<() => Promise<void>> = [];
  { const pg = await startPostgres(); teardowns.push(() => pg.stop()); project.provide('postgresUrl', pg.url); }
  // libvirtd, when a test file started it (test/fixtures/libvirt.ts): stopped once all files are done.
  teardowns.push(stopTestLibvirtd);
  return async () => {
    for (const t of teardowns.reverse()) await t();
  };
}
