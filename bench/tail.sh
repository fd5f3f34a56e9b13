#!/usr/bin/env bash
# Tail throughput: how fast sync_worker sequences a backlog of captured actions, against
# pg_recvlogical decoding the same WAL with pgoutput, in one run. Both slots exist before the
# writes, so both read exactly the same WAL. Knobs: TAIL_ROWS (default 200000), TAIL_TXN_ROWS (1000).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
rows=${TAIL_ROWS:-200000}
per_txn=${TAIL_TXN_ROWS:-1000}
worker=${BENCH_WORKER:-$here/target/release/sync_worker}
[ -n "${BENCH_WORKER:-}" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
floor=${TAIL_FLOOR:-$(awk '$1 == "tail" {print $2}' "$here/bench/floors")}

work=$(mktemp -d /tmp/pg_sync_tail.XXXXXX)
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
-- The publication the worker would create (it alters a narrower one, and the walsender then
-- decodes the backlog against a publication changed under it).
CREATE PUBLICATION pg_sync FOR TABLE pg_sync.sync_actions, pg_sync.group_memberships,
  pg_sync.api_keys, pg_sync.registry WITH (publish = 'insert, update, delete, truncate');
SELECT pg_create_logical_replication_slot('pg_sync', 'pgoutput');
SELECT pg_create_logical_replication_slot('baseline', 'pgoutput');
SQL
echo "writing $rows actions in transactions of $per_txn rows"
psql_b -d bench -c "DO \$\$ BEGIN FOR i IN 0..($rows / $per_txn - 1) LOOP
  INSERT INTO t SELECT g, 'row ' || g, 'g' || (g % 100) FROM generate_series(i * $per_txn + 1, (i + 1) * $per_txn) g;
  COMMIT; END LOOP; END \$\$"
end_lsn=$(psql_b -d bench -tAc "SELECT pg_current_wal_lsn()")
actions=$(psql_b -d bench -tAc "SELECT count(*) FROM pg_sync.sync_actions")

t0=$(date +%s.%N)
"$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$port" -U postgres -d bench --slot baseline --start \
  -o proto_version=1 -o publication_names=pg_sync --endpos="$end_lsn" -f /dev/null
t1=$(date +%s.%N)

DATABASE_URL="host=127.0.0.1 port=$port user=postgres dbname=bench" SYNC_LISTEN="127.0.0.1:$wport" \
  SYNC_JWT_SECRET=bench RUST_LOG=warn "$worker" >"$work/worker.log" 2>&1 &
echo $! >"$work/worker.pid"
t2=$(date +%s.%N)
while :; do
  last=$(curl -fsS "http://127.0.0.1:$wport/metrics" 2>/dev/null | sed -n 's/^pg_sync_last_sync_id //p' || true)
  [ "${last:-0}" -ge "$actions" ] && break
  sleep 0.02
done
t3=$(date +%s.%N)
# The worker's CPU time so far (user + system, clock ticks): its cost per action, which on a
# shared machine says more than the wall-clock ratio.
cpu=$(awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$(cat "$work/worker.pid")/stat")

report=$(python3 - <<PY
base = $actions / ($t1 - $t0); ours = $actions / ($t3 - $t2)
print(f"## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/tail.sh\` (TAIL_ROWS=$rows TAIL_TXN_ROWS=$per_txn)")
print()
print("Commit $(git -C "$here" log -1 --format=%h); worker $worker; load average $(uptime | sed 's/.*load average: //').")
print("Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; release build; backlog written first, then each reader")
print("drains the same WAL from its own slot. The worker's time includes its start-up and persisting")
print("commit_order; pg_recvlogical only decodes to /dev/null.")
print()
print("| reader | actions | seconds | actions/s |")
print("|---|---|---|---|")
print(f"| pg_recvlogical (pgoutput, baseline) | $actions | {$t1 - $t0:.2f} | {base:,.0f} |")
print(f"| sync_worker (decode, sequence, persist, publish, ack) | $actions | {$t3 - $t2:.2f} | {ours:,.0f} |")
print()
print(f"sync_worker / pg_recvlogical: {ours / base:.2f} (floor $floor); worker CPU {$cpu:.2f} s ({$cpu * 1e6 / $actions:.1f} us/action)")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
ratio=$(python3 -c "print($actions / ($t3 - $t2) / ($actions / ($t1 - $t0)))")
if python3 -c "import sys; sys.exit(0 if $ratio >= $floor else 1)"; then
  exit 0
fi
echo "REGRESSION: sync_worker / pg_recvlogical = $ratio, below the floor $floor in bench/floors" >&2
exit 3
