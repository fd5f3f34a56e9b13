-- The set-based apply of peer batches (apply_remote_set, the fast path of apply_peer_batch)
-- leaves the same table rows, row states and log as the per-change path: one batch mixing
-- inserts, updates, deletes, re-inserts, losing changes and state-only merges of the same keys,
-- applied once set-based (keys 'S-*') and once change by change (pg_sync.set_apply = off, keys
-- 'C-*') from the same starting state, then compared.
CREATE TABLE sa (id text PRIMARY KEY, a text, b int DEFAULT 7, grp text);
SELECT pg_sync.register_table('sa', group_column => 'grp');
CREATE TABLE sb (id text PRIMARY KEY, v text);
SELECT pg_sync.register_table('sb');
SELECT pg_sync.add_peer('sp', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
SELECT pg_sync.pin_peer('sp', 'sp');
CREATE TABLE sbase AS SELECT pg_sync.hlc_now() AS hlc;
CREATE FUNCTION sv(k int, node text) RETURNS text LANGUAGE sql AS
  $$ SELECT lpad(to_hex((SELECT hlc FROM sbase) + k), 16, '0') || '@' || node $$;
-- A change of key p || id, at version k of node, with sync id s.
CREATE FUNCTION sch(s int, m text, action text, p text, id text, k int, node text, data jsonb, extra jsonb DEFAULT '{}')
  RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('sync_id', s, 'model', m, 'model_id', p || id, 'action', action,
      'version', sv(k, node), 'origin', node,
      'data', CASE WHEN data ? 'id' THEN data || jsonb_build_object('id', p || id) ELSE data END) || extra $$;
-- The starting state: 1 live, 2 live, 3 dead (deleted at 30).
CREATE FUNCTION seed(p text) RETURNS bigint LANGUAGE sql AS $$
  SELECT pg_sync.apply_remote(jsonb_build_array(
    sch(0, 'sa', 'I', p, '1', 10, 'p1', '{"id": "", "a": "x", "b": 1, "grp": "g"}'),
    sch(0, 'sa', 'I', p, '2', 10, 'p1', '{"id": "", "a": "y", "b": 2, "grp": "g"}'),
    sch(0, 'sa', 'I', p, '3', 10, 'p1', '{"id": "", "a": "z", "b": 3, "grp": "g"}'),
    sch(0, 'sa', 'D', p, '3', 30, 'p1', '{"id": ""}'))) $$;
-- The batch, sync ids base+1 .. base+20.
CREATE FUNCTION batch(p text, base int) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_build_array(
    -- 4: insert (b from its default), update, delete, re-insert: four rounds of one key.
    sch(base + 1, 'sa', 'I', p, '4', 20, 'p2', '{"id": "", "a": "n", "grp": "g"}'),
    sch(base + 2, 'sa', 'U', p, '4', 21, 'p2', '{"a": "n2"}'),
    sch(base + 3, 'sa', 'D', p, '4', 22, 'p3', '{"id": ""}'),
    sch(base + 4, 'sa', 'I', p, '4', 23, 'p2', '{"id": "", "a": "r", "b": 3, "grp": "h"}'),
    -- 1: an update that wins, one that loses (nothing logged), an insert that wins over the
    -- live row and moves it to another group (a moved D, then the I).
    sch(base + 5, 'sa', 'U', p, '1', 20, 'p2', '{"b": 20}'),
    sch(base + 6, 'sa', 'U', p, '1', 5, 'p3', '{"a": "old"}'),
    sch(base + 7, 'sa', 'I', p, '1', 25, 'p3', '{"id": "", "a": "x25", "grp": "h"}',
        jsonb_build_object('versions', jsonb_build_object('b', sv(12, 'p3')))),
    -- 2: deleted, then a column newer than the tombstone (pending, state-only).
    sch(base + 8, 'sa', 'D', p, '2', 20, 'p2', '{"id": ""}'),
    sch(base + 9, 'sa', 'U', p, '2', 26, 'p3', '{"b": 26}'),
    -- 3 (dead): a newer tombstone, a pending column, an older insert raising created: all
    -- state-only; then an insert newer than everything brings it back with the pending value.
    sch(base + 10, 'sa', 'D', p, '3', 40, 'p2', '{"id": ""}'),
    sch(base + 11, 'sa', 'U', p, '3', 50, 'p2', '{"b": 50}'),
    sch(base + 12, 'sa', 'I', p, '3', 35, 'p3', '{"id": "", "a": "old", "b": 0, "grp": "g"}'),
    sch(base + 13, 'sa', 'I', p, '3', 45, 'p3', '{"id": "", "a": "back", "b": 45, "grp": "g"}'),
    -- 6: an insert, then an older delete: the row stays live, the tombstone register rises
    -- (state-only, logged with the row's group).
    sch(base + 14, 'sa', 'I', p, '6', 60, 'p2', '{"id": "", "a": "six", "b": 6, "grp": "g"}'),
    sch(base + 15, 'sa', 'D', p, '6', 55, 'p3', '{"id": ""}'),
    -- Another model in the same batch.
    sch(base + 16, 'sb', 'I', p, '1', 20, 'p2', '{"id": "", "v": "one"}'),
    sch(base + 17, 'sb', 'U', p, '1', 21, 'p3', '{"v": "uno"}'),
    -- Keys without a state row, merged state-only: 7 a delete (a tombstone), 8 an update (a
    -- pending value), 9 a moved row's delete half (changes nothing: an empty state row, as the
    -- per-change path's lock placeholder leaves).
    sch(base + 18, 'sa', 'D', p, '7', 20, 'p2', '{"id": ""}'),
    sch(base + 19, 'sa', 'U', p, '8', 21, 'p3', '{"b": 8}'),
    sch(base + 20, 'sa', 'D', p, '9', 22, 'p2', '{"id": ""}', '{"moved": true}')) $$;

SELECT seed('S-'), seed('C-');
CREATE TABLE mark AS SELECT max(id) AS id FROM pg_sync.sync_actions;
SELECT pg_sync.apply_peer_batch('sp', 'E1', 0, 20, batch('S-', 0));
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_peer_batch('sp', 'E1', 20, 40, batch('C-', 20));
RESET pg_sync.set_apply;

-- Each key's log since the seed, in its own order, versions shown by name.
CREATE FUNCTION vname(v text) RETURNS text LANGUAGE sql AS
  $$ SELECT (SELECT k || '@' || n FROM generate_series(0, 100) k, unnest(ARRAY['p1', 'p2', 'p3']) n WHERE sv(k, n) = v) $$;
CREATE VIEW slog AS
  SELECT left(s.model_id, 2) AS run, s.model, substr(s.model_id, 3) AS id,
         row_number() OVER (PARTITION BY s.model, s.model_id ORDER BY s.id) AS n,
         s.action, replace(s.data::text, left(s.model_id, 2), '') AS data, vname(s.version) AS version,
         (SELECT jsonb_object_agg(e.key, vname(e.value)) FROM jsonb_each_text(s.versions) e) AS versions,
         s.origin, s.group_id, s.prev_group_id, s.moved
    FROM pg_sync.sync_actions s WHERE s.id > (SELECT id FROM mark);
SELECT model, id, n, action, data, version, versions, origin, group_id, prev_group_id, moved
  FROM slog WHERE run = 'S-' ORDER BY model, id, n;
-- The same log on both paths: nothing in one that is not in the other.
(SELECT model, id, n, action, data, version, versions, origin, group_id, prev_group_id, moved FROM slog WHERE run = 'S-'
 EXCEPT SELECT model, id, n, action, data, version, versions, origin, group_id, prev_group_id, moved FROM slog WHERE run = 'C-')
UNION ALL
(SELECT model, id, n, action, data, version, versions, origin, group_id, prev_group_id, moved FROM slog WHERE run = 'C-'
 EXCEPT SELECT model, id, n, action, data, version, versions, origin, group_id, prev_group_id, moved FROM slog WHERE run = 'S-');
-- The same row states and table rows.
CREATE VIEW sstate AS
  SELECT left(model_id, 2) AS run, model, substr(model_id, 3) AS id, vname(created) AS created,
         vname(deleted) AS deleted, (SELECT jsonb_object_agg(e.key, vname(e.value)) FROM jsonb_each_text(versions) e) AS versions,
         pending, vname(max_version) AS max_version
    FROM pg_sync.row_state WHERE model IN ('sa', 'sb');
SELECT model, id, created, deleted, versions, pending, max_version FROM sstate WHERE run = 'S-' ORDER BY model, id;
(SELECT model, id, created, deleted, versions, pending, max_version FROM sstate WHERE run = 'S-'
 EXCEPT SELECT model, id, created, deleted, versions, pending, max_version FROM sstate WHERE run = 'C-')
UNION ALL
(SELECT model, id, created, deleted, versions, pending, max_version FROM sstate WHERE run = 'C-'
 EXCEPT SELECT model, id, created, deleted, versions, pending, max_version FROM sstate WHERE run = 'S-');
SELECT substr(id, 3) AS id, a, b, grp, count(*) AS on_both_paths FROM sa GROUP BY 1, 2, 3, 4 ORDER BY 1;
SELECT substr(id, 3) AS id, v, count(*) AS on_both_paths FROM sb GROUP BY 1, 2 ORDER BY 1;
SELECT peer_node_id, last_sync_id, applied, changed FROM pg_sync.peer_cursors WHERE peer_node_id = 'sp';

-- The set path declines (NULL: change by change) when it cannot write the table exactly: a
-- user trigger, or pg_sync.set_apply off; and applies otherwise.
SELECT pg_sync.apply_remote_set(jsonb_build_array(sch(0, 'sb', 'U', 'S-', '1', 30, 'p2', '{"v": "set"}'))) AS set_applied;
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_remote_set(jsonb_build_array(sch(0, 'sb', 'U', 'S-', '1', 31, 'p2', '{"v": "off"}'))) IS NULL AS declined_when_off;
RESET pg_sync.set_apply;
CREATE FUNCTION sb_touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER sb_touch BEFORE UPDATE ON sb FOR EACH ROW EXECUTE FUNCTION sb_touch();
SELECT pg_sync.apply_remote_set(jsonb_build_array(sch(0, 'sb', 'U', 'S-', '1', 32, 'p2', '{"v": "trg"}'))) IS NULL AS declined_with_trigger;
DROP TRIGGER sb_touch ON sb;
SELECT v FROM sb WHERE id = 'S-1';

-- A bad change in a set-applied batch: the batch falls back to change by change and parks
-- exactly that change; the others apply, the cursor moves.
SELECT pg_sync.apply_peer_batch('sp', 'E1', 40, 43, jsonb_build_array(
  sch(41, 'sb', 'I', 'S-', '7', 40, 'p2', '{"id": "", "v": "seven"}'),
  sch(42, 'sb', 'I', 'S-', '8', 40, 'p2', '{"id": "", "v": "eight", "nope": 1}'),
  sch(43, 'sb', 'U', 'S-', '1', 41, 'p2', '{"v": "after"}')));
SELECT sync_id, sqlstate FROM pg_sync.peer_quarantine WHERE peer_node_id = 'sp';
SELECT id, v FROM sb WHERE id IN ('S-1', 'S-7', 'S-8') ORDER BY id;

-- A catch-up of many new rows: keys without a state row are locked one by one only up to 64 of
-- them, past that by one lock for the batch, so a large batch does not fill the shared lock
-- table (max_locks_per_transaction); all applied
-- set-based (no fallback event besides the bad change's above). 2,000 rows: changes_pages
-- counts on no transaction in the log being larger than its own.
BEGIN;
SELECT pg_sync.apply_peer_batch('sp', 'E1', 43, 2043, (
  SELECT jsonb_agg(sch(43 + g, 'sb', 'I', 'N-', g::text, 50, 'p2', '{"id": "", "v": "new"}') ORDER BY g)
    FROM generate_series(1, 2000) g)) - 'cursor';
SELECT count(*) AS new_key_locks FROM pg_locks WHERE locktype = 'userlock' AND pid = pg_backend_pid();
COMMIT;
SELECT count(*) AS new_rows FROM sb WHERE id LIKE 'N-%';
SELECT count(*) AS fallbacks FROM pg_sync.peer_events WHERE peer = 'sp' AND event = 'quarantined';
