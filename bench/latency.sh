#!/usr/bin/env bash
# Write-to-client latency at light load, side by side with pg_recvlogical on the same WAL:
# LATENCY_RATE single-row commits per second (default 20) into a registered table, one
# WebSocket subscriber on the worker, and pg_recvlogical (pgoutput, its own slot, same
# publication) reading the same commits at the same time. Each row carries the writer's clock
# at insert (`ts`, unix ms); both readers compute now - ts on arrival. LATENCY_RUNS (3)
# windows of LATENCY_SECONDS (20) each; reports p50/p99 for both and the differences (goal:
# p50 within 2 ms, p99 within 5 ms of pg_recvlogical).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rate=${LATENCY_RATE:-20}
secs=${LATENCY_SECONDS:-20}
runs=${LATENCY_RUNS:-3}
[ -n "${BENCH_WORKER:-}" ] && [ -x "$here/target/release/fanout_load" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
worker=${BENCH_WORKER:-$here/target/release/sync_worker}
load="$here/target/release/fanout_load"

bench_cluster latency "shared_buffers = '256MB'"
# On every exit (a failed window, pg_recvlogical erroring, Ctrl-C): this script's readers, then
# lib.sh's cleanup (worker, helpers by pid, the cluster), which runs each step whatever failed.
latency_cleanup() {
  set +e
  [ -n "${pipe_pid:-}" ] && kill "$pipe_pid" 2>/dev/null
  bench_cleanup
}
trap latency_cleanup EXIT
bench_events
psql_b -d bench <<SQL
INSERT INTO pg_sync.group_memberships (user_id, group_id) VALUES ('u0', 'g0');
CREATE PUBLICATION pg_sync FOR TABLE pg_sync.sync_actions, pg_sync.group_memberships,
  pg_sync.api_keys, pg_sync.registry WITH (publish = 'insert, update, delete, truncate');
SELECT pg_create_logical_replication_slot('baseline', 'pgoutput');
SQL
start_worker
wait_healthy

# The baseline reader: pg_recvlogical's raw pgoutput, the ts found in the row's text.
cat >"$work/recv.py" <<'PY'
import os, re, sys, time
pat = re.compile(rb'"ts": ([0-9.e+]+)')
lat, buf, start = [], b"", float(sys.argv[2])
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    now = time.time() * 1000.0
    buf += chunk
    last = 0
    for m in pat.finditer(buf):
        ts = float(m.group(1))
        if ts >= start:  # rows of an earlier window the slot sends again are not counted
            lat.append(now - ts)
        last = m.end()
    buf = buf[last:][-64:]
with open(sys.argv[1], "w") as f:
    f.write("\n".join(f"{v:.3f}" for v in lat))
PY
printf "\\\\set g 0\nINSERT INTO events (grp, ts) VALUES ('g0', extract(epoch FROM clock_timestamp()) * 1000);\n" >"$work/write.sql"

rows=()
for run in $(seq 1 "$runs"); do
  start_ms=$(date +%s%3N)
  { "$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$port" -U postgres -d bench --slot baseline --start \
      -o proto_version=1 -o publication_names=pg_sync -f - & echo $! >"$work/recv.pid"; wait; } |
    python3 "$work/recv.py" "$work/recv.$run" "$start_ms" &
  pipe_pid=$!
  until [ -s "$work/recv.pid" ]; do sleep 0.05; done
  recv_pid=$(cat "$work/recv.pid")
  rm -f "$work/go"; mkfifo "$work/go"
  "$load" "$wport" bench 1 "$secs" <"$work/go" >"$work/load.out" &
  load_pid=$!
  exec 3>"$work/go"
  until grep -q READY "$work/load.out"; do sleep 0.1; done
  sleep 1
  echo go >&3
  "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c 1 -R "$rate" -T "$secs" \
    -f "$work/write.sql" bench >"$work/pgbench.out" 2>&1
  wait "$load_pid" || true
  load_pid=
  exec 3>&-
  sleep 0.5
  kill -INT "$recv_pid" 2>/dev/null || true
  wait "$pipe_pid" 2>/dev/null || true
  recv_pid= pipe_pid=
  rm -f "$work/recv.pid"
  ws=$(grep '^{' "$work/load.out")
  # Where the worker's time went (cumulative over the runs so far): visibility waits, and the
  # mean persist+publish time per flush.
  curl -fsS "http://127.0.0.1:$wport/metrics" | awk '
    /^pg_sync_sequencer_visibility_waits_total / {w = $2}
    /^pg_sync_flush_seconds_sum / {s = $2} /^pg_sync_flush_seconds_count / {c = $2}
    END {if (c > 0) printf "worker so far: %d flushes, mean flush %.2f ms, %d visibility waits\n", c, 1000 * s / c, w}' >&2 || true
  rows+=("$(python3 - "$work/recv.$run" "$ws" "$(uptime | sed 's/.*load average: //')" <<'PY'
import json, sys
lat = sorted(float(x) for x in open(sys.argv[1]).read().split() if x)
ws = json.loads(sys.argv[2])
def pct(p):
    return lat[min(len(lat) - 1, max(0, int(round(p * len(lat) + 0.5)) - 1))] if lat else float("nan")
b50, b99 = pct(0.50), pct(0.99)
print(f"| {len(lat)} | {b50:.1f} / {b99:.1f} | {ws['deliveries']} | {ws['p50_ms']:.1f} / {ws['p99_ms']:.1f} | "
      f"{ws['p50_ms'] - b50:+.1f} / {ws['p99_ms'] - b99:+.1f} | {sys.argv[3]} |")
PY
)")
  echo "${rows[-1]}"
done

commit=$(git -C "$here" log -1 --format='%h %s' | cut -c1-70)
report=$( {
  echo "## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/latency.sh\` (LATENCY_RATE=$rate LATENCY_SECONDS=$secs LATENCY_RUNS=$runs)"
  echo
  echo "Commit $commit; worker $worker. Machine: $(nproc) cores; release build; one subscriber, $rate single-row commits/s;"
  echo "pg_recvlogical (pgoutput) reads the same commits from its own slot at the same time. Latency is"
  echo "now - the writer's clock at insert, in ms. Goal (issue 11): p50 within 2 ms, p99 within 5 ms of pg_recvlogical."
  echo
  echo "| pg_recvlogical rows | pg_recvlogical p50 / p99 | worker deliveries | worker p50 / p99 | worker - pg_recvlogical p50 / p99 | load average |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} )
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
