#!/usr/bin/env bash
# Where a bootstrap's time goes: `perf record` of the worker and of the cluster (the backend
# that runs the bootstrap's query is forked after perf attaches to the postmaster, so it is
# followed) during one `GET /sync/bootstrap` of bench/bootstrap.sh's table, and of the backend
# during `COPY (SELECT * ...) TO STDOUT` of the same rows. Writes
# bench/flamegraphs/bootstrap_{worker,pg,copy_pg}_<commit>.folded (one "frame;... count" line
# per stack) and a top-symbols summary (.txt) of each. Needs `perf` and root.
# Knobs: BOOTSTRAP_ROWS (default 1000000), BENCH_WORKER (another worker binary; its commit
# name in BENCH_NAME).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rows=${BOOTSTRAP_ROWS:-1000000}
[ -n "${BENCH_WORKER:-}" ] && [ -x "$here/target/release/api_load" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
worker=${BENCH_WORKER:-$worker}
name=${BENCH_NAME:-$(git -C "$here" rev-parse --short HEAD)}
bench_cluster bootstrap_profile "shared_buffers = '1GB'"
psql_b -d bench <<SQL
CREATE EXTENSION pg_sync;
CREATE TABLE items (id bigint PRIMARY KEY, grp text NOT NULL, title text NOT NULL,
                    done boolean NOT NULL, n integer, updated_at timestamptz NOT NULL);
INSERT INTO items SELECT g, 'g1', 'item number ' || g, g % 3 = 0, g % 1000, now() FROM generate_series(1, $rows) g;
SELECT pg_sync.register_table('items', group_column => 'grp');
SELECT pg_sync.add_member('u1', 'g1');
VACUUM ANALYZE items;
SQL
postmaster=$(head -1 "$work/pg/data/postmaster.pid")
start_worker
wait_healthy
sql="SELECT * FROM items WHERE grp = 'g1'"
# One warm-up round, then each side recorded alone.
BOOTSTRAP_ROUNDS=1 "$here/target/release/api_load" bootstrap "$wport" bench u1 "$(bench_url)" "$sql" >/dev/null
record() { # record NAME COMMAND...: perf of the worker (NAME_worker) and the cluster (NAME_pg)
  local name=$1; shift
  perf record -F 999 --call-graph dwarf,16384 -o "$work/${name}_worker.data" -p "$wpid" 2>>"$work/perf.log" &
  local perf_w=$!
  perf record -F 999 --call-graph dwarf,16384 -o "$work/${name}_pg.data" -p "$postmaster" 2>>"$work/perf.log" &
  local perf_pg=$!
  sleep 2
  "$@" >/dev/null
  kill -INT "$perf_w" "$perf_pg"; wait "$perf_w" "$perf_pg" || true
}
fold() { # fold DATA OUT: folded stacks of the samples
  perf script -i "$work/$1.data" 2>/dev/null | python3 "$here/bench/perf_fold.py" "$2" 45 40
}
dir="$here/bench/flamegraphs"
record boot "$here/target/release/api_load" bootstrap_only "$wport" bench u1
fold boot_worker "$dir/bootstrap_worker_$name"
fold boot_pg "$dir/bootstrap_pg_$name"
record copy "$here/target/release/api_load" copy_only "$(bench_url)" "$sql"
fold copy_pg "$dir/bootstrap_copy_pg_$name"
grep -i lost "$work/perf.log" >&2 || true
echo "wrote $dir/bootstrap_{worker,pg,copy_pg}_$name.{folded,txt}" >&2
