-- Row state is kept current by every writer and never re-read from the log; apply_remote's
-- remote mode covers only its own write; schema differences between peers skip columns, not
-- batches. Uses v() and ch() from lww.
CREATE FUNCTION chm(model text, action text, id text, ver text, data jsonb) RETURNS jsonb
  LANGUAGE sql AS $$ SELECT jsonb_build_object('model', model, 'model_id', id, 'action', action,
      'version', ver, 'origin', split_part(ver, '@', 2), 'data', data) $$;
-- A version above every local write so far.
CREATE FUNCTION fresh(node text) RETURNS text LANGUAGE sql AS
  $$ SELECT lpad(to_hex(pg_sync.hlc_now() + 1000), 16, '0') || '@' || node $$;

-- A merge reads the row's state, not its history: the state survives losing the whole log.
CREATE TABLE st (id int PRIMARY KEY, a text, b int);
SELECT pg_sync.register_table('st');
INSERT INTO st VALUES (1, 'a', 1), (2, 'x', 2);
UPDATE st SET a = 'a2' WHERE id = 1;
UPDATE st SET b = 3 WHERE id = 1;
DELETE FROM st WHERE id = 2;
CREATE TABLE st_before AS SELECT k, pg_sync.row_version_state('st', k) AS s FROM unnest(ARRAY['1', '2']) k;
DELETE FROM pg_sync.sync_actions WHERE model = 'st';
SELECT k, s = pg_sync.row_version_state('st', k) AS same_state, s->>'live' AS live FROM st_before ORDER BY k;
-- Updates older than the local writes lose; nothing resurrects the deleted row.
SELECT pg_sync.apply_remote(chm('st', 'U', '1', v(-100000, 'old'), '{"a": "stale", "b": 0}')) AS applied;
SELECT pg_sync.apply_remote(chm('st', 'I', '2', v(-100000, 'old'), '{"id": 2, "a": "zombie", "b": 0}')) AS applied;
SELECT * FROM st ORDER BY id;
-- A local write is versioned above the row's state even when the state is ahead of this node's
-- clock (a merge that committed between minting and recording): the trigger observes and re-mints.
SELECT lpad(to_hex(pg_sync.hlc_now() + 100000000), 16, '0') || '@ahead' AS ahead \gset
UPDATE pg_sync.row_state SET max_version = :'ahead', versions = jsonb_build_object('b', :'ahead')
 WHERE model = 'st' AND model_id = '1';
UPDATE st SET a = 'a3' WHERE id = 1;
SELECT version > :'ahead' COLLATE "C" AS above_state FROM pg_sync.sync_actions ORDER BY id DESC LIMIT 1;
SELECT (pg_sync.row_version_state('st', '1')->'versions'->>'a') > :'ahead' COLLATE "C" AS state_a_above,
       pg_sync.row_version_state('st', '1')->'versions'->>'b' = :'ahead' AS state_b_kept;
-- Nothing reads a row's history any more, so the log keeps no per-row index.
SELECT count(*) AS row_history_indexes FROM pg_indexes
 WHERE schemaname = 'pg_sync' AND tablename = 'sync_actions' AND indexdef LIKE '%model_id%';

-- FK cascades fired by apply_remote are local writes: their own version and this node's origin.
CREATE TABLE parent (id int PRIMARY KEY, name text);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent ON DELETE CASCADE, note text);
CREATE TABLE pinned (id int PRIMARY KEY, parent_id int REFERENCES parent ON DELETE SET NULL, note text);
SELECT pg_sync.register_table('parent');
SELECT pg_sync.register_table('child');
SELECT pg_sync.register_table('pinned', group_column => 'parent_id');
INSERT INTO parent VALUES (1, 'p');
INSERT INTO child VALUES (10, 1, 'c');
INSERT INTO pinned VALUES (20, 1, 'n');
SELECT max(id) AS mark FROM pg_sync.sync_actions \gset
SELECT fresh('peer') AS pv \gset
SELECT pg_sync.apply_remote(chm('parent', 'D', '1', :'pv', '{"id": 1}')) AS applied;
SELECT model, model_id, action, moved, group_id, prev_group_id, origin,
       version = :'pv' AS peer_version, version > :'pv' COLLATE "C" AS above_peer
  FROM pg_sync.sync_actions WHERE id > :mark ORDER BY id;
SELECT pg_sync.row_version_state('child', '10')->>'live' AS child_live,
       pg_sync.row_version_state('pinned', '20')->>'live' AS pinned_live;
-- A user trigger's own write to the row apply_remote writes is local too.
CREATE TABLE touched (id int PRIMARY KEY, v text, stamp int DEFAULT 0);
SELECT pg_sync.register_table('touched');
CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.stamp = OLD.stamp THEN UPDATE touched SET stamp = stamp + 1 WHERE id = NEW.id; END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER a_bump AFTER UPDATE ON touched FOR EACH ROW EXECUTE FUNCTION bump();
INSERT INTO touched VALUES (1, 'x');
SELECT max(id) AS mark FROM pg_sync.sync_actions \gset
SELECT fresh('peer') AS pv \gset
SELECT pg_sync.apply_remote(chm('touched', 'U', '1', :'pv', '{"v": "y"}')) AS applied;
SELECT action, data, origin, version = :'pv' AS peer_version
  FROM pg_sync.sync_actions WHERE id > :mark ORDER BY id;
