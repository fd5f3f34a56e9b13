#!/usr/bin/env bash
# Where a captured single-row transaction's WAL goes, record by record: WAL_TX (200) single-row
# INSERT and then UPDATE transactions into each of bench/write_overhead.sh's tables (t_plain
# unregistered, t_plpgsql with the hand-written audit trigger, t_synced registered), with
# full_page_writes off, then pg_waldump over each measured range, every record attributed to its
# relation (by relfilenode) and record type. Prints bytes per transaction per (relation, record),
# and the total by LSN difference. Deterministic: one client, fixed count, after a warm-up pass.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
txs=${WAL_TX:-200}
bench_write_tables walrec "full_page_writes = off" "max_wal_size = '4GB'" \
  "checkpoint_timeout = '30min'" "synchronous_commit = off"
lsn() { psql_w -tAc "SELECT pg_current_wal_insert_lsn()"; }
psql_w -tA -F' ' -c "SELECT relfilenode, c.relname FROM pg_class c WHERE relfilenode <> 0" >"$work/rels"
for t in t_plain t_plpgsql t_synced; do
  for op in INSERT UPDATE; do
    if [ $op = INSERT ]; then tmpl="INSERT INTO $t (a, b, g) VALUES ('new row', 1, 'g3')"
    else tmpl="UPDATE $t SET b = b + 1 WHERE id = @"; fi
    python3 -c "
import sys
for i in range($txs): print(sys.argv[1].replace('@', str(i * 7 % 10000 + 1)) + ';')" "$tmpl" >"$work/w.sql"
    psql_w -f "$work/w.sql" >/dev/null # warm-up
    a=$(lsn)
    psql_w -f "$work/w.sql" >/dev/null
    b=$(lsn)
    psql_w -c CHECKPOINT >/dev/null
    as_pg "$PG_BIN/pg_waldump" -p "$work/pg/data/pg_wal" -s "$a" -e "$b" 2>/dev/null >"$work/dump"
    python3 - "$work/rels" "$work/dump" "$t" "$op" "$txs" "$a" "$b" <<'PY'
import collections, re, sys
rels = dict(l.split() for l in open(sys.argv[1]) if l.strip())
n = int(sys.argv[5])
agg = collections.Counter(); cnt = collections.Counter()
for l in open(sys.argv[2]):
    m = re.match(r"rmgr: (\S+)\s+len \(rec/tot\):\s+\d+/\s*(\d+),.*desc: (\S+)", l)
    if not m: continue
    rm, tot, desc = m.group(1), int(m.group(2)), m.group(3)
    r = re.search(r"rel \d+/\d+/(\d+)", l)
    rel = rels.get(r.group(1), r.group(1)) if r else "-"
    agg[(rel, rm + "/" + desc)] += tot; cnt[(rel, rm + "/" + desc)] += 1
def lsn(s):
    hi, lo = s.split("/"); return (int(hi, 16) << 32) + int(lo, 16)
total = (lsn(sys.argv[7]) - lsn(sys.argv[6])) / n
print(f"\n{sys.argv[3]} {sys.argv[4]}: {total:.0f} B per tx by LSN difference, {sum(agg.values())/n:.0f} B by pg_waldump")
print("| relation | record | records per tx | B per tx |")
print("|---|---|---|---|")
for k, v in sorted(agg.items(), key=lambda kv: -kv[1]):
    print(f"| {k[0]} | {k[1]} | {cnt[k]/n:.2f} | {v/n:.1f} |")
PY
  done
done
