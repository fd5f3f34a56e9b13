#!/usr/bin/env bash
# WAL bytes per single-row captured transaction, deterministic: full_page_writes off (no
# full-page images, which depend on checkpoint timing and swamp the per-record figures
# capture_ab.sh prints), one client, a fixed count, the same tables as bench/write_overhead.sh.
# Prints bytes per transaction for INSERT and UPDATE into the unregistered table, the PL/pgSQL
# audit trigger's and pg_sync's, then pg_waldump's per-record breakdown of pg_sync's inserts.
# Then WAL bytes per row of one multi-row INSERT ... SELECT (WAL_BULK_ROWS, 20000) into each.
# Knobs: WAL_TX (1000), WAL_BULK_ROWS.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
txs=${WAL_TX:-1000}
bulk=${WAL_BULK_ROWS:-20000}
bench_write_tables wal "full_page_writes = off" "max_wal_size = '4GB'" \
  "checkpoint_timeout = '30min'" "synchronous_commit = off"
lsn() { psql_w -tAc "SELECT pg_current_wal_insert_lsn()"; }
run() { # table template -> "bytes_per_tx start_lsn end_lsn"
  python3 -c "
import sys
for i in range($txs): print(sys.argv[1].replace('@', str(i % 10000 + 1)) + ';')" "$2" >"$work/w.sql"
  psql_w -f "$work/w.sql" >/dev/null # warm-up: first touches of pages, relcache
  local a b
  a=$(lsn)
  psql_w -f "$work/w.sql" >/dev/null
  b=$(lsn)
  echo "$(psql_w -tAc "SELECT round(('$b'::pg_lsn - '$a'::pg_lsn) / $txs)") $a $b"
}
echo "| WAL B per single-row tx ($txs tx, full_page_writes off) | INSERT | UPDATE |"
echo "|---|---|---|"
for t in t_plain t_plpgsql t_synced; do
  read -r ins a b < <(run $t "INSERT INTO $t (a, b, g) VALUES ('new row', 1, 'g3')")
  if [ $t = t_synced ]; then ia=$a ib=$b; fi
  read -r upd _ _ < <(run $t "UPDATE $t SET b = b + 1 WHERE id = @")
  echo "| $t | $ins | $upd |"
done
echo
echo "pg_sync's INSERT transactions, per record type (pg_waldump --stats=record):"
psql_w -c CHECKPOINT >/dev/null
as_pg "$PG_BIN/pg_waldump" -p "$work/pg/data/pg_wal" -s "$ia" -e "$ib" --stats=record 2>/dev/null |
  awk -v n="$txs" 'NR <= 2 || ($2 > 0 && $0 !~ /^Total/) { print } /^Total/ { print; print "per tx:", int($3 / n + 0.5), "B" }'
echo
echo "| WAL B per row of one INSERT ... SELECT of $bulk rows | t_plain | t_plpgsql | t_synced |"
echo "|---|---|---|---|"
row="|"
for t in t_plain t_plpgsql t_synced; do
  a=$(lsn)
  psql_w -c "INSERT INTO $t (a, b, g) SELECT 'bulk ' || i, i, 'g' || (i % 10) FROM generate_series(1, $bulk) i" >/dev/null
  b=$(lsn)
  row="$row $(psql_w -tAc "SELECT round(('$b'::pg_lsn - '$a'::pg_lsn) / $bulk)") |"
done
echo "| bytes $row"
