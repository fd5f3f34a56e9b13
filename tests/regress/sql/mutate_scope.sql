-- mutate_as acts for one user: the rows it writes (also through triggers and cascades) stay in
-- the user's groups, its transactions are the user's own, and it can move rows between groups.
SELECT pg_sync.add_member('erin', 'ta'), pg_sync.add_member('erin', 'tb'), pg_sync.add_member('fred', 'ta');

-- A group move through mutate and mutate_as: a D in the old group, an I in the new one.
CREATE TABLE ms_notes (id int PRIMARY KEY, team text, body text);
SELECT pg_sync.register_table('ms_notes', group_column => 'team');
SELECT pg_sync.mutate_as('erin', 'e-phone', '00000000-0000-0000-0000-0000000000e1', '[
  {"model": "ms_notes", "action": "I", "id": 1, "data": {"team": "ta", "body": "hello"}}]') ->> 'status';
SELECT pg_sync.mutate_as('erin', 'e-phone', '00000000-0000-0000-0000-0000000000e2', '[
  {"model": "ms_notes", "action": "U", "id": 1, "data": {"team": "tb", "body": "moved"}}]') ->> 'status';
SELECT pg_sync.mutate('admin', '00000000-0000-0000-0000-0000000000e3', '[
  {"model": "ms_notes", "action": "U", "id": 1, "data": {"team": "ta"}}]') ->> 'status';
SELECT * FROM ms_notes;
SELECT action, group_id, prev_group_id, moved, data->>'body' AS body
  FROM pg_sync.sync_actions WHERE model = 'ms_notes' ORDER BY id;

-- The group a row ends up in is what counts, not the JSON given: a BEFORE trigger derives an
-- item's group from its project.
CREATE TABLE ms_projects (id int PRIMARY KEY, team text NOT NULL);
SELECT pg_sync.register_table('ms_projects', group_column => 'team');
INSERT INTO ms_projects VALUES (1, 'ta'), (2, 'ta'), (9, 'tz');
CREATE TABLE ms_items (id int PRIMARY KEY, project int NOT NULL REFERENCES ms_projects ON DELETE CASCADE,
                    team text, body text);
CREATE FUNCTION ms_items_team() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.team := (SELECT p.team FROM ms_projects p WHERE p.id = NEW.project);
    RETURN NEW;
END $$;
CREATE TRIGGER ms_items_team BEFORE INSERT OR UPDATE ON ms_items FOR EACH ROW EXECUTE FUNCTION ms_items_team();
SELECT pg_sync.register_table('ms_items', group_column => 'team');
SELECT pg_sync.mutate_as('erin', 'e-phone', gen_random_uuid(), '[
  {"model": "ms_items", "action": "I", "id": 1, "data": {"project": 1, "team": "ta", "body": "mine"}}]') ->> 'status';
