-- pg_sync next to ordinary, non-superuser application roles: an owner (migrations,
-- registration), a writer (DML), a reader, and an attacker with no grants at all. Covers DDL,
-- DML and registration as those roles, and every privilege attack we know of.
CREATE ROLE app_owner LOGIN;
CREATE ROLE app_writer LOGIN;
CREATE ROLE app_reader LOGIN;
CREATE ROLE app_attacker LOGIN;
DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO app_owner', current_database()); END $$;
GRANT EXECUTE ON FUNCTION pg_sync.register_table(regclass, text, text, text[], text),
                          pg_sync.unregister_table(regclass) TO app_owner;
-- The writer may create objects in a schema of its own (used by the search_path attack).
CREATE SCHEMA writer_ns AUTHORIZATION app_writer;

-- DDL and registration as the table owner.
SET ROLE app_owner;
CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO app_writer, app_reader;
CREATE TYPE app.mood AS ENUM ('sad', 'happy');
-- A user-defined cast to json: to_jsonb(row) calls it; it must run as the writer.
CREATE FUNCTION app.mood_json(m app.mood) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'mood cast runs as %', current_user;
    RETURN to_json(m::text);
END $$;
CREATE CAST (app.mood AS json) WITH FUNCTION app.mood_json(app.mood);
CREATE TABLE app.chores (id int PRIMARY KEY, title text, grp text, mood app.mood);
CREATE TABLE app.plain (id int PRIMARY KEY);
SELECT pg_sync.register_table('app.chores', group_column => 'grp');
GRANT SELECT, INSERT, UPDATE, DELETE ON app.chores TO app_writer;
GRANT SELECT ON app.chores TO app_reader;
ALTER TABLE app.chores ADD COLUMN note text;
SELECT pg_sync.register_table('app.chores', group_column => 'grp', exclude => ARRAY['note']);
SELECT model, pk_columns, group_column, excluded_columns, capturing FROM pg_sync.tables() WHERE model = 'chores';
-- Another model name for a registered table, or someone else's table: refused.
SELECT err($$SELECT pg_sync.register_table('app.chores', model => 'other')$$);
RESET ROLE;
CREATE TABLE not_owned (id int PRIMARY KEY);
SET ROLE app_owner;
SELECT err($$SELECT pg_sync.register_table('not_owned')$$);
SELECT err($$SELECT pg_sync.registry_put('not_owned'::regclass, 'not_owned', '{id}', NULL, '{}', 'both')$$);
RESET ROLE;
-- registry_put, callable directly, checks what register_table checks; a direct write takes
-- effect at once (cached registrations are invalidated).
SET ROLE app_owner;
CREATE TEMP TABLE tmp_t (id int PRIMARY KEY, g text);
SELECT err($$SELECT pg_sync.registry_put('tmp_t'::regclass, 'tmp_t', '{id}', NULL, '{}', 'both')$$);
CREATE TABLE app.reg2 (id int PRIMARY KEY, g text, v text, note text);
SELECT err($$SELECT pg_sync.registry_put('app.reg2'::regclass, 'reg2', '{v}', 'g', '{}', 'both')$$);
SELECT err($$SELECT pg_sync.registry_put('app.reg2'::regclass, 'reg2', '{id}', 'nonexistent', '{}', 'both')$$);
SELECT err($$SELECT pg_sync.registry_put('app.reg2'::regclass, 'reg2', '{id}', 'g', '{id}', 'both')$$);
SELECT err($$SELECT pg_sync.registry_put('app.reg2'::regclass, 'reg2', '{id}', 'g', '{}', 'sideways')$$);
SELECT err($$SELECT pg_sync.registry_put('app.reg2'::regclass, 'bad name', '{id}', 'g', '{}', 'both')$$);
SELECT pg_sync.register_table('app.reg2', 'g');
INSERT INTO app.reg2 VALUES (1, 'g1', 'a', 'kept');
SELECT pg_sync.registry_put('app.reg2'::regclass, 'reg2', '{id}', 'g', '{note}', 'both');
INSERT INTO app.reg2 VALUES (2, 'g1', 'b', 'excluded');
DROP TABLE app.reg2, tmp_t;
RESET ROLE;
SELECT model_id, data FROM pg_sync.sync_actions WHERE model = 'reg2' ORDER BY id;

