#!/usr/bin/env bash
# Fan-out under attack: HOSTILE_SUBS normal WebSocket subscribers (default 1000) over
# HOSTILE_GROUPS groups (100) get HOSTILE_RATE single-row commits per second (500), and in
# alternate phases of HOSTILE_SECONDS (20) each, HOSTILE_ROUNDS times (3), 100 hostile
# connections run beside them (bad-frame floods, API keys revoked under them, subscribers that
# stop reading; see bench/src/bin/hostile_load.rs). One run, one worker: per phase, the normal
# subscribers' commit-to-receive p50/p99 and the worker's CPU; the report gives min/median/max
# over the rounds and the hostile/quiet p99 ratio (target: within 1.2x).
# HOSTILE_KINDS: a comma list of `frames` (bad-frame floods), `revoked` (API keys created,
# connected with and revoked under the connection), `stalled` (subscribe from 0, never read);
# default all three, the full mix. Hostile connection I is of kind I % 3, so one kind alone runs
# its third (33 or 34 connections) of the 100, to attribute the cost.
# BENCH_WORKER: another worker binary (e.g. main's thin-LTO build); no build then if
# target/release/hostile_load exists (build it first when bench/src changed).
# Per phase the report also gives CPU in cores of each process that could be the cost: the
# worker, its walsender and pooled backends (application_name sync_worker), pgbench and its
# backends, the load generator (and its attacker thread) and its backends, other Postgres
# processes, backends that exited, and the whole machine (other sessions included).
# HOSTILE_REVOKED_FROM=last (attribution only, not the attack): the `revoked` kind subscribes
# from the log's end instead of 0, which separates the revocation's cost from its replay's.
# SYNC_* variables reach the worker (e.g. SYNC_DB_CONNECTIONS, its pool size).
# HOSTILE_LATE_MS (default 1000): pgbench skips a commit that is this late on its -R schedule
# (-L), so a hostile phase that starves the writer does not leave a backlog that pgbench
# writes in a burst into the next quiet phase (it did: 5,900-6,900 deliveries/s against 5,000
# offered, p99 126-213 ms in "quiet" phases after hostile ones, 2026-11-30T20:58Z). 0: never.
# HOSTILE_STATEMENTS=1: load pg_stat_statements, reset it when the phases start (the set-up and
# the normal subscribers' first replay are not counted), and print after the report the 12
# statements that took the most database time over the phases (both kinds), each with its
# calls, time, shared blocks hit/read and rows, in total and per revoked-key cycle (divided by
# the cycles that ended, 4401 or otherwise), then the totals of the worker's statements (all but pgbench's insert, the load generator's
# key making, revoking and metering): with
# HOSTILE_KINDS=revoked, HOSTILE_ROUNDS=1, the database's cost of one revoked-key cycle
# (buffers are load-independent; times are not). Not added to RESULTS.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
subs=${HOSTILE_SUBS:-1000}
groups=${HOSTILE_GROUPS:-100}
rate=${HOSTILE_RATE:-500}
secs=${HOSTILE_SECONDS:-20}
rounds=${HOSTILE_ROUNDS:-3}
kinds=${HOSTILE_KINDS:-frames,revoked,stalled}
for k in ${kinds//,/ }; do
  case $k in frames | revoked | stalled) ;; *) echo "HOSTILE_KINDS: unknown kind $k" >&2; exit 2 ;; esac
done
[ -n "${BENCH_WORKER:-}" ] && [ -x "$here/target/release/hostile_load" ] || cargo build --release -q -p sync_worker -p pg_sync_bench
worker=${BENCH_WORKER:-$here/target/release/sync_worker}
load="$here/target/release/hostile_load"
ulimit -n "$(ulimit -Hn)"

conf=("shared_buffers = '512MB'")
[ "${HOSTILE_STATEMENTS:-0}" = 1 ] && conf+=("shared_preload_libraries = 'pg_sync, pg_stat_statements'")
bench_cluster hostile "${conf[@]}"
[ "${HOSTILE_STATEMENTS:-0}" = 1 ] && psql_b -d bench -c "CREATE EXTENSION pg_stat_statements"
bench_events
psql_b -d bench -c "INSERT INTO pg_sync.group_memberships (user_id, group_id)
  SELECT 'u' || i, 'g' || (i % $groups) FROM generate_series(0, $subs - 1) i
  UNION ALL SELECT 'h' || i, 'g' || (i % $groups) FROM generate_series(0, 99) i"
url=$(bench_url)
# Named, so the load generator can tell the worker's backends from the others.
start_worker DATABASE_URL="$url application_name=sync_worker"
wait_healthy

mkfifo "$work/go"
"$load" "$wport" bench "$subs" "$secs" "$rounds" "$wpid" "$url" "$kinds" <"$work/go" >"$work/load.out" &
load_pid=$!
exec 3>"$work/go"
until grep -q READY "$work/load.out"; do sleep 0.2; done
printf '\\set g random(0, %d)\nINSERT INTO events (grp, ts) VALUES (%s, extract(epoch FROM clock_timestamp()) * 1000);\n' \
  "$((groups - 1))" "'g' || :g" >"$work/write.sql"
total=$((rounds * 2 * (secs + 2) + 5))
late=${HOSTILE_LATE_MS:-1000}
limit=()
[ "$late" != 0 ] && limit=(-L "$late")
"$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c 4 -j 2 -R "$rate" "${limit[@]}" -T "$total" \
  -f "$work/write.sql" bench >"$work/pgbench.out" 2>&1 &
