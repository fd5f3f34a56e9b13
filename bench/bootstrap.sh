#!/usr/bin/env bash
# Bootstrap throughput: rows per second streamed to one client by `GET /sync/bootstrap`,
# against `COPY (SELECT * FROM items WHERE grp = 'g1') TO STDOUT` of the same rows, three
# rounds interleaved in one run (bench/src/bin/api_load.rs; both clients only count bytes).
# Target: at least 0.5 of COPY. Knobs: BOOTSTRAP_ROWS (default 1000000), BOOTSTRAP_ROUNDS
# (default 3). BENCH_WORKER=path runs another worker binary (no build then); with
# BENCH_WORKER_B=path too, the two alternate round by round on the same cluster (an A/B run:
# each round restarts the worker), and the report gives each one's ratios min/median/max.
# BOOTSTRAP_RAW=path also writes every run's raw numbers (JSON) there.
#
# The report ends with every round: seconds, the CPU each run cost (worker + cluster + client)
# and the cores the rest of the machine used meanwhile, with the cluster's checkpoints, buffer
# writes, block reads and autovacuum runs (both logged in the server log too). Why: single rounds
# "dipped" to 0.5-0.6x of COPY while others reached 0.9-1.2x (issue 11). Measured (RESULTS.md,
# 2026-11-30T18:49Z-18:55Z, boot12): no checkpoint, autovacuum or block read lands in any round (the
# table is VACUUMed after its load, so neither side sets hint bits), the slow rounds fall at
# any position, and in every round the bench's processes had about one core, the rest of the
# machine (other sessions' builds, each session a scheduler autogroup, so `nice` does not shield
# the bench) using the other. With one core the worker and the backend cannot overlap, and the
# wall ratio falls to the CPU ratio (COPY's CPU over the bootstrap's: 0.47-0.97, median ~0.65;
# it tracks the wall ratio, correlation 0.5-0.8): the bootstrap costs about 1.1-1.3 CPU s per 1M
# rows (worker ~0.57, backend ~0.45, client ~0.1) against COPY's 0.65-0.9. The rounds at 0.9x+
# are those where COPY's own CPU came out high. So the 0.9x goal holds only with two free cores.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rows=${BOOTSTRAP_ROWS:-1000000}
rounds=${BOOTSTRAP_ROUNDS:-3}
[ -n "${BENCH_WORKER:-}" ] && [ -x "$here/target/release/api_load" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
workers=("${BENCH_WORKER:-$worker}")
[ -n "${BENCH_WORKER_B:-}" ] && workers+=("$BENCH_WORKER_B")
# Checkpoints and autovacuum runs are logged, so a round they land in shows in the per-round table.
bench_cluster bootstrap "shared_buffers = '1GB'" "log_checkpoints = on" "log_autovacuum_min_duration = 0"
bench_items "$rows"
zone=$(psql_b -d bench -tAc "SHOW TimeZone")
postmaster=$(head -1 "$work/pg/data/postmaster.pid")
# Cluster counters around each round (checkpoints, buffers written by the checkpointer, the
# bgwriter and backends, blocks read and hit in `bench`, autovacuum/autoanalyze runs).
pg_counters() {
  psql_b -d bench -tAc "SELECT json_build_object(
    'checkpoints', checkpoints_timed + checkpoints_req, 'buf_checkpoint', buffers_checkpoint,
    'buf_clean', buffers_clean, 'buf_backend', buffers_backend,
    'blks_read', (SELECT blks_read FROM pg_stat_database WHERE datname = 'bench'),
    'blks_hit', (SELECT blks_hit FROM pg_stat_database WHERE datname = 'bench'),
    'autovacuums', (SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0) FROM pg_stat_all_tables))
    FROM pg_stat_bgwriter"
}
counters=()
starts=()
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
    starts+=("$(date -u +%T)")
    before=$(pg_counters)
    out=$(BOOTSTRAP_ROUNDS=$per BOOTSTRAP_CPU_PIDS="$wpid $postmaster" "$here/target/release/api_load" \
      bootstrap "$wport" bench u1 "$(bench_url)" "SELECT * FROM items WHERE grp = 'g1'")
    counters+=("$(python3 -c 'import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); print(json.dumps({k: b[k]-a[k] for k in a}))' "$before" "$(pg_counters)")")
    results=$(python3 -c 'import json,sys; a=json.loads(sys.argv[1]); a+= [dict(r, worker=int(sys.argv[3]), round=int(sys.argv[4])) for r in json.loads(sys.argv[2])]; print(json.dumps(a))' "$results" "$out" "$w" "$r")
    kill "$wpid"; wait "$wpid" 2>/dev/null || true
    rm -f "$work/worker.pid"
  done
