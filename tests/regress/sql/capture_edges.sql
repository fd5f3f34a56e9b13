-- Capture at the edges of a statement: multi-row statements with a rolled-back savepoint
-- inside, triggers that write registered tables from inside a captured statement, COPY,
-- multi-statement transactions, moves between groups in one statement, and indexes added to
-- the log after its direct-write layout was cached (pg_sync/src/actions.rs).
\set VERBOSITY terse
CREATE TABLE edge (id int PRIMARY KEY, v text, g text);
CREATE TABLE edge_audit (id int PRIMARY KEY, what text, g text);
SELECT pg_sync.register_table('edge', group_column => 'g');
SELECT pg_sync.register_table('edge_audit', group_column => 'g');
CREATE VIEW edge_log AS
  SELECT model, model_id, action, data, group_id, prev_group_id, moved
    FROM pg_sync.sync_actions WHERE model IN ('edge', 'edge_audit');

-- A multi-row statement whose rows each call a function with a savepoint: the function writes
-- a registered table and rolls every odd row's write back. Only the kept writes are logged,
-- and the outer statement's own rows all are.
CREATE FUNCTION edge_note(i int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        INSERT INTO edge_audit VALUES (i, 'noted', 'a');
        IF i % 2 = 1 THEN
            RAISE EXCEPTION 'roll back %', i;
        END IF;
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
    RETURN i;
END $$;
INSERT INTO edge (id, v, g) SELECT edge_note(i), 'v' || i, 'a' FROM generate_series(1, 4) i;
SELECT model, model_id, action FROM edge_log ORDER BY model, model_id;
SELECT model, model_id FROM pg_sync.row_state WHERE model IN ('edge', 'edge_audit')
 ORDER BY model, model_id;

-- An AFTER ROW trigger of a registered table that writes another registered table, inside the
-- captured statement; one of its writes in a subtransaction that fails.
CREATE FUNCTION edge_mirror() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO edge_audit VALUES (NEW.id, 'mirrored ' || NEW.v, NEW.g)
      ON CONFLICT (id) DO UPDATE SET what = EXCLUDED.what;
    BEGIN
        INSERT INTO edge_audit VALUES (NEW.id + 1000, 'doomed', NEW.g);
        RAISE EXCEPTION 'doomed';
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
    RETURN NULL;
END $$;
CREATE TRIGGER edge_mirror AFTER INSERT ON edge FOR EACH ROW EXECUTE FUNCTION edge_mirror();
INSERT INTO edge VALUES (5, 'five', 'b'), (6, 'six', 'b');
SELECT model, model_id, action, data FROM edge_log WHERE model_id IN ('5', '6', '1005', '1006')
 ORDER BY model, model_id, action;
DROP TRIGGER edge_mirror ON edge;

-- COPY captures every row, like INSERT.
COPY edge (id, v, g) FROM stdin;
7	seven	c
8	eight	c
\.
SELECT model_id, action, data, group_id FROM edge_log WHERE model = 'edge' AND model_id IN ('7', '8')
 ORDER BY model_id;

-- A multi-statement transaction: insert, update, move, delete of one row, plus a statement
-- rolled back by a savepoint; the log keeps the surviving actions in order, all under one xid.
BEGIN;
INSERT INTO edge VALUES (9, 'nine', 'c');
UPDATE edge SET v = 'NINE' WHERE id = 9;
SAVEPOINT s;
UPDATE edge SET v = 'lost' WHERE id = 9;
DELETE FROM edge WHERE id = 8;
ROLLBACK TO SAVEPOINT s;
UPDATE edge SET g = 'd' WHERE id = 9;
DELETE FROM edge WHERE id = 9;
COMMIT;
SELECT a.model_id, a.action, a.data, a.group_id, a.prev_group_id, a.moved
  FROM pg_sync.sync_actions a
 WHERE a.model = 'edge' AND a.model_id IN ('8', '9') ORDER BY a.id;
SELECT count(DISTINCT a.xid) AS xids FROM pg_sync.sync_actions a
 WHERE a.model = 'edge' AND a.model_id = '9';
SELECT v FROM edge WHERE id = 8;

-- Moves between groups in one multi-row statement: each moved row logs a delete for its old
-- group and the whole row for the new one; rows that stay log an update.
SELECT max(id) AS before FROM pg_sync.sync_actions \gset
UPDATE edge SET g = CASE WHEN id % 2 = 0 THEN 'z' ELSE g END, v = v || '!' WHERE id IN (1, 2, 3, 4);
SELECT model_id, action, data, group_id, prev_group_id, moved, versions IS NOT NULL AS has_versions
  FROM pg_sync.sync_actions WHERE id > :before ORDER BY id;

-- An index added to the log after captured writes cached its layout: the direct write keeps
-- it current (the relcache invalidation makes it rebuild the cached index list), also within
-- the transaction that creates it.
INSERT INTO edge VALUES (10, 'ten', 'e');
BEGIN;
CREATE INDEX edge_log_model_id ON pg_sync.sync_actions (model_id);
INSERT INTO edge VALUES (11, 'eleven', 'e');
SET LOCAL enable_seqscan = off;
SET LOCAL enable_bitmapscan = off;
SELECT model_id, action FROM pg_sync.sync_actions WHERE model_id IN ('10', '11') AND model = 'edge'
 ORDER BY id;
COMMIT;
INSERT INTO edge VALUES (12, 'twelve', 'e');
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SELECT model_id, action FROM pg_sync.sync_actions WHERE model_id IN ('10', '11', '12') AND model = 'edge'
 ORDER BY id;
RESET enable_seqscan;
RESET enable_bitmapscan;
-- And is no longer written once dropped.
DROP INDEX pg_sync.edge_log_model_id;
INSERT INTO edge VALUES (13, 'thirteen', 'e');
SELECT count(*) FROM pg_sync.sync_actions WHERE model = 'edge' AND model_id = '13';
-- The log's unique key (xid, id) is still enforced by the direct write (its cached IndexInfo):
-- an id handed out twice within a transaction fails the write instead of logging two actions
-- under one key.
BEGIN;
UPDATE edge SET v = 'x' WHERE id = 13;
SELECT setval('pg_sync.sync_actions_id_seq', (SELECT max(id) FROM pg_sync.sync_actions) - 1) > 0 AS rewound;
SELECT err($$UPDATE edge SET v = 'w' WHERE id = 13$$);
ROLLBACK;
SELECT setval('pg_sync.sync_actions_id_seq', (SELECT max(id) FROM pg_sync.sync_actions)) > 0 AS restored;
SELECT err($$UPDATE edge SET v = 'w' WHERE id = 13$$);
SELECT action, data FROM pg_sync.sync_actions WHERE model = 'edge' AND model_id = '13' ORDER BY id;

DROP VIEW edge_log;
SELECT pg_sync.unregister_table('edge');
SELECT pg_sync.unregister_table('edge_audit');
DROP TABLE edge, edge_audit;
DROP FUNCTION edge_note(int), edge_mirror();
