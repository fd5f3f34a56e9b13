-- Review 7b of the set-based apply: batches it must leave to the per-change path (it returns
-- NULL before writing anything), a synced column named like its SQL's aliases, and captured
-- JSON of user types under the writer's settings.
SELECT pg_sync.add_peer('sr', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
SELECT pg_sync.pin_peer('sr', 'sr');
CREATE TABLE rbase AS SELECT pg_sync.hlc_now() AS hlc;
-- A change of key id at version k of node, with sync id s.
CREATE FUNCTION rch(s int, m text, action text, id text, k int, node text, data jsonb)
  RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('sync_id', s, 'model', m, 'model_id', id, 'action', action,
      'version', lpad(to_hex((SELECT hlc FROM rbase) + k), 16, '0') || '@' || node,
      'origin', node, 'data', data) $$;

-- 1. The set path writes per model and kind in key order, not in batch order: a constraint
-- between rows (a unique index beyond the key, an exclusion constraint, a foreign key either
-- way) could let a batch through whole that change by change fails in part. Declined.
CREATE TABLE ru (id text PRIMARY KEY, email text UNIQUE);
SELECT pg_sync.register_table('ru');
SELECT pg_sync.apply_remote(rch(0, 'ru', 'I', 'k1', 10, 'p1', '{"id": "k1", "email": "a"}'));
-- [insert k2 with k1's email, delete k1]: the insert fails change by change.
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(1, 'ru', 'I', 'k2', 20, 'p2', '{"id": "k2", "email": "a"}'),
  rch(2, 'ru', 'D', 'k1', 21, 'p2', '{"id": "k1"}'))) IS NULL AS declined_unique;
-- Through apply_peer_batch: the insert is parked, the delete applies (as with set_apply off).
SELECT pg_sync.apply_peer_batch('sr', 'E1', 0, 2, jsonb_build_array(
  rch(1, 'ru', 'I', 'k2', 20, 'p2', '{"id": "k2", "email": "a"}'),
  rch(2, 'ru', 'D', 'k1', 21, 'p2', '{"id": "k1"}')));
SELECT sync_id, sqlstate FROM pg_sync.peer_quarantine WHERE peer_node_id = 'sr';
SELECT * FROM ru;
-- A unique index on the key's columns only (and a plain index) is fine.
CREATE TABLE rk (a int, b uuid, c timestamptz, v text, PRIMARY KEY (a, b, c));
CREATE UNIQUE INDEX rk_again ON rk (c, b, a);
CREATE INDEX rk_v ON rk (v);
SELECT pg_sync.register_table('rk');
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(3, 'rk', 'I', '["1","00000000-0000-0000-0000-000000000001","2024-01-02 03:04:05+00"]', 20, 'p2',
      '{"a": 1, "b": "00000000-0000-0000-0000-000000000001", "c": "2024-01-02T03:04:05+00:00", "v": "x"}'))) AS applied_plain_indexes;
SELECT * FROM rk;
-- A foreign key, referenced or referencing (NO ACTION), and an exclusion constraint.
CREATE TABLE rpar (id text PRIMARY KEY);
CREATE TABLE rchi (id text PRIMARY KEY, p text REFERENCES rpar);
SELECT pg_sync.register_table('rpar'), pg_sync.register_table('rchi');
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(4, 'rpar', 'I', 'p0', 20, 'p2', '{"id": "p0"}'))) IS NULL AS declined_referenced;
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(5, 'rchi', 'I', 'c1', 20, 'p2', '{"id": "c1", "p": "p9"}'))) IS NULL AS declined_referencing;
-- [insert parent p0, child c1 -> p9, parent p9]: change by change the child fails (23503).
SELECT pg_sync.apply_peer_batch('sr', 'E1', 2, 5, jsonb_build_array(
  rch(3, 'rpar', 'I', 'p0', 20, 'p2', '{"id": "p0"}'),
  rch(4, 'rchi', 'I', 'c1', 20, 'p2', '{"id": "c1", "p": "p9"}'),
  rch(5, 'rpar', 'I', 'p9', 20, 'p2', '{"id": "p9"}')));
SELECT sync_id, sqlstate FROM pg_sync.peer_quarantine WHERE peer_node_id = 'sr' ORDER BY 1;
SELECT (SELECT count(*) FROM rpar) AS parents, (SELECT count(*) FROM rchi) AS children;
CREATE TABLE rex (id int PRIMARY KEY, a int, EXCLUDE USING btree (a WITH =));
SELECT pg_sync.register_table('rex');
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(6, 'rex', 'I', '1', 20, 'p2', '{"id": 1, "a": 1}'))) IS NULL AS declined_exclusion;
CREATE TABLE rpu (id int PRIMARY KEY, a int);
CREATE UNIQUE INDEX rpu_a ON rpu (id) WHERE a > 0;
SELECT pg_sync.register_table('rpu');
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(7, 'rpu', 'I', '1', 20, 'p2', '{"id": 1, "a": 1}'))) IS NULL AS declined_partial_unique;

