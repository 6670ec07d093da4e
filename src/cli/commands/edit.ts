// Edits with optimistic concurrency: every PATCH carries the version the client read. By
// default the console reads it just before the edit; `--expect-version N` sends the version the
// user saw earlier (e.g. in `show --json`), so an edit made meanwhile by someone else is refused
// with "changed by someone else since you read it: reload".
import type { ApiClient } from '../client.js';

export async function editWithVersion<T>(
  client: ApiClient,
  path: string,
  patch: Record<string, unknown>,
  expectVersion: number | undefined,
): Promise<T> {
  const version = expectVersion ?? (await client.get<{ version: number }>(path)).version;
  return client.patch<T>(path, { ...patch, version });
}
