-- Probes that found NO defect (kept for the record): a NOT NULL domain column with the set
-- path (applied set-based fine), and a user BEFORE trigger named pg_sync_* (not declined, but
-- the result matched the per-change path: row 'X').
\i common.sql
CREATE DOMAIN nn AS int NOT NULL;
CREATE TABLE dn (id text PRIMARY KEY, n nn DEFAULT 0, a text);
SELECT pg_sync.register_table('dn');
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  ch(1, 'dn', 'I', 'k1', 20, 'p2', '{"id": "k1", "n": 1, "a": "x"}')));
-- a user trigger whose name starts with pg_sync_ is not seen as a user trigger (no decline)
CREATE TABLE tr (id text PRIMARY KEY, a text);
SELECT pg_sync.register_table('tr');
CREATE FUNCTION up() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.a := upper(NEW.a); RETURN NEW; END $$;
CREATE TRIGGER pg_sync_upper BEFORE INSERT ON tr FOR EACH ROW EXECUTE FUNCTION up();
SELECT pg_sync.apply_remote_set(jsonb_build_array(
  ch(1, 'tr', 'I', 'k1', 20, 'p2', '{"id": "k1", "a": "x"}')));
SELECT * FROM tr;
