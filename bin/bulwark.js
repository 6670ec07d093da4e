#!/usr/bin/env node
// The `bulwark` program: runs the compiled console (npm run build makes dist/).
import { existsSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { dirname, join } from 'node:path';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const entry = join(root, 'dist', 'cli', 'main.js');
if (!existsSync(entry)) {
  process.stderr.write(`bulwark: ${entry} is missing: run 'npm run build' in ${root} first\n`);
  process.exit(1);
}
await import(pathToFileURL(entry).href);
