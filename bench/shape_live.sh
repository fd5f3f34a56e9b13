#!/usr/bin/env bash
# Live delivery, write to client: SHAPE_LIVE_RATES single-row commits per second (default
# "100 1000"), each row carrying the writer's clock (`ts`, unix ms), read at the same time by
# three clients of one user: the real @electric-sql/client through `GET /v1/shape` long-poll,
# the same through SSE (`liveSse`), both in Node, and a `/sync/ws` subscriber
# (bench/src/bin/fanout_load.rs). Each computes now - ts on arrival. SHAPE_LIVE_RUNS (2)
# windows of SHAPE_LIVE_SECONDS (15) per rate; reports p50/p99 per client. Needs tests/shape's
# npm packages.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rates=${SHAPE_LIVE_RATES:-100 1000}
secs=${SHAPE_LIVE_SECONDS:-15}
runs=${SHAPE_LIVE_RUNS:-2}
[ -n "${BENCH_WORKER:-}" ] && [ -x "$here/target/release/fanout_load" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
worker=${BENCH_WORKER:-$worker}
load="$here/target/release/fanout_load"
bench_cluster shape_live "shared_buffers = '256MB'"
bench_events
psql_b -d bench -c "SELECT pg_sync.add_member('u0', 'g0')"
start_worker
wait_healthy
token=$(bench_token u0)
printf "INSERT INTO events (grp, ts) VALUES ('g0', extract(epoch FROM clock_timestamp()) * 1000);\n" >"$work/write.sql"

rows=()
for rate in $rates; do
  for run in $(seq 1 "$runs"); do
    pids=()
    for who in ws longpoll sse; do
      rm -f "$work/go.$who"; mkfifo "$work/go.$who"
      if [ "$who" = ws ]; then
        "$load" "$wport" bench 1 "$secs" <"$work/go.$who" >"$work/out.$who" &
      else
        node "$here/bench/shape_live_client.mjs" "http://127.0.0.1:$wport/v1/shape" "$token" events \
          "$who" "$secs" <"$work/go.$who" >"$work/out.$who" &
      fi
      pids+=($!)
    done
    exec 3>"$work/go.ws" 4>"$work/go.longpoll" 5>"$work/go.sse"
    for who in ws longpoll sse; do
      until grep -q READY "$work/out.$who"; do sleep 0.1; done
    done
    sleep 1
    echo go >&3; echo go >&4; echo go >&5
    # Writers spread over 4 connections so 1,000 commits/s keep their schedule.
    "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c 4 -j 2 -R "$rate" -T "$secs" \
      -f "$work/write.sql" bench >"$work/pgbench.out" 2>&1
    for pid in "${pids[@]}"; do wait "$pid" || true; done
    exec 3>&- 4>&- 5>&-
    written=$(sed -n 's/.*number of transactions actually processed: \([0-9]*\).*/\1/p' "$work/pgbench.out")
    rows+=("$(python3 - "$rate" "$written" "$work/out.ws" "$work/out.longpoll" "$work/out.sse" "$(uptime | sed 's/.*load average: //')" <<'PY'
import json, sys
rate, written = sys.argv[1], sys.argv[2]
res = [json.loads([l for l in open(f) if l.startswith("{")][-1]) for f in sys.argv[3:6]]
cells = " | ".join(f"{r['deliveries']} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f}" for r in res)
print(f"| {rate} | {written} | {cells} | {sys.argv[6]} |")
PY
)")
    echo "${rows[-1]}"
  done
done

commit=$(git -C "$here" log -1 --format='%h' )
report=$( {
  echo "## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/shape_live.sh\` (SHAPE_LIVE_RATES=\"$rates\" SHAPE_LIVE_SECONDS=$secs SHAPE_LIVE_RUNS=$runs, commit $commit)"
  echo
  echo "Machine: $(nproc) cores shared with other sessions; release build; Postgres, the worker, pgbench and the three"
  echo "clients share it. One user; each single-row commit carries the writer's clock; latency = arrival - that clock, ms."
  echo "Long-poll and SSE: the real @electric-sql/client 1.5.28 in Node (one ShapeStream each); /sync/ws: fanout_load (Rust)."
  echo
  echo "| commits/s | written | /sync/ws received | /sync/ws p50 / p99 | long-poll received | long-poll p50 / p99 | SSE received | SSE p50 / p99 | load average |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} )
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
