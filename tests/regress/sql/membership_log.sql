-- Membership changes are actions in the log ('$membership': model_id the user, group_id the
-- group, J joined / L left), in the writing transaction, however the change is made; and each
-- action records whether its model was global when it was written (group_id NULL), so a
-- re-registration never changes how older actions are served.
CREATE FUNCTION seq() RETURNS void LANGUAGE sql AS $$
  INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
  SELECT xid, pg_sync.last_sync_id() + sum(n) OVER (ORDER BY first_id) - n + 1, n, '0/0', now()
    FROM (SELECT a.xid, min(a.id) AS first_id, count(*)::int AS n FROM pg_sync.sync_actions a
           WHERE NOT EXISTS (SELECT 1 FROM pg_sync.commit_order c WHERE c.xid = a.xid) GROUP BY a.xid) s
$$;
CREATE FUNCTION log_since(after bigint) RETURNS TABLE (model text, model_id text, action text, group_id text, global boolean)
LANGUAGE sql AS $$
  SELECT c.model, c.model_id, c.action, coalesce(quote_literal(c.group_id), 'NULL'), c.global
    FROM pg_sync.changes(after, NULL, 1000) c ORDER BY c.sync_id
$$;
SELECT seq();
CREATE TEMP TABLE mark AS SELECT pg_sync.last_sync_id() AS at;

SELECT pg_sync.add_member('ml_u1', 'ml_g1', 'team');
SELECT pg_sync.add_member('ml_u1', 'ml_g1', 'team');            -- no change, nothing logged
SELECT pg_sync.add_member('ml_u1', 'ml_g1', 'project');         -- a type edit: no membership change
SELECT pg_sync.remove_member('ml_u1', 'ml_g1');
SELECT pg_sync.remove_member('ml_u1', 'ml_g1');                 -- not a member: nothing logged
INSERT INTO pg_sync.group_memberships (user_id, group_id) VALUES ('ml_u1', 'ml_g2'), ('ml_u2', 'ml_g2');
UPDATE pg_sync.group_memberships SET group_id = 'ml_g3' WHERE user_id = 'ml_u2';
UPDATE pg_sync.group_memberships SET group_type = 'x' WHERE user_id = 'ml_u1';
DELETE FROM pg_sync.group_memberships WHERE user_id = 'ml_u1';
-- Under session_replication_role = replica too.
SET session_replication_role = replica;
SELECT pg_sync.add_member('ml_u3', 'ml_g4');
RESET session_replication_role;
BEGIN;
SELECT pg_sync.add_member('ml_u4', 'ml_g5');
ROLLBACK;
SELECT seq();
SELECT * FROM log_since((SELECT at FROM mark));

-- TRUNCATE: a leave for every membership, in the same transaction.
UPDATE mark SET at = pg_sync.last_sync_id();
TRUNCATE pg_sync.group_memberships;
SELECT seq();
SELECT * FROM log_since((SELECT at FROM mark));

-- A restore (a superuser session with pg_sync.restoring on) restores memberships and the log
-- alike: the restored rows are not logged again.
SET pg_sync.restoring = on;
SELECT pg_sync.add_member('ml_u5', 'ml_g6');
RESET pg_sync.restoring;
SELECT count(*) AS logged FROM pg_sync.sync_actions WHERE model_id = 'ml_u5';

-- check_function_bodies off (as pg_dump scripts set it; any role may) is no restore: logged.
SET check_function_bodies = off;
SELECT pg_sync.add_member('ml_u9', 'ml_g6');
RESET check_function_bodies;
SELECT action, group_id FROM pg_sync.sync_actions WHERE model_id = 'ml_u9';

