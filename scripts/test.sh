#!/usr/bin/env bash
# Installs what the tests need (idempotently) and runs the whole suite: typecheck, lint, build,
# unit, integration and end-to-end tiers. Prints one closing line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
npm run --silent typecheck
npm run --silent lint
npm run --silent build
mkdir -p .cache
rc=0
# test-timings.json: where the time went (files, tests, beforeAll hooks); see test/fixtures/timing-reporter.ts.
npx vitest run --reporter=default --reporter=json --outputFile.json=.cache/vitest-report.json --reporter=./test/fixtures/timing-reporter.ts "$@" || rc=$?
node -e '
  const r = JSON.parse(require("fs").readFileSync(".cache/vitest-report.json", "utf8"));
  const skipped = (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0);
  console.log(`tests: ${r.numPassedTests} passed, ${r.numFailedTests} failed, ${skipped} skipped`);
' || true
exit "$rc"
