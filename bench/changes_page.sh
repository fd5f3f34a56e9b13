#!/usr/bin/env bash
# Newest-page read cost of pg_sync.changes() against the log's length: the newest 10 sync ids
# read from a log of BENCH_SMALL (1,000) one-action transactions and from one of BENCH_LARGE
# (1,000,000), in one run, plus the previous definition (no lower bound) on the large log.
# The logs are written directly (synthetic xids), so the run takes about a minute.
# Usage: bash bench/changes_page.sh (appends nothing; paste the table into bench/RESULTS.md).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
small=${BENCH_SMALL:-1000}
large=${BENCH_LARGE:-1000000}
reads=${BENCH_READS:-300}

work=$(mktemp -d /tmp/pg_sync_changes.XXXXXX)
chmod 755 "$work"
port=$(free_port)
cleanup() { cluster_stop "$work/pg" immediate; rm -rf "$work"; }
trap cleanup EXIT
cluster_init "$work/pg" "$port" "shared_buffers = '512MB'" "max_wal_size = '8GB'" "synchronous_commit = off"
cluster_start "$work/pg"
psql_b() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }

# fill DB N: N one-action transactions, sequenced 1..N.
fill() {
  psql_b -d postgres -c "CREATE DATABASE $1"
  psql_b -d "$1" <<SQL
CREATE EXTENSION pg_sync;
CREATE TABLE t (id bigint PRIMARY KEY, body text, grp text);
SELECT pg_sync.register_table('t', group_column => 'grp');
INSERT INTO pg_sync.sync_actions (model, model_id, action, data, version, origin, group_id, xid)
SELECT 't', g::text, 'I', jsonb_build_object('id', g, 'body', 'row ' || g), lpad(g::text, 20, '0'),
       'bench', 'g' || (g % 100), (1000000000000 + g)::text::xid8
  FROM generate_series(1, $2) g;
INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
SELECT (1000000000000 + g)::text::xid8, g, 1, '0/0', now() FROM generate_series(1, $2) g;
VACUUM ANALYZE;
-- The definition before the lower bound, for comparison.
CREATE FUNCTION old_changes(after bigint, groups text[], span integer) RETURNS SETOF bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS \$\$
    WITH tx AS (
        SELECT c.xid, c.first_sync_id FROM pg_sync.commit_order c
         WHERE c.first_sync_id <= after + span AND c.first_sync_id + c.action_count - 1 > after
    ), numbered AS (
        SELECT tx.first_sync_id + row_number() OVER (PARTITION BY a.xid ORDER BY a.id) - 1 AS sync_id, a.*
          FROM tx JOIN pg_sync.sync_actions a ON a.xid = tx.xid
    )
    SELECT n.sync_id FROM numbered n LEFT JOIN pg_sync.registry r ON r.model = n.model
     WHERE n.sync_id > after AND n.sync_id <= after + span
       AND (groups IS NULL OR (r.model IS NOT NULL AND r.group_column IS NULL) OR n.group_id = ANY (groups))
\$\$;
SQL
}

# page_ms DB FUNCTION N: mean latency (ms) of reading the newest 10 sync ids of an N-long log.
page_ms() {
  echo "SELECT count(*) FROM $2(:last - 10, ARRAY['g1','g2'], 10);" >"$work/page.sql"
  "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -D last="$3" -t "$reads" -f "$work/page.sql" "$1" \
    | awk '/latency average/ {print $4}'
}

echo "filling a log of $small transactions and one of $large" >&2
fill small "$small"
fill large "$large"
s=$(page_ms small pg_sync.changes "$small")
l=$(page_ms large pg_sync.changes "$large")
o=$(page_ms large old_changes "$large")
ratio=$(awk -v a="$l" -v b="$s" 'BEGIN { printf "%.2f", a / b }')
echo "| log (one-action transactions) | changes() newest page, ms | previous definition, ms |"
echo "|---|---|---|"
echo "| $small | $s | |"
echo "| $large | $l | $o |"
echo
echo "large / small: $ratio (must stay within 1.5)"
