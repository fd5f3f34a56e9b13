-- Same root cause as unique_order.sql, across models: the set path writes models in order of
-- first appearance, each model's whole round at once. Batch [insert parent p0, insert child c1
-- -> p9, insert parent p9]: change by change the child insert fails its (NO ACTION) foreign key
-- (23503; apply_peer_batch parks it); set-based all three are applied.
\i common.sql
CREATE TABLE par (id text PRIMARY KEY);
CREATE TABLE chi (id text PRIMARY KEY, p text REFERENCES par);
SELECT pg_sync.register_table('par'), pg_sync.register_table('chi');
BEGIN;
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  ch(1, 'par', 'I', 'p0', 20, 'p2', '{"id": "p0"}'),
  ch(2, 'chi', 'I', 'c1', 20, 'p2', '{"id": "c1", "p": "p9"}'),
  ch(3, 'par', 'I', 'p9', 20, 'p2', '{"id": "p9"}')));
SELECT * FROM chi;
ROLLBACK;
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(1, 'par', 'I', 'p0', 20, 'p2', '{"id": "p0"}'),
  ch(2, 'chi', 'I', 'c1', 20, 'p2', '{"id": "c1", "p": "p9"}'),
  ch(3, 'par', 'I', 'p9', 20, 'p2', '{"id": "p9"}')));
