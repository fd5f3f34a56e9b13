-- Defect: set path looks up locked rows by the TABLE's canonical key text, the per-change path
-- by SQL equality: a numeric key stored as 1.0, changed by a peer as id "1".
\i common.sql
CREATE TABLE nk_s (id numeric PRIMARY KEY, a text);
CREATE TABLE nk_c (id numeric PRIMARY KEY, a text);
SELECT pg_sync.register_table('nk_s'), pg_sync.register_table('nk_c');
INSERT INTO nk_s VALUES (1.0, 'local'), (2.0, 'local');
INSERT INTO nk_c VALUES (1.0, 'local'), (2.0, 'local');
-- set-based
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  ch(1, 'nk_s', 'U', '1', 20, 'p2', '{"a": "peer"}'),
  ch(2, 'nk_s', 'D', '2', 21, 'p2', '{"id": "2"}')));
-- change by change
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(1, 'nk_c', 'U', '1', 20, 'p2', '{"a": "peer"}'),
  ch(2, 'nk_c', 'D', '2', 21, 'p2', '{"id": "2"}')));
RESET pg_sync.set_apply;
SELECT 'set' AS path, * FROM nk_s UNION ALL SELECT 'chg', * FROM nk_c ORDER BY 1, 2;
SELECT model, model_id, created IS NOT NULL AS c, deleted IS NOT NULL AS d, versions, pending FROM pg_sync.row_state WHERE model IN ('nk_s','nk_c') ORDER BY 1, 2;
SELECT model, model_id, action, data, origin FROM pg_sync.sync_actions WHERE model IN ('nk_s','nk_c') ORDER BY id;
