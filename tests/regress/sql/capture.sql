-- Every committed change to a registered table yields its action rows; rollbacks yield none.
CREATE TABLE todos (id int PRIMARY KEY, title text, done boolean DEFAULT false, list text, secret text);
SELECT pg_sync.register_table('todos', group_column => 'list', exclude => '{secret}');
CREATE VIEW acts AS
  SELECT model_id, action, data, group_id, prev_group_id, moved, versions IS NOT NULL AS has_versions
    FROM pg_sync.sync_actions WHERE model = 'todos' ORDER BY id;

-- Multi-row insert: one I per row, whole row without excluded columns.
INSERT INTO todos (id, title, list, secret) VALUES (1, 'milk', 'home', 's1'), (2, 'bread', 'home', 's2');
-- Update: only changed columns; an update that changes nothing captured records nothing.
UPDATE todos SET done = true WHERE id = 1;
UPDATE todos SET done = true WHERE id = 1;
UPDATE todos SET secret = 'hidden' WHERE id = 2;
-- Multi-row update and delete.
UPDATE todos SET title = title || '!' WHERE list = 'home';
DELETE FROM todos WHERE id = 2;
SELECT * FROM acts;

-- A move between groups: a delete for the old group, then the whole row for the new one.
TRUNCATE pg_sync.sync_actions;
UPDATE todos SET list = 'work', title = 'oat milk' WHERE id = 1;
SELECT * FROM acts;
-- Moving to no group (NULL) and back.
UPDATE todos SET list = NULL WHERE id = 1;
UPDATE todos SET list = 'home' WHERE id = 1;
SELECT model_id, action, group_id, prev_group_id, moved FROM acts;

-- A key change is a delete of the old key and an insert of the new one.
TRUNCATE pg_sync.sync_actions;
UPDATE todos SET id = 10 WHERE id = 1;
SELECT model_id, action, group_id FROM acts;

-- Rolled back: nothing. Savepoint rolled back: only what survived.
TRUNCATE pg_sync.sync_actions;
BEGIN;
INSERT INTO todos VALUES (20, 'x', false, 'home');
ROLLBACK;
BEGIN;
INSERT INTO todos VALUES (21, 'kept', false, 'home');
SAVEPOINT s;
INSERT INTO todos VALUES (22, 'dropped', false, 'home');
ROLLBACK TO s;
COMMIT;
SELECT model_id, action FROM acts;
SELECT k, s->'live' AS live, s->'created' AS created FROM unnest(ARRAY['20', '22']) k, pg_sync.row_version_state('todos', k) s;

-- Versions: every write gets a version above the row's previous one, and the row state
-- records the tombstone of a delete.
TRUNCATE pg_sync.sync_actions;
INSERT INTO todos VALUES (30, 'a', false, 'home');
UPDATE todos SET title = 'b' WHERE id = 30;
UPDATE todos SET title = 'c' WHERE id = 30;
DELETE FROM todos WHERE id = 30;
INSERT INTO todos VALUES (30, 'again', false, 'home');
SELECT bool_and(v > prev) AS versions_increase
  FROM (SELECT version COLLATE "C" AS v, lag(version COLLATE "C") OVER (ORDER BY id) AS prev
          FROM pg_sync.sync_actions WHERE model_id = '30') s WHERE prev IS NOT NULL;
SELECT (s->>'live')::boolean AS live_again, s->>'created' COLLATE "C" > s->>'deleted' AS created_after_delete,
       s->>'max_version' = s->>'created' AS max_is_insert
  FROM pg_sync.row_version_state('todos', '30') s;
SELECT origin = pg_sync.node_id() AS local_origin, count(*) FROM pg_sync.sync_actions GROUP BY 1;

-- TRUNCATE is refused, never silently lost.
SELECT err($$TRUNCATE todos$$);
SELECT count(*) > 0 AS rows_still_there FROM todos;

-- Transaction id and timestamps are recorded for the sequencer.
SELECT bool_and(xid IS NOT NULL AND created_at IS NOT NULL) AS has_xid FROM pg_sync.sync_actions;

-- Composite keys: the model id is a JSON array of the key columns' text forms.
CREATE TABLE pairs (a int, b text, v int, PRIMARY KEY (a, b));
SELECT pg_sync.register_table('pairs');
INSERT INTO pairs VALUES (1, 'x', 1), (2, 'quote"d', 2);
UPDATE pairs SET v = 5 WHERE a = 1;
SELECT model_id, action, data, group_id FROM pg_sync.sync_actions WHERE model = 'pairs' ORDER BY id;
SELECT pg_sync.key_text(ARRAY['1', 'x']), pg_sync.key_text(ARRAY['only']);
