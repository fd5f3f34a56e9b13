#!/usr/bin/env bash
# Issue 8 item 5 (bounded work per merge): the cost of apply_remote and of a local group move on
# a row with a long history (LONG_ACTIONS captured updates, default 300k) against a row with
# none. Both should cost the same: a merge and a move read the row's state, never its history.
# Usage: bash bench/long_history.sh   (LONG_ACTIONS=n, LONG_ROUNDS=n to change the sizes)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/bench/lib.sh"
n=${LONG_ACTIONS:-300000}
rounds=${LONG_ROUNDS:-20}

bench_cluster long_history "pg_sync.node_id = 'bench'" "fsync = off" "synchronous_commit = off"
psql_b -d bench <<'SQL'
CREATE EXTENSION pg_sync;
CREATE TABLE hist (id int PRIMARY KEY, g text, a int);
SELECT pg_sync.register_table('hist', 'g');
INSERT INTO hist VALUES (1, 'g1', 0), (2, 'g1', 0);
-- Captured updates of row 1, committed in chunks (one transaction per update would be slower,
-- one transaction for all would make every update walk the row's whole update chain).
CREATE PROCEDURE grow(n int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..n LOOP
    UPDATE hist SET a = i WHERE id = 1;
    IF i % 500 = 0 THEN COMMIT; END IF;
  END LOOP;
END $$;
-- Per-operation times in ms (min / median / max over r rounds) for one row.
CREATE FUNCTION time_ops(k int, r int) RETURNS TABLE (op text, min_ms numeric, median_ms numeric, max_ms numeric)
LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; merge float8[] := '{}'; move float8[] := '{}'; v text;
BEGIN
  FOR i IN 1..r LOOP
    v := lpad(to_hex(pg_sync.hlc_now() + 65536 * 10), 16, '0') || '@peer';
    t0 := clock_timestamp();
    PERFORM pg_sync.apply_remote(jsonb_build_object('model', 'hist', 'model_id', k::text,
      'action', 'U', 'version', v, 'origin', 'peer', 'data', jsonb_build_object('a', -i)));
    merge := merge || extract(epoch FROM clock_timestamp() - t0) * 1000;
    t0 := clock_timestamp();
    UPDATE hist SET g = CASE g WHEN 'g1' THEN 'g2' ELSE 'g1' END WHERE id = k;
    move := move || extract(epoch FROM clock_timestamp() - t0) * 1000;
  END LOOP;
  RETURN QUERY SELECT 'apply_remote', round(min(x)::numeric, 3),
    round((percentile_cont(0.5) WITHIN GROUP (ORDER BY x))::numeric, 3), round(max(x)::numeric, 3)
    FROM unnest(merge) x;
  RETURN QUERY SELECT 'group move', round(min(x)::numeric, 3),
    round((percentile_cont(0.5) WITHIN GROUP (ORDER BY x))::numeric, 3), round(max(x)::numeric, 3)
    FROM unnest(move) x;
END $$;
SQL
start=$(date +%s)
psql_b -d bench -c "CALL grow($n)"
echo "built $n captured updates of row 1 in $(( $(date +%s) - start )) s"
psql_b -d bench -c "SELECT count(*) AS row1_actions FROM pg_sync.sync_actions WHERE model = 'hist' AND model_id = '1'"
psql_b -d bench -c "VACUUM ANALYZE hist" -c "VACUUM ANALYZE pg_sync.row_state"
echo "row 1 ($n actions), then row 2 (1 action), $rounds rounds each:"
psql_b -d bench -c "SELECT 'long' AS row, * FROM time_ops(1, $rounds) UNION ALL SELECT 'short', * FROM time_ops(2, $rounds)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
