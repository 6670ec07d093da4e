#!/usr/bin/env bash
# The one-host install: installs what Bulwark needs (Debian packages, npm modules), builds it,
# and starts the backup server with its local agent in the foreground (Ctrl-C stops it).
#   scripts/install.sh [bulwark server options: --data DIR --listen ADDR --db URL]
# With systemd present, `scripts/install.sh --service` installs and starts the unit instead.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/setup.sh
npm run --silent build

# `bulwark` on the PATH for the console.
if [ -w /usr/local/bin ]; then
  ln -sf "$root/bin/bulwark.js" /usr/local/bin/bulwark
fi

if [ "${1:-}" = "--service" ]; then
  shift
  if ! command -v systemctl >/dev/null || [ ! -d /run/systemd/system ]; then
    echo "install: --service needs systemd, which is not running on this host; run without --service" >&2
    exit 1
  fi
  sed "s#@ROOT@#$root#g" packaging/bulwark-server.service > /etc/systemd/system/bulwark-server.service
  systemctl daemon-reload
  systemctl enable --now bulwark-server.service
  echo "install: bulwark-server.service started; 'bulwark job list' talks to it"
  exit 0
fi

exec node "$root/bin/bulwark.js" server "$@"
