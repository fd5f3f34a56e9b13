# Shared by the benchmark scripts (source it after setting `here`): a private cluster with a
# `bench` database, and the release worker beside it. Cleans up on exit.
source "$here/scripts/cluster.sh"
worker="$here/target/release/sync_worker"

psql_b() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
bench_url() { echo "host=127.0.0.1 port=$port user=postgres dbname=bench"; }

bench_cleanup() {
  # Every step runs, whatever failed before: the scripts run under `set -e`, which holds in
  # this trap too, and a kill of a process that already exited (a helper waited for, a worker
  # or pg_recvlogical that died) fails; under errexit that ended the trap before the cluster
  # was stopped, leaving Postgres running.
  set +e
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

# bench_items ROWS: the extension and the `items` table the initial-sync benches read, ROWS rows
# in group g1, with u1 its member.
bench_items() {
  psql_b -d bench <<SQL
CREATE EXTENSION pg_sync;
CREATE TABLE items (id bigint PRIMARY KEY, grp text NOT NULL, title text NOT NULL,
                    done boolean NOT NULL, n integer, updated_at timestamptz NOT NULL);
INSERT INTO items SELECT g, 'g1', 'item number ' || g, g % 3 = 0, g % 1000, now() FROM generate_series(1, $1) g;
SELECT pg_sync.register_table('items', group_column => 'grp');
SELECT pg_sync.add_member('u1', 'g1');
VACUUM ANALYZE items;
SQL
}

# bench_token USER: a JWT for USER, valid an hour, signed with the workers' secret `bench`.
bench_token() {
  python3 - "$1" <<'PY'
import base64, hashlib, hmac, json, sys, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
head = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b(json.dumps({"sub": sys.argv[1], "exp": int(time.time()) + 3600}).encode())
sig = b(hmac.new(b"bench", f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
PY
}
