-- Application roles write registered tables without any privilege on pg_sync's own tables,
-- and cannot forge log entries or call the administrative functions.
CREATE ROLE app_user LOGIN;
CREATE TABLE shared (id int PRIMARY KEY, v text);
GRANT ALL ON shared TO app_user;
SELECT pg_sync.register_table('shared');
SET ROLE app_user;
INSERT INTO shared VALUES (1, 'by app');
UPDATE shared SET v = 'again' WHERE id = 1;
SELECT err($$INSERT INTO pg_sync.sync_actions (model, model_id, action, data, version, origin) VALUES ('shared', '9', 'I', '{}', 'x', 'y')$$);
SELECT err($$SELECT count(*) FROM pg_sync.group_memberships$$);
SELECT err($$SELECT pg_sync.apply_remote('{}')$$);
SELECT err($$SELECT pg_sync.mutate('c', gen_random_uuid(), '[]')$$);
SELECT err($$SELECT pg_sync.register_table('shared')$$);
SELECT err($$SELECT pg_sync.add_member('u', 'g')$$);
RESET ROLE;
SELECT model_id, action, data FROM pg_sync.sync_actions WHERE model = 'shared' ORDER BY id;

-- Membership helpers.
SELECT pg_sync.add_member('alice', 'team-1', 'team');
SELECT pg_sync.add_member('alice', 'team-1', 'team');
SELECT pg_sync.add_member('alice', 'team-2');
SELECT pg_sync.user_groups('alice');
SELECT pg_sync.remove_member('alice', 'team-1'), pg_sync.remove_member('alice', 'team-1');
SELECT err($$SELECT pg_sync.add_member('', 'g')$$);
SELECT pg_sync.status() ? 'hlc' AS status_has_hlc, pg_sync.status()->>'node_id' AS node;
DROP TABLE shared;
DROP ROLE app_user;