SELECT * FROM touched;
-- The state keeps both: the peer's column at its version, the trigger's at its own.
SELECT (pg_sync.row_version_state('touched', '1')->'versions'->>'v') = :'pv' AS v_at_peer,
       (pg_sync.row_version_state('touched', '1')->'versions'->>'stamp') > :'pv' COLLATE "C" AS stamp_above;

-- A merged write that a BEFORE trigger skips is not counted as applied, and changes no state.
CREATE TABLE vetoed (id int PRIMARY KEY, v text);
SELECT pg_sync.register_table('vetoed');
INSERT INTO vetoed VALUES (1, 'x');
CREATE FUNCTION veto() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE TRIGGER veto BEFORE UPDATE ON vetoed FOR EACH ROW EXECUTE FUNCTION veto();
SELECT pg_sync.row_version_state('vetoed', '1') AS before \gset
SELECT pg_sync.apply_remote(chm('vetoed', 'U', '1', fresh('peer'), '{"v": "y"}')) AS applied;
SELECT v, pg_sync.row_version_state('vetoed', '1') = :'before'::jsonb AS state_unchanged FROM vetoed;

-- Generated columns are not captured; identity-always columns keep the origin's values.
CREATE TABLE gen (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a int,
                  twice int GENERATED ALWAYS AS (a * 2) STORED);
SELECT pg_sync.register_table('gen');
INSERT INTO gen (a) VALUES (21);
SELECT action, data FROM pg_sync.sync_actions WHERE model = 'gen';
-- The same change, as a peer would send it, for a key this node has not used.
SELECT pg_sync.apply_remote(chm('gen', 'I', '7', v(1300, 'peer'), '{"id": 7, "a": 5}')) AS applied;
-- A peer that still captures the generated column: the column is skipped, the row goes in.
SELECT pg_sync.apply_remote(chm('gen', 'I', '8', v(1301, 'peer'), '{"id": 8, "a": 6, "twice": 99}')) AS applied;
SELECT * FROM gen ORDER BY id;

-- A column this node lacks is a schema mismatch: the change fails with 42703 naming the
-- column (never its value), so a peer batch parks it until the column exists, instead of
-- losing the value for good. Once added, the same change applies.
CREATE TABLE wide (id int PRIMARY KEY, a text, gone text);
SELECT pg_sync.register_table('wide');
SELECT err(format('SELECT pg_sync.apply_remote(%L)', jsonb_build_array(
  chm('wide', 'I', '1', v(1400, 'peer'), '{"id": 1, "a": "one", "extra": "secret-value"}'),
  chm('wide', 'I', '2', v(1401, 'peer'), '{"id": 2, "a": "two"}'))));
SELECT id, a FROM wide ORDER BY id;
ALTER TABLE wide ADD COLUMN extra text;
SELECT pg_sync.apply_remote(jsonb_build_array(
  chm('wide', 'I', '1', v(1400, 'peer'), '{"id": 1, "a": "one", "extra": "secret-value"}'),
  chm('wide', 'I', '2', v(1401, 'peer'), '{"id": 2, "a": "two"}'))) AS applied;
ALTER TABLE wide DROP COLUMN extra;
SELECT id, a FROM wide ORDER BY id;
-- Values waiting for a resurrecting insert may name a column dropped since: they are dropped.
SELECT pg_sync.apply_remote(chm('wide', 'D', '1', v(1500, 'peer'), '{"id": 1}')) AS applied;
SELECT pg_sync.apply_remote(chm('wide', 'U', '1', v(1600, 'peer'), '{"gone": "late"}')) AS applied;
ALTER TABLE wide DROP COLUMN gone;
SELECT pg_sync.apply_remote(chm('wide', 'I', '1', v(1550, 'peer'), '{"id": 1, "a": "back"}')) AS applied;
SELECT * FROM wide ORDER BY id;

-- A log row whose model_id does not parse does not stop compaction.
CREATE TABLE pair (a int, b int, v text, PRIMARY KEY (a, b));
SELECT pg_sync.register_table('pair');
INSERT INTO pair VALUES (1, 2, 'x');
INSERT INTO pg_sync.sync_actions (model, model_id, action, data, version, origin)
VALUES ('pair', 'not json', 'U', '{"v": "y"}', v(1700, 'peer'), 'peer');
SELECT sequence_all();
SELECT pg_sync.compact(pg_sync.last_sync_id()) > 0 AS compacted;
SELECT count(*) AS left_for_pair FROM pg_sync.sync_actions WHERE model = 'pair';
SELECT pg_sync.row_version_state('pair', '["1","2"]')->>'live' AS pair_live;

