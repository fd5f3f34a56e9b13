# Shared by the benchmark scripts (source it after setting `here`): a private cluster with a
# `bench` database, and the release worker beside it. Cleans up on exit.
source "$here/scripts/cluster.sh"
worker="$here/target/release/sync_worker"

psql_b() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
bench_url() { echo "host=127.0.0.1 port=$port user=postgres dbname=bench"; }

bench_cleanup() {
  [ -f "$work/worker.pid" ] && kill "$(cat "$work/worker.pid")" 2>/dev/null
  # Helpers a script started (load generators, pgbench, pg_recvlogical), by their pid.
  local pid
  for pid in "${load_pid:-}" "${pg_pid:-}" "${recv_pid:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
  done
  cluster_stop "$work/pg" immediate
  rm -rf "$work"
}

# bench_cluster NAME [postgresql.conf lines...]: sets work, port, wport.
bench_cluster() {
  work=$(mktemp -d "/tmp/pg_sync_$1.XXXXXX"); shift
  chmod 755 "$work"
  port=$(free_port)
  wport=$(free_port)
  trap bench_cleanup EXIT
  cluster_init "$work/pg" "$port" "$@"
  cluster_start "$work/pg"
  psql_b -d postgres -c "CREATE DATABASE bench"
}

# start_worker [VAR=value...]: the worker on $wport (JWT secret `bench`); sets wpid.
start_worker() {
  env DATABASE_URL="$(bench_url)" SYNC_LISTEN="127.0.0.1:$wport" SYNC_JWT_SECRET=bench RUST_LOG=warn "$@" \
    "$worker" >"$work/worker.log" 2>&1 &
  wpid=$!
  echo $wpid >"$work/worker.pid"
}

wait_healthy() { until curl -fsS "http://127.0.0.1:$wport/healthz" >/dev/null 2>&1; do sleep 0.1; done; }

# bench_events: the extension and the `events` table the delivery benches write (a group and the
# writer's clock, unix ms, per row), registered with `grp` as its group column.
bench_events() {
  psql_b -d bench <<SQL
CREATE EXTENSION pg_sync;
CREATE TABLE events (id bigserial PRIMARY KEY, grp text NOT NULL, ts float8 NOT NULL);
SELECT pg_sync.register_table('events', group_column => 'grp');
SQL
}

# bench_write_tables NAME [postgresql.conf lines...]: bench_cluster NAME with pg_sync.node_id
# 'bench' and the given settings, then bench/write_overhead.sh's tables (t_plain, t_plpgsql with
# the hand-written audit trigger, t_synced) in the `postgres` database, which psql_w reaches.
psql_w() { psql_b -d postgres "$@"; }
bench_write_tables() {
  local name=$1; shift
  bench_cluster "$name" "pg_sync.node_id = 'bench'" "$@"
  sed -n '/^CREATE EXTENSION pg_sync;/,/^VACUUM ANALYZE;/p' "$here/bench/write_overhead.sh" | psql_w >/dev/null
}
