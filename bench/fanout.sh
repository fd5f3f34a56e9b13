#!/usr/bin/env bash
# Fan-out: FANOUT_SUBS WebSocket subscribers (default 10000) over FANOUT_GROUPS groups (100), and
# FANOUT_RATE single-row commits per second (1000) spread over the groups, so
# RATE * SUBS / GROUPS deliveries per second are offered (100,000 by default). The load generator
# is a separate process; it measures commit-to-receive latency from a timestamp written with each
# row. Reports deliveries/s against the offered rate, p50/p99, and worker memory per idle
# subscriber. Knob: FANOUT_SECONDS (60).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
subs=${FANOUT_SUBS:-10000}
groups=${FANOUT_GROUPS:-100}
rate=${FANOUT_RATE:-1000}
secs=${FANOUT_SECONDS:-60}
# BENCH_WORKER: another worker binary (an A/B run against an older build); no build then.
[ -n "${BENCH_WORKER:-}" ] && [ -x "$here/target/release/fanout_load" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
worker=${BENCH_WORKER:-$here/target/release/sync_worker}
load="$here/target/release/fanout_load"
ulimit -n "$(ulimit -Hn)"

bench_cluster fanout "shared_buffers = '512MB'"
bench_events
psql_b -d bench -c "INSERT INTO pg_sync.group_memberships (user_id, group_id)
  SELECT 'u' || i, 'g' || (i % $groups) FROM generate_series(0, $subs - 1) i"
start_worker
wait_healthy
rss() { awk '/VmRSS/ {print $2}' "/proc/$wpid/status"; }
rss0=$(rss)

# Subscribers start after the log's end: the bench measures live fan-out, not a replay of the
# 10k membership actions the set-up logged (each from-0 replay reads the whole membership
# transaction: quadratic, minutes of set-up).
until [ "$(psql_b -d bench -Atc "SELECT pg_sync.last_sync_id() >= $subs")" = t ]; do sleep 0.2; done
after=$(psql_b -d bench -Atc "SELECT pg_sync.last_sync_id()")
mkfifo "$work/go"
"$load" "$wport" bench "$subs" "$secs" "$after" <"$work/go" >"$work/load.out" &
load_pid=$!
exec 3>"$work/go"
until grep -q READY "$work/load.out"; do sleep 0.2; done
sleep 2
rss1=$(rss)
printf '\\set g random(0, %d)\nINSERT INTO events (grp, ts) VALUES (%s, extract(epoch FROM clock_timestamp()) * 1000);\n' \
  "$((groups - 1))" "'g' || :g" >"$work/write.sql"
# CPU time (utime + stime, clock ticks) of the worker and of the load generator over the run:
# on 2 shared cores, which of them ran out of CPU is the first question about a missed p99.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
hz=$(getconf CLK_TCK)
wcpu0=$(cpu "$wpid"); lcpu0=$(cpu "$load_pid")
metrics0=$(curl -fsS "http://127.0.0.1:$wport/metrics" | grep '^pg_sync_\(delivery_seconds_bucket\|flush_seconds_count\)' || true)
echo go >&3
"$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c 4 -j 2 -R "$rate" -T "$((secs + 2))" \
  -f "$work/write.sql" bench >"$work/pgbench.out" 2>&1 &
pg_pid=$!
peak=$rss1
# The load generator exits as soon as its time is up: its CPU is read every second while it runs.
lcpu1=$lcpu0
for _ in $(seq 1 "$secs"); do
  sleep 1; r=$(rss); [ "$r" -gt "$peak" ] && peak=$r
  l=$(cpu "$load_pid"); [ "$l" -gt 0 ] && lcpu1=$l
done
wcpu1=$(cpu "$wpid")
metrics1=$(curl -fsS "http://127.0.0.1:$wport/metrics" | grep '^pg_sync_\(delivery_seconds_bucket\|flush_seconds_count\)' || true)
# Sequencer flushes (each one awaited persist) per second over the run.
flushes=$(( ($(echo "$metrics1" | awk '/^pg_sync_flush_seconds_count/ {print int($2)}') + 0 - ($(echo "$metrics0" | awk '/^pg_sync_flush_seconds_count/ {print int($2)}') + 0)) / secs ))
# The worker's own share of the latency: commit in Postgres to queued for every subscriber
# (pg_sync_delivery_seconds over the run), as the upper bound of the bucket holding p50 / p99.
worker_pcts=$(python3 - "$metrics0" "$metrics1" <<'PY'
import re, sys
def parse(text):
    return {float(m.group(1)) if m.group(1) != '+Inf' else float('inf'): float(m.group(2))
            for m in re.finditer(r'le="([^"]+)"\} (\S+)', text)}
a, b = parse(sys.argv[1]), parse(sys.argv[2])
d = sorted((le, b[le] - a.get(le, 0)) for le in b)
total = d[-1][1] if d else 0
def pct(q):
    for le, n in d:
        if total and n >= q * total:
            return '<= %g ms' % (le * 1000)
    return 'n/a'
print(pct(0.5) + ' / ' + pct(0.99))
PY
)
wait "$load_pid" || true
load_pid=
wait "$pg_pid" || true
result=$(grep '^{' "$work/load.out")
tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/pgbench.out" | head -1)

report=$(python3 - <<PY
import json
r = json.loads('''$result''')
offered = $rate * $subs / $groups
print(f"## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/fanout.sh\` (FANOUT_SUBS=$subs FANOUT_GROUPS=$groups FANOUT_RATE=$rate FANOUT_SECONDS=$secs)")
print()
print("Commit $(git -C "$here" log -1 --format=%h); worker $worker; load average $(cut -d' ' -f1-3 /proc/loadavg).")
print("Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; Postgres, the worker, pgbench and the load generator share it.")
print()
print("| measure | value |")
print("|---|---|")
print(f"| commits/s written (pgbench -R $rate) | {float('${tps:-0}'):,.0f} |")
print(f"| deliveries/s offered (commits/s x $subs / $groups) | {offered:,.0f} |")
print(f"| deliveries/s received | {r['deliveries_per_s']:,.0f} |")
print(f"| received / offered | {r['deliveries_per_s'] / offered:.2f} |")
print(f"| commit-to-receive p50 / p99 / p99.9 | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['p999_ms']:.1f} ms |")
print(f"| subscribers closed during the run | {r['closed']} |")
print(f"| worker RSS: empty / {$subs} idle subscribers / peak under load | {$rss0/1024:.0f} / {$rss1/1024:.0f} / {$peak/1024:.0f} MiB |")
print(f"| commit to queued in the worker (pg_sync_delivery_seconds) p50 / p99 | $worker_pcts |")
print(f"| sequencer flushes per second (pg_sync_flush_seconds_count) | $flushes |")
print(f"| CPU over the run: worker / load generator (of 2 cores x {$secs} s) | {($wcpu1 - $wcpu0) / $hz / $secs:.2f} / {($lcpu1 - $lcpu0) / $hz / $secs:.2f} cores |")
print(f"| worker memory per idle subscriber | {($rss1 - $rss0) * 1024 / $subs / 1024:.1f} KiB |")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