-- A partitioned registered table: apply_remote's write lands in a leaf partition and is
-- recorded as the peer's change (its version and origin), not as a local write.
CREATE TABLE parted (id int PRIMARY KEY, grp text, v text) PARTITION BY RANGE (id);
CREATE TABLE parted_a PARTITION OF parted FOR VALUES FROM (0) TO (100);
SELECT pg_sync.register_table('parted', 'grp');
INSERT INTO parted VALUES (1, 'g1', 'local');
SELECT pg_sync.apply_remote(chm('parted', 'I', '5', fresh('peer'), '{"id": 5, "v": "peer", "grp": "g1"}')) AS applied;
SELECT pg_sync.apply_remote(chm('parted', 'U', '1', fresh('peer'), '{"v": "peer-upd"}')) AS applied;
SELECT model_id, action, origin, version LIKE '%@peer' AS peer_version
  FROM pg_sync.sync_actions WHERE model = 'parted' ORDER BY id;
SELECT model_id, created LIKE '%@peer' AS created_by_peer, versions->>'v' LIKE '%@peer' AS v_by_peer
  FROM pg_sync.row_state WHERE model = 'parted' ORDER BY model_id;

-- A stored version far beyond wall time + pg_sync.max_clock_skew (corrupted or forged) does
-- not move the clock: a local write of that row is refused (22008), other writes go on, and
-- neither the clock nor its persisted mark jump to the end of the range.
CREATE TABLE far (id int PRIMARY KEY, v text);
SELECT pg_sync.register_table('far');
INSERT INTO far VALUES (1, 'a');
UPDATE pg_sync.row_state SET max_version = 'fffffffffffffffe@x', created = 'fffffffffffffffe@x'
 WHERE model = 'far' AND model_id = '1';
SELECT err($$UPDATE far SET v = 'b' WHERE id = 1$$);
INSERT INTO far VALUES (2, 'a');
UPDATE far SET v = 'c' WHERE id = 2;
SELECT pg_sync.hlc_now() > 0
   AND (pg_sync.hlc_now() >> 16) < extract(epoch FROM now()) * 1000 + 3600000 AS clock_sane,
       pg_read_file('pg_sync_hlc')::numeric < 2 ^ 63 AS mark_sane;
-- The same in a database whose stored versions the clock observes for the first time.
SELECT current_database() AS regress_db \gset
CREATE DATABASE pg_sync_far;
\c pg_sync_far
CREATE EXTENSION pg_sync;
CREATE TABLE far (id int PRIMARY KEY, v text);
SELECT pg_sync.register_table('far');
INSERT INTO pg_sync.row_state (model, model_id, created, max_version)
VALUES ('far', '9', 'fffffffffffffffe@x', 'fffffffffffffffe@x');
INSERT INTO far VALUES (1, 'a');
INSERT INTO far VALUES (9, 'a');
SELECT pg_sync.hlc_now() > 0
   AND (pg_sync.hlc_now() >> 16) < extract(epoch FROM now()) * 1000 + 3600000 AS clock_sane,
       pg_read_file('pg_sync_hlc')::numeric < 2 ^ 63 AS mark_sane;
\c :regress_db
DROP DATABASE pg_sync_far;

-- A BEFORE trigger that changes what apply_remote writes (or, on an update, other columns):
-- those columns hold this node's values, recorded as a local write above the peer's version,
-- not under it. Values the trigger leaves alone (whatever their JSON spelling from the peer)
-- are not.
CREATE TABLE bt (id int PRIMARY KEY, title text, stamp text, note text, at timestamptz, n numeric);
CREATE FUNCTION bt_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.title <> 'leave' THEN
        NEW.stamp := 'local';
        IF TG_OP = 'UPDATE' THEN NEW.note := 'touched'; END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER bt_stamp BEFORE INSERT OR UPDATE ON bt FOR EACH ROW EXECUTE FUNCTION bt_stamp();
SELECT pg_sync.register_table('bt');
SELECT pg_sync.apply_remote(chm('bt', 'I', '1', fresh('peer'),
  '{"id": 1, "title": "p", "stamp": "peer-stamp", "at": "2024-01-01T00:00:00+00:00", "n": 1.50}')) AS applied;
SELECT pg_sync.apply_remote(chm('bt', 'U', '1', fresh('peer'), '{"title": "p2"}')) AS applied;
SELECT pg_sync.apply_remote(chm('bt', 'I', '2', fresh('peer'),
  '{"id": 2, "title": "leave", "stamp": "s", "at": "2024-01-01T00:00:00+00:00", "n": 1.50}')) AS applied;
SELECT pg_sync.apply_remote(chm('bt', 'U', '2', fresh('peer'), '{"at": "2024-06-01T12:00:00Z", "n": 2.0}')) AS applied;
SELECT id, title, stamp, note, n FROM bt ORDER BY id;
SELECT model_id, action, origin, data - 'at' AS data FROM pg_sync.sync_actions WHERE model = 'bt' ORDER BY id;
SELECT model_id, versions->>'title' LIKE '%@peer' AS title_peer, versions->>'stamp' LIKE '%@regress' AS stamp_local,
       versions->>'note' LIKE '%@regress' AS note_local,
       versions->>'note' > versions->>'title' AS local_above_peer
  FROM pg_sync.row_state WHERE model = 'bt' ORDER BY model_id;
