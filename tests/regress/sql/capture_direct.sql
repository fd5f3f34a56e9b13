-- The capture trigger writes action rows and a key's first row_state row straight into the heap
-- (pg_sync/src/actions.rs, state_direct.rs). They must look exactly like the INSERTs they
-- replace, and a log table altered by a superuser must get its INSERT back.
-- Failing-row details carry ids, versions and times.
\set VERBOSITY terse
CREATE TABLE direct (id int PRIMARY KEY, v text, g text);
SELECT pg_sync.register_table('direct', group_column => 'g');

-- Defaults filled as the INSERT would: id from the identity, xid of this transaction, now().
BEGIN;
INSERT INTO direct VALUES (1, 'a', 'x'), (2, 'b', 'x');
SELECT count(*) AS actions,
       bool_and(xid = pg_current_xact_id()) AS xid_is_ours,
       bool_and(created_at = now()) AS created_now,
       max(id) - min(id) AS id_step
  FROM pg_sync.sync_actions WHERE model = 'direct';
COMMIT;
SELECT model_id, created = max_version AS created_at_max, deleted, versions, pending
  FROM pg_sync.row_state WHERE model = 'direct' ORDER BY model_id;

-- A rolled-back savepoint leaves neither actions nor state.
BEGIN;
SAVEPOINT s;
INSERT INTO direct VALUES (3, 'c', 'x');
ROLLBACK TO SAVEPOINT s;
INSERT INTO direct VALUES (4, 'd', 'x');
COMMIT;
SELECT model_id, action FROM pg_sync.sync_actions WHERE model = 'direct' ORDER BY id;
SELECT model_id FROM pg_sync.row_state WHERE model = 'direct' ORDER BY model_id;

-- Re-inserting a deleted key: its state exists (a tombstone), so the first-state insert yields
-- to the upsert; the row is live again above its delete.
DELETE FROM direct WHERE id = 1;
INSERT INTO direct VALUES (1, 'again', 'x');
SELECT created > deleted AS live, created = max_version AS created_at_max
  FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '1';
SELECT count(*) FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '1';

-- A CHECK constraint added to the log is honoured (the INSERT runs instead of the direct write).
ALTER TABLE pg_sync.sync_actions ADD CONSTRAINT no_updates CHECK (action <> 'U') NOT VALID;
UPDATE direct SET v = 'changed' WHERE id = 2;
ALTER TABLE pg_sync.sync_actions DROP CONSTRAINT no_updates;
UPDATE direct SET v = 'changed' WHERE id = 2;

-- So is a trigger on the log, and a column with its own default.
CREATE FUNCTION count_action() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.data := NEW.data || '{"seen": true}'; RETURN NEW; END $$;
CREATE TRIGGER count_action BEFORE INSERT ON pg_sync.sync_actions
  FOR EACH ROW EXECUTE FUNCTION count_action();
INSERT INTO direct VALUES (5, 'e', 'x');
DROP TRIGGER count_action ON pg_sync.sync_actions;
ALTER TABLE pg_sync.sync_actions ADD COLUMN note text DEFAULT 'noted';
INSERT INTO direct VALUES (6, 'f', 'x');
SELECT model_id, note FROM pg_sync.sync_actions WHERE model = 'direct' AND model_id = '6';
ALTER TABLE pg_sync.sync_actions DROP COLUMN note;
INSERT INTO direct VALUES (7, 'g', 'x');
SELECT model_id, action, data FROM pg_sync.sync_actions
 WHERE model = 'direct' AND model_id IN ('5', '7') ORDER BY id;

-- row_state with a CHECK that refuses new keys: the first-state insert yields to the upsert,
-- which the CHECK stops.
ALTER TABLE pg_sync.row_state ADD CONSTRAINT no_eights CHECK (model <> 'direct' OR model_id <> '8') NOT VALID;
INSERT INTO direct VALUES (8, 'h', 'x');
ALTER TABLE pg_sync.row_state DROP CONSTRAINT no_eights;
INSERT INTO direct VALUES (8, 'h', 'x');
SELECT count(*) FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '8';

