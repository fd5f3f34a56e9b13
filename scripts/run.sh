#!/usr/bin/env bash
# `make run`: a project-local Postgres 15 cluster in ./.run with pg_sync preloaded, logical WAL,
# the extension installed and the demo schema registered. `make stop` stops it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
dir="$here/.run"
port=${PG_SYNC_PORT:-54329}

worker_port=${SYNC_PORT:-8787}
secret=${SYNC_JWT_SECRET:-pg-sync-demo-secret}

stop_worker() {
  if [ -f "$dir/worker.pid" ]; then
    kill "$(cat "$dir/worker.pid")" 2>/dev/null || true
    rm -f "$dir/worker.pid"
  fi
}

if [ "${1:-}" = stop ]; then
  stop_worker
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
# A fresh demo database each time, so it always matches the extension just installed.
stop_worker
psql_run -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'pg_sync_demo'" >/dev/null
psql_run -d postgres -c "DROP DATABASE IF EXISTS pg_sync_demo WITH (FORCE)" -c "CREATE DATABASE pg_sync_demo"
psql_run -d pg_sync_demo -c "CREATE EXTENSION pg_sync" -f "$here/sql/demo.sql" >/dev/null

DATABASE_URL="host=127.0.0.1 port=$port user=postgres dbname=pg_sync_demo" \
SYNC_LISTEN="127.0.0.1:$worker_port" SYNC_JWT_SECRET="$secret" \
  nohup "$here/target/release/sync_worker" >"$dir/worker.log" 2>&1 &
echo $! >"$dir/worker.pid"
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$worker_port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$worker_port/healthz" >/dev/null || { echo "worker did not become healthy; see $dir/worker.log" >&2; exit 1; }

token=$(python3 - "$secret" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "demo-user", "exp": int(time.time()) + 86400}).encode())
sig = b64(hmac.new(sys.argv[1].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
PY
)
cat <<MSG
pg_sync is running:
  Postgres 15 on 127.0.0.1:$port, database pg_sync_demo, node id 'local':
    psql -h 127.0.0.1 -p $port -U postgres pg_sync_demo
  sync_worker on 127.0.0.1:$worker_port (log: .run/worker.log), health: curl http://127.0.0.1:$worker_port/healthz
A WebSocket token for demo-user (member of project 'demo'), valid 24 h:
  $token
Open the demo page (two tabs show each other's changes):
  http://127.0.0.1:$worker_port/demo?token=$token
Or connect to ws://127.0.0.1:$worker_port/sync/ws?token=<token>, send {"type":"subscribe","after":0}; then in psql:
  UPDATE tasks SET done = true WHERE title = 'Try pg_sync';
  SELECT id, model, action, data, group_id FROM pg_sync.sync_actions ORDER BY id DESC LIMIT 5;
Stop everything with: make stop
MSG