-- DML as the writer, with no privileges on pg_sync's tables.
SET ROLE app_writer;
INSERT INTO app.chores VALUES (1, 'a', 'g1', 'happy'), (2, 'b', 'g1', NULL);
UPDATE app.chores SET title = 'a2' WHERE id = 1;
UPDATE app.chores SET grp = 'g2' WHERE id = 2;
DELETE FROM app.chores WHERE id = 1;
-- pg_sync's tables and internals are out of reach.
SELECT err($$INSERT INTO pg_sync.sync_actions (model, model_id, action, data, version, origin) VALUES ('chores', '9', 'D', '{}', 'x', 'y')$$);
SELECT err($$DELETE FROM pg_sync.sync_actions$$);
SELECT err($$UPDATE pg_sync.registry SET enabled = false$$);
SELECT err($$INSERT INTO pg_sync.group_memberships VALUES ('u', 'g1')$$);
SELECT err($$SELECT count(*) FROM pg_sync.row_state$$);
SELECT err($$SELECT pg_sync.hlc_now()$$);
SELECT err($$SELECT pg_sync.next_version()$$);
-- Nor can it take the worker's federation lock (it could take any advisory lock).
SELECT err($$SELECT pg_sync.try_federation_lock()$$);
SELECT err($$SELECT pg_sync.registry_disable('app.chores'::regclass)$$);
SELECT err($$TRUNCATE app.chores$$);
RESET ROLE;

SET ROLE app_reader;
SELECT id, title, grp, mood FROM app.chores ORDER BY id;
SELECT err($$INSERT INTO app.chores VALUES (9, 'x', 'g1')$$);
SELECT err($$SELECT count(*) FROM pg_sync.sync_actions$$);
RESET ROLE;

SELECT model_id, action, data, group_id, prev_group_id, moved, origin = pg_sync.node_id() AS local
  FROM pg_sync.sync_actions WHERE model = 'chores' ORDER BY id;

-- Attack: a role with no grants attaches capture() to its own temp table, whose enum column's
-- cast to json tries to make it a superuser, and forges actions for a registered model.
SET ROLE app_attacker;
CREATE TYPE pg_temp.evil AS ENUM ('x');
CREATE FUNCTION pg_temp.evil_json(e pg_temp.evil) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE 'ALTER ROLE app_attacker SUPERUSER';
    RETURN '"x"';
END $$;
CREATE CAST (pg_temp.evil AS json) WITH FUNCTION pg_temp.evil_json(pg_temp.evil);
CREATE TEMP TABLE bait (id int PRIMARY KEY, grp text, e pg_temp.evil);
INSERT INTO bait VALUES (1, 'g2', 'x');
CREATE TRIGGER pg_sync_capture AFTER INSERT OR DELETE ON bait
    FOR EACH ROW EXECUTE FUNCTION pg_sync.capture('chores', 'grp', '1', 'id');
SELECT err($$INSERT INTO bait VALUES (2, 'g2', 'x')$$);
SELECT err($$DELETE FROM bait$$);
-- Same with a permanent-looking name and no arguments: still not a registered table.
DROP TRIGGER pg_sync_capture ON bait;
CREATE TRIGGER pg_sync_capture AFTER INSERT ON bait FOR EACH ROW EXECUTE FUNCTION pg_sync.capture();
SELECT err($$INSERT INTO bait VALUES (3, 'g2', 'x')$$);
-- A BEFORE trigger or another name is refused as well.
DROP TRIGGER pg_sync_capture ON bait;
CREATE TRIGGER pg_sync_capture BEFORE INSERT ON bait FOR EACH ROW EXECUTE FUNCTION pg_sync.capture();
SELECT err($$INSERT INTO bait VALUES (4, 'g2', 'x')$$);
RESET ROLE;
SELECT rolsuper FROM pg_roles WHERE rolname = 'app_attacker';
SELECT count(*) AS forged FROM pg_sync.sync_actions
 WHERE model = 'chores' AND (model_id IN ('3', '4') OR action = 'D' AND model_id = '2');

-- The owner of a registered table cannot add a second capture trigger to forge actions either.
SET ROLE app_owner;
CREATE TRIGGER forge AFTER INSERT ON app.chores FOR EACH ROW EXECUTE FUNCTION pg_sync.capture();
RESET ROLE;
SET ROLE app_writer;
SELECT err($$INSERT INTO app.chores VALUES (5, 'e', 'g1')$$);
RESET ROLE;
SET ROLE app_owner;
DROP TRIGGER forge ON app.chores;
RESET ROLE;

-- Attack: a group move folds the row's history as the log owner. An operator planted earlier
-- in the writer's search_path must not be what that fold runs.
SET ROLE app_writer;
CREATE FUNCTION writer_ns.evil_eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF current_user::text OPERATOR(pg_catalog.<>) 'app_writer' THEN
        RAISE EXCEPTION 'planted operator ran as %', current_user;
    END IF;
    RETURN a OPERATOR(pg_catalog.=) b;
