#!/bin/sh
# Runs once, when a region's Postgres initializes its data directory (the official image's
# /docker-entrypoint-initdb.d): this node's id, the extension, a federated table and the peer.
# NODE_ID, PEER_NAME, PEER_URL and PEER_SECRET come from compose.yaml.
set -eu
# The worker tails the log over a replication connection from another container.
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "ALTER DATABASE \"$POSTGRES_DB\" SET pg_sync.node_id = '$NODE_ID'"
# A new session, so the node id above is set before the first peer.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE EXTENSION pg_sync;
-- Federated tables need globally unique keys (uuids here).
CREATE TABLE tasks (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id text NOT NULL,
    title      text,
    done       boolean NOT NULL DEFAULT false
);
SELECT pg_sync.register_table('tasks', group_column => 'project_id', federation => 'both');
SELECT pg_sync.add_peer('$PEER_NAME', '$PEER_URL', '$PEER_SECRET', direction => 'both');
SQL
