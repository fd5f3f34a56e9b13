#!/usr/bin/env bash
# `make run`: a project-local Postgres 15 cluster in ./.run with pg_sync preloaded, logical WAL,
# the extension installed and the demo schema registered. `make stop` stops it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
dir="$here/.run"
port=${PG_SYNC_PORT:-54329}

if [ "${1:-}" = stop ]; then
  cluster_stop "$dir/pg"
  echo "stopped"
  exit 0
fi

if [ ! -d "$dir/pg/data" ]; then
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chmod 755 "$dir"
  cluster_init "$dir/pg" "$port" "pg_sync.node_id = 'local'"
fi
as_pg "$PG_BIN/pg_ctl" -D "$dir/pg/data" status >/dev/null 2>&1 || cluster_start "$dir/pg"

psql_run() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
psql_run -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'pg_sync_demo'" | grep -q 1 \
  || psql_run -d postgres -c "CREATE DATABASE pg_sync_demo"
psql_run -d pg_sync_demo -c "CREATE EXTENSION IF NOT EXISTS pg_sync" -f "$here/sql/demo.sql" >/dev/null

cat <<MSG
pg_sync is running: Postgres 15 on 127.0.0.1:$port, database pg_sync_demo, node id 'local'.
  psql -h 127.0.0.1 -p $port -U postgres pg_sync_demo
Try:
  UPDATE tasks SET done = true WHERE title = 'Try pg_sync';
  SELECT id, model, action, data, group_id FROM pg_sync.sync_actions ORDER BY id DESC LIMIT 5;
Stop it with: make stop
MSG
