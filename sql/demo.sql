-- A small shared task list: projects are sync groups, tasks belong to a project.
CREATE TABLE IF NOT EXISTS projects (
    id   text PRIMARY KEY,
    name text NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id text NOT NULL REFERENCES projects (id),
    title      text NOT NULL,
    done       boolean NOT NULL DEFAULT false,
    internal   text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_sync.register_table('projects', group_column => 'id');
SELECT pg_sync.register_table('tasks', group_column => 'project_id', exclude => '{internal}');

INSERT INTO projects VALUES ('demo', 'Demo project'), ('secret', 'Someone else''s project')
ON CONFLICT DO NOTHING;
SELECT pg_sync.add_member('demo-user', 'demo', 'project');
INSERT INTO tasks (project_id, title) SELECT 'demo', t FROM unnest(ARRAY['Try pg_sync', 'Register a table']) t
WHERE NOT EXISTS (SELECT 1 FROM tasks);
