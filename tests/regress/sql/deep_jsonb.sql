-- jsonb nested deeper than serde_json parses (128 levels): a 5,000-level value is captured,
-- applied by apply_remote and apply_remote_set (inserted, updated, kept pending past a
-- tombstone and brought back), logged, and stored exactly (md5 of its text). Values are never
-- printed, only whether their md5 matches.
CREATE TABLE dj (id text PRIMARY KEY, doc jsonb, n int);
SELECT pg_sync.register_table('dj', federation => 'both');
SELECT pg_sync.add_peer('djp', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
SELECT pg_sync.pin_peer('djp', 'djp');
-- A value `depth` levels deep: arrays around an object whose strings hold brackets, braces,
-- quotes, backslashes and the marker's name (never a marker: jsonb strings cannot hold NUL).
CREATE FUNCTION dj_deep(depth int, leaf text) RETURNS jsonb LANGUAGE sql AS $$
  SELECT (repeat('[', depth / 2) || repeat('{"k": ', depth / 2)
          || jsonb_build_object('leaf', leaf, 's', '[{"]}\', 'm', 'pg_sync.deep.00:[1]')::text
          || repeat('}', depth / 2) || repeat(']', depth / 2))::jsonb $$;
CREATE TABLE djbase AS SELECT pg_sync.hlc_now() AS hlc;
CREATE FUNCTION djv(k int, node text) RETURNS text LANGUAGE sql AS
  $$ SELECT lpad(to_hex((SELECT hlc FROM djbase) + k), 16, '0') || '@' || node $$;
CREATE FUNCTION djch(action text, id text, k int, node text, data jsonb) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_build_object('sync_id', k, 'model', 'dj', 'model_id', id, 'action', action,
                            'version', djv(k, node), 'origin', node, 'data', data) $$;
CREATE FUNCTION djok(id text, leaf text) RETURNS boolean LANGUAGE sql AS $$
  SELECT md5(doc::text) IS NOT DISTINCT FROM md5(dj_deep(5000, leaf)::text) FROM dj WHERE dj.id = djok.id $$;
-- The last log row of a key carries the value exactly.
CREATE FUNCTION djlog(id text, leaf text) RETURNS boolean LANGUAGE sql AS $$
  SELECT md5((data -> 'doc')::text) IS NOT DISTINCT FROM md5(dj_deep(5000, leaf)::text)
    FROM pg_sync.sync_actions a WHERE a.model = 'dj' AND a.model_id = djlog.id ORDER BY a.id DESC LIMIT 1 $$;
SELECT jsonb_typeof(dj_deep(5000, 'x')) AS deep_value_builds;

-- Capture of a local write.
INSERT INTO dj VALUES ('c1', dj_deep(5000, 'c1'), 1);
SELECT djok('c1', 'c1') AS captured_row, djlog('c1', 'c1') AS captured_log;
UPDATE dj SET doc = dj_deep(5000, 'c1b') WHERE id = 'c1';
SELECT djok('c1', 'c1b') AS updated_row, djlog('c1', 'c1b') AS updated_log;

-- apply_remote: an insert, then an update of the deep column.
SELECT pg_sync.apply_remote(jsonb_build_array(
  djch('I', 'r1', 10, 'p1', jsonb_build_object('id', 'r1', 'doc', dj_deep(5000, 'r1'), 'n', 1))));
SELECT djok('r1', 'r1') AS remote_insert, djlog('r1', 'r1') AS remote_insert_log;
SELECT pg_sync.apply_remote(djch('U', 'r1', 11, 'p1', jsonb_build_object('doc', dj_deep(5000, 'r1b'))));
SELECT djok('r1', 'r1b') AS remote_update, djlog('r1', 'r1b') AS remote_update_log;
-- An older change of the same value is no conflict (a loss to an equal value), an older change
-- of another value is one.
SET pg_sync.log_conflicts = on;
SELECT pg_sync.apply_remote(djch('U', 'r1', 5, 'p2', jsonb_build_object('doc', dj_deep(5000, 'r1b'))));
SELECT count(*) AS conflicts_equal FROM pg_sync.conflicts WHERE model = 'dj';
SELECT pg_sync.apply_remote(djch('U', 'r1', 6, 'p2', jsonb_build_object('doc', dj_deep(5000, 'old'))));
SELECT count(*) AS conflicts_other FROM pg_sync.conflicts WHERE model = 'dj';
RESET pg_sync.log_conflicts;
SELECT djok('r1', 'r1b') AS newer_kept;
-- A value newer than the row's tombstone waits in its state and comes back with a newer insert.
SELECT pg_sync.apply_remote(jsonb_build_array(
  djch('D', 'r1', 20, 'p1', '{"id": "r1"}'),
  djch('U', 'r1', 22, 'p1', jsonb_build_object('doc', dj_deep(5000, 'pending')))));
SELECT count(*) AS deleted FROM dj WHERE id = 'r1';
SELECT pg_sync.apply_remote(djch('I', 'r1', 21, 'p1', '{"id": "r1", "doc": null, "n": 2}'));
SELECT djok('r1', 'pending') AS pending_back, n FROM dj WHERE id = 'r1';

-- apply_remote_set: the same on other keys, set-based (not NULL).
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  djch('I', 's1', 10, 'p1', jsonb_build_object('id', 's1', 'doc', dj_deep(5000, 's1'), 'n', 1)),
  djch('I', 's2', 10, 'p1', jsonb_build_object('id', 's2', 'doc', dj_deep(5000, 's2'), 'n', 1)),
  djch('U', 's2', 11, 'p1', jsonb_build_object('doc', dj_deep(5000, 's2b'))),
  djch('U', 'r1', 30, 'p1', jsonb_build_object('doc', dj_deep(5000, 'r1set')))));
SELECT djok('s1', 's1') AS set_insert, djlog('s1', 's1') AS set_insert_log,
       djok('s2', 's2b') AS set_update, djlog('s2', 's2b') AS set_update_log,
       djok('r1', 'r1set') AS set_update_live, djlog('r1', 'r1set') AS set_update_live_log;
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  djch('D', 's1', 20, 'p1', '{"id": "s1"}'),
  djch('U', 's1', 22, 'p1', jsonb_build_object('doc', dj_deep(5000, 's1pending')))));
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  djch('I', 's1', 21, 'p1', '{"id": "s1", "doc": null, "n": 3}')));
SELECT djok('s1', 's1pending') AS set_pending_back, n FROM dj WHERE id = 's1';

-- Through apply_peer_batch: applied, nothing parked.
SELECT pg_sync.apply_peer_batch('djp', 'e1', 0, 2, jsonb_build_array(
  djch('I', 'b1', 1, 'p1', jsonb_build_object('id', 'b1', 'doc', dj_deep(5000, 'b1'), 'n', 1)),
  djch('U', 'b1', 2, 'p1', jsonb_build_object('doc', dj_deep(5000, 'b1b'))))) - 'cursor';
SELECT djok('b1', 'b1b') AS batch_applied, count(*) AS parked FROM pg_sync.peer_quarantine;

-- Internal errors are not transient (the batch is parked, not retried forever); connection
-- exceptions are.
SELECT pg_sync.transient_sqlstate('XX000') AS xx000, pg_sync.transient_sqlstate('08006') AS c08006,
       pg_sync.transient_sqlstate('40P01') AS c40p01, pg_sync.transient_sqlstate('23505') AS c23505;
