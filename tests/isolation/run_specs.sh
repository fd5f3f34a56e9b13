#!/usr/bin/env bash
# Runs the named isolation specs (not the schedule) against a private cluster started here and
# removed after: bash tests/isolation/run_specs.sh fedapply-gc-horizon fedapply-stateless-row
# (REVIEW12 reproductions, now also in tests/isolation/schedule).
# Results of a failing run are kept in tests/isolation/results.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
source "$here/scripts/cluster.sh"
[ $# -gt 0 ] || { echo "usage: $0 SPEC..." >&2; exit 2; }
work=$(mktemp -d /tmp/pg_sync_isolation.XXXXXX)
chmod 755 "$work"
port=$(free_port)
cleanup() { cluster_stop "$work/pg" immediate; rm -rf "$work"; }
trap cleanup EXIT
cluster_init "$work/pg" "$port" "pg_sync.node_id = 'isolation'" "fsync = off"
cluster_start "$work/pg"
isolation=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/isolation/pg_isolation_regress
mkdir -p "$work/out"
[ "$(id -u)" = 0 ] && chown -R postgres: "$work/out"
status=0
as_pg "$isolation" \
  --bindir="$PG_BIN" --inputdir="$here/tests/isolation" --outputdir="$work/out" \
  --host=127.0.0.1 --port="$port" --user=postgres --dbname=pg_sync_isolation "$@" || status=$?
if [ $status -ne 0 ]; then
  cat "$work/out/regression.diffs" 2>/dev/null || true
  rm -rf "$here/tests/isolation/results" && cp -r "$work/out/results" "$here/tests/isolation/results"
  echo "isolation: results kept in tests/isolation/results" >&2
fi
exit $status
