#!/usr/bin/env node
// The `bulwark` program: runs the compiled console (npm run build makes dist/).
//
// CommonJS on purpose (bin/package.json): a CommonJS entry is loaded with synchronous reads, so
// libuv's thread pool does not exist yet when the first line below runs and its size can still be
// set. The default of 4 threads is too few for the server: every file call on a file-level
// restore mount holds one thread while this same process serves the mount's NBD reads.
'use strict';
process.env.UV_THREADPOOL_SIZE ??= '16';
const { existsSync } = require('node:fs');
const { join } = require('node:path');
const { pathToFileURL } = require('node:url');

const root = join(__dirname, '..');
const entry = join(root, 'dist', 'cli', 'main.js');
if (!existsSync(entry)) {
  process.stderr.write(`bulwark: ${entry} is missing: run 'npm run build' in ${root} first\n`);
  process.exit(1);
}
import(pathToFileURL(entry).href).catch((err) => {
  process.stderr.write(`bulwark: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(1);
});
