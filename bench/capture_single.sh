#!/usr/bin/env bash
# The pgbench single-row goal measured where a loaded machine does not drown it: the writing
# backend's own CPU time (user + system from /proc) for SINGLE_TX single-row INSERT (then
# UPDATE) transactions, autocommit, one session, into the unregistered table, the PL/pgSQL
# audit trigger's and pg_sync's (bench/write_overhead.sh's tables), interleaved per round. Each
# transaction is parsed, planned, executed and committed as pgbench's simple protocol does;
# the client's own time and the wait for the socket are not counted. Prints min/median/max of
# the per-round ratios unregistered / pg_sync (1.0 = capture is free; the goal is >= 0.85).
# Knobs: SINGLE_TX (5000), SINGLE_ROUNDS (3).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
txs=${SINGLE_TX:-5000}
rounds=${SINGLE_ROUNDS:-3}
bench_write_tables single "shared_buffers = '512MB'" "max_wal_size = '4GB'" \
  "checkpoint_timeout = '30min'" "synchronous_commit = off"
cpu() { # sql-file -> backend CPU seconds of one session running it
  local out
  out=$(psql_w -At <<SQL
SELECT pg_backend_pid() AS pid \gset
\setenv PID :pid
\! awk '{print "cpu0", \$14 + \$15}' /proc/\$PID/stat
\i $1
\! awk '{print "cpu1", \$14 + \$15}' /proc/\$PID/stat
SQL
)
  python3 -c '
import sys
v = dict(l.split() for l in sys.argv[1].splitlines() if l.startswith("cpu"))
print((float(v["cpu1"]) - float(v["cpu0"])) / float(sys.argv[2]))' "$out" "$(getconf CLK_TCK)"
}
for t in t_plain t_plpgsql t_synced; do
  python3 -c "
for i in range($txs): print(\"INSERT INTO $t (a, b, g) VALUES ('new row', 1, 'g3');\")" >"$work/ins_$t.sql"
  python3 -c "
for i in range($txs): print(f'UPDATE $t SET b = b + 1 WHERE id = {i % 10000 + 1};')" >"$work/upd_$t.sql"
  cpu "$work/ins_$t.sql" >/dev/null # warm-up
done
declare -A r=()
for round in $(seq "$rounds"); do
  for w in ins upd; do
    declare -A c=()
    for t in t_plain t_plpgsql t_synced; do c[$t]=$(cpu "$work/${w}_$t.sql"); done
    echo "round $round $w: backend CPU us/tx: plain $(python3 -c "print(round(${c[t_plain]} * 1e6 / $txs, 1))") PL/pgSQL $(python3 -c "print(round(${c[t_plpgsql]} * 1e6 / $txs, 1))") pg_sync $(python3 -c "print(round(${c[t_synced]} * 1e6 / $txs, 1))")" >&2
    r[$w,plain]+="$(python3 -c "print(${c[t_plain]} / max(${c[t_synced]}, 0.01))") "
    r[$w,plpgsql]+="$(python3 -c "print(${c[t_plpgsql]} / max(${c[t_synced]}, 0.01))") "
  done
done
echo "| single-row transactions ($txs per round, $rounds rounds), backend CPU | min | median | max |"
echo "|---|---|---|---|"
for w in ins upd; do
  for b in plain plpgsql; do
    python3 - "$w" "$b" "${r[$w,$b]}" <<'PY'
import statistics, sys
w, b, vals = sys.argv[1], sys.argv[2], sorted(float(x) for x in sys.argv[3].split())
what = {"ins": "INSERT", "upd": "UPDATE"}[w]
base = {"plain": "unregistered / pg_sync", "plpgsql": "PL/pgSQL / pg_sync"}[b]
print(f"| {what}, {base} | {vals[0]:.2f} | {statistics.median(vals):.2f} | {vals[-1]:.2f} |")
PY
  done
done
