-- Set path finds the locked row by its canonical key text; per-change path by SQL equality.
-- A key type whose equality is coarser than its text (citext) makes them disagree.
\i common.sql
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE ck_s (id citext PRIMARY KEY, a text);
CREATE TABLE ck_c (id citext PRIMARY KEY, a text);
SELECT pg_sync.register_table('ck_s'), pg_sync.register_table('ck_c');
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(0, 'ck_s', 'I', 'ABC', 10, 'p1', '{"id": "ABC", "a": "x"}'),
  ch(0, 'ck_c', 'I', 'ABC', 10, 'p1', '{"id": "ABC", "a": "x"}'),
  ch(0, 'ck_s', 'I', 'DEF', 10, 'p1', '{"id": "DEF", "a": "x"}'),
  ch(0, 'ck_c', 'I', 'DEF', 10, 'p1', '{"id": "DEF", "a": "x"}')));
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  ch(1, 'ck_s', 'U', 'abc', 20, 'p2', '{"a": "peer"}'),
  ch(2, 'ck_s', 'D', 'def', 21, 'p2', '{"id": "def"}')));
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(1, 'ck_c', 'U', 'abc', 20, 'p2', '{"a": "peer"}'),
  ch(2, 'ck_c', 'D', 'def', 21, 'p2', '{"id": "def"}')));
RESET pg_sync.set_apply;
SELECT 'set' AS path, * FROM ck_s UNION ALL SELECT 'chg', * FROM ck_c ORDER BY 1, 2;
SELECT model, model_id, created IS NOT NULL AS c, deleted IS NOT NULL AS d, versions, pending FROM pg_sync.row_state WHERE model IN ('ck_s','ck_c') ORDER BY 1, 2;
SELECT model, model_id, action, data, origin FROM pg_sync.sync_actions WHERE model IN ('ck_s','ck_c') ORDER BY id;
