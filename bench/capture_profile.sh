#!/usr/bin/env bash
# Where a captured row's time goes: `perf record` of the backend running a bulk INSERT ... SELECT
# (or UPDATE) into the registered table of bench/write_overhead.sh, folded into
# bench/flamegraphs/capture_<what>_<commit>.folded (one "frame;frame;... count" line per stack,
# the input of flamegraph.pl / inferno) plus a top-symbols summary (.txt). Needs `perf` and root.
# Knobs: PROFILE_ROWS (200000), PROFILE_WHAT (insert | update | single: one client's pgbench of
# single-row INSERT transactions, synchronous_commit off, for PROFILE_SECONDS (10)), PROFILE_TABLE
# (t_synced; t_plpgsql or t_plain for the baselines).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rows=${PROFILE_ROWS:-200000}
what=${PROFILE_WHAT:-insert}
commit=$(git -C "$here" rev-parse --short HEAD)
bench_write_tables prof "shared_buffers = '512MB'" "max_wal_size = '4GB'" \
  "checkpoint_timeout = '30min'" "synchronous_commit = off"
table=${PROFILE_TABLE:-t_synced}
out="$here/bench/flamegraphs/capture_${what}_${table}_${commit}"
if [ "$what" = single ]; then
  printf "INSERT INTO %s (a, b, g) VALUES ('new row', 1, 'g' || (random() * 9)::int);\n" "$table" >"$work/single.sql"
  "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c 1 -T "${PROFILE_SECONDS:-10}" -f "$work/single.sql" postgres \
    >"$work/pgbench.out" 2>&1 &
  client=$!
  sleep 1
  pid=$(psql_w -tAc "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench'")
  perf record -q -F 999 --call-graph dwarf,32768 -o "$work/perf.data" -p "$pid" 2>/dev/null &
  perf_pid=$!
  wait "$client"
  grep '^tps' "$work/pgbench.out" >&2
elif [ "$what" = insert ]; then
  stmt="INSERT INTO $table (a, b, g) SELECT 'bulk ' || i, i, 'g' || (i % 10) FROM generate_series(1, $rows) i"
else
  psql_w -c "INSERT INTO $table (a, b, g) SELECT 'bulk ' || i, i, 'g' || (i % 10) FROM generate_series(1, $rows) i"
  stmt="UPDATE $table SET b = b + 1"
fi
if [ "$what" != single ]; then
  # The statement waits for perf to attach: its session sleeps first, found by its query text.
  psql_w -c "SELECT pg_sleep(2)" -c "$stmt" &
  client=$!
  sleep 1
  pid=$(psql_w -tAc "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(2)'")
  perf record -q -F 999 --call-graph dwarf,32768 -o "$work/perf.data" -p "$pid" 2>/dev/null &
  perf_pid=$!
  wait "$client"
fi
kill -INT "$perf_pid"
wait "$perf_pid" || true
perf script -i "$work/perf.data" 2>/dev/null | python3 "$here/bench/perf_fold.py" "$out" 45 30
echo "wrote $out.folded and $out.txt" >&2
