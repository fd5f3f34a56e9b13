#!/usr/bin/env bash
# Capture cost on a noisy machine: pairs of bulk INSERT ... SELECT and UPDATE (PL/pgSQL audit
# trigger, then pg_sync, back to back on one cluster) with the ratio taken per pair, and WAL
# bytes per single-row insert/update transaction (deterministic: one client, fixed count).
# Prints min/median/max of the per-pair ratios, of wall time and of the writing backend's own CPU
# time (user + system from /proc, which other load on a shared machine disturbs far less), and
# the same statements into the unregistered table. Knobs: AB_ROUNDS (5), AB_ROWS (50000),
# AB_TX (2000).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
rounds=${AB_ROUNDS:-5}
rows=${AB_ROWS:-50000}
txs=${AB_TX:-2000}
bench_write_tables ab "shared_buffers = '512MB'" "max_wal_size = '4GB'" \
  "checkpoint_timeout = '30min'" "synchronous_commit = off"
timed() { # statement -> "wall_seconds cpu_seconds" of one session running it
  local out
  out=$(psql_w -At <<SQL
SELECT pg_backend_pid() AS pid \gset
\setenv PID :pid
\! awk '{print "cpu0", \$14 + \$15}' /proc/\$PID/stat; echo "wall0 \$(date +%s.%N)"
$1;
\! awk '{print "cpu1", \$14 + \$15}' /proc/\$PID/stat; echo "wall1 \$(date +%s.%N)"
SQL
)
  python3 -c '
import sys
v = {}
for l in sys.argv[1].splitlines():
    p = l.split()
    if len(p) == 2 and p[0] in ("cpu0", "cpu1", "wall0", "wall1"):
        v[p[0]] = float(p[1])
print(v["wall1"] - v["wall0"], (v["cpu1"] - v["cpu0"]) / float(sys.argv[2]))
' "$out" "$(getconf CLK_TCK)"
}
ratios=()
uratios=()
cratios=()
ucratios=()
pratios=()
for r in $(seq "$rounds"); do
  declare -A s=() u=() cs=() cu=()
  for t in t_plain t_plpgsql t_synced; do
    read -r "s[$t]" "cs[$t]" < <(timed "INSERT INTO $t (a, b, g) SELECT 'bulk ' || i, i, 'g' || (i % 10) FROM generate_series(1, $rows) i")
    # The 10k rows the tables were loaded with (same ids), each updated once.
    read -r "u[$t]" "cu[$t]" < <(timed "UPDATE $t SET b = b + 1 WHERE id <= 10000")
  done
  ratios+=("$(python3 -c "print(${s[t_plpgsql]} / ${s[t_synced]})")")
  uratios+=("$(python3 -c "print(${u[t_plpgsql]} / ${u[t_synced]})")")
  cratios+=("$(python3 -c "print(${cs[t_plpgsql]} / max(${cs[t_synced]}, 0.01))")")
  ucratios+=("$(python3 -c "print(${cu[t_plpgsql]} / max(${cu[t_synced]}, 0.01))")")
  pratios+=("$(python3 -c "print(${cs[t_plain]} / max(${cs[t_synced]}, 0.01))")")
  echo "round $r: wall/cpu s: insert plain ${s[t_plain]}/${cs[t_plain]} PL/pgSQL ${s[t_plpgsql]}/${cs[t_plpgsql]} pg_sync ${s[t_synced]}/${cs[t_synced]}; update PL/pgSQL ${u[t_plpgsql]}/${cu[t_plpgsql]} pg_sync ${u[t_synced]}/${cu[t_synced]}" >&2
done
wal() { # table statement-template -> bytes per transaction
  # Full-page images after a checkpoint would dominate (the state key index is written at random
  # leaf pages): checkpoint, warm up (taking the images), then measure twice and keep the
  # smaller figure, so a checkpoint starting mid-measurement does not count.
  local lsn0 lsn1 best=
  python3 -c "
import sys
for i in range($txs): print(sys.argv[1].replace('@', str(i % 10000 + 1)) + ';')" "$2" >"$work/w.sql"
  psql_w -c CHECKPOINT
  psql_w -f "$work/w.sql" >/dev/null
  for _ in 1 2; do
    lsn0=$(psql_w -tAc "SELECT pg_current_wal_insert_lsn()")
    psql_w -f "$work/w.sql" >/dev/null
    lsn1=$(psql_w -tAc "SELECT pg_current_wal_insert_lsn()")
    b=$(psql_w -tAc "SELECT round(('$lsn1'::pg_lsn - '$lsn0'::pg_lsn) / $txs)")
    if [ -z "$best" ] || [ "$b" -lt "$best" ]; then best=$b; fi
  done
  echo "$best"
}
echo "| measure | min | median | max |"
echo "|---|---|---|---|"
python3 - "${ratios[*]}" "${uratios[*]}" "$rows" "${cratios[*]}" "${ucratios[*]}" "${pratios[*]}" <<'PY'
import statistics, sys
for what, arg in [(f"INSERT ... SELECT of {sys.argv[3]} rows, pg_sync / PL/pgSQL, wall", sys.argv[1]),
                  ("UPDATE of 10000 rows, pg_sync / PL/pgSQL, wall", sys.argv[2]),
                  (f"INSERT ... SELECT of {sys.argv[3]} rows, pg_sync / PL/pgSQL, backend CPU", sys.argv[4]),
                  ("UPDATE of 10000 rows, pg_sync / PL/pgSQL, backend CPU", sys.argv[5]),
                  (f"INSERT ... SELECT of {sys.argv[3]} rows, pg_sync / unregistered, backend CPU", sys.argv[6])]:
    r = sorted(float(x) for x in arg.split())
    print(f"| bulk {what} ({len(r)} rounds) | {r[0]:.2f} | {statistics.median(r):.2f} | {r[-1]:.2f} |")
PY
for t in t_plain t_synced t_plpgsql; do
  echo "| WAL B per single-row INSERT tx, $t | $(wal $t "INSERT INTO $t (a, b, g) VALUES ('new row', 1, 'g3')") | | |"
  echo "| WAL B per single-row UPDATE tx, $t | $(wal $t "UPDATE $t SET b = b + 1 WHERE id = @") | | |"
done
