#!/usr/bin/env bash
# Builds the demo page's script (sync_worker/static/demo.js, served at /demo.js) from
# clients/js/demo/demo.mjs: the package, TanStack DB and offline-transactions in one ES module.
# The output is committed (the worker embeds it); sync_worker/tests/browser.rs checks it is
# current. Needs clients/js/node_modules (`make deps`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/sync_worker/static/demo.js}
cd "$here/clients/js"
node_modules/.bin/tsup --silent
node_modules/.bin/esbuild demo/demo.mjs --bundle --minify --format=esm --target=es2022 \
  --legal-comments=none --log-level=warning --outfile="$out"
