-- The "pg_" prefix is reserved for system schemas; the extension script may claim it. The setting
-- lasts only while CREATE EXTENSION runs its script.
SET allow_system_table_mods = on;
CREATE SCHEMA pg_sync;

-- pg_sync's tables belong to a dedicated NOLOGIN role, not to the superuser that installs the
-- extension: the capture trigger writes the log directly or switches to it only for fixed
-- statements (pg_sync/src/owner.rs). Roles are cluster-wide, so a second database (or a restore)
-- finds it in place. A role of that name that could log in or is a superuser would defeat the
-- point: refuse it.
DO $$
DECLARE r pg_catalog.pg_roles;
BEGIN
    SELECT * INTO r FROM pg_catalog.pg_roles WHERE rolname = 'pgsync_owner';
    IF NOT FOUND THEN
        CREATE ROLE pgsync_owner NOLOGIN;
    ELSIF r.rolcanlogin OR r.rolsuper THEN
        RAISE EXCEPTION 'role "pgsync_owner" exists and can log in or is a superuser'
            USING ERRCODE = 'invalid_role_specification',
                  HINT = 'pg_sync''s tables belong to pgsync_owner, which must be NOLOGIN and not a superuser: ALTER ROLE pgsync_owner NOLOGIN NOSUPERUSER.';
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                    LEFT JOIN pg_catalog.pg_roles g ON g.oid OPERATOR(pg_catalog.=) m.grantor
                   WHERE m.roleid OPERATOR(pg_catalog.=) r.oid AND NOT coalesce(g.rolsuper, false)) THEN
        -- Its members can rewrite pg_sync's log and memberships. A CREATEROLE role can create
        -- the role (or grant it to itself) before pg_sync is installed: only memberships a
        -- superuser granted (the worker's) are accepted.
        RAISE EXCEPTION 'role "pgsync_owner" exists and has members granted by a non-superuser'
            USING ERRCODE = 'invalid_role_specification',
                  HINT = 'Members of pgsync_owner can rewrite pg_sync''s tables. Check who created it and its members (\du pgsync_owner), REVOKE pgsync_owner FROM each member a superuser did not grant it to (or DROP ROLE pgsync_owner), and try again.';
    END IF;
END
$$;

-- pg_sync's tables. Version columns use COLLATE "C": a version's text order is its LWW order.

CREATE TABLE pg_sync.registry (
    rel              regclass PRIMARY KEY,
    model            text NOT NULL UNIQUE
                     CHECK (model ~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$'),
    pk_columns       text[] NOT NULL,
    group_column     text,
    excluded_columns text[] NOT NULL DEFAULT '{}',
    federation       text NOT NULL DEFAULT 'both'
                     CHECK (federation IN ('push', 'pull', 'both', 'off')),
    enabled          boolean NOT NULL DEFAULT true,
    registered_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pg_sync.registry IS 'Tables whose changes pg_sync captures; see pg_sync.register_table().';

CREATE TABLE pg_sync.sync_actions (
    id            bigint GENERATED ALWAYS AS IDENTITY,
    model         text NOT NULL,
    model_id      text NOT NULL,
    -- 'I', 'U' or 'D'. Not a CHECK: only pg_sync writes the log (capture writes literals,
    -- apply_remote validates), and a CHECK is re-planned on every captured row (about 15% of a
    -- bulk INSERT's time).
    action        text NOT NULL,
    data          jsonb NOT NULL,
    version       text COLLATE "C" NOT NULL,
    versions      jsonb,
    origin        text NOT NULL,
    group_id      text,
    prev_group_id text,
    moved         boolean NOT NULL DEFAULT false,
    client_id     text,
    client_tx_id  uuid,
    xid           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- The log's only index. Every reader finds actions by transaction (changes(), compaction,
    -- the sequencer's backlog) or by (xid, id) (membership_log, which records both); one index
    -- instead of (id) and (xid) is one btree entry less per captured row (64 B of WAL, about 6%
    -- of a bulk insert's CPU). ids come from the identity sequence, so they stay unique without
    -- an index of their own; within a transaction the key refuses an id handed out twice.
    PRIMARY KEY (xid, id)
);
-- No (model, model_id) index: nothing reads a row's history (its LWW state is in row_state), and
-- every captured write would pay for maintaining one.
COMMENT ON TABLE pg_sync.sync_actions IS
  'One row per captured change. data: whole row on I, changed columns on U, key on D. '
  'version applies to every column in data unless versions names another for it.';

-- Commit order, written by the worker's sequencer: the actions of transaction xid have the sync
-- ids first_sync_id .. first_sync_id + action_count - 1, in action id order.
CREATE TABLE pg_sync.commit_order (
    xid           xid8 PRIMARY KEY,
    first_sync_id bigint NOT NULL UNIQUE CHECK (first_sync_id > 0),
    action_count  integer NOT NULL CHECK (action_count > 0),
    commit_lsn    pg_lsn NOT NULL,
    committed_at  timestamptz NOT NULL,
    sequenced_at  timestamptz NOT NULL DEFAULT now(),
    -- Every group_id of the transaction's actions (at most 32, distinct, any order), or NULL:
    -- it has a global action (group_id NULL), a membership change, more groups, or its writer
    -- did not say. changes() reads the actions of a transaction for a reader of some groups
    -- only when it is NULL or names one of them: a page for a client of one group in a hundred
    -- probes the hundredth of the span's transactions that can hold its rows, not all of them.
    -- Filled by the sequencer from the actions it streams; a wrong list (one missing a group
    -- its actions have) would hide those actions from that group's readers.
    -- changes() reads the first element as group_ids[1] (one probe of the reader's groups) and
    -- the rest with &&: so a list is one-dimensional, based at 1, without NULL elements.
    group_ids     text[] CHECK (group_ids IS NULL
                                OR (pg_catalog.cardinality(group_ids) = 0)
                                OR (pg_catalog.array_ndims(group_ids) = 1
                                    AND pg_catalog.array_lower(group_ids, 1) = 1
                                    AND pg_catalog.cardinality(group_ids) <= 32
                                    AND pg_catalog.array_position(group_ids, NULL) IS NULL))
                  -- A one-group list is a key of commit_order_group_idx below, whose btree
                  -- entries cannot pass 2,704 bytes: the sequencer lists no group id longer
                  -- than 512 bytes (NULL, always read, instead).
                  CHECK (pg_catalog.cardinality(group_ids) <> 1
                         OR pg_catalog.octet_length(group_ids[1]) <= 512),
    -- The lowest action id of the transaction when its action ids are contiguous (exactly
    -- first_action_id .. first_action_id + action_count - 1), else NULL (a rolled-back
    -- savepoint left a hole, or another transaction's action was drawn in between). Set by the
    -- sequencer with the row. changes() then has an action's sync id from its id,
    -- first_sync_id + (id - first_action_id), and reads a page's part of the transaction as one
    -- id range; for NULL it ranks the transaction's actions. Compaction removes whole
    -- transactions only, so the ids stay contiguous while the row exists.
    first_action_id bigint
);
-- What a page for a reader of a few groups scans instead of the whole span (pg_sync.changes()):
-- the one-group transactions by group, then sync id; the others that can hold any group's rows
-- (NULL list, or several groups) by sync id. A reader of 1 group in 100 reads its hundredth of
-- the span, not all of it. Partial and disjoint: each transaction the sequencer writes enters
-- one of the two (an empty list neither), one btree insertion beside the two keys'.
-- changes() names the expressions and predicates exactly as here (so the planner matches them).
CREATE INDEX commit_order_group_idx ON pg_sync.commit_order ((group_ids[1]), first_sync_id)
    WHERE pg_catalog.cardinality(group_ids) = 1;
CREATE INDEX commit_order_shared_idx ON pg_sync.commit_order (first_sync_id)
    WHERE group_ids IS NULL OR pg_catalog.cardinality(group_ids) > 1;

-- Retention: actions with sync ids at or below the horizon have been compacted away; a client
-- whose cursor is older must bootstrap again.
CREATE TABLE pg_sync.retention (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    horizon      bigint NOT NULL DEFAULT 0,
    compacted_at timestamptz
);
-- No seeded row: pg_dump restores the table's rows into a freshly created extension, where a
-- seeded row would collide. Readers treat "no row" as horizon 0; compaction upserts.

-- The key columns compare bytewise ("C"): equality is the same under any deterministic
-- collation, and every captured insert descends this index (with the database's collation each
-- comparison is a strcoll).
CREATE TABLE pg_sync.row_state (
    model       text COLLATE "C" NOT NULL,
    model_id    text COLLATE "C" NOT NULL,
    created     text COLLATE "C",
    deleted     text COLLATE "C",
    versions    jsonb NOT NULL DEFAULT '{}',
    pending     jsonb,
    max_version text COLLATE "C" NOT NULL,
    PRIMARY KEY (model, model_id)
) WITH (fillfactor = 80);
COMMENT ON TABLE pg_sync.row_state IS
  'Current LWW state per row, written with every captured write and merge: created (last insert), '
  'deleted (tombstone), per-column versions above both, and values waiting for a resurrecting insert '
  'while the row is not live. An empty row (no created, deleted or versions) is a merge''s lock '
  'placeholder, the same as no row; see pg_sync.row_version_state().';

CREATE TABLE pg_sync.group_memberships (
    user_id    text NOT NULL CHECK (user_id <> ''),
    group_id   text NOT NULL CHECK (group_id <> ''),
    group_type text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, group_id)
);
CREATE INDEX group_memberships_group_idx ON pg_sync.group_memberships (group_id);

-- Revocable API keys for clients that do not use JWTs. Only a hash is stored; revoking deletes
-- the row, which the worker sees in the replication stream and closes that key's sessions.
CREATE TABLE pg_sync.api_keys (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    text NOT NULL CHECK (user_id <> ''),
    key_hash   bytea NOT NULL UNIQUE,
    label      text,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- The whole old row in the replication stream: the worker closes a key's sessions only when its
-- hash, user or id changed, not on a label edit.
ALTER TABLE pg_sync.api_keys REPLICA IDENTITY FULL;

-- Client transactions applied by mutate, for exactly-once replays. Scoped to the user mutate_as
-- wrote for ('' for plain mutate): one user's tx id never replays another's result.
CREATE TABLE pg_sync.client_transactions (
    user_id      text NOT NULL DEFAULT '',
    client_id    text NOT NULL,
    client_tx_id uuid NOT NULL,
    result       jsonb NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, client_id, client_tx_id)
);

-- The database's lineage (system identifier, timeline) as the worker last saw it, and when it
-- last saw it change. Written by the worker (and by an operator who starts a grace by setting
-- changed_at, docs/clients.md). A promoted standby carries the old primary's
-- row (replicated) and a restore carries the dumped one, so either shows up as a change; the
-- worker then leaves Electric's `snapshot-end` out of /v1/shape snapshots for a grace period
-- (xids handed out before the change may be handed out again: docs/clients.md).
CREATE TABLE pg_sync.lineage (
    one               boolean PRIMARY KEY DEFAULT true CHECK (one),
    system_identifier bigint NOT NULL,
    timeline          bigint NOT NULL,
    changed_at        timestamptz
);

SELECT pg_catalog.pg_extension_config_dump('pg_sync.registry', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.sync_actions', '');
-- The identity sequence too: otherwise a restored log gets ids from 1 again and every captured
-- write fails on the primary key.
SELECT pg_catalog.pg_extension_config_dump('pg_sync.sync_actions_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.row_state', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.group_memberships', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.client_transactions', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.commit_order', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.api_keys', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.retention', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.lineage', '');

REVOKE ALL ON ALL TABLES IN SCHEMA pg_sync FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pg_sync FROM PUBLIC;
ALTER TABLE pg_sync.registry OWNER TO pgsync_owner;
ALTER TABLE pg_sync.sync_actions OWNER TO pgsync_owner;
ALTER TABLE pg_sync.commit_order OWNER TO pgsync_owner;
ALTER TABLE pg_sync.retention OWNER TO pgsync_owner;
ALTER TABLE pg_sync.row_state OWNER TO pgsync_owner;
ALTER TABLE pg_sync.group_memberships OWNER TO pgsync_owner;
ALTER TABLE pg_sync.api_keys OWNER TO pgsync_owner;
ALTER TABLE pg_sync.client_transactions OWNER TO pgsync_owner;
ALTER TABLE pg_sync.lineage OWNER TO pgsync_owner;
-- Anyone may see the schema (and call what is granted); its tables stay private, except the
-- registry, which only names tables and columns the catalogs show anyway (pg_sync.tables(),
-- register_table's checks and the partition event trigger read it as the caller).
GRANT USAGE ON SCHEMA pg_sync TO PUBLIC;
GRANT SELECT ON pg_sync.registry TO PUBLIC;