-- Updates and deletes of keys with state update their row_state row in place: the columns'
-- versions merged in at the write's version, a delete's tombstone resetting them.
UPDATE direct SET v = 'x2' WHERE id = 4;
UPDATE direct SET g = 'y' WHERE id = 4;
SELECT created < max_version AS after_insert, deleted IS NULL AS not_deleted,
       versions ->> 'v' < max_version AS v_older, versions ->> 'g' = max_version AS g_latest,
       versions ? 'id' AS has_key
  FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '4';
DELETE FROM direct WHERE id = 4;
SELECT deleted = max_version AS tombstone, versions, pending, created IS NOT NULL AS created
  FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '4';
-- A row that predates capture has no state: its first update creates it (created at zero).
ALTER TABLE direct DISABLE TRIGGER pg_sync_capture;
INSERT INTO direct VALUES (9, 'old', 'x');
ALTER TABLE direct ENABLE TRIGGER pg_sync_capture;
UPDATE direct SET v = 'new' WHERE id = 9;
SELECT created, versions ->> 'v' = max_version AS v_latest
  FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '9';
-- A second index on row_state makes updates that change max_version non-HOT: the new version
-- gets its index entries (found through that index afterwards).
CREATE INDEX row_state_max ON pg_sync.row_state (max_version);
UPDATE direct SET v = 'indexed' WHERE id = 9;
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SELECT count(*) FROM pg_sync.row_state s
 WHERE s.max_version = (SELECT max_version FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '9');
RESET enable_seqscan;
RESET enable_bitmapscan;
DROP INDEX pg_sync.row_state_max;
-- Under REPEATABLE READ the UPDATE statement runs (its snapshot rules); the result is the same.
BEGIN ISOLATION LEVEL REPEATABLE READ;
UPDATE direct SET v = 'rr' WHERE id = 9;
COMMIT;
SELECT versions ->> 'v' = max_version AS v_latest
  FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '9';

-- A column altered in type, NOT NULL or nullability sends the writes back to SQL, which honours
-- it (the direct paths write raw datums and fill defaults themselves): no garbage in the log,
-- no constraint bypassed, no crash on a NULL the direct update would not expect.
BEGIN;
ALTER TABLE pg_sync.sync_actions ALTER COLUMN client_tx_id TYPE text USING client_tx_id::text;
SELECT pg_sync.mutate('c1', '00000000-0000-4000-8000-000000000099',
                      '[{"model": "direct", "action": "U", "id": 9, "data": {"v": "typed"}}]') ->> 'status';
SELECT client_tx_id, data::text
  FROM pg_sync.sync_actions WHERE model = 'direct' AND model_id = '9' ORDER BY id DESC LIMIT 1;
ROLLBACK;
BEGIN;
UPDATE pg_sync.sync_actions SET client_id = '' WHERE client_id IS NULL;
ALTER TABLE pg_sync.sync_actions ALTER COLUMN client_id SET NOT NULL;
SELECT err($$INSERT INTO direct VALUES (21, 'not null', 'x')$$);
ROLLBACK;
BEGIN;
ALTER TABLE pg_sync.row_state ALTER COLUMN versions DROP NOT NULL;
UPDATE pg_sync.row_state SET versions = NULL WHERE model = 'direct' AND model_id = '9';
UPDATE direct SET v = 'after null versions' WHERE id = 9;
SELECT versions IS NULL AS versions_null FROM pg_sync.row_state WHERE model = 'direct' AND model_id = '9';
ROLLBACK;
INSERT INTO direct VALUES (22, 'direct again', 'x');
SELECT action, data ->> 'v' FROM pg_sync.sync_actions WHERE model = 'direct' AND model_id = '22';

SELECT pg_sync.unregister_table('direct');
DROP TABLE direct;
DROP FUNCTION count_action();
