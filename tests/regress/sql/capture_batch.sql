-- Statement-level batching of the log rows (pg_sync/src/actions.rs, `batch`): a statement's
-- captured rows wait in a queue tagged with the subtransaction that captured them and go into
-- the log in one multi-insert at the end of each executor run, around each utility statement
-- and before commit. A rolled-back subtransaction's rows never reach the log; a parent's rows
-- are never written inside a child (whose rollback would take them along).
\set VERBOSITY terse
CREATE TABLE cb (id int PRIMARY KEY, v text);
CREATE TABLE cb_side (id int PRIMARY KEY, v text);
SELECT pg_sync.register_table('cb');
SELECT pg_sync.register_table('cb_side');
CREATE VIEW cb_log AS
  SELECT model, model_id::int AS k, action, xid FROM pg_sync.sync_actions
   WHERE model IN ('cb', 'cb_side');

-- An AFTER ROW trigger that fires after the capture trigger (names sort after
-- pg_sync_capture), while the row's action is still queued at the statement's level, and opens
-- a subtransaction that writes another registered table (its own statement, which writes its
-- own queue at its end) and rolls every even row's back. Every row of cb is logged; only the
-- odd rows' side writes are.
CREATE FUNCTION cb_child() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        INSERT INTO cb_side VALUES (NEW.id + 100, 'child of ' || NEW.id);
        IF NEW.id % 2 = 0 THEN
            RAISE EXCEPTION 'roll back the child of %', NEW.id;
        END IF;
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
    RETURN NULL;
END $$;
CREATE TRIGGER zz_child AFTER INSERT ON cb FOR EACH ROW EXECUTE FUNCTION cb_child();
INSERT INTO cb SELECT i, 'v' || i FROM generate_series(1, 4) i;
SELECT model, k, action FROM cb_log ORDER BY model, k;
DROP TRIGGER zz_child ON cb;

-- Nested subtransactions inside one statement: each row's function writes at its own level,
-- in a child and in a grandchild; even rows roll the grandchild back, row 13 the child (and the
-- grandchild it had committed into it).
CREATE FUNCTION cb_nested(i int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cb_side VALUES (i + 1000, 'parent');
    BEGIN
        INSERT INTO cb_side VALUES (i + 2000, 'child');
        BEGIN
            INSERT INTO cb_side VALUES (i + 3000, 'grandchild');
            IF i % 2 = 0 THEN
                RAISE EXCEPTION 'roll back the grandchild of %', i;
            END IF;
        EXCEPTION WHEN raise_exception THEN
            NULL;
        END;
        IF i = 13 THEN
            RAISE EXCEPTION 'roll back the child of %', i;
        END IF;
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
    RETURN i;
END $$;
INSERT INTO cb SELECT cb_nested(i), 'n' FROM generate_series(11, 14) i;
SELECT model, k, action FROM cb_log WHERE k BETWEEN 11 AND 14 OR k > 1000 ORDER BY model, k;
SELECT (SELECT count(*) FROM cb_side WHERE id > 1000) AS side_rows,
       (SELECT count(*) FROM cb_log WHERE model = 'cb_side' AND k > 1000) AS side_actions;

-- COPY and savepoints in one transaction: the log holds each statement's rows as soon as the
-- next statement runs (also inside the transaction), and a rolled-back COPY's rows never.
BEGIN;
COPY cb (id, v) FROM stdin;
21	copied
22	copied
\.
SELECT k, action FROM cb_log WHERE model = 'cb' AND k > 20 ORDER BY k;
SAVEPOINT s;
COPY cb (id, v) FROM stdin;
23	doomed
\.
UPDATE cb SET v = 'doomed too' WHERE id = 21;
ROLLBACK TO SAVEPOINT s;
UPDATE cb SET v = 'kept' WHERE id = 22;
SELECT k, action FROM cb_log WHERE model = 'cb' AND k > 20 ORDER BY k, action;
SELECT count(DISTINCT xid) = 1 AS one_xid FROM cb_log WHERE model = 'cb' AND k > 20;
COMMIT;

-- A statement that fails after its rows were captured (a later AFTER ROW trigger raises), in a
-- savepoint inside another one: its queued rows go with the savepoint, also once the outer one
-- is released into the transaction.
CREATE FUNCTION cb_fail() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.v = 'fail' THEN
        RAISE EXCEPTION 'row % fails', NEW.id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER zz_fail AFTER INSERT ON cb FOR EACH ROW EXECUTE FUNCTION cb_fail();
BEGIN;
SAVEPOINT a;
SAVEPOINT b;
INSERT INTO cb VALUES (41, 'x'), (42, 'x'), (43, 'fail');
ROLLBACK TO SAVEPOINT b;
RELEASE SAVEPOINT a;
INSERT INTO cb VALUES (44, 'kept');
COMMIT;
SELECT k, action FROM cb_log WHERE k BETWEEN 41 AND 44 ORDER BY k;
DROP TRIGGER zz_fail ON cb;

-- A statement that errors at the top level leaves nothing behind; the next one logs normally.
SELECT count(*) AS before FROM cb_log \gset
DO $$ BEGIN
    INSERT INTO cb VALUES (31, 'lost');
    RAISE EXCEPTION 'abort the statement';
END $$;
INSERT INTO cb VALUES (32, 'after');
SELECT k, action FROM cb_log WHERE k IN (31, 32) ORDER BY k;
SELECT count(*) - :before AS new_actions FROM cb_log;

-- A statement of more rows than the queue holds (1000) is written in chunks: every row logged
-- once, under one xid, ids in capture order without gaps.
INSERT INTO cb SELECT i, 'bulk' FROM generate_series(100001, 102500) i;
SELECT count(*) AS actions, count(DISTINCT id) AS ids, max(id) - min(id) + 1 AS id_span,
       count(DISTINCT xid) AS xids,
       bool_and(model_id::int - 100001 = id - first_id) AS capture_order
  FROM (SELECT a.*, min(a.id) OVER () AS first_id FROM pg_sync.sync_actions a
         WHERE a.model = 'cb' AND a.model_id::int > 100000) s;

DROP VIEW cb_log;
SELECT pg_sync.unregister_table('cb');
SELECT pg_sync.unregister_table('cb_side');
DROP TABLE cb, cb_side;
DROP FUNCTION cb_child(), cb_nested(int), cb_fail();