-- A role that may write the memberships, and nothing else of pg_sync's, has its change logged.
CREATE ROLE ml_admin;
GRANT INSERT ON pg_sync.group_memberships TO ml_admin;
SET ROLE ml_admin;
INSERT INTO pg_sync.group_memberships (user_id, group_id) VALUES ('ml_u7', 'ml_g8');
-- ... and cannot declare itself a restore to change memberships unlogged.
SELECT err($$SET pg_sync.restoring = on$$);
SELECT err($$SELECT set_config('pg_sync.restoring', 'on', false)$$);
SELECT err($$INSERT INTO pg_sync.sync_actions (model, model_id, action, data, version, origin) VALUES ('$membership', 'x', 'J', '{}', '', '')$$);
RESET ROLE;
SELECT action, group_id FROM pg_sync.sync_actions WHERE model_id = 'ml_u7';
DELETE FROM pg_sync.group_memberships WHERE user_id = 'ml_u7';
REVOKE ALL ON pg_sync.group_memberships FROM ml_admin;
DROP ROLE ml_admin;
SELECT seq();

-- The trigger function logs the memberships only.
CREATE TABLE ml_other (user_id text, group_id text);
CREATE TRIGGER t AFTER INSERT ON ml_other FOR EACH ROW EXECUTE FUNCTION pg_sync.log_membership();
SELECT err($$INSERT INTO ml_other VALUES ('x', 'y')$$);
DROP TABLE ml_other;
SELECT has_function_privilege('public', 'pg_sync.log_membership()', 'EXECUTE') AS public_may_execute;

-- Global or not is recorded per action: a global model's actions have no group id, a grouped
-- model's row without a group has group '' (nobody is in it), and re-registering the model
-- changes neither.
CREATE TABLE ml_notes (id int PRIMARY KEY, team text);
SELECT pg_sync.register_table('ml_notes');
INSERT INTO ml_notes VALUES (1, 't1');
SELECT pg_sync.register_table('ml_notes', group_column => 'team');
INSERT INTO ml_notes VALUES (2, 't1'), (3, NULL);
SELECT pg_sync.register_table('ml_notes');
INSERT INTO ml_notes VALUES (4, 't2');
SELECT pg_sync.add_member('ml_u6', 'ml_g7');
UPDATE mark SET at = (SELECT pg_sync.last_sync_id());
SELECT seq();
SELECT * FROM log_since((SELECT at FROM mark));
-- Filtered by group: global actions, the group's, and every membership change.
SELECT c.model, c.model_id, coalesce(quote_literal(c.group_id), 'NULL') AS group_id, c.global
  FROM pg_sync.changes((SELECT at FROM mark), ARRAY['t1'], 1000) c ORDER BY c.sync_id;
SELECT pg_sync.unregister_table('ml_notes');
DROP TABLE ml_notes;

-- Each membership action is indexed by user in membership_log; member_joins() finds a user's
-- last join of each group within a range of sync ids (a replay serves a group's deltas only
-- after it).
SELECT seq();
UPDATE mark SET at = pg_sync.last_sync_id();
SELECT pg_sync.add_member('ml_u8', 'ml_g9');
SELECT pg_sync.remove_member('ml_u8', 'ml_g9');
SELECT pg_sync.add_member('ml_u8', 'ml_g9');
SELECT pg_sync.add_member('ml_u8', 'ml_g10');
SELECT seq();
SELECT m.user_id, m.group_id, m.joined, a.action
  FROM pg_sync.membership_log m JOIN pg_sync.sync_actions a ON a.id = m.action_id
 WHERE m.user_id = 'ml_u8' ORDER BY m.action_id;
SELECT j.group_id, j.sync_id - (SELECT at FROM mark) AS offset
  FROM pg_sync.member_joins('ml_u8', (SELECT at FROM mark), pg_sync.last_sync_id()) j ORDER BY 1;
SELECT count(*) AS joins_in_an_earlier_range
  FROM pg_sync.member_joins('ml_u8', 0, (SELECT at FROM mark));
-- Compaction takes the compacted actions' rows with them.
SELECT pg_sync.compact(pg_sync.last_sync_id() - 1) > 0 AS compacted;
SELECT count(*) AS kept FROM pg_sync.membership_log;
SELECT has_table_privilege('public', 'pg_sync.membership_log', 'SELECT') AS public_may_read,
       has_function_privilege('public', 'pg_sync.member_joins(text, bigint, bigint)', 'EXECUTE') AS public_may_call;
