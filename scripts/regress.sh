#!/usr/bin/env bash
# pg_regress, installcheck style, against a private cluster started here and removed after.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"

work=$(mktemp -d /tmp/pg_sync_regress.XXXXXX)
chmod 755 "$work"
port=$(free_port)
cleanup() { cluster_stop "$work/pg" immediate; rm -rf "$work"; }
trap cleanup EXIT

cluster_init "$work/pg" "$port" "pg_sync.node_id = 'regress'" "fsync = off"
cluster_start "$work/pg"

regress=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/regress/pg_regress
mkdir -p "$work/out"
[ "$(id -u)" = 0 ] && chown -R postgres: "$work/out"
status=0
as_pg "$regress" \
  --bindir="$PG_BIN" --inputdir="$here/tests/regress" --outputdir="$work/out" \
  --host=127.0.0.1 --port="$port" --user=postgres --dbname=pg_sync_regress \
  --schedule="$here/tests/regress/schedule" || status=$?
if [ $status -ne 0 ]; then
  cat "$work/out/regression.diffs" 2>/dev/null || true
  rm -rf "$here/tests/regress/results" && cp -r "$work/out/results" "$here/tests/regress/results"
  echo "regress: results kept in tests/regress/results" >&2
  exit $status
fi