pg_pid=$!
sleep 3
[ "${HOSTILE_STATEMENTS:-0}" = 1 ] && psql_b -d bench -c "SELECT pg_stat_statements_reset()" >/dev/null
echo go >&3
wait "$load_pid" || true
load_pid=
kill "$pg_pid" 2>/dev/null || true
wait "$pg_pid" 2>/dev/null || true
pg_pid=
grep '^{' "$work/load.out" >"$work/phases.json"
commit=$(git -C "$here" rev-parse --short HEAD)

report=$(python3 - "$work/phases.json" <<PY
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
quiet = [r for r in rows if not r["hostile"]]
hostile = [r for r in rows if r["hostile"]]
def mmm(xs, f="{:.1f}"):
    return " / ".join(f.format(v) for v in (min(xs), statistics.median(xs), max(xs)))
ratios = [h["p99_ms"] / q["p99_ms"] for q, h in zip(quiet, hostile)]
last = rows[-1]
print(f"## $(date -u +%Y-%m-%dT%H:%MZ): \`bash bench/hostile.sh\` (HOSTILE_SUBS=$subs HOSTILE_GROUPS=$groups HOSTILE_RATE=$rate HOSTILE_SECONDS=$secs HOSTILE_ROUNDS=$rounds HOSTILE_KINDS=$kinds${HOSTILE_STATEMENTS:+ HOSTILE_STATEMENTS=$HOSTILE_STATEMENTS}${HOSTILE_REVOKED_FROM:+ HOSTILE_REVOKED_FROM=$HOSTILE_REVOKED_FROM}${SYNC_DB_CONNECTIONS:+ SYNC_DB_CONNECTIONS=$SYNC_DB_CONNECTIONS} HOSTILE_LATE_MS=$late), commit $commit")
print()
print("Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end; Postgres, the release worker, pgbench and the load generator share it.")
print("Worker $worker. One worker, $subs normal subscribers throughout; phases alternate quiet / hostile connections of kinds $kinds")
print("(of 100: a third flood bad frames, a third have their API key revoked under them, a third subscribe from 0 and stop reading; a kind left out is not run).")
print("min / median / max over the $rounds rounds:")
print()
print("| measure | quiet | with 100 hostile |")
print("|---|---|---|")
print(f"| normal p50 (ms) | {mmm([r['p50_ms'] for r in quiet])} | {mmm([r['p50_ms'] for r in hostile])} |")
print(f"| normal p99 (ms) | {mmm([r['p99_ms'] for r in quiet])} | {mmm([r['p99_ms'] for r in hostile])} |")
print(f"| normal p99.9 (ms) | {mmm([r['p999_ms'] for r in quiet])} | {mmm([r['p999_ms'] for r in hostile])} |")
print(f"| deliveries/s | {mmm([r['deliveries_per_s'] for r in quiet], '{:,.0f}')} | {mmm([r['deliveries_per_s'] for r in hostile], '{:,.0f}')} |")
print(f"| worker CPU (cores) | {mmm([r['worker_cpu'] for r in quiet], '{:.2f}')} | {mmm([r['worker_cpu'] for r in hostile], '{:.2f}')} |")
for k in sorted({k for r in rows for k in r.get("cores", {})}):
    print(f"| {k} (cores) | {mmm([r['cores'].get(k, 0) for r in quiet], '{:.3f}')} | {mmm([r['cores'].get(k, 0) for r in hostile], '{:.3f}')} |")
print()
print("Per phase (round, quiet/hostile): p99 ms, load average at its end: " + "; ".join(
    f"{r['round']}{'h' if r['hostile'] else 'q'} {r['p99_ms']:.1f} ({r.get('loadavg', '?')})" for r in rows))
print()
print(f"p99 hostile / quiet, per round: {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}; target <= 1.2).")
print(f"Hostile outcomes over the run: {last['bad_frame_closes']} closed 4400, {last['revoked_closes']} closed 4401, "
      f"{last['stalled_cutoffs']} stalled readers cut off 4008, {last['other_ends']} other ends; normal subscribers closed: {last['normal_closed']}; "
      f"revoked-kind handshakes refused (HTTP status: count, 0 no answer): {last.get('revoked_refused', '?')}; "
      f"frames-kind handshakes refused 429 (the penalty box): {last.get('frames_refused', '?')}.")
PY
)
echo "$report"
printf '\n%s\n' "$report" >>"$here/bench/RESULTS.md"
if [ "${HOSTILE_STATEMENTS:-0}" = 1 ]; then
  cycles=$(python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][-1]; print(max(r["revoked_closes"] + r["other_ends"], 1))' "$work/phases.json")
  echo "pg_stat_statements over the phases; per cycle = divided by $cycles revoked-key cycles (closes 4401 + other ends)"
  psql_b -d bench -c "SELECT calls, round(total_exec_time) AS ms, round(mean_exec_time::numeric, 2) AS mean_ms,
      shared_blks_hit AS hit, shared_blks_read AS read, rows,
      round(calls::numeric / $cycles, 2) AS calls_per_cycle, round((total_exec_time / $cycles)::numeric, 2) AS ms_per_cycle,
      round((shared_blks_hit + shared_blks_read)::numeric / $cycles) AS blks_per_cycle,
      left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS query
    FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12"
  psql_b -d bench -c "SELECT sum(calls) AS calls, round(sum(total_exec_time)) AS ms, sum(shared_blks_hit) AS hit,
      sum(shared_blks_read) AS read, round((sum(total_exec_time) / $cycles)::numeric, 2) AS ms_per_cycle,
      round(sum(shared_blks_hit + shared_blks_read) / $cycles) AS blks_per_cycle
    FROM pg_stat_statements
    WHERE query !~ 'INSERT INTO events|create_api_key|revoke_api_key|pg_stat_activity|pg_stat_statements|last_sync_id'"
fi
