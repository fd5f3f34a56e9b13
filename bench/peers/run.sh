#!/usr/bin/env bash
# `make bench-peers`: pg_sync side by side with Zero (@rocicorp/zero, pinned in package.json and
# package-lock.json beside this script) on one private Postgres cluster, one run for both.
#
# Both systems stay up for the whole run, each serving its own copy of the same table
# (`events` registered with pg_sync; `events_zero`, plain, in Zero's publication `zero_pub`),
# so that only the system under test has work while it is measured. Per round (PEERS_RUNS,
# default 3; the system measured first alternates between rounds):
#   - write-to-client latency p50/p99 at 100 and 1,000 single-row writes/s (pgbench -R), to 1
#     and to 100 connected clients, PEERS_SECONDS (10) of writes, then up to PEERS_DRAIN (30) s
#     for the last rows to arrive; a row still missing then counts as missing, ranked above
#     every delivered one (a percentile among them is printed as "-");
#   - catch-up: 100k rows in 1,000-row transactions, last commit to client has all;
#   - the writer's own time for those 100k rows: plain table vs pg_sync's capture (a third copy,
#     `events_plain`, in no publication, so the writer alone is timed);
#   - memory: RSS of zero-cache (all its processes) vs sync_worker with 1 and 100 clients.
# Prints a markdown report and appends it to bench/RESULTS.md. See bench/peers/README.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
peers="$here/bench/peers"
source "$here/scripts/cluster.sh"
runs=${PEERS_RUNS:-3}
secs=${PEERS_SECONDS:-10}
drain=${PEERS_DRAIN:-30}
rows=${PEERS_CATCHUP_ROWS:-100000}
txn_rows=1000
zero_version=0.22.2025071101

# --- install (idempotent): Zero from the lockfile, the release worker and load generator.
node_major=$(node --version | sed 's/^v\([0-9]*\).*/\1/')
[ "$node_major" = 20 ] || echo "warning: Zero $zero_version is the last release for Node 20; this is $(node --version)" >&2
zero_pkg="$peers/node_modules/@rocicorp/zero/package.json"
sqlite_addon="$peers/node_modules/@rocicorp/zero-sqlite3/build/Release/better_sqlite3.node"
if ! grep -q "\"version\": \"$zero_version\"" "$zero_pkg" 2>/dev/null || [ ! -f "$sqlite_addon" ]; then
  echo "installing @rocicorp/zero $zero_version (npm ci; its SQLite addon compiles from source, ~5 min)" >&2
  (cd "$peers" && npm ci --no-audit --no-fund)
fi
if [ -z "${BENCH_WORKER:-}" ]; then
  cargo build --release -q -p sync_worker -p pg_sync_bench
fi
worker=${BENCH_WORKER:-$here/target/release/sync_worker}
load="$here/target/release/peers_load"
zero_bin="$peers/node_modules/@rocicorp/zero/out/zero/src"

# --- cluster, tables, publications.
work=$(mktemp -d /tmp/pg_sync_peers.XXXXXX)
logs=${PEERS_LOGS:-/tmp/pg_sync_peers.logs} # the last run's logs are kept here
rm -rf "$logs"
chmod 755 "$work"
port=$(free_port)
wport=$(free_port)
while :; do # zero-cache listens on ZERO_PORT and ZERO_PORT + 1 (its change streamer)
  zport=$(free_port)
  python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', $zport + 1))" 2>/dev/null && break
