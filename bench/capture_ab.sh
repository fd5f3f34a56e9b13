#!/usr/bin/env bash
# Capture cost on a noisy machine: pairs of bulk INSERT ... SELECT and UPDATE (PL/pgSQL audit
# trigger, then pg_sync, back to back on one cluster) with the ratio taken per pair, and WAL
# bytes per single-row insert/update transaction (deterministic: one client, fixed count).
# Prints min/median/max of the per-pair ratios. Knobs: AB_ROUNDS (5), AB_ROWS (50000), AB_TX (2000).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
rounds=${AB_ROUNDS:-5}
rows=${AB_ROWS:-50000}
txs=${AB_TX:-2000}
work=$(mktemp -d /tmp/pg_sync_ab.XXXXXX)
chmod 755 "$work"
port=$(free_port)
cleanup() { cluster_stop "$work/pg" immediate; rm -rf "$work"; }
trap cleanup EXIT
cluster_init "$work/pg" "$port" "pg_sync.node_id = 'bench'" "shared_buffers = '512MB'" "max_wal_size = '4GB'" \
  "checkpoint_timeout = '30min'" "synchronous_commit = off"
cluster_start "$work/pg"
psql_b() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
# The same tables and hand-written trigger as bench/write_overhead.sh.
sed -n '/^CREATE EXTENSION pg_sync;/,/^VACUUM ANALYZE;/p' "$here/bench/write_overhead.sh" | psql_b
ratios=()
uratios=()
for r in $(seq "$rounds"); do
  declare -A s=() u=()
  for t in t_plpgsql t_synced; do
    t0=$(date +%s.%N)
    psql_b -c "INSERT INTO $t (a, b, g) SELECT 'bulk ' || i, i, 'g' || (i % 10) FROM generate_series(1, $rows) i"
    t1=$(date +%s.%N)
    # The 10k rows both tables were loaded with (same ids), each updated once.
    psql_b -c "UPDATE $t SET b = b + 1 WHERE id <= 10000"
    t2=$(date +%s.%N)
    s[$t]=$(python3 -c "print($t1 - $t0)")
    u[$t]=$(python3 -c "print($t2 - $t1)")
  done
  ratios+=("$(python3 -c "print(${s[t_plpgsql]} / ${s[t_synced]})")")
  uratios+=("$(python3 -c "print(${u[t_plpgsql]} / ${u[t_synced]})")")
  echo "round $r: insert PL/pgSQL ${s[t_plpgsql]}s, pg_sync ${s[t_synced]}s; update ${u[t_plpgsql]}s, ${u[t_synced]}s" >&2
done
wal() { # table statement-template -> bytes per transaction
  local lsn0 lsn1
  python3 -c "
import sys
for i in range($txs): print(sys.argv[1].replace('@', str(i % 10000 + 1)) + ';')" "$2" >"$work/w.sql"
  lsn0=$(psql_b -tAc "SELECT pg_current_wal_insert_lsn()")
  psql_b -f "$work/w.sql" >/dev/null
  lsn1=$(psql_b -tAc "SELECT pg_current_wal_insert_lsn()")
  psql_b -tAc "SELECT round(('$lsn1'::pg_lsn - '$lsn0'::pg_lsn) / $txs)"
}
echo "| measure | min | median | max |"
echo "|---|---|---|---|"
python3 - "${ratios[*]}" "${uratios[*]}" "$rows" <<'PY'
import statistics, sys
for what, arg in [(f"INSERT ... SELECT of {sys.argv[3]} rows", sys.argv[1]), ("UPDATE of 10000 rows", sys.argv[2])]:
    r = sorted(float(x) for x in arg.split())
    print(f"| bulk {what}, pg_sync / PL/pgSQL ({len(r)} pairs) | {r[0]:.2f} | {statistics.median(r):.2f} | {r[-1]:.2f} |")
PY
for t in t_plain t_synced t_plpgsql; do
  echo "| WAL B per single-row INSERT tx, $t | $(wal $t "INSERT INTO $t (a, b, g) VALUES ('new row', 1, 'g3')") | | |"
  echo "| WAL B per single-row UPDATE tx, $t | $(wal $t "UPDATE $t SET b = b + 1 WHERE id = @") | | |"
done
