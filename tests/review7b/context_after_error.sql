-- After a set-based write fails (unique violation in the UPDATE statement), is the remote set
-- context gone? A local write to the same table in the same session must be logged as local.
\i common.sql
CREATE TABLE ce (id text PRIMARY KEY, email text UNIQUE);
SELECT pg_sync.register_table('ce');
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(0, 'ce', 'I', 'k1', 10, 'p1', '{"id": "k1", "email": "a"}'),
  ch(0, 'ce', 'I', 'k2', 10, 'p1', '{"id": "k2", "email": "b"}')));
BEGIN;
SAVEPOINT s;
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  ch(1, 'ce', 'U', 'k1', 20, 'p2', '{"email": "b"}'),
  ch(2, 'ce', 'U', 'k2', 20, 'p2', '{"email": "c"}')));
ROLLBACK TO s;
UPDATE ce SET email = 'z' WHERE id = 'k2';
COMMIT;
SELECT model_id, action, data, origin FROM pg_sync.sync_actions WHERE model = 'ce' ORDER BY id;
