#!/usr/bin/env bash
# The worker's own cost of one `GET /sync/bootstrap` of bench/bootstrap.sh's 1M-row table:
# `perf stat`'s task clock (CPU time) and context switches of the worker process alone, each
# worker in turn (alternated, BOOTSTRAP_ROUNDS rounds, default 3), one warm-up bootstrap
# before each counted one. User-space instructions would not move with the machine's load at
# all, but this VM exposes no hardware counters; the task clock is the worker's own CPU time,
# which moves less with load than wall time does (issue 11). Workers: BENCH_WORKER (A) and
# BENCH_WORKER_B (B). Needs `perf` and root, and target/release/api_load. An A/B tool like
# bench/bootstrap_profile.sh, so not in `make bench` (which has one worker).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rows=${BOOTSTRAP_ROWS:-1000000}
rounds=${BOOTSTRAP_ROUNDS:-3}
workers=("$BENCH_WORKER" "$BENCH_WORKER_B")
bench_cluster bootstrap_cpu "shared_buffers = '1GB'"
bench_items "$rows" >/dev/null
echo "| round | worker | task-clock ms | context switches | load 1m |"
echo "|---|---|---|---|---|"
for ((r = 0; r < rounds; r++)); do
  for w in 0 1; do
    worker=${workers[$w]}
    start_worker
    wait_healthy
    # One warm-up bootstrap (connection pool, catalog caches), then the counted one.
    "$here/target/release/api_load" bootstrap_only "$wport" bench u1 >/dev/null
    perf stat -x, -e task-clock,context-switches -o "$work/stat" -p "$wpid" &
    stat_pid=$!
    sleep 0.5
    "$here/target/release/api_load" bootstrap_only "$wport" bench u1 >/dev/null
    kill -INT "$stat_pid"; wait "$stat_pid" || true
    python3 - "$work/stat" "$r" "$w" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import sys
v = {}
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if len(f) > 2 and f[0] and f[0][0].isdigit():
        v[f[2].split(":")[0]] = float(f[0])
print(f"| {sys.argv[2]} | {'AB'[int(sys.argv[3])]} | {v.get('task-clock', 0):,.0f} | {v.get('context-switches', 0):,.0f} | {sys.argv[4]} |")
PY
    kill "$wpid"; wait "$wpid" 2>/dev/null || true
    rm -f "$work/worker.pid"
  done
done
