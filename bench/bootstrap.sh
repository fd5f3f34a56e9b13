#!/usr/bin/env bash
# Bootstrap throughput: rows per second streamed to one client by `GET /sync/bootstrap`,
# against `COPY (SELECT * FROM items WHERE grp = 'g1') TO STDOUT` of the same rows, three
# rounds interleaved in one run (bench/src/bin/api_load.rs; both clients only count bytes).
# Target: at least 0.5 of COPY. Knob: BOOTSTRAP_ROWS (default 1000000).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rows=${BOOTSTRAP_ROWS:-1000000}
cargo build --release -q -p sync_worker -p pg_sync_bench
bench_cluster bootstrap "shared_buffers = '1GB'"
bench_items "$rows"
zone=$(psql_b -d bench -tAc "SHOW TimeZone")
start_worker
wait_healthy
result=$("$here/target/release/api_load" bootstrap "$wport" bench u1 "$(bench_url)" \
  "SELECT * FROM items WHERE grp = 'g1'")

report=$(python3 - "$result" <<PY
import json, statistics, sys
runs = json.loads(sys.argv[1])
def med(what, key):
    return statistics.median(r[key] for r in runs if r["what"] == what)
copy_s, boot_s, gz_s = med("copy", "secs"), med("bootstrap", "secs"), med("bootstrap_gzip", "secs")
rows = [r["rows"] for r in runs if r["what"] == "bootstrap"][0]
assert all(r["rows"] == $rows for r in runs if "rows" in r), runs
print("## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/bootstrap.sh\` (BOOTSTRAP_ROWS=$rows)")
print()
print("Machine: $(nproc) cores; Postgres, the worker and the client share it. Medians of 3 interleaved rounds.")
print("Table: 6 columns (bigint key, text group, text, boolean, integer, timestamptz); server TimeZone $zone.")
print()
print("| run | rows/s | MB sent | ratio to COPY |")
print("|---|---|---|---|")
print(f"| COPY (SELECT * ...) TO STDOUT | {rows / copy_s:,.0f} | {med('copy', 'bytes') / 1e6:.0f} | 1.00 |")
print(f"| GET /sync/bootstrap | {rows / boot_s:,.0f} | {med('bootstrap', 'bytes') / 1e6:.0f} | {copy_s / boot_s:.2f} |")
print(f"| GET /sync/bootstrap, gzip | {rows / gz_s:,.0f} | {med('bootstrap_gzip', 'bytes') / 1e6:.0f} | {copy_s / gz_s:.2f} |")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
