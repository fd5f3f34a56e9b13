-- compact() drops sequenced actions below a horizon, keeping every row's LWW state.
CREATE TABLE kept (id int PRIMARY KEY, v text);
SELECT pg_sync.register_table('kept');
INSERT INTO kept VALUES (1, 'a'), (2, 'b'), (3, 'c');
UPDATE kept SET v = 'a2' WHERE id = 1;
DELETE FROM kept WHERE id = 2;
-- Sequence the log as the worker does (in order of each transaction's first action).
CREATE FUNCTION sequence_all() RETURNS void LANGUAGE sql AS $$
  INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
  SELECT xid, pg_sync.last_sync_id() + sum(n) OVER (ORDER BY first_id) - n + 1, n, '0/0', now()
    FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n FROM pg_sync.sync_actions a
           WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid) GROUP BY a.xid) s
$$;
SELECT sequence_all();
CREATE TABLE before AS
  SELECT k, pg_sync.row_version_state('kept', k) AS s FROM unnest(ARRAY['1', '2', '3']) k;
SELECT pg_sync.last_sync_id() > 0 AS sequenced, pg_sync.retention_horizon();
SELECT count(*) AS actions FROM pg_sync.sync_actions WHERE model = 'kept';

-- Bad horizons.
SELECT regexp_replace(err($$SELECT pg_sync.compact(-1)$$), '=\d+', '=N') AS err;
SELECT regexp_replace(err($$SELECT pg_sync.compact(pg_sync.last_sync_id() + 1)$$), '\d+ is outside 0..=\d+', 'L+1 is outside 0..=L') AS err;

SELECT pg_sync.compact(pg_sync.last_sync_id()) > 0 AS removed;
SELECT count(*) AS actions_left FROM pg_sync.sync_actions WHERE model = 'kept';
SELECT pg_sync.retention_horizon() = pg_sync.last_sync_id() AS horizon_recorded,
       pg_sync.last_sync_id() > 0 AS counter_kept;
SELECT count(*) AS changes_served FROM pg_sync.changes(0, NULL, 1000);
-- Every row's state survives compaction exactly.
SELECT k, b.s = pg_sync.row_version_state('kept', k) AS same_state FROM before b ORDER BY k;
-- The tombstone still wins over an older update, and new writes go on.
SELECT pg_sync.apply_remote(jsonb_build_object('model', 'kept', 'model_id', '2', 'action', 'U',
  'version', '0000000000000001@old', 'origin', 'old', 'data', '{"v": "zombie"}'::jsonb));
SELECT count(*) AS zombie FROM kept WHERE id = 2;
UPDATE kept SET v = 'a3' WHERE id = 1;
SELECT (pg_sync.row_version_state('kept', '1')->>'max_version') COLLATE "C" > (SELECT s->>'max_version' FROM before WHERE k = '1') AS newer;
SELECT err($$SELECT pg_sync.compact_older_than('1 hour')$$);

-- By size: keep the newest N sequenced actions, whole transactions only.
INSERT INTO kept SELECT g, 'bulk' FROM generate_series(10, 14) g;
INSERT INTO kept VALUES (20, 'x');
INSERT INTO kept VALUES (21, 'y');
SELECT sequence_all();
SELECT pg_sync.compact_to_size(2) AS removed_by_size;
SELECT count(*) AS actions_left FROM pg_sync.sync_actions WHERE model = 'kept';
SELECT pg_sync.retention_horizon() = pg_sync.last_sync_id() - 2 AS horizon_at_size;
SELECT pg_sync.compact_to_size(1000) AS nothing_more;
SELECT err($$SELECT pg_sync.compact_to_size(-1)$$);
SELECT err($$SELECT pg_sync.compact_to_size(NULL)$$);
