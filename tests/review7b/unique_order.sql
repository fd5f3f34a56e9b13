-- Defect: within a round the set path writes DELETEs before INSERTs (and models by first
-- appearance, keys sorted by id), not in batch order. A batch [insert k2 email 'a', delete k1
-- (holding email 'a')] applied change by change fails at the insert (23505, the change is
-- parked by apply_peer_batch); set-based it succeeds whole: different table rows.
\i common.sql
CREATE TABLE u_s (id text PRIMARY KEY, email text UNIQUE);
CREATE TABLE u_c (id text PRIMARY KEY, email text UNIQUE);
SELECT pg_sync.register_table('u_s'), pg_sync.register_table('u_c');
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(0, 'u_s', 'I', 'k1', 10, 'p1', '{"id": "k1", "email": "a"}'),
  ch(0, 'u_c', 'I', 'k1', 10, 'p1', '{"id": "k1", "email": "a"}')));
-- set-based
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  ch(1, 'u_s', 'I', 'k2', 20, 'p2', '{"id": "k2", "email": "a"}'),
  ch(2, 'u_s', 'D', 'k1', 21, 'p2', '{"id": "k1"}')));
-- change by change, as apply_remote does (and as apply_peer_batch's fallback does)
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(1, 'u_c', 'I', 'k2', 20, 'p2', '{"id": "k2", "email": "a"}'),
  ch(2, 'u_c', 'D', 'k1', 21, 'p2', '{"id": "k1"}')));
RESET pg_sync.set_apply;
SELECT 'set' AS path, * FROM u_s UNION ALL SELECT 'chg', * FROM u_c ORDER BY 1, 2;
-- Through apply_peer_batch (the real caller): set path on, then off, on fresh tables.
CREATE TABLE v_s (id text PRIMARY KEY, email text UNIQUE);
CREATE TABLE v_c (id text PRIMARY KEY, email text UNIQUE);
SELECT pg_sync.register_table('v_s'), pg_sync.register_table('v_c');
SELECT pg_sync.apply_remote(jsonb_build_array(
  ch(0, 'v_s', 'I', 'k1', 10, 'p1', '{"id": "k1", "email": "a"}'),
  ch(0, 'v_c', 'I', 'k1', 10, 'p1', '{"id": "k1", "email": "a"}')));
SELECT pg_sync.apply_peer_batch('sp', (SELECT coalesce(max(epoch),'e1') FROM (SELECT NULL::text AS epoch) z), 0, 2, jsonb_build_array(
  ch(1, 'v_s', 'I', 'k2', 20, 'p2', '{"id": "k2", "email": "a"}'),
  ch(2, 'v_s', 'D', 'k1', 21, 'p2', '{"id": "k1"}')));
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_peer_batch('sp', 'e1', 2, 4, jsonb_build_array(
  ch(3, 'v_c', 'I', 'k2', 20, 'p2', '{"id": "k2", "email": "a"}'),
  ch(4, 'v_c', 'D', 'k1', 21, 'p2', '{"id": "k1"}')));
RESET pg_sync.set_apply;
SELECT 'set' AS path, * FROM v_s UNION ALL SELECT 'chg', * FROM v_c ORDER BY 1, 2;
SELECT model, model_id, action FROM pg_sync.peer_quarantine q ORDER BY 1, 2;
