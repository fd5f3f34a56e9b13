#!/usr/bin/env bash
# Installs what building and testing pg_sync needs, idempotently: Debian packages (when root),
# the pinned cargo-pgrx, `cargo pgrx init` pointed at the system Postgres 15, cargo-nextest when
# missing, and the browser tests' npm packages (tests/browser and tests/shape, from their lock
# files).
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PGRX_VERSION=0.18.1
NEXTEST_VERSION=0.9.143
# chromium: the browser test of the demo page (tests/browser).
PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 libclang-dev clang sudo curl chromium locales)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "deps: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "deps: missing Debian packages: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# A locale whose money format differs from C's (comma decimal, euro sign): the settings matrix
# of tests/regress/sql/identity.sql writes keys under lc_monetary = de_DE.UTF-8.
if ! locale -a 2>/dev/null | grep -qix 'de_DE.utf8'; then
  if [ "$(id -u)" = 0 ]; then
    echo "deps: localedef de_DE.UTF-8"
    localedef -i de_DE -f UTF-8 de_DE.UTF-8
  else
    echo "deps: missing locale de_DE.UTF-8 (sudo localedef -i de_DE -f UTF-8 de_DE.UTF-8)" >&2
    exit 1
  fi
fi

# cargo-pgrx only drives builds (the extension's own profile is unaffected), so it is built
# without optimization: half the time of a release build on a fresh machine (2 min against 4).
if ! cargo pgrx --version 2>/dev/null | grep -q " ${PGRX_VERSION}\$"; then
  echo "deps: installing cargo-pgrx ${PGRX_VERSION}"
  CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_LTO=false \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 \
    cargo install cargo-pgrx --version "${PGRX_VERSION}" --locked
fi

# The integration tests run in cargo-nextest (`make integration`, .config/nextest.toml, which
# needs 0.9.91 or newer); a machine without one gets this pinned version, built as above.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "deps: installing cargo-nextest ${NEXTEST_VERSION}"
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 \
    cargo install cargo-nextest --version "${NEXTEST_VERSION}" --locked
fi

if ! grep -qs "^pg15 = \"${PG_CONFIG}\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  echo "deps: cargo pgrx init --pg15 ${PG_CONFIG}"
  cargo pgrx init --pg15 "${PG_CONFIG}"
fi

# The browser test drives Debian's chromium with playwright-core, which needs Node.js 20+.
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "deps: the browser test needs Node.js 20 or newer (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi
here=$(cd "$(dirname "$0")/.." && pwd)
# npm packages from their lock files, again only when a lock file changed: the browser test's
# (tests/browser: playwright-core), the Shape API test's (tests/shape: the real
# @electric-sql/client) and the TypeScript client package's (clients/js, whose Node tests
# sync_worker/tests/jsclient.rs runs).
for dir in tests/browser tests/shape clients/js; do
  lock="$here/$dir/package-lock.json"
  stamp="$here/$dir/node_modules/.installed-from"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$(sha256sum <"$lock")" ]; then
    echo "deps: npm ci in $dir"
    (cd "$here/$dir" && npm ci --no-audit --no-fund --loglevel=error)
    sha256sum <"$lock" >"$stamp"
  fi
done
