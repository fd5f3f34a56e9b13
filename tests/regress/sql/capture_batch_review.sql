-- Review rev7a of the statement-level batching (pg_sync/src/actions.rs `batch`): probes of
-- the flush points and subtransaction tagging the change names. Each block states what the
-- log must hold; none prints ids or xids (they differ between runs).
\set VERBOSITY terse
CREATE TABLE rv_a (id int PRIMARY KEY, v text);
CREATE TABLE rv_b (id int PRIMARY KEY, v text);
SELECT pg_sync.register_table('rv_a');
SELECT pg_sync.register_table('rv_b');
-- Per model: actions, distinct keys, transactions.
CREATE VIEW rv_log AS
  SELECT model, count(*) AS actions, count(DISTINCT model_id) AS keys, count(DISTINCT xid) AS xacts
    FROM pg_sync.sync_actions WHERE model IN ('rv_a', 'rv_b') GROUP BY model ORDER BY model;
-- Table and log agree: every live row has a last action 'I'/'U', every logged key not in the
-- table ends with 'D'.
CREATE VIEW rv_mismatch AS
  WITH last AS (
    SELECT DISTINCT ON (model, model_id) model, model_id, action
      FROM pg_sync.sync_actions WHERE model IN ('rv_a', 'rv_b') ORDER BY model, model_id, id DESC)
  SELECT l.model, l.model_id, l.action FROM last l
   WHERE (l.action = 'D') = EXISTS (
           SELECT 1 FROM rv_a WHERE l.model = 'rv_a' AND id::text = l.model_id
           UNION ALL SELECT 1 FROM rv_b WHERE l.model = 'rv_b' AND id::text = l.model_id)
  UNION ALL
  SELECT 'rv_a', id::text, 'missing' FROM rv_a
   WHERE NOT EXISTS (SELECT 1 FROM pg_sync.sync_actions s WHERE s.model = 'rv_a' AND s.model_id = rv_a.id::text)
  UNION ALL
  SELECT 'rv_b', id::text, 'missing' FROM rv_b
   WHERE NOT EXISTS (SELECT 1 FROM pg_sync.sync_actions s WHERE s.model = 'rv_b' AND s.model_id = rv_b.id::text);

-- 1. A deferred constraint trigger writing another registered table fires at COMMIT (after
-- every statement's flush): its rows must be logged.
CREATE FUNCTION rv_wb() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO rv_b VALUES (NEW.id, 'deferred'); RETURN NULL; END$$;
CREATE CONSTRAINT TRIGGER rv_dt AFTER INSERT ON rv_a DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION rv_wb();
BEGIN;
INSERT INTO rv_a SELECT g, 'x' FROM generate_series(1, 3) g;
COMMIT;
SELECT * FROM rv_log;
DROP TRIGGER rv_dt ON rv_a;

-- 2. A statement crossing the 1000-row flush inside a savepoint that is rolled back leaves
-- nothing; the same released is logged whole, in the one transaction.
BEGIN;
SAVEPOINT s;
INSERT INTO rv_a SELECT g, 'x' FROM generate_series(1001, 2500) g;
ROLLBACK TO s;
SAVEPOINT s2;
INSERT INTO rv_a SELECT g, 'x' FROM generate_series(3001, 4500) g;
RELEASE s2;
COMMIT;
SELECT * FROM rv_log;

-- 3. The same in a PL/pgSQL exception block (a subtransaction) that fails after the chunks.
DO $$BEGIN
  BEGIN
    INSERT INTO rv_a SELECT g, 'x' FROM generate_series(5001, 6500) g;
    RAISE EXCEPTION 'undo';
  EXCEPTION WHEN raise_exception THEN NULL;
  END;
END$$;
SELECT * FROM rv_log;

-- 4. Transaction control in a procedure: the committed parts only.
CREATE PROCEDURE rv_proc() LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO rv_a VALUES (7001, 'p'); COMMIT;
  INSERT INTO rv_a VALUES (7002, 'p'); ROLLBACK;
  INSERT INTO rv_a VALUES (7003, 'p');
END$$;
CALL rv_proc();
SELECT * FROM rv_log;

-- 5. ON CONFLICT (one update, one insert), a CTE with two DML parts, EXPLAIN ANALYZE of a DML.
INSERT INTO rv_a VALUES (1, 'u'), (9001, 'n') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v;
WITH x AS (INSERT INTO rv_a VALUES (9002, 'w') RETURNING id),
     y AS (UPDATE rv_b SET v = 'z' WHERE id = 1 RETURNING id)
SELECT (SELECT count(*) FROM x) + (SELECT count(*) FROM y) AS written;
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) INSERT INTO rv_a VALUES (9003, 'e');
SELECT * FROM rv_log;

-- 6. A cursor whose rows write a registered table, fetched partly in a savepoint rolled back
-- and partly in the top transaction.
CREATE FUNCTION rv_ins(i int) RETURNS int LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO rv_b VALUES (i, 'cursor'); RETURN i; END$$;
BEGIN;
DECLARE c CURSOR FOR SELECT rv_ins(g) FROM generate_series(8001, 8006) g;
FETCH 2 FROM c;
SAVEPOINT s;
FETCH 2 FROM c;
ROLLBACK TO s;
FETCH 2 FROM c;
COMMIT;
SELECT id FROM rv_b WHERE id > 8000 ORDER BY id;
SELECT * FROM rv_log;

-- 7. COPY over the chunk size, and wide (toasted) rows in one multi-insert.
COPY rv_a FROM PROGRAM 'seq 10001 12500 | sed "s/$/\tc/"';
INSERT INTO rv_b SELECT g, repeat(md5(g::text), 400) FROM generate_series(20001, 20005) g;
SELECT count(*) AS wide, bool_and(data->>'v' = repeat(md5(model_id), 400)) AS intact
  FROM pg_sync.sync_actions WHERE model = 'rv_b' AND model_id::int > 20000;
SELECT * FROM rv_log;

-- Whatever ran above, the log and the tables agree.
SELECT * FROM rv_mismatch;
DROP VIEW rv_mismatch, rv_log;
DROP FUNCTION rv_wb(), rv_ins(int);
DROP PROCEDURE rv_proc();
SELECT pg_sync.unregister_table('rv_a');
SELECT pg_sync.unregister_table('rv_b');
DROP TABLE rv_a, rv_b;