-- Claims ta, lands in tz.
SELECT err($$SELECT pg_sync.mutate_as('erin', 'e-phone', gen_random_uuid(), '[
  {"model": "ms_items", "action": "I", "id": 2, "data": {"project": 9, "team": "ta", "body": "planted"}}]')$$);
SELECT err($$SELECT pg_sync.mutate_as('erin', 'e-phone', gen_random_uuid(), '[
  {"model": "ms_items", "action": "U", "id": 1, "data": {"project": 9}}]')$$);
SELECT id, project, team FROM ms_items ORDER BY id;
-- Plain mutate (a trusted caller) is not limited to groups.
SELECT pg_sync.mutate('admin', gen_random_uuid(), '[
  {"model": "ms_items", "action": "I", "id": 3, "data": {"project": 9, "body": "admin"}}]') ->> 'status';

-- Cascades a user's write fires are held to the user's groups too: deleting project 2 would
-- delete a link in tz.
CREATE TABLE ms_links (id int PRIMARY KEY, project int REFERENCES ms_projects ON DELETE CASCADE, team text);
SELECT pg_sync.register_table('ms_links', group_column => 'team');
INSERT INTO ms_links VALUES (1, 2, 'tz');
SELECT err($$SELECT pg_sync.mutate_as('erin', 'e-phone', gen_random_uuid(), '[
  {"model": "ms_projects", "action": "D", "id": 2}]')$$);
SELECT count(*) AS links_left FROM ms_links;
DELETE FROM ms_links;
SELECT pg_sync.mutate_as('erin', 'e-phone', gen_random_uuid(), '[
  {"model": "ms_projects", "action": "D", "id": 2}]') -> 'ops' -> 0 ->> 'status' AS deleted;
-- Global models are read-only for clients, also when a trigger writes them.
CREATE TABLE ms_activity (id int PRIMARY KEY, n int NOT NULL);
SELECT pg_sync.register_table('ms_activity');
INSERT INTO ms_activity VALUES (1, 0);
CREATE FUNCTION ms_count_notes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ms_activity SET n = n + 1 WHERE id = 1;
    RETURN NULL;
END $$;
CREATE TRIGGER ms_count_notes AFTER INSERT ON ms_notes FOR EACH ROW EXECUTE FUNCTION ms_count_notes();
SELECT err($$SELECT pg_sync.mutate_as('erin', 'e-phone', gen_random_uuid(), '[
  {"model": "ms_notes", "action": "I", "id": 5, "data": {"team": "ta"}}]')$$);
DROP TRIGGER ms_count_notes ON ms_notes;

-- Client transactions belong to their user: fred, who saw erin's clientTxId in the shared group
-- ta, gets his own transaction applied, not erin's stored result.
SELECT pg_sync.mutate_as('erin', 'shared', '00000000-0000-0000-0000-0000000000f1', '[
  {"model": "ms_notes", "action": "I", "id": 10, "data": {"team": "tb", "body": "erin in tb"}}]') ->> 'status' AS erin;
SELECT r ->> 'status' AS fred, r -> 'ops' -> 0 ->> 'id' AS fred_id
  FROM pg_sync.mutate_as('fred', 'shared', '00000000-0000-0000-0000-0000000000f1', '[
  {"model": "ms_notes", "action": "I", "id": 11, "data": {"team": "ta", "body": "fred"}}]') r;
SELECT id, team, body FROM ms_notes WHERE id IN (10, 11) ORDER BY id;
-- Each user's replay is a duplicate of that user's own first result.
SELECT r ->> 'status' AS status, r -> 'ops' -> 0 ->> 'id' AS id
  FROM pg_sync.mutate_as('erin', 'shared', '00000000-0000-0000-0000-0000000000f1', '[
  {"model": "ms_notes", "action": "D", "id": 10}]') r;
SELECT r ->> 'status' AS status, r -> 'ops' -> 0 ->> 'id' AS id
  FROM pg_sync.mutate_as('fred', 'shared', '00000000-0000-0000-0000-0000000000f1', '[
  {"model": "ms_notes", "action": "D", "id": 11}]') r;
-- Plain mutate has a namespace of its own.
SELECT pg_sync.mutate('shared', '00000000-0000-0000-0000-0000000000f1', '[
  {"model": "ms_notes", "action": "I", "id": 12, "data": {"team": "tc"}}]') ->> 'status' AS plain;
SELECT user_id, client_id, client_tx_id FROM pg_sync.client_transactions
 WHERE client_id = 'shared' ORDER BY user_id;
SELECT err($$SELECT pg_sync.mutate_as('', 'shared', gen_random_uuid(), '[
  {"model": "ms_notes", "action": "D", "id": 12}]')$$);

-- Group values in data are compared as canonical group ids: "07" is group 7.
CREATE TABLE ms_boards (id int PRIMARY KEY, team int, day date);
SELECT pg_sync.register_table('ms_boards', group_column => 'team');
SELECT pg_sync.add_member('erin', '7');
SELECT pg_sync.mutate_as('erin', 'e-phone', gen_random_uuid(), '[
  {"model": "ms_boards", "action": "I", "id": 1, "data": {"team": "07"}},
  {"model": "ms_boards", "action": "U", "id": 1, "data": {"team": 7, "day": "2024-02-29"}}]') -> 'ops' -> 0 ->> 'status' AS status;
SELECT model_id, group_id FROM pg_sync.sync_actions WHERE model = 'ms_boards' ORDER BY id;
SELECT err($$SELECT pg_sync.mutate_as('erin', 'e-phone', gen_random_uuid(), '[
  {"model": "ms_boards", "action": "U", "id": 1, "data": {"team": "8"}}]')$$);
