#!/usr/bin/env bash
# Bootstrap throughput: rows per second streamed to one client by `GET /sync/bootstrap`,
# against `COPY (SELECT * FROM items WHERE grp = 'g1') TO STDOUT` of the same rows, three
# rounds interleaved in one run (bench/src/bin/api_load.rs; both clients only count bytes).
# Target: at least 0.5 of COPY. Knobs: BOOTSTRAP_ROWS (default 1000000), BOOTSTRAP_ROUNDS
# (default 3). BENCH_WORKER=path runs another worker binary (no build then); with
# BENCH_WORKER_B=path too, the two alternate round by round on the same cluster (an A/B run:
# each round restarts the worker), and the report gives each one's ratios min/median/max.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rows=${BOOTSTRAP_ROWS:-1000000}
rounds=${BOOTSTRAP_ROUNDS:-3}
[ -n "${BENCH_WORKER:-}" ] && [ -x "$here/target/release/api_load" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
workers=("${BENCH_WORKER:-$worker}")
[ -n "${BENCH_WORKER_B:-}" ] && workers+=("$BENCH_WORKER_B")
bench_cluster bootstrap "shared_buffers = '1GB'"
bench_items "$rows"
zone=$(psql_b -d bench -tAc "SHOW TimeZone")
postmaster=$(head -1 "$work/pg/data/postmaster.pid")
loads=()
results="[]"
# One round per worker at a time when there are two (alternated), else all rounds at once.
per=$rounds; [ ${#workers[@]} -gt 1 ] && per=1
for ((r = 0; r < rounds; r += per)); do
  for w in "${!workers[@]}"; do
    worker=${workers[$w]}
    start_worker
    wait_healthy
    loads+=("$(cut -d' ' -f1-3 /proc/loadavg)")
    out=$(BOOTSTRAP_ROUNDS=$per BOOTSTRAP_CPU_PIDS="$wpid $postmaster" "$here/target/release/api_load" \
      bootstrap "$wport" bench u1 "$(bench_url)" "SELECT * FROM items WHERE grp = 'g1'")
    results=$(python3 -c 'import json,sys; a=json.loads(sys.argv[1]); a+= [dict(r, worker=int(sys.argv[3]), round=int(sys.argv[4])) for r in json.loads(sys.argv[2])]; print(json.dumps(a))' "$results" "$out" "$w" "$r")
    kill "$wpid"; wait "$wpid" 2>/dev/null || true
    rm -f "$work/worker.pid"
  done
done
names=("${workers[@]}")
report=$(python3 - "$results" "$(IFS='|'; echo "${names[*]}")" "$(IFS='|'; echo "${loads[*]}")" <<PY
import json, statistics, sys
runs = json.loads(sys.argv[1])
names = sys.argv[2].split("|")
loads = sys.argv[3].split("|")
assert all(r["rows"] == $rows for r in runs if "rows" in r), runs
med = statistics.median
print("## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/bootstrap.sh\` (BOOTSTRAP_ROWS=$rows, commit $(git -C "$here" rev-parse --short HEAD))")
print()
print("Machine: $(nproc) cores; Postgres, the worker and the client share it. $rounds rounds" + (", the workers alternated round by round (each round restarts the worker)." if len(names) > 1 else " interleaved."))
print("Table: 6 columns (bigint key, text group, text, boolean, integer, timestamptz); server TimeZone $zone.")
print("Load average (1/5/15 min) at each round's start: " + "; ".join(loads) + ".")
print("Ratio: COPY's seconds over the bootstrap's in the same round (min / median / max); CPU: seconds used during the run")
print("by the worker and by the whole cluster (postmaster and backends), medians.")
print()
print("| worker | run | rows/s (median) | MB sent | ratio to COPY min / median / max | worker CPU s | Postgres CPU s |")
print("|---|---|---|---|---|---|---|")
for w, name in enumerate(names):
    mine = [r for r in runs if r["worker"] == w]
    rounds = sorted({r["round"] for r in mine})
    def of(what):
        return [r for r in mine if r["what"] == what]
    copy = {r["round"]: r for r in of("copy")}
    for what, label in (("copy", "COPY (SELECT * ...) TO STDOUT"), ("bootstrap", "GET /sync/bootstrap"), ("bootstrap_gzip", "GET /sync/bootstrap, gzip")):
        rs = of(what)
        ratios = sorted(copy[r["round"]]["secs"] / r["secs"] for r in rs)
        rate = med($rows / r["secs"] for r in rs)
        ratio = "1.00" if what == "copy" else f"{ratios[0]:.2f} / {med(ratios):.2f} / {ratios[-1]:.2f}"
        print(f"| {name} | {label} | {rate:,.0f} | {med(r['bytes'] for r in rs) / 1e6:.0f} | {ratio} | {med(r['worker_cpu'] for r in rs):.2f} | {med(r['pg_cpu'] for r in rs):.2f} |")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
