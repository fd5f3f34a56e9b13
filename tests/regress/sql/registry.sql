-- register_table validates its input and installs capture; unregister keeps history.
CREATE TABLE projects (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE nopk (id int, v text);
CREATE VIEW projects_v AS SELECT * FROM projects;
CREATE TEMP TABLE tmp (id int PRIMARY KEY);
CREATE TABLE items (id int PRIMARY KEY, project int, secret text, note text);

-- Bad input: each refused with its SQLSTATE and a hint, nothing registered.
SELECT err($$SELECT pg_sync.register_table('nopk')$$);
SELECT err($$SELECT pg_sync.register_table('projects_v')$$);
SELECT err($$SELECT pg_sync.register_table('tmp')$$);
SELECT err($$SELECT pg_sync.register_table('pg_sync.sync_actions')$$);
SELECT err($$SELECT pg_sync.register_table(NULL)$$);
SELECT err($$SELECT pg_sync.register_table('items', group_column => 'nope')$$);
SELECT err($$SELECT pg_sync.register_table('items', exclude => '{nope}')$$);
SELECT err($$SELECT pg_sync.register_table('items', exclude => '{id}')$$);
SELECT err($$SELECT pg_sync.register_table('items', group_column => 'project', exclude => '{project}')$$);
SELECT err($$SELECT pg_sync.register_table('items', federation => 'sideways')$$);
SELECT err($$SELECT pg_sync.register_table('items', model => 'bad name')$$);
SELECT err($$SELECT pg_sync.register_table('items', colour => 'red')$$);
SELECT err($$SELECT pg_sync.register_table('no_such_table')$$);
SELECT count(*) AS registered FROM pg_sync.registry;

-- Good input; registering twice is harmless.
SELECT pg_sync.register_table('projects', group_column => 'id');
SELECT pg_sync.register_table('projects', group_column => 'id');
SELECT pg_sync.register_table('items', group_column => 'project', exclude => '{secret}', federation => 'pull');
CREATE TABLE other (id int PRIMARY KEY);
SELECT err($$SELECT pg_sync.register_table('other', model => 'items')$$);
SELECT model, pk_columns, group_column, excluded_columns, federation, enabled, capturing FROM pg_sync.tables();
SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'items'::regclass ORDER BY 1;

-- Rows that predate registration are live at the zero version (empty created) until written.
CREATE TABLE legacy (a int, b text, v int, PRIMARY KEY (a, b));
INSERT INTO legacy VALUES (1, 'x', 1), (2, 'y"z', 2);
SELECT pg_sync.register_table('legacy');
SELECT k, s->'live' AS live, s->'created' AS created, s->'deleted' AS deleted
  FROM unnest(ARRAY['["1","x"]', '["2","y\"z"]', '["3","none"]']) k, pg_sync.row_version_state('legacy', k) s;
UPDATE legacy SET v = 10 WHERE a = 1;
SELECT s->'live' AS live, s->>'created' = '' AS zero_created, s->'versions' ? 'v' AS v_versioned
  FROM pg_sync.row_version_state('legacy', '["1","x"]') s;

-- Unregistering stops capture and keeps history; unregistered tables pay nothing (no trigger).
INSERT INTO projects VALUES (1, 'one');
SELECT pg_sync.unregister_table('projects');
SELECT pg_sync.unregister_table('projects');
INSERT INTO projects VALUES (2, 'two');
SELECT model_id, action FROM pg_sync.sync_actions WHERE model = 'projects' ORDER BY id;
SELECT count(*) AS triggers_left FROM pg_trigger WHERE tgrelid = 'projects'::regclass;
SELECT model, enabled, capturing FROM pg_sync.tables() WHERE model = 'projects';
TRUNCATE projects;
-- Registering again resumes capture; rows written meanwhile are live (at the zero version).
INSERT INTO projects VALUES (3, 'three');
SELECT pg_sync.register_table('projects', group_column => 'id');
SELECT id, pg_sync.row_version_state('projects', id::text)->'live' AS live FROM projects ORDER BY id;
SELECT err($$SELECT pg_sync.register_table('projects', model => 'renamed_projects')$$);
INSERT INTO projects VALUES (4, 'four');
SELECT model_id, action, group_id FROM pg_sync.sync_actions WHERE model = 'projects' ORDER BY id;

-- A dropped table's registration goes with it.
CREATE TABLE gone (id int PRIMARY KEY);
SELECT pg_sync.register_table('gone');
DROP TABLE gone;
SELECT count(*) AS gone_registrations FROM pg_sync.registry WHERE model = 'gone';

-- Renaming a column of a registered table (or of a registered partition tree) is refused with
-- a hint; unregistered, renamed and registered again, the table syncs under the new names.
CREATE TABLE renamed (id int PRIMARY KEY, g text, v text);
SELECT pg_sync.register_table('renamed', group_column => 'g');
SELECT err($$ALTER TABLE renamed RENAME COLUMN g TO grp$$);
SELECT err($$ALTER TABLE renamed RENAME COLUMN v TO w$$);
ALTER TABLE renamed RENAME TO renamed2;
ALTER TABLE renamed2 RENAME TO renamed;
CREATE TABLE renamed_p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE renamed_p1 PARTITION OF renamed_p FOR VALUES FROM (0) TO (10);
SELECT pg_sync.register_table('renamed_p');
SELECT err($$ALTER TABLE renamed_p RENAME COLUMN v TO w$$);
SELECT pg_sync.unregister_table('renamed_p');
ALTER TABLE renamed_p RENAME COLUMN v TO w;
SELECT pg_sync.unregister_table('renamed');
ALTER TABLE renamed RENAME COLUMN g TO grp;
SELECT pg_sync.register_table('renamed', group_column => 'grp');
INSERT INTO renamed VALUES (1, 'a');
SELECT model, action, group_id FROM pg_sync.sync_actions WHERE model = 'renamed';
