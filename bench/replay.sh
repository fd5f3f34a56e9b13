#!/usr/bin/env bash
# Replay throughput (issue 9): one WebSocket client replays the whole sequenced log from sync id
# 0 to `caught_up`, against `COPY (SELECT ... FROM pg_sync.sync_actions) TO STDOUT` of the same
# rows, alternating, REPLAY_ROUNDS times each, in one run. The log: REPLAY_ACTIONS (1,000,000)
# captured inserts in transactions of 1,000, over 100 groups; the replaying user is a member of
# all of them (every action is hers: the worst case for delivery). Goal: at least 0.5x.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
actions=${REPLAY_ACTIONS:-1000000}
per_txn=1000
rounds=${REPLAY_ROUNDS:-3}
worker=${BENCH_WORKER:-$here/target/release/sync_worker}
[ -n "${BENCH_WORKER:-}" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
load=$here/target/release/replay_load

bench_cluster replay "shared_buffers = '512MB'" "max_wal_size = '8GB'" "synchronous_commit = off"
psql_b -d bench <<SQL
CREATE EXTENSION pg_sync;
CREATE TABLE t (id bigint PRIMARY KEY, body text, grp text);
SELECT pg_sync.register_table('t', group_column => 'grp');
SET pg_sync.restoring = on;
SELECT pg_sync.add_member('reader', 'g' || g) FROM generate_series(0, 99) g;
SQL
# REPLAY_SQL: a file of SQL run once after the extension is created, e.g. an older definition
# of a function an older worker in REPLAY_WORKERS calls (bench/sql/changes_c5ec34a.sql).
[ -z "${REPLAY_SQL:-}" ] || psql_b -d bench -f "$REPLAY_SQL"
echo "writing $actions actions in transactions of $per_txn rows" >&2
psql_b -d bench -c "DO \$\$ BEGIN FOR i IN 0..($actions / $per_txn - 1) LOOP
  INSERT INTO t SELECT g, 'row ' || g, 'g' || (g % 100) FROM generate_series(i * $per_txn + 1, (i + 1) * $per_txn) g;
  COMMIT; END LOOP; END \$\$"
psql_b -d bench -c "VACUUM ANALYZE"

# REPLAY_WORKERS: several worker binaries (an A/B run, e.g. "old new"): each round replays once
# with each, alternating, each worker started fresh on the same sequenced log.
workers=${REPLAY_WORKERS:-$worker}
run_worker() {
  worker=$1
  start_worker
  while :; do
    last=$(curl -fsS "http://127.0.0.1:$wport/metrics" 2>/dev/null | sed -n 's/^pg_sync_last_sync_id //p' || true)
    [ "${last:-0}" -ge "$actions" ] && break
    sleep 0.2
  done
}
stop_worker() { kill "$wpid"; wait "$wpid" 2>/dev/null || true; rm -f "$work/worker.pid"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Postgres CPU: the postmaster's reaped children (every backend the worker used, once they
# exited after the worker stopped), in ticks.
pg_ticks() { awk '{print $16 + $17}' "/proc/$(head -1 "$work/pg/data/postmaster.pid")/stat"; }
pg_settled() { sleep 1; pg_ticks; }
echo "waiting for the worker to sequence the backlog" >&2
run_worker "${workers%% *}"
stop_worker

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
  i=0
  for w in $workers; do
    p0=$(pg_settled)
    run_worker "$w"
    t0=$(cpu_ticks "$wpid")
    # REPLAY_PERF=DIR: a call-graph profile of each replay's worker (worker_rR_wI.data) and of
    # the cluster (pg_rR_wI.data: the postmaster and its backends, those the worker holds open
    # and any forked later) into DIR (perf record, cpu-clock: no hardware counters needed;
    # DWARF unwinding, Postgres has no frame pointers).
    perf_pid="" perf_pg=""
    if [ -n "${REPLAY_PERF:-}" ]; then
      mkdir -p "$REPLAY_PERF"
      perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$wpid" \
        -o "$REPLAY_PERF/worker_r${r}_w${i}.data" >/dev/null 2>&1 &
      perf_pid=$!
      postmaster=$(head -1 "$work/pg/data/postmaster.pid")
      perf record -e cpu-clock -F 499 --call-graph dwarf,16384 \
        -p "$(pgrep -d, -P "$postmaster"),$postmaster" \
        -o "$REPLAY_PERF/pg_r${r}_w${i}.data" >/dev/null 2>&1 &
      perf_pg=$!
      sleep 1
    fi
    out=$(/usr/bin/time -f '%U %S' -o "$work/client.time" "$load" "$wport" bench reader)
    cpu=$(( $(cpu_ticks "$wpid") - t0 ))
    [ -z "$perf_pid" ] || { kill -INT "$perf_pid" "$perf_pg"; wait "$perf_pid" "$perf_pg" || true; }
    stop_worker
    pgcpu=$(( $(pg_settled) - p0 ))
    client=$(awk '{print $1 + $2}' "$work/client.time")
    got=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['deltas'])" "$out")
    s=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$out")
    [ "$got" -eq "$actions" ] || { echo "replay got $got deltas of $actions" >&2; exit 1; }
    echo "round $r: COPY ${c}s, worker $i ($w) replay ${s}s, worker CPU $cpu ticks, Postgres $pgcpu ticks, client ${client}s" >&2
    rows="$rows$i $c $s $cpu $pgcpu $client
"
    i=$((i + 1))
  done
done

report=$(python3 - "$rows" "$workers" <<PY
import os, statistics, sys
rows = [l.split() for l in sys.argv[1].strip().splitlines()]
workers = sys.argv[2].split()
n = $actions
hz = os.sysconf("SC_CLK_TCK")
f = lambda xs: f"{min(xs):,.0f} / {statistics.median(xs):,.0f} / {max(xs):,.0f}"
g = lambda xs: f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"
copy = [n / float(r[1]) for r in rows if r[0] == "0"]
print(f"## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/replay.sh\` (REPLAY_ACTIONS=$actions REPLAY_ROUNDS=$rounds)")
print()
print("Commit $(git -C "$here" log -1 --format=%h); load average $(uptime | sed 's/.*load average: //').")
print("Machine: $(nproc) cores; release build. One WebSocket client (member of all 100 groups) replays the")
print("log from 0 to caught_up; COPY of the same rows of pg_sync.sync_actions to psql's /dev/null; alternating")
print("(each round: COPY, then one replay per worker, each worker started fresh).")
print()
print("| reader | actions/s min / median / max | replay / COPY min / median / max | worker CPU s per replay | Postgres CPU s per replay | client CPU s per replay |")
print("|---|---|---|---|---|---|")
print(f"| COPY (SELECT ... FROM pg_sync.sync_actions) TO STDOUT (baseline) | {f(copy)} | 1 | | | |")
for i, w in enumerate(workers):
    mine = [r for r in rows if r[0] == str(i)]
    ours = [n / float(r[2]) for r in mine]
    ratios = [(n / float(r[2])) / (n / float(r[1])) for r in mine]
    cpu = [int(r[3]) / hz for r in mine]
    pg = [int(r[4]) / hz for r in mine]
    client = [float(r[5]) for r in mine]
    print(f"| WebSocket replay from 0, worker {i}: \`{w}\` | {f(ours)} | {g(ratios)} | {g(cpu)} | {g(pg)} | {g(client)} |")
print()
print("Goal: replay / COPY at least 0.5.")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
