-- (a) capture's canonical settings around to_jsonb: an ERROR inside (a user cast to json) caught
-- by a plpgsql EXCEPTION block must not leave the canonical settings in force afterwards.
-- (b) a table with only timestamptz columns: captured JSON follows the writer's TimeZone.
\i common.sql
CREATE TYPE e AS ENUM ('ok', 'bad');
CREATE FUNCTION e_json(v e) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
  RAISE NOTICE 'cast sees extra_float_digits=% TimeZone=%', current_setting('extra_float_digits'), current_setting('TimeZone');
  IF v = 'bad' THEN RAISE EXCEPTION 'bad value'; END IF;
  RETURN to_json(v::text);
END $$;
CREATE CAST (e AS json) WITH FUNCTION e_json(e);
CREATE TABLE el (id int PRIMARY KEY, v e, f float8, t timestamptz);
SELECT pg_sync.register_table('el');
SET extra_float_digits = 0; SET TimeZone = 'Asia/Kolkata';
INSERT INTO el VALUES (1, 'ok', 0.1, '2024-01-02 03:04:05+00');
DO $$ BEGIN
  INSERT INTO el VALUES (2, 'bad', 0.1, now());
EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'caught: %', SQLERRM;
END $$;
SHOW extra_float_digits;
SHOW TimeZone;
BEGIN;
SAVEPOINT s;
INSERT INTO el VALUES (3, 'bad', 0.1, now());
ROLLBACK TO s;
SHOW extra_float_digits;
SHOW TimeZone;
COMMIT;
SELECT data FROM pg_sync.sync_actions WHERE model = 'el';
-- (b)
CREATE TABLE tz (id int PRIMARY KEY, t timestamptz);
SELECT pg_sync.register_table('tz');
SET TimeZone = 'UTC';
INSERT INTO tz VALUES (1, '2024-01-02 03:04:05+00');
SET TimeZone = 'Asia/Kolkata';
INSERT INTO tz VALUES (2, '2024-01-02 03:04:05+00');
RESET TimeZone;
SELECT model_id, data FROM pg_sync.sync_actions WHERE model = 'tz' ORDER BY id;