END $$;
CREATE OPERATOR writer_ns.= (LEFTARG = text, RIGHTARG = text, FUNCTION = writer_ns.evil_eq);
-- Usable by every role, the log owner included.
GRANT USAGE ON SCHEMA writer_ns TO PUBLIC;
SET search_path = writer_ns, pg_catalog, public;
SELECT err($$UPDATE app.chores SET grp = 'g3' WHERE id = 2$$);
RESET search_path;
RESET ROLE;
SELECT model_id, action, group_id, prev_group_id, moved FROM pg_sync.sync_actions
 WHERE model = 'chores' AND group_id = 'g3' ORDER BY id;

-- The worker as a non-superuser, with the grants docs/extension.md lists: it merges peers'
-- changes, applies client mutations, sequences and reads the log, compacts, and owns its
-- publication on pg_sync's tables.
CREATE ROLE app_sync_worker LOGIN REPLICATION;
GRANT pgsync_owner TO app_sync_worker;
DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO app_sync_worker', current_database()); END $$;
GRANT EXECUTE ON FUNCTION pg_sync.mutate_as(text, text, uuid, jsonb), pg_sync.apply_remote(jsonb),
      pg_sync.changes(bigint, text[], integer),
      pg_sync.changes(bigint, text[], integer, text), pg_sync.last_sync_id(), pg_sync.retention_horizon(),
      pg_sync.compact(bigint), pg_sync.compact_older_than(interval), pg_sync.compact_to_size(bigint),
      pg_sync.user_groups(text), pg_sync.member_joins(text, bigint, bigint), pg_sync.status(),
      pg_sync.hlc_now() TO app_sync_worker;
-- No grant on the application's schema or tables: apply_remote and mutate_as write them as
-- their owner. The owner's code (here a trigger) runs as the owner in a security-restricted
-- operation, never with the worker's membership in pgsync_owner.
SELECT pg_sync.add_member('alice', 'g1');
SET ROLE app_owner;
CREATE FUNCTION app.probe() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'trigger runs as %', current_user;
    BEGIN
        INSERT INTO pg_sync.group_memberships (user_id, group_id) VALUES ('mallory', 'g1');
        RAISE NOTICE 'trigger wrote pg_sync.group_memberships';
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'trigger: %', SQLERRM;
    END;
    BEGIN
        CREATE TEMP TABLE probe_tmp (x int);
        RAISE NOTICE 'trigger created a temp table';
    EXCEPTION WHEN insufficient_privilege OR invalid_transaction_state THEN
        RAISE NOTICE 'trigger: %', SQLERRM;
    END;
    RETURN NEW;
END $$;
CREATE TRIGGER probe BEFORE INSERT ON app.chores FOR EACH ROW EXECUTE FUNCTION app.probe();
RESET ROLE;
SET ROLE app_sync_worker;
SELECT pg_sync.apply_remote(jsonb_build_object(
    'model', 'chores', 'model_id', '50', 'action', 'I', 'origin', 'node-x',
    'version', lpad(to_hex(pg_sync.hlc_now()), 16, '0') || '@node-x',
    'data', '{"id": 50, "title": "from a peer", "grp": "g1"}'::jsonb)) AS applied;
SELECT pg_sync.mutate_as('alice', 'client-1', gen_random_uuid(),
    '[{"model": "chores", "action": "I", "id": 60, "data": {"title": "from a client", "grp": "g1"}}]')->>'status' AS mutated;
SELECT sequence_all();
SELECT count(*) AS sequenced FROM pg_sync.changes(pg_sync.retention_horizon(), NULL, 100000)
 WHERE model = 'chores' AND model_id IN ('50', '60');
SELECT group_id FROM pg_sync.member_joins('alice', 0, pg_sync.last_sync_id());
SELECT pg_sync.compact_to_size(1000000) >= 0 AS compacted;
CREATE PUBLICATION app_roles_pub FOR TABLE pg_sync.sync_actions, pg_sync.group_memberships, pg_sync.api_keys;
DROP PUBLICATION app_roles_pub;
RESET ROLE;
SELECT model_id, action, origin FROM pg_sync.sync_actions
 WHERE model = 'chores' AND model_id IN ('50', '60') ORDER BY id;
SELECT count(*) AS planted_memberships FROM pg_sync.group_memberships WHERE user_id = 'mallory';
DROP TRIGGER probe ON app.chores;
SELECT pg_sync.remove_member('alice', 'g1');
DROP OWNED BY app_sync_worker;
DROP ROLE app_sync_worker;

