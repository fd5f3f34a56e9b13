-- Federation, the extension's part: the peer registry and secrets, the receiver's cursors and
-- batch apply with quarantine, the sender's filtered log, announce for rows that predate
-- registration, and this node's log identity (epoch). The worker drives the links; see
-- docs/federation.md.

-- This node's log identity: the random part is minted by CREATE EXTENSION and deliberately not
-- dumped, so a restored database gets a new one (its sync ids may repeat an older history).
CREATE TABLE pg_sync.node_identity (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    epoch_id   uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pg_sync.node_identity DEFAULT VALUES;

-- Peers: other deployments this node exchanges changes with. direction is seen from this node:
-- 'pull' (this node receives), 'push' (this node sends), 'both'. node_id is pinned by the worker
-- at the first authenticated link (pg_sync.pin_peer) and checked on every later one.
CREATE TABLE pg_sync.peers (
    name       text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    node_id    text UNIQUE,
    url        text NOT NULL CHECK (url ~ '^wss?://'),
    direction  text NOT NULL DEFAULT 'both' CHECK (direction IN ('push', 'pull', 'both')),
    models     text[],
    bootstrap  text NOT NULL DEFAULT 'snapshot' CHECK (bootstrap IN ('snapshot', 'none')),
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Shared secrets, one per peering; previous_secret is still accepted during a rotation.
-- Readable only by pgsync_owner (the worker's role is a member).
CREATE TABLE pg_sync.peer_secrets (
    peer            text PRIMARY KEY REFERENCES pg_sync.peers (name) ON DELETE CASCADE ON UPDATE CASCADE,
    secret          text NOT NULL,
    previous_secret text,
    rotated_at      timestamptz NOT NULL DEFAULT now()
);

-- How much of each peer's log is applied here; advanced only by apply_peer_batch, in the
-- transaction that applied the changes.
CREATE TABLE pg_sync.peer_cursors (
    peer_node_id text PRIMARY KEY,
    peer_epoch   text,
    last_sync_id bigint NOT NULL DEFAULT 0 CHECK (last_sync_id >= 0),
    state        text NOT NULL DEFAULT 'new',
    applied      bigint NOT NULL DEFAULT 0,
    changed      bigint NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Changes from a peer that failed to apply, with why; retried by retry_quarantined. A row of a
-- snapshot join (no sync id) is parked under -nextval(snapshot_quarantine_seq).
CREATE SEQUENCE pg_sync.snapshot_quarantine_seq;
CREATE TABLE pg_sync.peer_quarantine (
    peer_node_id text NOT NULL,
    sync_id      bigint NOT NULL,
    change       jsonb NOT NULL,
    sqlstate     text NOT NULL,
    message      text NOT NULL,
    attempts     integer NOT NULL DEFAULT 1,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (peer_node_id, sync_id)
);

-- What happened on each peering (added, changed, removed, quarantined, and what the worker
-- reports: connected, auth_failed, resync, ...). Never holds secrets or row values.
CREATE TABLE pg_sync.peer_events (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    peer   text NOT NULL,
    event  text NOT NULL,
    detail jsonb
);
CREATE INDEX peer_events_at_idx ON pg_sync.peer_events (at);

-- Link state the worker reports, one row per peer and direction ('in': this node receives).
CREATE TABLE pg_sync.peer_links (
    peer              text NOT NULL REFERENCES pg_sync.peers (name) ON DELETE CASCADE ON UPDATE CASCADE,
    direction         text NOT NULL CHECK (direction IN ('in', 'out')),
    state             text NOT NULL DEFAULT 'connecting',
    connected_since   timestamptz,
    peer_last_sync_id bigint,
    lag_seconds       double precision,
    applied           bigint NOT NULL DEFAULT 0,
    changed           bigint NOT NULL DEFAULT 0,
    last_error        text,
    rtt_ms            double precision,
    clock_offset_ms   double precision,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (peer, direction)
);

-- The sender's retention holds: what each peer it sends to has acknowledged (applied and
-- committed there), recorded by the worker at subscribe and on acks. Compaction never removes
-- a sync id above the lowest acknowledgement of a holding peer. A peer that lagged past the cap
-- (pg_sync.release_lagging_peers, the worker's SYNC_PEER_MAX_LAG) stops holding: resync_below
-- is the log's end when it was released, and the peer gets PS003 (resync_required) for any
-- cursor below it until it has re-bootstrapped and acknowledged past it.
CREATE TABLE pg_sync.peer_holds (
    peer          text PRIMARY KEY REFERENCES pg_sync.peers (name) ON DELETE CASCADE ON UPDATE CASCADE,
    acked_sync_id bigint NOT NULL DEFAULT 0 CHECK (acked_sync_id >= 0),
    resync_below  bigint,
    released_at   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Set by peer_join_start, cleared by the next ack: a joining peer acks nothing until its
    -- join ends, so release_lagging_peers spares it for a day after the join (re)started.
    joining_since timestamptz
);

-- The receiver's snapshot joins in progress, one per peer (by node id): the sender's log
-- position W and its peer cursors, read together when the join began, and the last row
-- applied (pages go in (model, model_id) order). It commits with each page, so a killed join
-- resumes after the last page applied. finish_peer_join moves the cursors and deletes it.
CREATE TABLE pg_sync.peer_joins (
    peer_node_id   text PRIMARY KEY,
    peer_epoch     text NOT NULL,
    w              bigint NOT NULL CHECK (w >= 0),
    cursors        jsonb NOT NULL DEFAULT '[]',
    after_model    text COLLATE "C" NOT NULL DEFAULT '',
    after_model_id text COLLATE "C" NOT NULL DEFAULT '',
    rows           bigint NOT NULL DEFAULT 0,
    pages          bigint NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Connection tests (pg_sync.test_peer): the worker's last handshake with each peer, as the
-- receiver: reachable, authenticated, the peer's node id, protocol and versions, RTT, clock
-- offset and models. requested_at asks the worker for a fresh probe (it polls this table).
CREATE TABLE pg_sync.peer_probes (
    peer              text PRIMARY KEY REFERENCES pg_sync.peers (name) ON DELETE CASCADE ON UPDATE CASCADE,
    requested_at      timestamptz,
    checked_at        timestamptz,
    reachable         boolean,
    auth_ok           boolean,
    node_id           text,
    proto             integer,
    extension_version text,
    worker_version    text,
    rtt_ms            double precision,
    clock_offset_ms   double precision,
    models_sent       text[],
    models_taken      text[],
    models_compatible boolean,
    error             text
);

-- The optional conflict log (pg_sync.log_conflicts = on): remote column values that lost, on
-- arrival, to a newer register minted by another node. Versions only, never values.
CREATE TABLE pg_sync.conflicts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    model        text NOT NULL,
    model_id     text NOT NULL,
    column_name  text NOT NULL,
    kept_version text NOT NULL,
    lost_version text NOT NULL,
    origin       text NOT NULL
);
CREATE INDEX conflicts_at_idx ON pg_sync.conflicts (at);

-- Federation mode changes by log position: a model's mode applies to the transactions that
-- commit after the change (commit LSN past at_lsn, the WAL insert position when the registry row
-- changed), so peer_changes sends what was logged while the model was sent, whatever a
-- receiver's lag when the mode changed. `before` is the mode for everything committed before.
CREATE TABLE pg_sync.federation_modes (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model  text NOT NULL,
    before text NOT NULL,
    at_lsn pg_lsn NOT NULL,
    -- For transactions sequenced by a backlog pass (commit_order.commit_lsn '0/0': the worker
    -- was not streaming when they committed, so no commit LSN is known): one this snapshot sees
    -- committed before the change.
    snap   pg_snapshot NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX federation_modes_model_idx ON pg_sync.federation_modes (model, at_lsn);

CREATE FUNCTION pg_sync.record_federation_mode() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO pg_sync.federation_modes (model, before, at_lsn, snap)
    VALUES (OLD.model, OLD.federation, pg_current_wal_insert_lsn(), pg_current_snapshot());
    RETURN NULL;
END
$$;
CREATE TRIGGER record_federation_mode AFTER UPDATE OF federation ON pg_sync.registry
    FOR EACH ROW WHEN (OLD.federation IS DISTINCT FROM NEW.federation)
    EXECUTE FUNCTION pg_sync.record_federation_mode();

SELECT pg_catalog.pg_extension_config_dump('pg_sync.peers', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.peer_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.peer_cursors', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.peer_quarantine', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.peer_events', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.peer_holds', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.peer_joins', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.peer_events_id_seq', '');
-- The conflict log is data too: a dump/restore keeps it (review rev1 #12).
SELECT pg_catalog.pg_extension_config_dump('pg_sync.conflicts', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.conflicts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pg_sync.snapshot_quarantine_seq', '');
REVOKE ALL ON pg_sync.node_identity, pg_sync.peers, pg_sync.peer_secrets, pg_sync.peer_cursors,
    pg_sync.peer_quarantine, pg_sync.peer_events, pg_sync.peer_links, pg_sync.peer_holds, pg_sync.peer_joins, pg_sync.peer_probes, pg_sync.conflicts FROM PUBLIC;
REVOKE ALL ON SEQUENCE pg_sync.conflicts_id_seq FROM PUBLIC;
REVOKE ALL ON SEQUENCE pg_sync.federation_modes_id_seq FROM PUBLIC;
REVOKE ALL ON SEQUENCE pg_sync.peer_events_id_seq FROM PUBLIC;
REVOKE ALL ON SEQUENCE pg_sync.snapshot_quarantine_seq FROM PUBLIC;
ALTER SEQUENCE pg_sync.snapshot_quarantine_seq OWNER TO pgsync_owner;
ALTER TABLE pg_sync.node_identity OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peers OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peer_secrets OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peer_cursors OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peer_quarantine OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peer_events OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peer_links OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peer_holds OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peer_joins OWNER TO pgsync_owner;
ALTER TABLE pg_sync.peer_probes OWNER TO pgsync_owner;
ALTER TABLE pg_sync.conflicts OWNER TO pgsync_owner;
ALTER TABLE pg_sync.federation_modes OWNER TO pgsync_owner;
REVOKE ALL ON pg_sync.federation_modes FROM PUBLIC;

-- This node's log identity: system identifier, timeline and the random id made at CREATE
-- EXTENSION. A peer that sees it change (restore from backup, promotion, reinstall) must
-- re-bootstrap: sync ids may repeat. SECURITY DEFINER (the installing superuser) only to read
-- pg_control, which is superuser-only.
CREATE FUNCTION pg_sync.epoch() RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (SELECT system_identifier::text FROM pg_control_system())
        || '.' || (SELECT timeline_id::text FROM pg_control_checkpoint())
        || '.' || (SELECT replace(epoch_id::text, '-', '') FROM pg_sync.node_identity)
$$;

-- Refuses unless pg_sync.node_id is set explicitly: the derived default repeats on a cloned
-- database, and peers pin node ids.
CREATE FUNCTION pg_sync.require_explicit_node_id() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF coalesce(current_setting('pg_sync.node_id', true), '') = '' THEN
        RAISE EXCEPTION 'pg_sync.node_id is not set'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Federation needs an explicit, unique node id: ALTER SYSTEM SET pg_sync.node_id = ''eu-west''; SELECT pg_reload_conf(); (the derived default repeats on a cloned database).';
    END IF;
END
$$;

-- The SQL expression of a registered table's model id (canonical key text) over alias "t", in
-- collation "C" (as row_state.model_id): a key column of a collation other than the default
-- and "C" would otherwise leave its comparisons with model ids without a collation (42P22).
CREATE FUNCTION pg_sync.model_id_expr(r pg_sync.registry) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '(pg_sync.key_text(ARRAY[' || string_agg(format('pg_sync.canonical_text(t.%I)', c), ', ' ORDER BY o) || ']) COLLATE pg_catalog."C")'
      FROM unnest(r.pk_columns) WITH ORDINALITY AS k(c, o)
$$;

-- Rows of a registered table with no recorded insert: they predate registration, so peers
-- have never seen them (at most `lim` are counted).
CREATE FUNCTION pg_sync.unannounced(model text, lim bigint DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r pg_sync.registry;
    n bigint;
BEGIN
    SELECT * INTO r FROM pg_sync.registry g WHERE g.model = unannounced.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model "%" is not registered', model
            USING ERRCODE = 'undefined_object', HINT = 'See pg_sync.tables() for the registered models.';
    END IF;
    EXECUTE format(
        'SELECT count(*) FROM (SELECT 1 FROM %s t WHERE NOT EXISTS (
             SELECT 1 FROM pg_sync.row_state s
              WHERE s.model OPERATOR(pg_catalog.=) $1 AND s.model_id OPERATOR(pg_catalog.=) %s
                AND s.created OPERATOR(pg_catalog.<>) '''') LIMIT $2) x',
        r.rel, pg_sync.model_id_expr(r))
      INTO n USING r.model, lim;
    RETURN n;
END
$$;

-- Mints versions and insert actions for rows that predate registration (rows without a recorded
-- insert). Reads the table in pages of batch_size rows in key order, each page locked while it
-- is announced, as the table's owner (pg_sync.owner_rows: the row JSON calls the owner's casts
-- to json, which must not run with the caller's rights). Idempotent: announced rows are skipped.
-- Returns how many rows were announced.
CREATE FUNCTION pg_sync.announce(model text, batch_size integer DEFAULT 10000) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r     pg_sync.registry;
    total bigint := 0;
    n     bigint;
    page  jsonb;
    after text;
BEGIN
    SELECT * INTO r FROM pg_sync.registry g WHERE g.model = announce.model;
    IF NOT FOUND OR NOT r.enabled THEN
        RAISE EXCEPTION 'model "%" is not registered', model
            USING ERRCODE = 'undefined_object', HINT = 'Register the table first: pg_sync.register_table(...).';
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass how many rows to announce per statement.';
    END IF;
    LOOP
        page := pg_sync.owner_rows(r.model, NULL, after, batch_size, true);
        EXIT WHEN jsonb_array_length(page) = 0;
        after := page -> -1 ->> 'id';
        WITH cand AS (
             SELECT x ->> 'id' AS mid, coalesce(x ->> 'grp', '') AS grp, x -> 'data' AS data
               FROM jsonb_array_elements(page) x
              WHERE NOT EXISTS (
                    SELECT 1 FROM pg_sync.row_state s
                     WHERE s.model = r.model AND s.model_id = x ->> 'id' AND s.created <> '')
         ), v AS (
             SELECT cand.*, pg_sync.next_version() AS ver FROM cand
         ), st AS (
             INSERT INTO pg_sync.row_state AS s (model, model_id, created, max_version)
             SELECT r.model, v.mid, v.ver, v.ver FROM v
             ON CONFLICT ON CONSTRAINT row_state_pkey DO UPDATE SET
               created = EXCLUDED.created, deleted = NULL, versions = '{}', pending = NULL,
               max_version = EXCLUDED.max_version
             WHERE s.max_version < EXCLUDED.max_version
             RETURNING s.model_id
         ), a AS (
             INSERT INTO pg_sync.sync_actions (model, model_id, action, data, version, origin, group_id)
             SELECT r.model, v.mid, 'I', v.data, v.ver, pg_sync.node_id(), CASE WHEN r.group_column IS NOT NULL THEN v.grp END
               FROM v JOIN st ON st.model_id = v.mid
             RETURNING 1
         )
        SELECT count(*) INTO n FROM a;
        total := total + n;
        EXIT WHEN jsonb_array_length(page) < batch_size;
    END LOOP;
    RETURN total;
END
$$;

-- A federated table (federation other than 'off') whose key defaults to a sequence mints the
-- same keys on every node: warn (register_table calls this).
CREATE FUNCTION pg_sync.warn_sequence_key(rel regclass, federation text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col text;
BEGIN
    IF federation = 'off' THEN
        RETURN;
    END IF;
    FOR col IN
        SELECT a.attname FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE i.indrelid = rel AND i.indisprimary
           AND (a.attidentity <> '' OR pg_get_expr(d.adbin, d.adrelid) LIKE '%nextval(%')
         ORDER BY a.attnum
    LOOP
        RAISE WARNING 'key column "%" of federated table "%" defaults to a sequence', col, rel
            USING HINT = 'Every node would mint the same keys and overwrite each other''s rows: use globally unique keys (uuid, or node-prefixed), or register with federation => ''off''.';
    END LOOP;
END
$$;

CREATE FUNCTION pg_sync.check_peer_models(models text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m text;
BEGIN
    FOREACH m IN ARRAY coalesce(models, '{}') LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_sync.registry r WHERE r.model = m) THEN
            RAISE EXCEPTION 'model "%" is not registered', m
                USING ERRCODE = 'undefined_object',
                      HINT = 'models lists registered model names (pg_sync.tables()); NULL means every federated model.';
        END IF;
    END LOOP;
END
$$;

CREATE FUNCTION pg_sync.add_peer(
    name      text,
    url       text,
    secret    text,
    direction text    DEFAULT 'both',
    models    text[]  DEFAULT NULL,
    bootstrap text    DEFAULT 'snapshot'
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m text;
BEGIN
    PERFORM pg_sync.require_explicit_node_id();
    IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid peer name "%"', coalesce(name, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A peer name starts with a letter or digit and holds letters, digits, ".", "_" and "-" (at most 63).';
    END IF;
    IF name = pg_sync.node_id() THEN
        RAISE EXCEPTION 'peer "%" is this node', name
            USING ERRCODE = 'invalid_parameter_value', HINT = 'A node cannot peer with itself; name the other deployment.';
    END IF;
    IF url IS NULL OR url !~ '^wss?://' THEN
        RAISE EXCEPTION 'invalid peer url "%"', coalesce(url, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the peer worker''s address, e.g. ''wss://us-east.example.com''.';
    END IF;
    IF secret IS NULL OR length(secret) < 16 THEN
        RAISE EXCEPTION 'the peer secret must have at least 16 characters'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use the same long random secret on both sides, e.g. encode(gen_random_bytes(32), ''hex'').';
    END IF;
    IF direction IS NULL OR direction NOT IN ('push', 'pull', 'both') THEN
        RAISE EXCEPTION 'invalid direction "%"', coalesce(direction, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use ''both'', ''push'' (this node sends) or ''pull'' (this node receives).';
    END IF;
    IF bootstrap IS NULL OR bootstrap NOT IN ('snapshot', 'none') THEN
        RAISE EXCEPTION 'invalid bootstrap "%"', coalesce(bootstrap, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use ''snapshot'' (join from the peer''s state) or ''none'' (start at the peer''s log start).';
    END IF;
    PERFORM pg_sync.check_peer_models(models);
    IF EXISTS (SELECT 1 FROM pg_sync.peers p WHERE p.name = add_peer.name) THEN
        RAISE EXCEPTION 'peer "%" already exists', name
            USING ERRCODE = 'duplicate_object', HINT = 'Change it with pg_sync.set_peer(...), or remove it first.';
    END IF;
    FOR m IN SELECT r.model FROM pg_sync.registry r WHERE r.enabled AND r.federation <> 'off' ORDER BY 1 LOOP
        IF pg_sync.unannounced(m, 1) > 0 THEN
            RAISE EXCEPTION 'model "%" holds rows that predate its registration', m
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = format('Peers would never see them: run SELECT pg_sync.announce(%L) first.', m);
        END IF;
    END LOOP;
    INSERT INTO pg_sync.peers (name, url, direction, models, bootstrap)
    VALUES (name, url, direction, models, bootstrap);
    INSERT INTO pg_sync.peer_secrets (peer, secret) VALUES (name, secret);
    INSERT INTO pg_sync.peer_events (peer, event, detail)
    VALUES (name, 'added', jsonb_build_object('direction', direction, 'models', models, 'bootstrap', bootstrap));
    RETURN name;
END
$$;

CREATE FUNCTION pg_sync.peer_or_raise(name text) RETURNS pg_sync.peers
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers;
BEGIN
    SELECT * INTO p FROM pg_sync.peers q WHERE q.name = peer_or_raise.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'peer "%" does not exist', coalesce(name, 'NULL')
            USING ERRCODE = 'undefined_object', HINT = 'See pg_sync.peers() for the peers of this node.';
    END IF;
    RETURN p;
END
$$;

-- Changes a peer. NULL leaves a setting as it is. A new secret keeps the old one accepted as
-- previous_secret until retire_previous => true (rotate on both sides, then retire).
CREATE FUNCTION pg_sync.set_peer(
    name            text,
    enabled         boolean DEFAULT NULL,
    url             text    DEFAULT NULL,
    secret          text    DEFAULT NULL,
    direction       text    DEFAULT NULL,
    models          text[]  DEFAULT NULL,
    retire_previous boolean DEFAULT false
) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p       pg_sync.peers := pg_sync.peer_or_raise(name);
    changed text[] := '{}';
BEGIN
    IF url IS NOT NULL AND url !~ '^wss?://' THEN
        RAISE EXCEPTION 'invalid peer url "%"', url
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the peer worker''s address, e.g. ''wss://us-east.example.com''.';
    END IF;
    IF secret IS NOT NULL AND length(secret) < 16 THEN
        RAISE EXCEPTION 'the peer secret must have at least 16 characters'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use a long random secret, e.g. encode(gen_random_bytes(32), ''hex'').';
    END IF;
    IF direction IS NOT NULL AND direction NOT IN ('push', 'pull', 'both') THEN
        RAISE EXCEPTION 'invalid direction "%"', direction
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use ''both'', ''push'' (this node sends) or ''pull'' (this node receives).';
    END IF;
    PERFORM pg_sync.check_peer_models(models);
    IF enabled IS NOT NULL AND enabled IS DISTINCT FROM p.enabled THEN changed := array_append(changed, 'enabled'); END IF;
    IF url IS NOT NULL AND url IS DISTINCT FROM p.url THEN changed := array_append(changed, 'url'); END IF;
    IF direction IS NOT NULL AND direction IS DISTINCT FROM p.direction THEN changed := array_append(changed, 'direction'); END IF;
    IF models IS NOT NULL AND models IS DISTINCT FROM p.models THEN changed := array_append(changed, 'models'); END IF;
    UPDATE pg_sync.peers q SET
        enabled = coalesce(set_peer.enabled, q.enabled),
        url = coalesce(set_peer.url, q.url),
        direction = coalesce(set_peer.direction, q.direction),
        -- '{}' (no model) is distinct from NULL (every model); pass '{}' to stop all models.
        models = CASE WHEN set_peer.models IS NULL THEN q.models ELSE set_peer.models END,
        updated_at = now()
     WHERE q.name = p.name;
    IF secret IS NOT NULL THEN
        UPDATE pg_sync.peer_secrets s
           SET previous_secret = CASE WHEN retire_previous THEN NULL ELSE s.secret END,
               secret = set_peer.secret, rotated_at = now()
         WHERE s.peer = p.name;
        changed := array_append(changed, 'secret');
    ELSIF retire_previous THEN
        UPDATE pg_sync.peer_secrets s SET previous_secret = NULL WHERE s.peer = p.name AND s.previous_secret IS NOT NULL;
        IF FOUND THEN changed := array_append(changed, 'previous_secret_retired'); END IF;
    END IF;
    IF cardinality(changed) > 0 THEN
        INSERT INTO pg_sync.peer_events (peer, event, detail)
        VALUES (p.name, 'changed', jsonb_build_object('changed', changed));
    END IF;
    RETURN cardinality(changed) > 0;
END
$$;

-- Removes a peer, its secret, cursor and quarantine (adding it again bootstraps afresh). The
-- worker sees the row go and closes the links.
CREATE FUNCTION pg_sync.remove_peer(name text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers := pg_sync.peer_or_raise(name);
BEGIN
    DELETE FROM pg_sync.peers q WHERE q.name = p.name;
    IF p.node_id IS NOT NULL THEN
        DELETE FROM pg_sync.peer_cursors c WHERE c.peer_node_id = p.node_id;
        DELETE FROM pg_sync.peer_quarantine q WHERE q.peer_node_id = p.node_id;
        DELETE FROM pg_sync.peer_joins j WHERE j.peer_node_id = p.node_id;
    END IF;
    INSERT INTO pg_sync.peer_events (peer, event) VALUES (p.name, 'removed');
    RETURN true;
END
$$;

-- For the worker, after authenticating a link: pins the peer's node id at first contact, then
-- refuses any other (a cloned or replaced node), and refuses this node's own id (a self-link).
CREATE FUNCTION pg_sync.pin_peer(name text, node_id text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers := pg_sync.peer_or_raise(name);
BEGIN
    IF node_id IS NULL OR node_id = '' THEN
        RAISE EXCEPTION 'node_id must not be empty'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the node id the peer proved in its handshake.';
    END IF;
    IF node_id = pg_sync.node_id() THEN
        RAISE EXCEPTION 'peer "%" has this node''s own node id "%"', p.name, node_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The peer is this database or a clone of it: give every node its own pg_sync.node_id.';
    END IF;
    IF p.node_id IS NULL THEN
        IF EXISTS (SELECT 1 FROM pg_sync.peers q WHERE q.node_id = pin_peer.node_id) THEN
            RAISE EXCEPTION 'node id "%" is pinned for another peer', node_id
                USING ERRCODE = 'duplicate_object', HINT = 'Two peer entries name the same deployment: remove one.';
        END IF;
        UPDATE pg_sync.peers q SET node_id = pin_peer.node_id, updated_at = now() WHERE q.name = p.name;
        INSERT INTO pg_sync.peer_events (peer, event, detail) VALUES (p.name, 'pinned', jsonb_build_object('node_id', node_id));
    ELSIF p.node_id <> node_id THEN
        RAISE EXCEPTION 'peer "%" answered as node "%", but is pinned to "%"', p.name, node_id, p.node_id
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'If the peer was really replaced, remove and add it again.';
    END IF;
    RETURN node_id;
END
$$;

-- Peers without their secrets.
CREATE FUNCTION pg_sync.peers()
RETURNS TABLE (name text, node_id text, url text, direction text, models text[], bootstrap text,
               enabled boolean, has_previous_secret boolean, secret_rotated_at timestamptz,
               created_at timestamptz, updated_at timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.name, p.node_id, p.url, p.direction, p.models, p.bootstrap, p.enabled,
           s.previous_secret IS NOT NULL, s.rotated_at, p.created_at, p.updated_at
      FROM pg_sync.peers p LEFT JOIN pg_sync.peer_secrets s ON s.peer = p.name
     ORDER BY p.name
$$;

CREATE VIEW pg_sync.peer_status AS
    SELECT p.name AS peer, p.node_id, p.direction, p.enabled,
           CASE WHEN NOT p.enabled THEN 'disabled'
                WHEN p.direction = 'push' THEN coalesce(o.state, 'connecting')
                ELSE coalesce(l.state, 'connecting') END AS state,
           l.connected_since,
           c.last_sync_id AS cursor,
           c.peer_epoch,
           l.peer_last_sync_id,
           GREATEST(l.peer_last_sync_id - coalesce(c.last_sync_id, 0), 0) AS lag_actions,
           l.lag_seconds,
           coalesce(c.applied, 0) AS applied,
           coalesce(c.changed, 0) AS changed,
           (SELECT count(*) FROM pg_sync.peer_quarantine q WHERE q.peer_node_id = p.node_id) AS open_quarantine,
           coalesce(l.last_error, o.last_error) AS last_error,
           coalesce(l.rtt_ms, o.rtt_ms) AS rtt_ms,
           coalesce(l.clock_offset_ms, o.clock_offset_ms) AS clock_offset_ms,
           o.state AS out_state,
           o.peer_last_sync_id AS out_acked_sync_id,
           c.updated_at AS cursor_updated_at,
           h.acked_sync_id AS out_hold,
           h.resync_below IS NOT NULL AS resync_required
      FROM pg_sync.peers p
      LEFT JOIN pg_sync.peer_holds h ON h.peer = p.name
      LEFT JOIN pg_sync.peer_cursors c ON c.peer_node_id = p.node_id
      LEFT JOIN pg_sync.peer_links l ON l.peer = p.name AND l.direction = 'in'
      LEFT JOIN pg_sync.peer_links o ON o.peer = p.name AND o.direction = 'out';
ALTER VIEW pg_sync.peer_status OWNER TO pgsync_owner;
REVOKE ALL ON pg_sync.peer_status FROM PUBLIC;

CREATE FUNCTION pg_sync.clear_peer_events(older_than interval) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must be a non-negative interval'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'e.g. pg_sync.clear_peer_events(older_than => ''30 days'').';
    END IF;
    DELETE FROM pg_sync.peer_events e WHERE e.at < now() - older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Errors that say nothing about the change: connection exceptions, transaction rollback
-- (deadlock, serialization), lock timeout, insufficient resources, operator intervention,
-- system errors. Not internal errors (XX): one that a change raises, it raises again on every
-- retry, so it is parked with its SQLSTATE and the link flows on.
CREATE FUNCTION pg_sync.transient_sqlstate(st text) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT left(st, 2) IN ('08', '40', '53', '57', '58') OR st = '55P03' $$;

-- Parks (or re-parks) a change that failed to apply.
CREATE FUNCTION pg_sync.quarantine_change(peer_node_id text, sync_id bigint, change jsonb, sqlstate text, message text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pg_sync.peer_quarantine AS q (peer_node_id, sync_id, change, sqlstate, message)
    VALUES (peer_node_id, sync_id, change, sqlstate, message)
    ON CONFLICT (peer_node_id, sync_id) DO UPDATE SET
        change = EXCLUDED.change, sqlstate = EXCLUDED.sqlstate, message = EXCLUDED.message,
        attempts = q.attempts + 1, last_seen = now()
$$;

-- The receiver's apply of one batch from peer `peer` (its name): the changes with sync ids
-- from_id+1 .. to_id of the peer's log whose epoch is `epoch`, as a JSON array of actions (each
-- with its "sync_id"). One or more whole source transactions: the worker never splits one.
-- Locks the cursor; a range already applied answers 'duplicate'; a gap or another epoch raises.
-- Applies the batch in one go, set-based where it can (apply_remote_set; NULL means it cannot,
-- and apply_remote applies it change by change); if that fails, change by change in
-- subtransactions, parking failures in peer_quarantine. Advances the cursor in this same
-- transaction.
CREATE FUNCTION pg_sync.apply_peer_batch(peer text, epoch text, from_id bigint, to_id bigint, changes jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p        pg_sync.peers := pg_sync.peer_or_raise(peer);
    c        pg_sync.peer_cursors;
    todo     jsonb;
    item     jsonb;
    n        bigint := 0;
    n_changed bigint := 0;
    parked   bigint := 0;
    st       text;
    msg      text;
BEGIN
    IF p.node_id IS NULL THEN
        RAISE EXCEPTION 'peer "%" has no pinned node id', p.name
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'The worker pins it with pg_sync.pin_peer() after authenticating the link.';
    END IF;
    IF NOT p.enabled OR p.direction = 'push' THEN
        RAISE EXCEPTION 'peer "%" does not send to this node (%)', p.name,
                        CASE WHEN p.enabled THEN 'direction ' || p.direction ELSE 'disabled' END
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Enable the peer or set its direction to ''pull'' or ''both'' with pg_sync.set_peer().';
    END IF;
    IF epoch IS NULL OR from_id IS NULL OR to_id IS NULL OR from_id < 0 OR to_id < from_id THEN
        RAISE EXCEPTION 'invalid batch range (%, %]', coalesce(from_id::text, 'NULL'), coalesce(to_id::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'A batch covers sync ids from_id+1 .. to_id of one epoch.';
    END IF;
    IF changes IS NULL OR jsonb_typeof(changes) <> 'array' THEN
        RAISE EXCEPTION 'changes must be a JSON array'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the peer''s actions, each with its "sync_id".';
    END IF;
    INSERT INTO pg_sync.peer_cursors (peer_node_id) VALUES (p.node_id) ON CONFLICT DO NOTHING;
    SELECT * INTO c FROM pg_sync.peer_cursors k WHERE k.peer_node_id = p.node_id FOR UPDATE;
    IF c.peer_epoch IS NOT NULL AND c.peer_epoch <> epoch THEN
        RAISE EXCEPTION 'peer "%" sends epoch "%", but this node applied its log of epoch "%"', p.name, epoch, c.peer_epoch
            USING ERRCODE = 'PS002',
                  HINT = 'The peer''s log was restored or replaced and its sync ids may repeat: re-bootstrap with pg_sync.resync_peer() (the worker does).';
    END IF;
    IF to_id <= c.last_sync_id THEN
        RETURN jsonb_build_object('status', 'duplicate', 'cursor', c.last_sync_id);
    END IF;
    IF from_id > c.last_sync_id THEN
        RAISE EXCEPTION 'gap in the log of peer "%": batch starts after sync id %, applied up to %', p.name, from_id, c.last_sync_id
            USING ERRCODE = 'PS001', HINT = 'Re-subscribe from the cursor in pg_sync.peer_cursors (the worker does).';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(changes) e
                WHERE jsonb_typeof(e -> 'sync_id') IS DISTINCT FROM 'number'
                   OR (e ->> 'sync_id')::numeric <= from_id OR (e ->> 'sync_id')::numeric > to_id) THEN
        RAISE EXCEPTION 'every change of a batch needs its "sync_id" within (%, %]', from_id, to_id
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Send the rows of pg_sync.peer_changes() with their sync ids.';
    END IF;
    -- A partial overlap: only what is new (the rest was applied with the earlier batch). The
    -- peer's models filter again here: the sender may not know of a change made since.
    IF from_id = c.last_sync_id AND p.models IS NULL
       AND NOT EXISTS (SELECT 1 FROM pg_sync.registry r WHERE r.enabled AND r.federation IN ('push', 'off')) THEN
        -- The usual batch: all of it new, and no model to leave out (what the query below would
        -- keep, without copying the batch).
        todo := changes;
    ELSE
        SELECT coalesce(jsonb_agg(e ORDER BY o), '[]') INTO todo
          FROM jsonb_array_elements(changes) WITH ORDINALITY AS x(e, o)
         WHERE (e ->> 'sync_id')::bigint > c.last_sync_id
           AND (p.models IS NULL OR (e ->> 'model') = ANY (p.models))
           -- Models this node does not take (federation 'push' or 'off') are skipped, not
           -- parked: a mode is a choice, and a parked change would apply once the mode changes
           -- back.
           AND NOT EXISTS (SELECT 1 FROM pg_sync.registry r
                            WHERE r.model = (e ->> 'model') AND r.enabled AND r.federation IN ('push', 'off'));
    END IF;
    n := jsonb_array_length(todo);
    IF n > 0 THEN
        BEGIN
            n_changed := coalesce(pg_sync.apply_remote_set(todo), pg_sync.apply_remote(todo));
        EXCEPTION WHEN OTHERS THEN
            -- Transient failures (deadlock, serialization, lock timeout, resources, shutdown)
            -- are not the change's fault: the whole batch fails and the worker retries it.
            GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE;
            IF pg_sync.transient_sqlstate(st) THEN
                RAISE;
            END IF;
            n_changed := 0;
            FOR item IN SELECT e FROM jsonb_array_elements(todo) e LOOP
                BEGIN
                    n_changed := n_changed + pg_sync.apply_remote(item);
                EXCEPTION WHEN OTHERS THEN
                    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
                    IF pg_sync.transient_sqlstate(st) THEN
                        RAISE;
                    END IF;
                    PERFORM pg_sync.quarantine_change(p.node_id, (item ->> 'sync_id')::bigint, item, st, msg);
                    parked := parked + 1;
                END;
            END LOOP;
            INSERT INTO pg_sync.peer_events (peer, event, detail)
            VALUES (p.name, 'quarantined', jsonb_build_object('from_id', from_id, 'to_id', to_id, 'count', parked));
        END;
    END IF;
    -- A resync asked for (resync_peer) stays asked for until the join ends: the link that
    -- applies this batch may be the one about to restart for it.
    UPDATE pg_sync.peer_cursors k SET
        peer_epoch = epoch, last_sync_id = to_id,
        state = CASE WHEN k.state = 'resync_required' THEN k.state ELSE 'applied' END,
        applied = k.applied + n - parked, changed = k.changed + n_changed, updated_at = now()
     WHERE k.peer_node_id = p.node_id;
    RETURN jsonb_build_object('status', 'applied', 'cursor', to_id, 'applied', n - parked,
                              'changed', n_changed, 'quarantined', parked);
END
$$;

-- Re-applies a peer's parked changes in sync id order; those that now apply leave the
-- quarantine, the others count an attempt. Returns how many remain. A change refused as below
-- the tombstone GC horizon (72000) is refused again unless the caller decided otherwise (SET
-- pg_sync.gc_horizon_check = off); a snapshot join's parked rows (negative keys) are states
-- and applied without that check, as apply_peer_snapshot applies them.
CREATE FUNCTION pg_sync.retry_quarantined(peer text) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p   pg_sync.peers := pg_sync.peer_or_raise(peer);
    q   pg_sync.peer_quarantine;
    st  text;
    msg text;
    ok  bigint := 0;
    chk text := current_setting('pg_sync.gc_horizon_check');
BEGIN
    FOR q IN SELECT * FROM pg_sync.peer_quarantine k WHERE k.peer_node_id = p.node_id ORDER BY k.sync_id FOR UPDATE LOOP
        BEGIN
            IF q.sync_id < 0 THEN
                PERFORM set_config('pg_sync.gc_horizon_check', 'off', true);
            END IF;
            PERFORM pg_sync.apply_remote(q.change);
            PERFORM set_config('pg_sync.gc_horizon_check', chk, true);
            DELETE FROM pg_sync.peer_quarantine k WHERE k.peer_node_id = q.peer_node_id AND k.sync_id = q.sync_id;
            ok := ok + 1;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            IF pg_sync.transient_sqlstate(st) THEN
                RAISE;
            END IF;
            PERFORM pg_sync.quarantine_change(q.peer_node_id, q.sync_id, q.change, st, msg);
        END;
    END LOOP;
    IF ok > 0 THEN
        INSERT INTO pg_sync.peer_events (peer, event, detail) VALUES (p.name, 'unquarantined', jsonb_build_object('count', ok));
    END IF;
    RETURN (SELECT count(*) FROM pg_sync.peer_quarantine k WHERE k.peer_node_id = p.node_id);
END
$$;

-- The sender's log for a peer (by its pinned node id): pg_sync.changes() from sync id after+1
-- to after+span, keeping actions of models federated with 'push' or 'both' that the peer
-- accepts, and dropping an action only when every version in it was minted by the peer (never
-- by origin alone: an action can carry versions from several nodes). The worker pages with
-- after + span until pg_sync.last_sync_id(); a page with nothing for the peer still moves the
-- peer's cursor to after + span.
CREATE FUNCTION pg_sync.peer_changes(peer_node_id text, after bigint, span integer DEFAULT 1000)
RETURNS TABLE (sync_id bigint, id bigint, model text, model_id text, action text, data jsonb,
               version text, versions jsonb, origin text, group_id text, prev_group_id text,
               moved boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers;
BEGIN
    SELECT * INTO p FROM pg_sync.peers q WHERE q.node_id = peer_changes.peer_node_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no peer is pinned to node id "%"', peer_node_id
            USING ERRCODE = 'undefined_object', HINT = 'Add the peer with pg_sync.add_peer(); the worker pins its node id at the first link.';
    END IF;
    IF NOT p.enabled OR p.direction = 'pull' THEN
        RAISE EXCEPTION 'this node does not send to peer "%" (%)', p.name,
                        CASE WHEN p.enabled THEN 'direction ' || p.direction ELSE 'disabled' END
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Enable the peer or set its direction to ''push'' or ''both''.';
    END IF;
    RETURN QUERY
    SELECT c.sync_id, c.id, c.model, c.model_id, c.action, c.data, c.version, c.versions, c.origin,
           c.group_id, c.prev_group_id, c.moved
      FROM pg_sync.changes(after, NULL, span) c
      JOIN pg_sync.registry r ON r.model = c.model
     -- The mode in force when the action committed (federation_modes), else the current one.
     WHERE (CASE WHEN NOT EXISTS (SELECT 1 FROM pg_sync.federation_modes f WHERE f.model = c.model)
                 THEN r.federation
                 ELSE coalesce((SELECT f.before FROM pg_sync.federation_modes f,
                                        -- The transaction holding sync id c.sync_id (one
                                        -- probe of commit_order's first_sync_id key; the log
                                        -- has no index on id alone).
                                        (SELECT o.commit_lsn, o.xid FROM pg_sync.commit_order o
                                          WHERE o.first_sync_id <= c.sync_id
                                          ORDER BY o.first_sync_id DESC LIMIT 1) t
                                 WHERE f.model = c.model
                                   AND CASE WHEN t.commit_lsn = '0/0'
                                            THEN pg_visible_in_snapshot(t.xid, f.snap)
                                            ELSE f.at_lsn > t.commit_lsn END
                                 ORDER BY f.at_lsn LIMIT 1), r.federation) END) IN ('push', 'both')
       AND (p.models IS NULL OR c.model = ANY (p.models))
       AND NOT (substr(c.version, strpos(c.version, '@') + 1) = p.node_id
                AND NOT EXISTS (SELECT 1 FROM jsonb_each_text(coalesce(c.versions, '{}')) v
                                 WHERE substr(v.value, strpos(v.value, '@') + 1) <> p.node_id))
     ORDER BY c.sync_id;
    -- Checked after the read, in a snapshot at least as new as the read's: the horizon only
    -- grows, so if it is not past the cursor now, nothing the read needed was compacted.
    IF after < pg_sync.retention_horizon() THEN
        RAISE EXCEPTION 'the log after sync id % is compacted (horizon %): peer "%" must resync', after, pg_sync.retention_horizon(), p.name
            USING ERRCODE = 'PS003',
                  HINT = 'The receiver re-bootstraps from a snapshot (resync_required); raise retention for lagging peers to avoid it.';
    END IF;
    -- Released for lagging past the cap: the log it needs is no longer held (and may go at any
    -- compaction), so it must re-bootstrap even if that log is still there now.
    IF after < (SELECT h.resync_below FROM pg_sync.peer_holds h WHERE h.peer = p.name) THEN
        RAISE EXCEPTION 'peer "%" lagged past the retention cap and was released: it must resync', p.name
            USING ERRCODE = 'PS003',
                  HINT = 'The receiver re-bootstraps from a snapshot (resync_required); raise SYNC_PEER_MAX_LAG to hold the log longer for lagging peers.';
    END IF;
END
$$;

-- The sender records what peer `peer` acknowledged (the worker: its cursor at subscribe, with
-- at_subscribe, which may move it back; then each ack, which only moves it forward). An ack at
-- or past resync_below ends a release: the peer re-bootstrapped and holds the log again.
CREATE FUNCTION pg_sync.peer_ack(peer text, acked bigint, at_subscribe boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers := pg_sync.peer_or_raise(peer);
    h pg_sync.peer_holds;
BEGIN
    IF acked IS NULL OR acked < 0 OR acked > pg_sync.last_sync_id() THEN
        RAISE EXCEPTION 'acknowledged sync id % is outside 0..=%', coalesce(acked::text, 'NULL'), pg_sync.last_sync_id()
            USING ERRCODE = 'invalid_parameter_value', HINT = 'A peer acknowledges sync ids of this node''s sequenced log.';
    END IF;
    INSERT INTO pg_sync.peer_holds AS k (peer, acked_sync_id) VALUES (p.name, acked)
    ON CONFLICT ON CONSTRAINT peer_holds_pkey DO UPDATE SET
        acked_sync_id = CASE WHEN at_subscribe THEN EXCLUDED.acked_sync_id
                             ELSE GREATEST(k.acked_sync_id, EXCLUDED.acked_sync_id) END,
        updated_at = now(), joining_since = NULL
    RETURNING * INTO h;
    IF h.resync_below IS NOT NULL AND h.acked_sync_id >= h.resync_below THEN
        UPDATE pg_sync.peer_holds k SET resync_below = NULL, released_at = NULL WHERE k.peer = p.name;
        INSERT INTO pg_sync.peer_events (peer, event, detail)
        VALUES (p.name, 'hold_resumed', jsonb_build_object('direction', 'out', 'acked', h.acked_sync_id));
    END IF;
    RETURN h.acked_sync_id;
END
$$;

-- The highest sync id compaction may remove: below the lowest acknowledgement of every peer
-- that holds the log (one this node sends to, not released). NULL: no peer holds anything.
-- Disabled peers hold too (disabling is a pause); peers that never acknowledged hold nothing
-- (they join by snapshot).
CREATE FUNCTION pg_sync.peer_retention_hold() RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT min(h.acked_sync_id) FROM pg_sync.peer_holds h JOIN pg_sync.peers p ON p.name = h.peer
     WHERE p.direction <> 'pull' AND h.resync_below IS NULL
$$;

-- The retention cap: peers whose acknowledgement is more than max_lag sync ids behind the log's
-- end stop holding it; each gets a resync_required event, and its link is told resync_required
-- (PS003 from peer_changes) until it re-bootstraps. The worker's compaction runs this first
-- (SYNC_PEER_MAX_LAG). Returns the peers released.
CREATE FUNCTION pg_sync.release_lagging_peers(max_lag bigint) RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    log_end bigint := pg_sync.last_sync_id();
    h       pg_sync.peer_holds;
BEGIN
    IF max_lag IS NULL OR max_lag < 0 THEN
        RAISE EXCEPTION 'max_lag must be a non-negative number of sync ids'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'e.g. pg_sync.release_lagging_peers(1000000).';
    END IF;
    FOR h IN UPDATE pg_sync.peer_holds k SET resync_below = log_end, released_at = now(), updated_at = now()
               FROM pg_sync.peers p
              WHERE p.name = k.peer AND p.direction <> 'pull' AND k.resync_below IS NULL
                AND log_end - k.acked_sync_id > max_lag
                AND (k.joining_since IS NULL OR k.joining_since < now() - interval '1 day')
             RETURNING k.* LOOP
        INSERT INTO pg_sync.peer_events (peer, event, detail)
        VALUES (h.peer, 'resync_required', jsonb_build_object('direction', 'out', 'reason', 'lag_cap',
                'acked', h.acked_sync_id, 'lag', log_end - h.acked_sync_id, 'max_lag', max_lag));
        RETURN NEXT h.peer;
    END LOOP;
END
$$;

-- Tombstone GC. A dead row's state (its tombstone, and any values pending for a resurrecting
-- insert) is what keeps a late, older change from resurrecting it: a peer that wrote the row
-- before it saw the delete may send that write at any time until it has seen the delete and
-- everything it logged before is here. gc_tombstones drops such states once
--   * every peer this node sends to (the holds of peer_retention_hold: released ones do not
--     hold) has acknowledged every logged change of the row, and no snapshot join of a peer is
--     in progress (on either side: the pages it has not read yet may need them);
--   * every link this node receives on has stayed connected and caught up since an earlier pass
--     (the mark) at least `settle` ago: a write a peer logged before it applied the delete was
--     sequenced before its acknowledgement, so a link that has been streaming since has
--     delivered it (frames are ordered; a link silent for a minute is reported down);
--   * the state is older than min_age (its highest version's clock against this node's).
-- Live rows' states are never touched. Each pass first needs a mark from an earlier pass, so the
-- first call (and one after a link went down or a join ran) only marks.
CREATE TABLE pg_sync.tombstone_gc (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- The lowest acknowledgement of the holding peers (or the log's end) at mark_at.
    mark           bigint,
    mark_at        timestamptz,
    -- The highest version of a state dropped so far: a change at or below it for a row with no
    -- state may be one whose tombstone is gone.
    horizon        text COLLATE "C" NOT NULL DEFAULT '',
    collected      bigint NOT NULL DEFAULT 0,
    last_run_at    timestamptz,
    last_collected bigint,
    -- What kept the last pass from collecting (peers, joins), NULL when nothing did.
    held_by        text[]
);
REVOKE ALL ON pg_sync.tombstone_gc FROM PUBLIC;
ALTER TABLE pg_sync.tombstone_gc OWNER TO pgsync_owner;

CREATE FUNCTION pg_sync.gc_tombstones(min_age interval DEFAULT '7 days', settle interval DEFAULT '90 seconds')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    g       pg_sync.tombstone_gc;
    hold    bigint := coalesce(pg_sync.peer_retention_hold(), pg_sync.last_sync_id());
    upto    bigint;
    cutoff  text;
    blocked text[];
    n       bigint := 0;
    top     text;
BEGIN
    IF min_age IS NULL OR min_age < interval '0' OR settle IS NULL OR settle < interval '0' THEN
        RAISE EXCEPTION 'min_age and settle must be non-negative intervals'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'e.g. pg_sync.gc_tombstones(''7 days'').';
    END IF;
    -- One pass at a time: the mark is read and moved under this row's lock.
    INSERT INTO pg_sync.tombstone_gc (only_row) VALUES (true) ON CONFLICT DO NOTHING;
    SELECT * INTO g FROM pg_sync.tombstone_gc FOR UPDATE;
    IF g.mark IS NOT NULL AND now() < g.mark_at + settle THEN
        RETURN 0;
    END IF;
    blocked := CASE WHEN g.mark IS NULL THEN '{}' ELSE ARRAY(
        SELECT 'joining:' || h.peer FROM pg_sync.peer_holds h JOIN pg_sync.peers p ON p.name = h.peer
         WHERE p.direction <> 'pull' AND h.resync_below IS NULL AND h.joining_since IS NOT NULL
        UNION ALL
        SELECT 'joining:' || coalesce(p.name, j.peer_node_id) FROM pg_sync.peer_joins j
          LEFT JOIN pg_sync.peers p ON p.node_id = j.peer_node_id
        UNION ALL
        -- Receiving links of pinned peers (one never linked has sent nothing): up and caught up
        -- since the mark. A disabled peer's link is down whatever its row says: the worker
        -- stops it without reporting (the row keeps 'streaming').
        SELECT 'link:' || p.name FROM pg_sync.peers p
          LEFT JOIN pg_sync.peer_links l ON l.peer = p.name AND l.direction = 'in'
         WHERE p.direction <> 'push' AND p.node_id IS NOT NULL
           AND (NOT p.enabled OR l.peer IS NULL OR l.state <> 'streaming' OR l.connected_since IS NULL
                -- No worker runs the links (none holds the federation lock, pg_sync/src/leader.rs):
                -- the rows are what a worker that is gone (killed, say) left.
                OR NOT EXISTS (SELECT 1 FROM pg_locks k
                                WHERE k.locktype = 'userlock' AND k.granted
                                  AND k.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
                                  AND k.classid = 1885822835::oid AND k.objid = 2037277542::oid)
                OR l.connected_since > g.mark_at)
        ORDER BY 1) END;
    IF g.mark IS NOT NULL AND cardinality(blocked) = 0 THEN
        upto := LEAST(g.mark, hold);
        -- Versions sort as text in clock order: this node's HLC of min_age ago, as a version
        -- prefix (the HLC, not the wall clock: a clock moved ahead by a peer's version ages
        -- the states it minted meanwhile at the same pace).
        cutoff := lpad(to_hex(GREATEST(pg_sync.hlc_now() - (floor(extract(epoch FROM min_age) * 1000)::bigint << 16), 0)),
                       16, '0');
        WITH unacked AS (
            -- Rows with a change some holding peer has not acknowledged (or not yet sequenced).
            SELECT DISTINCT a.model COLLATE "C" AS model, a.model_id COLLATE "C" AS model_id
              FROM pg_sync.sync_actions a LEFT JOIN pg_sync.commit_order c ON c.xid = a.xid
             WHERE c.xid IS NULL OR c.first_sync_id + c.action_count - 1 > upto),
        cand AS (
            SELECT s.model, s.model_id, s.max_version FROM pg_sync.row_state s
             WHERE NOT (s.created IS NOT NULL AND (s.deleted IS NULL OR s.created > s.deleted))
               AND s.max_version < cutoff COLLATE "C"
               AND NOT EXISTS (SELECT 1 FROM unacked u WHERE u.model = s.model AND u.model_id = s.model_id)),
        mine AS (
            -- A row written since this snapshot (a newer tombstone, pending values, a
            -- re-insert) has another max_version and stays: the quals are re-checked on it.
            -- One a writer holds now is skipped, not waited for (it is being written): a pass
            -- that waited, holding the rows it had locked, could deadlock with a transaction
            -- that re-inserts or merges two collected rows, one on each side of the pass.
            SELECT s.ctid FROM pg_sync.row_state s JOIN cand
                ON s.model = cand.model AND s.model_id = cand.model_id AND s.max_version = cand.max_version
             WHERE NOT (s.created IS NOT NULL AND (s.deleted IS NULL OR s.created > s.deleted))
               FOR UPDATE OF s SKIP LOCKED),
        gone AS (
            -- (a row updated since the snapshot is skipped too: its locked version is not
            -- visible to the delete)
            DELETE FROM pg_sync.row_state s USING mine WHERE s.ctid = mine.ctid
            RETURNING s.max_version)
        SELECT count(*), max(gone.max_version) INTO n, top FROM gone;
    END IF;
    UPDATE pg_sync.tombstone_gc t SET
        mark = hold, mark_at = now(),
        horizon = GREATEST(t.horizon, coalesce(top, '')),
        collected = t.collected + n, last_run_at = now(),
        last_collected = CASE WHEN g.mark IS NULL THEN NULL ELSE n END,
        held_by = NULLIF(blocked, '{}');
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION pg_sync.gc_tombstones(interval, interval) FROM PUBLIC;

-- Joining by snapshot, the sender's part. A receiver that is new (bootstrap 'snapshot') or must
-- resync reads this node's folded LWW state page by page, then continues from the log after W.
-- peer_join_start fixes W (the log's end, or the W of a join being resumed while the log after
-- it is still here) and holds the log after W for the peer, and returns this node's peer
-- cursors read with it: every page is read later, so it holds everything up to W and up to
-- those cursors (no gap), and anything newer is merged again from the log (a no-op).
CREATE FUNCTION pg_sync.peer_join_start(peer_node_id text, resume_w bigint DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers;
    w bigint;
    answer jsonb;
BEGIN
    SELECT * INTO p FROM pg_sync.peers q WHERE q.node_id = peer_join_start.peer_node_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no peer is pinned to node id "%"', peer_node_id
            USING ERRCODE = 'undefined_object', HINT = 'Add the peer with pg_sync.add_peer(); the worker pins its node id at the first link.';
    END IF;
    IF NOT p.enabled OR p.direction = 'pull' THEN
        RAISE EXCEPTION 'this node does not send to peer "%" (%)', p.name,
                        CASE WHEN p.enabled THEN 'direction ' || p.direction ELSE 'disabled' END
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Enable the peer or set its direction to ''push'' or ''both''.';
    END IF;
    IF resume_w IS NOT NULL AND resume_w >= pg_sync.retention_horizon() AND resume_w <= pg_sync.last_sync_id() THEN
        w := resume_w;
    ELSE
        w := pg_sync.last_sync_id();
    END IF;
    PERFORM pg_sync.peer_ack(p.name, w, at_subscribe => true);
    UPDATE pg_sync.peer_holds k SET joining_since = now() WHERE k.peer = p.name;
    -- A compaction that read the holds before ours may have passed W: start again.
    IF w < pg_sync.retention_horizon() THEN
        RAISE EXCEPTION 'the log after sync id % was compacted while the join of peer "%" began', w, p.name
            USING ERRCODE = 'PS003', HINT = 'Retry: the next join starts at the log''s end.';
    END IF;
    SELECT jsonb_build_object('w', w, 'epoch', pg_sync.epoch(), 'resumed', w IS NOT DISTINCT FROM resume_w,
             'cursors', coalesce(jsonb_agg(jsonb_build_object('node_id', c.peer_node_id, 'epoch', c.peer_epoch,
                                                              'last_sync_id', c.last_sync_id) ORDER BY c.peer_node_id)
                                   FILTER (WHERE c.peer_node_id IS NOT NULL), '[]'))
      INTO answer
      FROM (SELECT 1) one LEFT JOIN pg_sync.peer_cursors c ON c.peer_epoch IS NOT NULL;
    -- A new join, and its first resume, are logged; a receiver that keeps retrying at the
    -- same W is not logged again each time (review rev1 #04).
    IF w IS DISTINCT FROM resume_w OR NOT EXISTS (
           SELECT 1 FROM pg_sync.peer_events e
            WHERE e.peer = p.name AND e.event = 'join_started' AND e.detail ->> 'direction' = 'out'
              AND (e.detail ->> 'w')::bigint = w AND e.detail ->> 'resumed' = 'true') THEN
        INSERT INTO pg_sync.peer_events (peer, event, detail)
        VALUES (p.name, 'join_started', jsonb_build_object('direction', 'out', 'w', w, 'resumed', answer -> 'resumed'));
    END IF;
    RETURN answer;
END
$$;

-- A page of this node's LWW state for peer_node_id: the rows after (after_model, after_model_id)
-- in (model, model_id) order (bytewise), of models federated 'push' or 'both' that the peer
-- accepts, at most lim. Each row comes as the changes that rebuild its registers on a merge: a
-- D at its tombstone, an I at its insert (the whole live row, each column above the insert with
-- its own version in versions; the key only for a dead row), and a U with the values pending
-- for a dead row. A live state whose table row is gone (deleted while unregistered, or with
-- triggers off) sends no insert: a key-only insert would make a phantom row on the peer (review
-- rev1 #08). Merging them is a join, so a row read twice (or also merged from the log)
-- changes nothing. Read in one snapshot per page; the table rows as their owner (owner_rows).
CREATE FUNCTION pg_sync.peer_snapshot(peer_node_id text, after_model text DEFAULT '', after_model_id text DEFAULT '',
                                      lim integer DEFAULT 1000)
RETURNS TABLE (model text, model_id text, changes jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p    pg_sync.peers;
    r    pg_sync.registry;
    got  integer := 0;
    n    integer;
    keyc text;
    keyo text;
    grp  text;
BEGIN
    SELECT * INTO p FROM pg_sync.peers q WHERE q.node_id = peer_snapshot.peer_node_id;
    IF NOT FOUND OR NOT p.enabled OR p.direction = 'pull' THEN
        RAISE EXCEPTION 'this node does not send to a peer pinned to node id "%"', peer_node_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'The peer must be pinned, enabled and have direction ''push'' or ''both''.';
    END IF;
    IF lim IS NULL OR lim < 1 THEN
        RAISE EXCEPTION 'lim must be at least 1' USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the page size.';
    END IF;
    FOR r IN SELECT * FROM pg_sync.registry g
              WHERE g.enabled AND g.federation IN ('push', 'both')
                AND (p.models IS NULL OR g.model = ANY (p.models))
                AND g.model COLLATE "C" >= coalesce(after_model, '') COLLATE "C"
              ORDER BY g.model COLLATE "C" LOOP
        EXIT WHEN got >= lim;
        -- The page of states first (row_state's primary key, in order), then each one's table
        -- row by its key parsed from the model id (the key's index), checked against the
        -- canonical id: a page costs its own rows, not a scan of the table.
        SELECT string_agg(format('t.%I = %s::%s', k.c,
                                 CASE WHEN cardinality(r.pk_columns) = 1 THEN 's.model_id'
                                      ELSE format('(s.model_id::jsonb ->> %s)', k.o - 1) END,
                                 format_type(a.atttypid, a.atttypmod)), ' AND '),
               'jsonb_build_object(' || string_agg(format('%L, %s', k.c,
                                 CASE WHEN cardinality(r.pk_columns) = 1 THEN 's.model_id'
                                      ELSE format('(s.model_id::jsonb ->> %s)', k.o - 1) END), ', ') || ')'
          INTO keyc, keyo
          FROM unnest(r.pk_columns) WITH ORDINALITY AS k(c, o)
          JOIN pg_attribute a ON a.attrelid = r.rel AND a.attname = k.c;
        -- A row updated but never inserted while registered (created = '', the "unrecorded"
        -- marker: it predates the registration) has no insert this node can vouch for: only
        -- its versioned columns go (as a U); announce() gives it an insert (review rev1 #03).
        IF coalesce(after_model_id, '') = '' OR r.model <> after_model THEN
            PERFORM 1 FROM pg_sync.row_state s WHERE s.model = r.model AND s.created = '' LIMIT 1;
            IF FOUND THEN
                RAISE WARNING 'model "%" holds rows that predate its registration: a joining peer gets only their updated columns', r.model
                    USING HINT = format('Run SELECT pg_sync.announce(%L) on this node.', r.model);
            END IF;
        END IF;
        RETURN QUERY EXECUTE format(
            'WITH s AS (SELECT * FROM pg_sync.row_state s
                      WHERE s.model OPERATOR(pg_catalog.=) $1 AND s.model_id OPERATOR(pg_catalog.>) $2
                        AND (s.created IS NOT NULL OR s.deleted IS NOT NULL OR s.versions OPERATOR(pg_catalog.<>) ''{}'')
                      ORDER BY s.model_id LIMIT $3),
                  o AS (SELECT pg_catalog.jsonb_object_agg(x OPERATOR(pg_catalog.->>) ''id'', x) AS m
                          FROM pg_catalog.jsonb_array_elements(
                                 pg_sync.owner_rows($1, ARRAY(SELECT s.model_id::pg_catalog.text FROM s), NULL, NULL, false)) x)
             SELECT s.model::text, s.model_id::text,
                    pg_catalog.jsonb_path_query_array(pg_catalog.jsonb_build_array(
                      CASE WHEN s.deleted IS NOT NULL THEN pg_catalog.jsonb_build_object(
                        ''model'', s.model, ''model_id'', s.model_id, ''action'', ''D'', ''data'', %3$s,
                        ''version'', s.deleted, ''origin'', pg_catalog.split_part(s.deleted, ''@'', 2)) END,
                      CASE WHEN NULLIF(s.created, '''') IS NOT NULL AND (t.data IS NOT NULL OR s.deleted IS NOT NULL)
                      THEN pg_catalog.jsonb_build_object(
                        ''model'', s.model, ''model_id'', s.model_id, ''action'', ''I'',
                        ''data'', coalesce(t.data, %3$s), ''version'', s.created,
                        ''versions'', CASE WHEN t.data IS NOT NULL AND s.versions OPERATOR(pg_catalog.<>) ''{}'' THEN s.versions END,
                        ''origin'', pg_catalog.split_part(s.created, ''@'', 2), ''group_id'', t.grp) END,
                      CASE WHEN (t.data IS NULL AND s.pending IS NOT NULL AND s.pending OPERATOR(pg_catalog.<>) ''{}'')
                             OR (t.data IS NOT NULL AND NULLIF(s.created, '''') IS NULL AND s.versions OPERATOR(pg_catalog.<>) ''{}'') THEN
                        (SELECT pg_catalog.jsonb_build_object(
                           ''model'', s.model, ''model_id'', s.model_id, ''action'', ''U'',
                           ''data'', pg_catalog.jsonb_object_agg(v.key, coalesce(t.data, s.pending) OPERATOR(pg_catalog.->) v.key),
                           ''version'', max(v.value COLLATE "C"), ''versions'', pg_catalog.jsonb_object_agg(v.key, v.value),
                           ''origin'', pg_catalog.split_part(max(v.value COLLATE "C"), ''@'', 2), ''group_id'', t.grp)
                           FROM pg_catalog.jsonb_each_text(s.versions) v
                          WHERE coalesce(t.data, s.pending) OPERATOR(pg_catalog.?) v.key
                         HAVING count(*) OPERATOR(pg_catalog.>) 0) END),
                      ''$[*] ? (@ != null)'')
               FROM s
               CROSS JOIN o
               LEFT JOIN LATERAL (
                    SELECT o.m OPERATOR(pg_catalog.->) s.model_id OPERATOR(pg_catalog.->) ''data'' AS data,
                           o.m OPERATOR(pg_catalog.->) s.model_id OPERATOR(pg_catalog.->>) ''grp'' AS grp) t ON true
              ORDER BY s.model_id',
            r.rel, keyc, keyo)
          USING r.model, CASE WHEN r.model = after_model THEN coalesce(after_model_id, '') ELSE '' END,
                lim - got, r.excluded_columns;
        GET DIAGNOSTICS n = ROW_COUNT;
        got := got + n;
    END LOOP;
END
$$;

-- Joining by snapshot, the receiver's part. begin_peer_join records (or resumes) a join of the
-- peer's state: the same epoch and W resume where the last page left off; anything else starts
-- over (rows already merged stay: merging them again is a no-op). Returns where to read next.
CREATE FUNCTION pg_sync.begin_peer_join(peer text, epoch text, w bigint, cursors jsonb DEFAULT '[]')
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers := pg_sync.peer_or_raise(peer);
    j pg_sync.peer_joins;
BEGIN
    IF p.node_id IS NULL THEN
        RAISE EXCEPTION 'peer "%" has no pinned node id', p.name
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'The worker pins it with pg_sync.pin_peer() after authenticating the link.';
    END IF;
    IF epoch IS NULL OR w IS NULL OR w < 0 OR cursors IS NULL OR jsonb_typeof(cursors) <> 'array'
       OR EXISTS (SELECT 1 FROM jsonb_array_elements(cursors) c
                   WHERE jsonb_typeof(c) <> 'object' OR jsonb_typeof(c -> 'node_id') IS DISTINCT FROM 'string'
                      OR jsonb_typeof(c -> 'epoch') IS DISTINCT FROM 'string'
                      OR jsonb_typeof(c -> 'last_sync_id') IS DISTINCT FROM 'number'
                      OR (c ->> 'last_sync_id') !~ '^[0-9]{1,18}$') THEN
        RAISE EXCEPTION 'invalid join: epoch, w >= 0 and a cursors array are required'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass what pg_sync.peer_join_start() answered on the peer.';
    END IF;
    SELECT * INTO j FROM pg_sync.peer_joins k WHERE k.peer_node_id = p.node_id FOR UPDATE;
    IF FOUND AND j.peer_epoch = epoch AND j.w = w THEN
        RETURN jsonb_build_object('after_model', j.after_model, 'after_model_id', j.after_model_id,
                                  'rows', j.rows, 'resumed', true);
    END IF;
    INSERT INTO pg_sync.peer_joins AS k (peer_node_id, peer_epoch, w, cursors)
    VALUES (p.node_id, epoch, w, cursors)
    ON CONFLICT (peer_node_id) DO UPDATE SET
        peer_epoch = EXCLUDED.peer_epoch, w = EXCLUDED.w, cursors = EXCLUDED.cursors, after_model = '',
        after_model_id = '', rows = 0, pages = 0, started_at = now(), updated_at = now();
    INSERT INTO pg_sync.peer_events (peer, event, detail)
    VALUES (p.name, 'bootstrapping', jsonb_build_object('direction', 'in', 'w', w, 'restarted', j.peer_node_id IS NOT NULL));
    RETURN jsonb_build_object('after_model', '', 'after_model_id', '', 'rows', 0, 'resumed', false);
END
$$;

-- Merges one page of the peer's state (rows of peer_snapshot, read after (after_model,
-- after_model_id)) and moves the join past its last row, in one transaction: a kill -9 leaves
-- the page either merged and recorded or neither. A page for another position (a retry after
-- a lost answer) changes nothing. Models this node does not take from the peer are skipped.
-- The tombstone GC horizon is not checked (pg_sync.gc_horizon_check off): a page carries the
-- peer's folded states, not late changes, and the join is what brings this node to them.
CREATE FUNCTION pg_sync.apply_peer_snapshot(peer text, w bigint, after_model text, after_model_id text, page jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET pg_sync.gc_horizon_check = off
AS $$
DECLARE
    p pg_sync.peers := pg_sync.peer_or_raise(peer);
    j pg_sync.peer_joins;
    todo jsonb;
    item jsonb;
    last_row jsonb;
    n_changed bigint := 0;
    parked bigint := 0;
    st text;
    msg text;
BEGIN
    IF page IS NULL OR jsonb_typeof(page) <> 'array' THEN
        RAISE EXCEPTION 'page must be a JSON array' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass the rows of pg_sync.peer_snapshot() (model, model_id, changes).';
    END IF;
    SELECT * INTO j FROM pg_sync.peer_joins k WHERE k.peer_node_id = p.node_id FOR UPDATE;
    IF NOT FOUND OR j.w <> w THEN
        RAISE EXCEPTION 'no join of peer "%" at W %', p.name, w
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Begin it with pg_sync.begin_peer_join().';
    END IF;
    IF j.after_model <> coalesce(after_model, '') OR j.after_model_id <> coalesce(after_model_id, '') THEN
        RETURN jsonb_build_object('status', 'duplicate', 'after_model', j.after_model, 'after_model_id', j.after_model_id);
    END IF;
    SELECT coalesce(jsonb_agg(c ORDER BY o, ci), '[]') INTO todo
      FROM jsonb_array_elements(page) WITH ORDINALITY AS x(e, o),
           jsonb_array_elements(e -> 'changes') WITH ORDINALITY AS y(c, ci)
      JOIN pg_sync.registry g ON g.model = c ->> 'model'
     WHERE g.enabled AND g.federation IN ('pull', 'both') AND (p.models IS NULL OR g.model = ANY (p.models));
    IF jsonb_array_length(todo) > 0 THEN
        BEGIN
            n_changed := pg_sync.apply_remote(todo);
        EXCEPTION WHEN OTHERS THEN
            -- As apply_peer_batch: a transient failure fails the page (the worker retries it);
            -- otherwise row by row, each row's changes in a subtransaction, parking a row that
            -- fails in peer_quarantine (under a negative key of its own: snapshot rows have no
            -- sync id) for retry_quarantined, so one bad row cannot stop the join.
            GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE;
            IF pg_sync.transient_sqlstate(st) THEN
                RAISE;
            END IF;
            n_changed := 0;
            FOR item IN SELECT jsonb_agg(c ORDER BY ci)
                          FROM jsonb_array_elements(todo) WITH ORDINALITY AS y(c, ci)
                         GROUP BY c ->> 'model', c ->> 'model_id'
                         ORDER BY min(ci) LOOP
                BEGIN
                    n_changed := n_changed + pg_sync.apply_remote(item);
                EXCEPTION WHEN OTHERS THEN
                    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
                    IF pg_sync.transient_sqlstate(st) THEN
                        RAISE;
                    END IF;
                    PERFORM pg_sync.quarantine_change(p.node_id, -nextval('pg_sync.snapshot_quarantine_seq'), item, st, msg);
                    parked := parked + 1;
                END;
            END LOOP;
            INSERT INTO pg_sync.peer_events (peer, event, detail)
            VALUES (p.name, 'quarantined', jsonb_build_object('join_w', w, 'count', parked));
        END;
    END IF;
    last_row := page -> -1;
    UPDATE pg_sync.peer_joins k SET
        after_model = coalesce(last_row ->> 'model', k.after_model),
        after_model_id = coalesce(last_row ->> 'model_id', k.after_model_id),
        rows = k.rows + jsonb_array_length(page), pages = k.pages + 1, updated_at = now()
     WHERE k.peer_node_id = p.node_id
    RETURNING * INTO j;
    RETURN jsonb_build_object('status', 'applied', 'after_model', j.after_model, 'after_model_id', j.after_model_id,
                              'rows', jsonb_array_length(page), 'changed', n_changed, 'quarantined', parked);
END
$$;

-- Ends a join: the cursor for the peer becomes W (its epoch); the join's record goes, in the
-- same transaction. Cursors for other nodes are neither created nor raised: the peer's cursor
-- for a node X says how far it looked at X's log, not that its snapshot carried X's changes
-- (models it does not take from X or send here, quarantined changes), so raising ours to it
-- could skip X's changes for good. Receiving them again from X is a no-op merge.
CREATE FUNCTION pg_sync.finish_peer_join(peer text, w bigint) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers := pg_sync.peer_or_raise(peer);
    j pg_sync.peer_joins;
    left_before bigint;
    left_now bigint;
BEGIN
    SELECT * INTO j FROM pg_sync.peer_joins k WHERE k.peer_node_id = p.node_id FOR UPDATE;
    IF NOT FOUND OR j.w <> w THEN
        RAISE EXCEPTION 'no join of peer "%" at W %', p.name, w
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Begin it with pg_sync.begin_peer_join().';
    END IF;
    -- The snapshot goes model by model in name order, so a row can arrive before the row its
    -- foreign key references (children before parents) and be parked. Now that every page is
    -- in, retry the parked rows until a pass frees none: each pass frees at least one more
    -- level of a reference chain. What still fails is really the row's (and stays parked).
    LOOP
        SELECT count(*) INTO left_before FROM pg_sync.peer_quarantine k WHERE k.peer_node_id = p.node_id;
        EXIT WHEN left_before = 0;
        left_now := pg_sync.retry_quarantined(p.name);
        EXIT WHEN left_now >= left_before;
    END LOOP;
    INSERT INTO pg_sync.peer_cursors AS k (peer_node_id, peer_epoch, last_sync_id, state)
    VALUES (p.node_id, j.peer_epoch, j.w, 'joined')
    ON CONFLICT (peer_node_id) DO UPDATE SET
        peer_epoch = EXCLUDED.peer_epoch, last_sync_id = EXCLUDED.last_sync_id, state = 'joined', updated_at = now();
    DELETE FROM pg_sync.peer_joins k WHERE k.peer_node_id = p.node_id;
    INSERT INTO pg_sync.peer_events (peer, event, detail)
    VALUES (p.name, 'joined', jsonb_build_object('direction', 'in', 'w', j.w, 'rows', j.rows, 'pages', j.pages));
    RETURN j.w;
END
$$;

-- Re-bootstraps this node's copy of a peer's state: the next link from the peer joins by
-- snapshot (merging the peer's state into this node's, so writes made here meanwhile stay),
-- then continues from the snapshot's log position. The worker also does this by itself when the
-- peer answers resync_required.
CREATE FUNCTION pg_sync.resync_peer(peer text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers := pg_sync.peer_or_raise(peer);
BEGIN
    IF p.direction = 'push' THEN
        RAISE EXCEPTION 'this node does not receive from peer "%" (direction push)', p.name
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Resync on the peer, which receives from this node.';
    END IF;
    IF p.node_id IS NOT NULL THEN
        INSERT INTO pg_sync.peer_cursors AS k (peer_node_id, state) VALUES (p.node_id, 'resync_required')
        ON CONFLICT (peer_node_id) DO UPDATE SET state = 'resync_required', updated_at = now();
        DELETE FROM pg_sync.peer_joins k WHERE k.peer_node_id = p.node_id;
    END IF;
    -- A new fingerprint for the worker: the running link restarts and joins.
    UPDATE pg_sync.peers q SET updated_at = now() WHERE q.name = p.name;
    INSERT INTO pg_sync.peer_events (peer, event, detail) VALUES (p.name, 'resync', jsonb_build_object('direction', 'in'));
    RETURN true;
END
$$;

-- Tests the connection to a peer, through the worker (the extension does no network I/O):
-- returns the latest result, and unless a request is already pending, asks the worker for a
-- fresh probe (it dials the peer, authenticates as the receiver and hangs up, within about a
-- second of this transaction's commit). A result with checked_at >= requested_at answers the
-- latest request: it tested the peer's configuration as committed before the request (on this
-- node, and on the peer when the request came after the peer's change); otherwise it is older:
-- call again a moment later. The receiver's own link refreshes the result at every connect too
-- (checked_at is when a handshake read its configuration, not when it recorded).
CREATE FUNCTION pg_sync.test_peer(peer text)
RETURNS TABLE (peer_name text, checked_at timestamptz, requested_at timestamptz, reachable boolean,
               auth_ok boolean, node_id text, proto integer, extension_version text,
               worker_version text, rtt_ms double precision, clock_offset_ms double precision,
               models_sent text[], models_taken text[], models_compatible boolean, error text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_sync.peers := pg_sync.peer_or_raise(peer);
    q pg_sync.peer_probes;
BEGIN
    SELECT * INTO q FROM pg_sync.peer_probes k WHERE k.peer = p.name FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO pg_sync.peer_probes AS k (peer, requested_at) VALUES (p.name, now())
        ON CONFLICT ON CONSTRAINT peer_probes_pkey DO NOTHING RETURNING * INTO q;
        IF NOT FOUND THEN
            -- A concurrent first call, or the worker's record_peer_probe, inserted it meanwhile
            -- (this INSERT waited for it to commit): take that row as if it had been there.
            SELECT * INTO q FROM pg_sync.peer_probes k WHERE k.peer = p.name FOR UPDATE;
        END IF;
    END IF;
    IF q.requested_at IS NULL OR q.checked_at >= q.requested_at THEN
        -- Past the recorded result: a handshake may have read (and recorded) after this
        -- transaction's start, before this request and whatever this transaction changed.
        UPDATE pg_sync.peer_probes k SET requested_at = GREATEST(now(), q.checked_at + interval '1 microsecond')
         WHERE k.peer = p.name;
    END IF;
    RETURN QUERY SELECT q.peer, q.checked_at, q.requested_at, q.reachable, q.auth_ok, q.node_id, q.proto,
           q.extension_version, q.worker_version, q.rtt_ms, q.clock_offset_ms, q.models_sent,
           q.models_taken, q.models_compatible, q.error;
END
$$;

-- For the worker: records a probe of peer `peer` (a jsonb of peer_probes' columns; absent ones
-- become NULL). models_taken (what this node takes from the peer) and models_compatible (every
-- model taken is one the peer sends) are computed here. checked_at is when the handshake read
-- the configuration it tested (now() if absent): a result read before a test_peer request must
-- not answer it, however late it is recorded, and never replaces a newer result (a link's
-- handshake and a probe may finish in either order); the link's rtt is updated either way.
-- requested_at, when present, is the request the handshake saw with that configuration: a
-- request committed after it (its requested_at is its transaction's start, and may be older
-- than checked_at) is not answered by this result.
CREATE FUNCTION pg_sync.record_peer_probe(peer text, result jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p       pg_sync.peers := pg_sync.peer_or_raise(peer);
    taken   text[];
    sent    text[];
    checked timestamptz := coalesce((result ->> 'checked_at')::timestamptz, now());
    asked   timestamptz;
BEGIN
    IF result ? 'requested_at' THEN
        -- Waits for a test_peer call in progress: then its request is the one compared.
        SELECT q.requested_at INTO asked FROM pg_sync.peer_probes q WHERE q.peer = p.name FOR UPDATE;
        IF asked IS DISTINCT FROM (result ->> 'requested_at')::timestamptz AND asked <= checked THEN
            checked := asked - interval '1 microsecond';
        END IF;
    END IF;
    SELECT coalesce(array_agg(r.model ORDER BY r.model), '{}') INTO taken FROM pg_sync.registry r
     WHERE r.enabled AND r.federation IN ('pull', 'both') AND (p.models IS NULL OR r.model = ANY (p.models));
    IF jsonb_typeof(result -> 'models_sent') = 'array' THEN
        sent := ARRAY(SELECT jsonb_array_elements_text(result -> 'models_sent'));
    END IF;
    INSERT INTO pg_sync.peer_probes AS q (peer, checked_at, reachable, auth_ok, node_id, proto, extension_version,
                                          worker_version, rtt_ms, clock_offset_ms, models_sent, models_taken,
                                          models_compatible, error)
    VALUES (p.name, checked, (result ->> 'reachable')::boolean, (result ->> 'auth_ok')::boolean, result ->> 'node_id',
            (result ->> 'proto')::integer, result ->> 'extension_version', result ->> 'worker_version',
            (result ->> 'rtt_ms')::double precision, (result ->> 'clock_offset_ms')::double precision,
            sent, taken, CASE WHEN sent IS NOT NULL THEN taken <@ sent END, result ->> 'error')
    ON CONFLICT ON CONSTRAINT peer_probes_pkey DO UPDATE SET
        checked_at = EXCLUDED.checked_at, reachable = EXCLUDED.reachable, auth_ok = EXCLUDED.auth_ok,
        node_id = EXCLUDED.node_id, proto = EXCLUDED.proto, extension_version = EXCLUDED.extension_version,
        worker_version = EXCLUDED.worker_version, rtt_ms = EXCLUDED.rtt_ms,
        clock_offset_ms = EXCLUDED.clock_offset_ms, models_sent = EXCLUDED.models_sent,
        models_taken = EXCLUDED.models_taken, models_compatible = EXCLUDED.models_compatible,
        error = EXCLUDED.error
    WHERE q.checked_at IS NULL OR q.checked_at <= EXCLUDED.checked_at;
    IF (result ->> 'rtt_ms') IS NOT NULL THEN
        UPDATE pg_sync.peer_links l SET rtt_ms = (result ->> 'rtt_ms')::double precision,
               clock_offset_ms = (result ->> 'clock_offset_ms')::double precision
         WHERE l.peer = p.name AND l.direction = 'in';
    END IF;
END
$$;

-- Where a batch that starts after `after` and covers at least `span` sync ids ends: at the end
-- of the source transaction holding sync id after + span (never inside one), at most the last
-- sequenced sync id. The worker pulls peer_changes(node, after, batch_end - after) and applies
-- it as the batch (after, batch_end], so no source transaction is split.
CREATE FUNCTION pg_sync.batch_end(after bigint, span integer DEFAULT 1000) RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT LEAST(pg_sync.last_sync_id(), coalesce(
        (SELECT c.first_sync_id + c.action_count - 1 FROM pg_sync.commit_order c
          WHERE c.first_sync_id <= after + GREATEST(span, 1)
            AND c.first_sync_id + c.action_count - 1 >= after + GREATEST(span, 1)),
        after + GREATEST(span, 1)))
$$;

-- Administration and the worker's functions: not for PUBLIC. Kept for PUBLIC: warn_sequence_key
-- (register_table, which table owners may be granted, calls it; it reads catalogs and warns),
-- and peer_retention_hold (compact, which the worker's role is granted, calls it; it reads
-- tables only pgsync_owner may read).
REVOKE ALL ON FUNCTION pg_sync.epoch() FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.record_federation_mode() FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.require_explicit_node_id() FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.model_id_expr(pg_sync.registry) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.unannounced(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.announce(text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.check_peer_models(text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.add_peer(text, text, text, text, text[], text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.peer_or_raise(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.set_peer(text, boolean, text, text, text, text[], boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.remove_peer(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.pin_peer(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.peers() FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.clear_peer_events(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.transient_sqlstate(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.quarantine_change(text, bigint, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.apply_peer_batch(text, text, bigint, bigint, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.retry_quarantined(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.peer_changes(text, bigint, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.batch_end(bigint, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.peer_ack(text, bigint, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.release_lagging_peers(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.peer_join_start(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.peer_snapshot(text, text, text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.begin_peer_join(text, text, bigint, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.apply_peer_snapshot(text, bigint, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.finish_peer_join(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.resync_peer(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.test_peer(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_sync.record_peer_probe(text, jsonb) FROM PUBLIC;