done
names=("${workers[@]}")
report=$(python3 - "$results" "$(IFS='|'; echo "${names[*]}")" "$(IFS='|'; echo "${loads[*]}")" \
  "$(IFS='|'; echo "${counters[*]}")" "$(IFS='|'; echo "${starts[*]}")" \
  "$(grep -E 'checkpoint (starting|complete)|automatic (vacuum|analyze)' "$work/pg/postgres.log" | cut -c1-160 || true)" <<PY
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
# Every round: each run's seconds, the CPU seconds it cost (worker + cluster + this client) and the
# cores the rest of the machine (other sessions) used meanwhile: machine busy minus those three,
# over the run's seconds. "CPU ratio" is COPY's CPU cost over the bootstrap's: the ratio the two
# would reach if they had one core between them (a loaded machine); the wall ratio can exceed it
# only while the worker and the backend run on two free cores at once.
counters = [json.loads(c) for c in sys.argv[4].split("|")]
starts = sys.argv[5].split("|")
print()
print("Every round (worker index as above; s = seconds; own CPU = worker + cluster + client CPU s; others = cores the rest of")
print("the machine used during the run; pg: checkpoints, buffers written by checkpointer+bgwriter+backends, blocks read,")
print("autovacuum+autoanalyze runs during the round):")
print()
print("| round | worker | start | load 1m | COPY s / own CPU / others | bootstrap s / own CPU (w+pg+client) / others | ratio | CPU ratio | gzip s | gzip ratio | pg |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
own = lambda r: r["worker_cpu"] + r["pg_cpu"] + r.get("client_cpu", 0)
oth = lambda r: (r.get("machine_cpu", 0) - own(r)) / r["secs"]
order = sorted({(r["round"], r["worker"]) for r in runs})
i = 0
for (rnd, w) in order:
    rs = [r for r in runs if r["round"] == rnd and r["worker"] == w]
    # With one worker, all rounds ran in one call: split them by position.
    for k in range(0, len(rs), 3):
        c, b, g = rs[k:k + 3]
        ct = counters[min(i, len(counters) - 1)]
        pg = f"{ct['checkpoints']} ckpt, {ct['buf_checkpoint'] + ct['buf_clean'] + ct['buf_backend']} buf, {ct['blks_read']} read, {ct['autovacuums']} av"
        print(f"| {rnd + k // 3} | {w} | {starts[min(i, len(starts) - 1)]} | {loads[min(i, len(loads) - 1)].split()[0]} | {c['secs']:.2f} / {own(c):.2f} / {oth(c):.2f} | "
              f"{b['secs']:.2f} / {own(b):.2f} ({b['worker_cpu']:.2f}+{b['pg_cpu']:.2f}+{b.get('client_cpu', 0):.2f}) / {oth(b):.2f} | {c['secs'] / b['secs']:.2f} | {own(c) / own(b):.2f} | {g['secs']:.2f} | {c['secs'] / g['secs']:.2f} | {pg} |")
    i += 1
print()
# Runs come as copy, bootstrap, gzip per round, in order.
cr = sorted(own(runs[i]) / own(runs[i + 1]) for i in range(0, len(runs), 3))
others = sorted(oth(r) for r in runs)
print(f"CPU ratio (COPY's CPU over the bootstrap's), all rounds min / median / max: {cr[0]:.2f} / {med(cr):.2f} / {cr[-1]:.2f}; "
      f"cores the rest of the machine used during the runs: {others[0]:.2f} / {med(others):.2f} / {others[-1]:.2f} (of $(nproc)).")
log = sys.argv[6].strip()
if log:
    print()
    print("Checkpoints and autovacuum in the server log:")
    print()
    for line in log.splitlines():
        print("    " + line)
PY
)
[ -n "${BOOTSTRAP_RAW:-}" ] && echo "$results" >"$BOOTSTRAP_RAW"
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
