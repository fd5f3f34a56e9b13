-- lock_rows aggregates `to_jsonb(l)` over the CTE `l`: a synced column named "l" is taken for the
-- row (a column reference wins over a whole-row reference), so every locked row reads as absent.
-- Direct evidence: WITH l AS (SELECT t.id, t.l, t.a FROM cl_c t) SELECT jsonb_object_agg(id, to_jsonb(l)) FROM l
-- gives {"k1": "ell"}, not rows; lock_rows drops non-objects, so `current` is None for every key.
\i common.sql
CREATE TABLE cl_s (id text PRIMARY KEY, l text, a text);
CREATE TABLE cl_c (id text PRIMARY KEY, l text, a text);
-- rows that predate registration (no row_state: "live at the zero version" if the table holds them)
INSERT INTO cl_s VALUES ('k1', 'ell', 'local'), ('k2', 'ell', 'local');
INSERT INTO cl_c VALUES ('k1', 'ell', 'local'), ('k2', 'ell', 'local');
SELECT pg_sync.register_table('cl_s'), pg_sync.register_table('cl_c');
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  ch(1, 'cl_s', 'U', 'k1', 20, 'p2', '{"a": "peer"}'),
  ch(2, 'cl_s', 'D', 'k2', 21, 'p2', '{"id": "k2"}')));
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(1, 'cl_c', 'U', 'k1', 20, 'p2', '{"a": "peer"}'),
  ch(2, 'cl_c', 'D', 'k2', 21, 'p2', '{"id": "k2"}')));
RESET pg_sync.set_apply;
SELECT 'set' AS path, * FROM cl_s UNION ALL SELECT 'chg', * FROM cl_c ORDER BY 1, 2;
SELECT model, model_id, created IS NOT NULL AS c, deleted IS NOT NULL AS d, versions, pending FROM pg_sync.row_state WHERE model IN ('cl_s','cl_c') ORDER BY 2, 1;
SELECT model, model_id, action, data, origin FROM pg_sync.sync_actions WHERE model IN ('cl_s','cl_c') AND origin <> 'regress' ORDER BY id;
