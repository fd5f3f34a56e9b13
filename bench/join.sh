#!/usr/bin/env bash
# Snapshot join through the extension's functions (what the worker runs, without the network):
# a sender database with N rows, a receiver that pulls the state in pages of 1000
# (peer_snapshot on the sender, apply_peer_snapshot on the receiver, one transaction per page),
# against plain INSERT ... SELECT of the same rows into an unregistered table on the receiver.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
n=${JOIN_ROWS:-50000}
bench_cluster join "fsync = off"
psql_b -d postgres -c "CREATE DATABASE recv" -c "ALTER DATABASE bench SET pg_sync.node_id = 's'" \
  -c "ALTER DATABASE recv SET pg_sync.node_id = 'r'"
for db in bench recv; do
  psql_b -d "$db" -c "CREATE EXTENSION pg_sync" \
    -c "CREATE TABLE items (id text PRIMARY KEY, a text, b int, grp text)" \
    -c "SELECT pg_sync.register_table('items', group_column => 'grp')"
done
psql_b -d bench -c "INSERT INTO items SELECT 'k' || g, md5(g::text), g, 'g' || (g % 50) FROM generate_series(1, $n) g" \
  -c "SELECT pg_sync.add_peer('r', 'ws://127.0.0.1:1', 'a-secret-of-16-chars'), pg_sync.pin_peer('r', 'r')" >/dev/null
psql_b -d recv -c "SELECT pg_sync.add_peer('s', 'ws://127.0.0.1:1', 'a-secret-of-16-chars'), pg_sync.pin_peer('s', 's')" \
  -c "CREATE TABLE plain (id text PRIMARY KEY, a text, b int, grp text)" >/dev/null
start=$(date +%s.%N)
read -r w epoch cursors < <(psql_b -d bench -At -F ' ' -c \
  "SELECT j->>'w', j->>'epoch', j->'cursors' FROM pg_sync.peer_join_start('r') j")
psql_b -d recv -At -c "SELECT pg_sync.begin_peer_join('s', '$epoch', $w, '$cursors')" >/dev/null
m='' id=''
while :; do
  psql_b -d bench -At -o "$work/page.json" \
    -c "SELECT coalesce(jsonb_agg(to_jsonb(x)), '[]') FROM pg_sync.peer_snapshot('r', '$m', '$id', 1000) x"
  pos=$(psql_b -d recv -At <<SQL
\\set page \`cat $work/page.json\`
SELECT x->>'after_model' || ' ' || (x->>'after_model_id') || ' ' || (x->>'rows')
  FROM pg_sync.apply_peer_snapshot('s', $w, '$m', '$id', :'page'::jsonb) x;
SQL
)
  read -r m id rows <<<"$pos"
  [ "$rows" -lt 1000 ] && break
done
psql_b -d recv -At -c "SELECT pg_sync.finish_peer_join('s', $w)" >/dev/null
join_s=$(echo "$(date +%s.%N) - $start" | bc)
start=$(date +%s.%N)
psql_b -d bench -At -c "COPY items TO STDOUT" | psql_b -d recv -c "COPY plain FROM STDIN"
copy_s=$(echo "$(date +%s.%N) - $start" | bc)
got=$(psql_b -d recv -At -c "SELECT count(*) FROM items")
[ "$got" = "$n" ] || { echo "join: expected $n rows, got $got" >&2; exit 1; }
printf 'join %d rows: %.2f s (%.0f rows/s); COPY out+in: %.2f s (%.0f rows/s); ratio %.2f\n' \
  "$n" "$join_s" "$(echo "$n / $join_s" | bc -l)" "$copy_s" "$(echo "$n / $copy_s" | bc -l)" \
  "$(echo "$copy_s / $join_s" | bc -l)"
