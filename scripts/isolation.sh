#!/usr/bin/env bash
# pg_isolation_regress (concurrent-transaction specs under tests/isolation), installcheck style,
# against a private cluster started here and removed after, also on failure. With spec names
# as arguments (bash scripts/isolation.sh fedapply-gc-horizon ...) it runs those instead of the
# schedule.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"

work=$(mktemp -d /tmp/pg_sync_isolation.XXXXXX)
chmod 755 "$work"
port=$(free_port)
cleanup() { cluster_stop "$work/pg" immediate; rm -rf "$work"; }
trap cleanup EXIT

cluster_init "$work/pg" "$port" "pg_sync.node_id = 'isolation'" "fsync = off"
cluster_start "$work/pg"

isolation=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/isolation/pg_isolation_regress
if [ ! -x "$isolation" ]; then
  echo "isolation: $isolation is missing (Debian: postgresql-server-dev-15 / postgresql-15)" >&2
  exit 1
fi
specs=("--schedule=$here/tests/isolation/schedule")
[ $# -gt 0 ] && specs=("$@")
mkdir -p "$work/out"
[ "$(id -u)" = 0 ] && chown -R postgres: "$work/out"
status=0
as_pg "$isolation" \
  --bindir="$PG_BIN" --inputdir="$here/tests/isolation" --outputdir="$work/out" \
  --host=127.0.0.1 --port="$port" --user=postgres --dbname=pg_sync_isolation \
  "${specs[@]}" || status=$?
if [ $status -ne 0 ]; then
  cat "$work/out/regression.diffs" 2>/dev/null || true
  rm -rf "$here/tests/isolation/results" && cp -r "$work/out/results" "$here/tests/isolation/results"
  echo "isolation: results kept in tests/isolation/results" >&2
  exit $status
fi