done
cleanup() {
  set +e # a process already gone must not stop the rest of the cleanup
  mkdir -p "$logs"
  cp "$work/worker.log" "$work/zero/zero-cache.log" "$work/zero/deploy.log" "$work"/*.err "$logs/" 2>/dev/null
  [ -n "${load_pid:-}" ] && kill "$load_pid" 2>/dev/null
  [ -n "${wpid:-}" ] && kill "$wpid" 2>/dev/null
  # zero-cache and every process it started (found through their parents, before any exits).
  if [ -n "${zpid:-}" ]; then
    local zp
    zp=$(zero_pids)
    kill -TERM $zp 2>/dev/null
    for _ in $(seq 50); do kill -0 $zp 2>/dev/null || break; sleep 0.1; done
    kill -KILL $zp 2>/dev/null
  fi
  cluster_stop "$work/pg" immediate
  rm -rf "$work"
}
trap cleanup EXIT
cluster_init "$work/pg" "$port" "shared_buffers = '512MB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'" \
  "max_replication_slots = 20" "max_wal_senders = 20"
cluster_start "$work/pg"
psql_b() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
psql_b -d postgres -c "CREATE DATABASE bench"
psql_b -d bench <<'SQL'
CREATE EXTENSION pg_sync;
CREATE TABLE events (id bigserial PRIMARY KEY, grp text NOT NULL, ts float8 NOT NULL);
CREATE TABLE events_zero (LIKE events INCLUDING ALL);
CREATE TABLE events_plain (LIKE events INCLUDING ALL);
CREATE SEQUENCE events_zero_id_seq OWNED BY events_zero.id;
ALTER TABLE events_zero ALTER id SET DEFAULT nextval('events_zero_id_seq');
CREATE SEQUENCE events_plain_id_seq OWNED BY events_plain.id;
ALTER TABLE events_plain ALTER id SET DEFAULT nextval('events_plain_id_seq');
SELECT pg_sync.register_table('events', group_column => 'grp');
INSERT INTO pg_sync.group_memberships (user_id, group_id) SELECT 'u' || i, 'g0' FROM generate_series(0, 99) i;
CREATE PUBLICATION zero_pub FOR TABLE events_zero;
SQL
upstream="postgresql://postgres@127.0.0.1:$port/bench"

# --- pg_sync's worker.
DATABASE_URL="host=127.0.0.1 port=$port user=postgres dbname=bench" SYNC_LISTEN="127.0.0.1:$wport" \
  SYNC_JWT_SECRET=bench RUST_LOG=warn "$worker" >"$work/worker.log" 2>&1 &
wpid=$!
until curl -fsS "http://127.0.0.1:$wport/healthz" >/dev/null 2>&1; do sleep 0.1; done

# --- Zero: permissions (read: anyone), then zero-cache, forced onto loopback (loopback.cjs).
mkdir -p "$work/zero"
(cd "$work/zero" && node "$zero_bin/deploy-permissions.js" --schema-path "$peers/schema.js" \
  --upstream-db "$upstream" >"$work/zero/deploy.log" 2>&1) || { cat "$work/zero/deploy.log"; exit 1; }
zero_env=(NODE_ENV=production NODE_OPTIONS="--require $peers/loopback.cjs" DO_NOT_TRACK=1
  ZERO_UPSTREAM_DB="$upstream" ZERO_CVR_DB="$upstream" ZERO_CHANGE_DB="$upstream"
  ZERO_REPLICA_FILE="$work/zero/replica.db" ZERO_PORT="$zport" ZERO_APP_PUBLICATIONS=zero_pub
  ZERO_ADMIN_PASSWORD=bench ZERO_LOG_LEVEL=warn)
(cd "$work/zero" && exec setsid env "${zero_env[@]}" node "$zero_bin/cli.js" >"$work/zero/zero-cache.log" 2>&1) &
zpid=$! # setsid did not fork (a background subshell leads no group), so this is node's pid
for _ in $(seq 600); do curl -fsS "http://127.0.0.1:$zport/" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "http://127.0.0.1:$zport/" >/dev/null || { cat "$work/zero/zero-cache.log"; exit 1; }

# Every process of zero-cache: its process and all descendants (its workers start sessions of
# their own, so neither the session nor the process group finds them).
zero_pids() {
  ps -e -o pid=,ppid= | awk -v root="$zpid" '
    { parent[$1] = $2 }
    END { for (p in parent) { q = p; while (q != "" && q > 1) { if (q == root) { print p; break } q = parent[q] } } }'
}
rss_mib() { # PIDS... -> summed RSS in MiB
  local kb=0 p r
  for p in "$@"; do r=$(ps -o rss= -p "$p" 2>/dev/null || true); kb=$((kb + ${r:-0})); done
  awk -v kb="$kb" 'BEGIN { printf "%.1f", kb / 1024 }'
}
# Nothing of either system may listen beyond loopback.
check_loopback() {
  local pids listeners bad
  pids=$( (zero_pids; echo "$wpid") | paste -sd'|')
  echo "  zero-cache processes: $(zero_pids | wc -l)" >&2
  listeners=$(ss -ltnpH | grep -E "pid=($pids)," || true)
  echo "$listeners" | awk '{ print "  listening: " $4 " " $6 }' >&2
  bad=$(echo "$listeners" | awk '$4 !~ /^127\.0\.0\.1:/' | grep . || true)
  [ -z "$bad" ] || { echo "not on loopback: $bad" >&2; exit 1; }
  loopback_report=$(echo "$listeners" | awk '{ print $4 }' | sort | paste -sd' ')
}
check_loopback

results="$work/results.jsonl"
last_sync_id() { psql_b -d bench -Atc "SELECT coalesce(max(first_sync_id + action_count - 1), 0) FROM pg_sync.commit_order"; }
max_id() { psql_b -d bench -Atc "SELECT coalesce(max(id), 0) FROM $1"; }
record() { echo "$1" >>"$results"; echo "  $1" >&2; }
ready_wait() { # FILE PID: until READY is in FILE (or the process died)
  for _ in $(seq 1800); do grep -qs READY "$1" && return 0; kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
  echo "client did not get ready:" >&2; cat "$1" >&2; exit 1
}
# Let both systems settle: the last phase's rows delivered, the worker sequenced everything.
settle() {
  for _ in $(seq 300); do
    [ "$(psql_b -d bench -Atc "SELECT count(*) FROM pg_sync.sync_actions a WHERE NOT EXISTS
        (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid)")" = 0 ] && break
    sleep 0.1
  done
  sleep 1
}

# latency SYSTEM RATE CLIENTS RUN
latency() {
  local sys=$1 rate=$2 n=$3 run=$4 table base out tps written rss rss_end pg_clients
  table=$([ "$sys" = zero ] && echo events_zero || echo events)
  base=$(max_id "$table")
  out="$work/lat.$sys.$rate.$n.$run"
  rm -f "$work/go"; mkfifo "$work/go"
  if [ "$sys" = zero ]; then
    node "$peers/zero_client.mjs" latency "http://127.0.0.1:$zport" "$n" "$base" <"$work/go" >"$out" 2>"$out.err" &
  else
    "$load" latency "$wport" bench "$n" "$(last_sync_id)" <"$work/go" >"$out" 2>"$out.err" &
  fi
  load_pid=$!
  exec 3>"$work/go"
  ready_wait "$out" "$load_pid"
  sleep 2
  if [ "$sys" = zero ]; then rss=$(rss_mib $(zero_pids)); else rss=$(rss_mib "$wpid"); fi
  printf "INSERT INTO %s (grp, ts) VALUES ('g0', extract(epoch FROM clock_timestamp()) * 1000);\n" "$table" >"$work/write.sql"
  pg_clients=$([ "$rate" -ge 500 ] && echo 4 || echo 1)
  echo go >&3
  "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c "$pg_clients" -j "$pg_clients" -R "$rate" -T "$secs" \
    -f "$work/write.sql" bench >"$work/pgbench.out" 2>&1
  written=$(psql_b -d bench -Atc "SELECT count(*) FROM $table WHERE id > $base")
  tps=$(awk '/^tps/ { print $3; exit }' "$work/pgbench.out")
  if [ "$sys" = zero ]; then rss_end=$(rss_mib $(zero_pids)); else rss_end=$(rss_mib "$wpid"); fi
  echo "stop $written $drain" >&3
  wait "$load_pid" || true
  load_pid=
  exec 3>&-
  record "$(python3 - "$out" "$sys" "$rate" "$n" "$run" "$tps" "$written" "$rss" "$rss_end" <<'PY'
import json, sys
out, sysname, rate, n, run, tps, written, rss, rss_end = sys.argv[1:]
line = [l for l in open(out) if l.startswith("{")]
r = json.loads(line[-1]) if line else {"p50_ms": None, "p99_ms": None, "missing": None, "deliveries": 0}
print(json.dumps({"kind": "latency", "system": sysname, "rate": int(rate), "clients": int(n), "run": int(run),
                  "tps": float(tps or 0), "written": int(written), "rss_mib": float(rss),
                  "rss_end_mib": float(rss_end), **r}))
PY
)"
  settle
}

# write_rows TABLE -> "start_ms end_ms": 100k rows in 1,000-row transactions, one connection.
write_rows() {
  local sql="$work/bulk.sql" start end
  : >"$sql"
  for _ in $(seq $((rows / txn_rows))); do
    echo "INSERT INTO $1 (grp, ts) SELECT 'g0', extract(epoch FROM clock_timestamp()) * 1000 FROM generate_series(1, $txn_rows);" >>"$sql"
  done
  start=$(date +%s%3N)
  psql_b -d bench -f "$sql"
  end=$(date +%s%3N)
  echo "$start $end"
}

# catchup SYSTEM RUN
catchup() {
  local sys=$1 run=$2 out="$work/catchup.$1.$2" times done_ms
  if [ "$sys" = zero ]; then
    node "$peers/zero_client.mjs" catchup "http://127.0.0.1:$zport" "$(max_id events_zero)" "$rows" 600 >"$out" 2>"$out.err" &
  else
    "$load" catchup "$wport" bench u0 "$(last_sync_id)" "$rows" 600 >"$out" 2>"$out.err" &
  fi
  load_pid=$!
  ready_wait "$out" "$load_pid"
  sleep 1
  times=$(write_rows "$([ "$sys" = zero ] && echo events_zero || echo events)")
  wait "$load_pid" || true
  load_pid=
  record "$(python3 - "$out" "$sys" "$run" $times <<'PY'
import json, sys
out, sysname, run, start, end = sys.argv[1:]
r = json.loads([l for l in open(out) if l.startswith("{")][-1])
done = r["done_ms"]
print(json.dumps({"kind": "catchup", "system": sysname, "run": int(run), "rows": r["rows"],
                  "writer_s": (int(end) - int(start)) / 1000,
                  "catchup_s": None if done is None else (done - int(end)) / 1000}))
PY
)"
  settle
}

# writer RUN ORDER...: the writer alone, plain table vs captured, in the order given.
writer() {
  local run=$1 t times; shift
  for t in "$@"; do
    psql_b -d bench -c "CHECKPOINT"
    times=$(write_rows "$([ "$t" = plain ] && echo events_plain || echo events)")
    record "$(python3 -c 'import json,sys; s,e=map(int,sys.argv[3:5]); print(json.dumps({"kind":"writer","table":sys.argv[1],"run":int(sys.argv[2]),"writer_s":(e-s)/1000}))' "$t" "$run" $times)"
    settle
  done
}

started=$(date -u +%Y-%m-%dT%H:%MZ)
for run in $(seq 1 "$runs"); do
  if [ $((run % 2)) = 1 ]; then order=(zero pg_sync); else order=(pg_sync zero); fi
  echo "round $run: ${order[*]}" >&2
  for cfg in "100 1" "1000 1" "100 100" "1000 100"; do
    for sys in "${order[@]}"; do latency "$sys" $cfg "$run"; done
  done
  for sys in "${order[@]}"; do catchup "$sys" "$run"; done
  if [ $((run % 2)) = 1 ]; then writer "$run" plain captured; else writer "$run" captured plain; fi
done
check_loopback

commit=$(git -C "$here" log -1 --format='%h %s' | cut -c1-70)
dirty=$(git -C "$here" status --porcelain --untracked-files=no | grep -q . && echo " (with uncommitted changes)" || true)
report=$(python3 "$peers/report.py" "$results" "$started" "$runs" "$secs" "$drain" "$rows" "$commit$dirty" \
  "$zero_version" "$(node --version)" "$loopback_report" "$(uptime | sed 's/.*load average: //')")
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
echo "logs of this run: $logs" >&2