-- Partitions: TRUNCATE of any partition of a registered table is refused, also of partitions
-- created or attached after registration; writes to a partition are captured under the model.
SET ROLE app_owner;
CREATE TABLE app.outings (id int, day int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE app.outings_a PARTITION OF app.outings FOR VALUES FROM (0) TO (10);
SELECT pg_sync.register_table('app.outings');
CREATE TABLE app.outings_b PARTITION OF app.outings FOR VALUES FROM (10) TO (20) PARTITION BY RANGE (day);
CREATE TABLE app.outings_b1 PARTITION OF app.outings_b FOR VALUES FROM (10) TO (15);
CREATE TABLE app.outings_c (id int, day int, PRIMARY KEY (id, day));
ALTER TABLE app.outings ATTACH PARTITION app.outings_c FOR VALUES FROM (20) TO (30);
INSERT INTO app.outings VALUES (1, 1), (2, 11), (3, 21);
INSERT INTO app.outings_a VALUES (4, 2);
SELECT err($$TRUNCATE app.outings_a$$);
SELECT err($$TRUNCATE app.outings_b$$);
SELECT err($$TRUNCATE app.outings_b1$$);
SELECT err($$TRUNCATE app.outings_c$$);
SELECT err($$TRUNCATE app.outings$$);
SELECT count(*) AS rows_kept FROM app.outings;
-- A detached partition is no longer synced: its leftover guard lets TRUNCATE through.
ALTER TABLE app.outings DETACH PARTITION app.outings_c;
TRUNCATE app.outings_c;
SELECT count(*) AS detached_rows FROM app.outings_c;
RESET ROLE;
SELECT model, model_id, action FROM pg_sync.sync_actions WHERE model = 'outings' ORDER BY id;
SET ROLE app_owner;
SELECT pg_sync.unregister_table('app.outings');
TRUNCATE app.outings_a;
SELECT count(*) AS rows_left FROM app.outings;

-- DROP TABLE / DROP SCHEMA / DROP OWNED as a non-superuser, of registered and unregistered
-- tables; the registrations go with the tables.
DROP TABLE app.plain;
CREATE TABLE app.vanish (id int PRIMARY KEY);
SELECT pg_sync.register_table('app.vanish');
DROP TABLE app.vanish;
CREATE SCHEMA scratch;
CREATE TABLE scratch.scratch_t (id int PRIMARY KEY);
CREATE TABLE scratch.scratch_u (id int PRIMARY KEY);
SELECT pg_sync.register_table('scratch.scratch_t');
DROP SCHEMA scratch CASCADE;
RESET ROLE;
SELECT model FROM pg_sync.registry WHERE model IN ('vanish', 'scratch_t', 'scratch_u');
REVOKE ALL ON FUNCTION pg_sync.register_table(regclass, text, text, text[], text),
                       pg_sync.unregister_table(regclass) FROM app_owner;
DO $$ BEGIN EXECUTE format('REVOKE CREATE ON DATABASE %I FROM app_owner', current_database()); END $$;
SET ROLE app_owner;
DROP CAST (app.mood AS json);
DROP OWNED BY app_owner;
RESET ROLE;
SELECT model, enabled FROM pg_sync.registry WHERE model IN ('chores', 'outings');

DROP OWNED BY app_writer;
SET ROLE app_attacker;
DROP CAST (pg_temp.evil AS json);
RESET ROLE;
DROP OWNED BY app_attacker;
DROP TABLE not_owned;
DROP ROLE app_owner, app_writer, app_reader, app_attacker;

-- A CREATEROLE role that grants itself pgsync_owner (a role of that name may also be created
-- by it before pg_sync is first installed) could rewrite pg_sync's tables in every database
-- pg_sync is installed in later: CREATE EXTENSION refuses such a role.
CREATE ROLE app_helpdesk CREATEROLE;
SET ROLE app_helpdesk;
GRANT pgsync_owner TO app_helpdesk;
RESET ROLE;
SELECT current_database() AS regress_db \gset
CREATE DATABASE pg_sync_squat;
\c pg_sync_squat
CREATE EXTENSION pg_sync;
\c :regress_db
REVOKE pgsync_owner FROM app_helpdesk;
\c pg_sync_squat
CREATE EXTENSION pg_sync;
SELECT count(*) AS registrations FROM pg_sync.registry;
\c :regress_db
DROP DATABASE pg_sync_squat;
DROP ROLE app_helpdesk;
