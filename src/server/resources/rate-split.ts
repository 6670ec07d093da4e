// A repository's rate limit is shared equally by the tasks using it at that moment: with a
// 400 MB/s repository and 4 tasks each gets 100 MB/s; when one ends the other 3 get 133 MB/s.

export interface RateUser {
  readonly taskId: string;
  readonly repository: string;
}

/** Each task's share (bytes/s) of its repository's limit; undefined where the repository has none. */
export function splitRepositoryRates(
  users: readonly RateUser[],
  limits: ReadonlyMap<string, number | undefined>,
): Map<string, number | undefined> {
  const counts = new Map<string, number>();
  for (const u of users) counts.set(u.repository, (counts.get(u.repository) ?? 0) + 1);
  const shares = new Map<string, number | undefined>();
  for (const u of users) {
    const limit = limits.get(u.repository);
    shares.set(u.taskId, limit === undefined || !(limit > 0) ? undefined : limit / counts.get(u.repository)!);
  }
  return shares;
}
