#!/usr/bin/env bash
# Replay throughput (issue 9): one WebSocket client replays the whole sequenced log from sync id
# 0 to `caught_up`, against `COPY (SELECT ... FROM pg_sync.sync_actions) TO STDOUT` of the same
# rows, alternating, REPLAY_ROUNDS times each, in one run. The log: REPLAY_ACTIONS (1,000,000)
# captured inserts in transactions of 1,000, over 100 groups; the replaying user is a member of
# all of them (every action is hers: the worst case for delivery). Goal: at least 0.5x.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
actions=${REPLAY_ACTIONS:-1000000}
per_txn=1000
rounds=${REPLAY_ROUNDS:-3}
worker=${BENCH_WORKER:-$here/target/release/sync_worker}
[ -n "${BENCH_WORKER:-}" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
load=$here/target/release/replay_load

work=$(mktemp -d /tmp/pg_sync_replay.XXXXXX)
chmod 755 "$work"
port=$(free_port)
wport=$(free_port)
cleanup() { [ -f "$work/worker.pid" ] && kill "$(cat "$work/worker.pid")" 2>/dev/null; cluster_stop "$work/pg" immediate; rm -rf "$work"; }
trap cleanup EXIT
cluster_init "$work/pg" "$port" "shared_buffers = '512MB'" "max_wal_size = '8GB'" "synchronous_commit = off"
cluster_start "$work/pg"
psql_b() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
psql_b -d postgres -c "CREATE DATABASE bench"
psql_b -d bench <<SQL
CREATE EXTENSION pg_sync;
CREATE TABLE t (id bigint PRIMARY KEY, body text, grp text);
SELECT pg_sync.register_table('t', group_column => 'grp');
SET pg_sync.restoring = on;
SELECT pg_sync.add_member('reader', 'g' || g) FROM generate_series(0, 99) g;
SQL
echo "writing $actions actions in transactions of $per_txn rows" >&2
psql_b -d bench -c "DO \$\$ BEGIN FOR i IN 0..($actions / $per_txn - 1) LOOP
  INSERT INTO t SELECT g, 'row ' || g, 'g' || (g % 100) FROM generate_series(i * $per_txn + 1, (i + 1) * $per_txn) g;
  COMMIT; END LOOP; END \$\$"
psql_b -d bench -c "VACUUM ANALYZE"

DATABASE_URL="host=127.0.0.1 port=$port user=postgres dbname=bench" SYNC_LISTEN="127.0.0.1:$wport" \
  SYNC_JWT_SECRET=bench RUST_LOG=warn "$worker" >"$work/worker.log" 2>&1 &
echo $! >"$work/worker.pid"
echo "waiting for the worker to sequence the backlog" >&2
while :; do
  last=$(curl -fsS "http://127.0.0.1:$wport/metrics" 2>/dev/null | sed -n 's/^pg_sync_last_sync_id //p' || true)
  [ "${last:-0}" -ge "$actions" ] && break
  sleep 0.2
done

copy_s() {
  local t0 t1
  t0=$(date +%s.%N)
  psql_b -d bench -c "COPY (SELECT id, model, model_id, action, data, version, versions, origin, group_id
                              FROM pg_sync.sync_actions ORDER BY id) TO STDOUT" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)"
}
rows=""
for r in $(seq 1 "$rounds"); do
  c=$(copy_s)
  out=$("$load" "$wport" bench reader)
  got=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['deltas'])" "$out")
  s=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$out")
  [ "$got" -eq "$actions" ] || { echo "replay got $got deltas of $actions" >&2; exit 1; }
  echo "round $r: COPY ${c}s, replay ${s}s" >&2
  rows="$rows$c $s
"
done

report=$(python3 - "$rows" <<PY
import statistics, sys
pairs = [tuple(map(float, l.split())) for l in sys.argv[1].strip().splitlines()]
n = $actions
copy = [n / c for c, _ in pairs]; ours = [n / s for _, s in pairs]
ratios = [o / c for o, c in zip(ours, copy)]
f = lambda xs: f"{min(xs):,.0f} / {statistics.median(xs):,.0f} / {max(xs):,.0f}"
print(f"## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/replay.sh\` (REPLAY_ACTIONS=$actions REPLAY_ROUNDS=$rounds)")
print()
print("Commit $(git -C "$here" log -1 --format=%h); worker $worker; load average $(uptime | sed 's/.*load average: //').")
print("Machine: $(nproc) cores; release build. One WebSocket client (member of all 100 groups) replays the")
print("log from 0 to caught_up; COPY of the same rows of pg_sync.sync_actions to psql's /dev/null; alternating.")
print()
print("| reader | actions/s min / median / max |")
print("|---|---|")
print(f"| COPY (SELECT ... FROM pg_sync.sync_actions) TO STDOUT (baseline) | {f(copy)} |")
print(f"| WebSocket replay from 0 (subscribe to caught_up) | {f(ours)} |")
print()
print(f"replay / COPY: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, max {max(ratios):.2f} (goal 0.5)")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