-- 2. Keys whose equality is not their canonical text's: the set path finds locked rows by that
-- text, so 'abc' would miss a citext row 'ABC' that = finds. Declined.
CREATE EXTENSION citext;
CREATE COLLATION r_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE TABLE rcit (id citext PRIMARY KEY, a text);
CREATE TABLE rnd (id text COLLATE r_ci PRIMARY KEY, a text);
CREATE TABLE riv (id interval PRIMARY KEY, a text);
CREATE TABLE rfl (id float8 PRIMARY KEY, a text);
SELECT pg_sync.register_table('rcit'), pg_sync.register_table('rnd'),
       pg_sync.register_table('riv'), pg_sync.register_table('rfl');
INSERT INTO rcit VALUES ('ABC', 'x'), ('DEF', 'x');
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(8, 'rcit', 'U', 'abc', 20, 'p2', '{"a": "peer"}'),
  rch(9, 'rcit', 'D', 'def', 21, 'p2', '{"id": "def"}'))) IS NULL AS declined_citext;
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(10, 'rnd', 'I', 'abc', 20, 'p2', '{"id": "abc", "a": "x"}'))) IS NULL AS declined_nondeterministic;
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(11, 'riv', 'I', '1 day', 20, 'p2', '{"id": "1 day", "a": "x"}'))) IS NULL AS declined_interval;
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(12, 'rfl', 'I', '0', 20, 'p2', '{"id": 0, "a": "x"}'))) IS NULL AS declined_float;
SELECT * FROM rcit ORDER BY id;
-- A key of a collation other than the default and "C" (a nondeterministic one here, POSIX
-- below), with a row that predates registration and one captured: counting and announcing
-- unannounced rows compares model ids in "C" (before, 42P22 "could not determine which
-- collation to use", so add_peer failed on such a table).
CREATE TABLE rnd2 (id text COLLATE r_ci PRIMARY KEY, a text);
INSERT INTO rnd2 VALUES ('old', 'x');
SELECT pg_sync.register_table('rnd2');
INSERT INTO rnd2 VALUES ('New', 'x');
SET enable_indexscan = off; SET enable_bitmapscan = off;
SELECT pg_sync.unannounced('rnd2') AS unannounced_before;
RESET enable_indexscan; RESET enable_bitmapscan;
SELECT pg_sync.announce('rnd2') AS announced;
SET enable_indexscan = off; SET enable_bitmapscan = off;
SELECT pg_sync.unannounced('rnd2') AS unannounced_after;
RESET enable_indexscan; RESET enable_bitmapscan;
SELECT model_id FROM pg_sync.row_state WHERE model = 'rnd2' ORDER BY 1;
CREATE TABLE rpx (id text COLLATE "POSIX" PRIMARY KEY, a text);
INSERT INTO rpx VALUES ('old', 'x');
SELECT pg_sync.register_table('rpx');
SET enable_indexscan = off; SET enable_bitmapscan = off;
SELECT pg_sync.unannounced('rpx') AS unannounced_before;
RESET enable_indexscan; RESET enable_bitmapscan;
SELECT pg_sync.announce('rpx') AS announced, pg_sync.unannounced('rpx') AS unannounced_after;

-- 3. A synced column named like the CTE the set path reads rows through: rows that predate
-- registration (live, no recorded state) are found and written as change by change.
CREATE TABLE rl (id text PRIMARY KEY, l text, a text);
INSERT INTO rl VALUES ('k1', 'ell', 'local'), ('k2', 'ell', 'local');
SELECT pg_sync.register_table('rl');
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  rch(13, 'rl', 'U', 'k1', 20, 'p2', '{"a": "peer"}'),
  rch(14, 'rl', 'D', 'k2', 21, 'p2', '{"id": "k2"}'))) AS applied;
SELECT * FROM rl ORDER BY id;
SELECT model_id, deleted IS NOT NULL AS deleted, pending FROM pg_sync.row_state WHERE model = 'rl' ORDER BY 1;

-- 4. A user type's cast to json, which to_jsonb calls, may read any setting: the capture runs
-- it under the canonical ones (extra_float_digits 1), for the type itself and a domain over it.
CREATE TYPE r_e AS ENUM ('ok');
CREATE FUNCTION r_e_json(v r_e) RETURNS json LANGUAGE sql AS
  $$ SELECT to_json(v::text || ' ' || current_setting('extra_float_digits')) $$;
CREATE CAST (r_e AS json) WITH FUNCTION r_e_json(r_e);
CREATE DOMAIN r_d AS r_e;
CREATE TABLE ren (id int PRIMARY KEY, v r_e, w r_d);
SELECT pg_sync.register_table('ren');
SET extra_float_digits = 0;
INSERT INTO ren VALUES (1, 'ok', 'ok');
RESET extra_float_digits;
SELECT data->>'v' AS v, data->>'w' AS w FROM pg_sync.sync_actions WHERE model = 'ren';
