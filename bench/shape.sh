#!/usr/bin/env bash
# Initial sync of BOOTSTRAP_ROWS rows (default 1000000) in one run: the real
# @electric-sql/client through `GET /v1/shape` (Node, parses every message by the schema;
# SHAPE_RUNS rounds, default 3), the same requests read without parsing (by Node's fetch, and
# by Python: bench/shape_raw.py, the worker's and the transport's part), our own `GET /sync/bootstrap`, and `COPY ... TO STDOUT`
# (bench/src/bin/api_load.rs, which only counts bytes; 3 interleaved rounds). min / median /
# max per row. BENCH_WORKER=path runs another worker binary. Needs tests/shape's npm packages.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rows=${BOOTSTRAP_ROWS:-1000000}
runs=${SHAPE_RUNS:-3}
[ -n "${BENCH_WORKER:-}" ] && [ -x "$here/target/release/api_load" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
worker=${BENCH_WORKER:-$worker}
bench_cluster shape "shared_buffers = '1GB'"
bench_items "$rows"
start_worker
wait_healthy
token=$(bench_token u1)
shapes=()
for run in $(seq 1 "$runs"); do
  shapes+=("$(node "$here/bench/shape_client.mjs" "http://127.0.0.1:$wport/v1/shape" "$token" items client)")
  shapes+=("$(node "$here/bench/shape_client.mjs" "http://127.0.0.1:$wport/v1/shape" "$token" items raw "$rows")")
  shapes+=("$(python3 "$here/bench/shape_raw.py" "http://127.0.0.1:$wport/v1/shape" "$token" items)")
done
others=$("$here/target/release/api_load" bootstrap "$wport" bench u1 "$(bench_url)" \
  "SELECT * FROM items WHERE grp = 'g1'")
load=$(uptime | sed 's/.*load average: //')
report=$(python3 - "$others" "${shapes[@]}" <<PY
import json, statistics, sys
runs = json.loads(sys.argv[1]) + [json.loads(s) for s in sys.argv[2:]]
for r in runs:
    if r["what"] == "client":
        assert r["rows"] == $rows, r
def rates(what):
    return sorted($rows / r["secs"] for r in runs if r["what"] == what)
copy = statistics.median(rates("copy"))
print("## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/shape.sh\` (BOOTSTRAP_ROWS=$rows SHAPE_RUNS=$runs, commit $(git -C "$here" rev-parse --short HEAD), worker $worker)")
print()
print("Machine: $(nproc) cores shared with other sessions (load average at the end: $load); Postgres, the worker and")
print("the client share it. Same 6-column table as bench/bootstrap.sh. Client: the real @electric-sql/client 1.5.28 in")
print("Node (ShapeStream, every message parsed by the schema header); raw: the same /v1/shape requests read as text,")
print("not parsed, by Node's fetch, and by Python (urllib: the worker's part); COPY and /sync/bootstrap: api_load (bytes")
print("counted only). Ratio: median rows/s / median COPY rows/s.")
print()
print("| run | n | rows/s min | median | max | ratio to COPY |")
print("|---|---|---|---|---|---|")
for what, label in [("copy", "COPY (SELECT * ...) TO STDOUT"), ("bootstrap", "GET /sync/bootstrap"),
                    ("raw_py", "GET /v1/shape, read by Python, not parsed"),
                    ("raw", "GET /v1/shape, read by Node's fetch, not parsed"),
                    ("client", "GET /v1/shape, @electric-sql/client in Node")]:
    r = rates(what)
    print(f"| {label} | {len(r)} | {r[0]:,.0f} | {statistics.median(r):,.0f} | {r[-1]:,.0f} | {statistics.median(r) / copy:.2f} |")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
