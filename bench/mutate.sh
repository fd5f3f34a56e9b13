#!/usr/bin/env bash
# Mutations: transactions per second through `POST /sync/mutate` (batches of MUTATE_BATCH
# transactions, one insert op each, from MUTATE_CLIENTS keep-alive connections) against the same
# kind of rows written by plain SQL `INSERT`s, one transaction each, from one connection; both
# into the same registered table, MUTATE_SECONDS each, in one run (bench/src/bin/api_load.rs).
# Reports the ratio and p50/p99 latency (per request for mutate, per insert for SQL).
# Knobs: MUTATE_SECONDS (10), MUTATE_CLIENTS (1 and 4), MUTATE_BATCH (100).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
secs=${MUTATE_SECONDS:-10}
batch=${MUTATE_BATCH:-100}
clients_list=${MUTATE_CLIENTS:-1 4}
cargo build --release -q -p sync_worker -p pg_sync_bench
bench_cluster mutate "shared_buffers = '1GB'"
psql_b -d bench <<SQL
CREATE EXTENSION pg_sync;
CREATE TABLE tasks (id bigint PRIMARY KEY, grp text NOT NULL, title text NOT NULL, done boolean NOT NULL);
SELECT pg_sync.register_table('tasks', group_column => 'grp');
SELECT pg_sync.add_member('u1', 'g1');
SQL
start_worker
wait_healthy

rows=""
run=0
for clients in $clients_list; do
  run=$((run + 1))
  out=$("$here/target/release/api_load" mutate "$wport" bench u1 "$(bench_url)" tasks g1 "$secs" "$clients" "$batch" \
    "$((run * 10000000000))")
  rows+="$out"$'\n'
done

report=$(python3 - "$rows" <<PY
import json, sys
runs = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
print("## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/mutate.sh\` (MUTATE_SECONDS=$secs MUTATE_BATCH=$batch MUTATE_CLIENTS=\"$clients_list\")")
print()
print("Machine: $(nproc) cores; Postgres, the worker and the load generator share it. Each row: $secs s of plain INSERTs, then $secs s of mutate, into the same registered table.")
print()
print("| mutate clients | SQL inserts/s (1 conn) | SQL p50 / p99 | mutate txns/s | ratio | mutate request p50 / p99 (batch of $batch) |")
print("|---|---|---|---|---|---|")
for r in runs:
    s, m = r["sql_latency"], r["mutate_request_latency"]
    print(f"| {r['clients']} | {r['sql_tps']:,.0f} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} ms | {r['mutate_tps']:,.0f} | {r['mutate_tps'] / r['sql_tps']:.2f} | {m['p50_ms']:.1f} / {m['p99_ms']:.1f} ms |")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
