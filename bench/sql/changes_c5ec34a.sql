-- pg_sync.changes(after, groups, span) as main c5ec34a defined it (a window over each whole
-- transaction, a sort of the page), for A/B runs (bench/replay.sh REPLAY_SQL): a worker of that
-- version calls this 3-argument form; a newer worker calls the 4-argument one, which stays as is.
CREATE OR REPLACE FUNCTION pg_sync.changes(after bigint, groups text[] DEFAULT NULL, span integer DEFAULT 1000)
RETURNS TABLE (sync_id bigint, id bigint, model text, model_id text, action text, data jsonb,
               version text, versions jsonb, origin text, group_id text, prev_group_id text,
               moved boolean, client_id text, client_tx_id uuid, global boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- The transactions overlapping after+1 .. after+span: from the one holding sync id
    -- after+1 (the last to start at or before it: one index probe) up to after+span. The
    -- lower bound keeps a page's cost independent of how much log lies before it.
    WITH tx AS (
        SELECT c.xid, c.first_sync_id
          FROM pg_sync.commit_order c
         WHERE c.first_sync_id >= coalesce(
                   (SELECT s.first_sync_id FROM pg_sync.commit_order s
                     WHERE s.first_sync_id <= after + 1
                     ORDER BY s.first_sync_id DESC LIMIT 1), 0)
           AND c.first_sync_id <= after + span
           AND c.first_sync_id + c.action_count - 1 > after
    ), numbered AS (
        SELECT tx.first_sync_id + row_number() OVER (PARTITION BY a.xid ORDER BY a.id) - 1 AS sync_id, a.*
          FROM tx JOIN pg_sync.sync_actions a ON a.xid = tx.xid
    )
    SELECT n.sync_id, n.id, n.model, n.model_id, n.action, n.data, n.version, n.versions, n.origin,
           n.group_id, n.prev_group_id, n.moved, n.client_id, n.client_tx_id,
           n.group_id IS NULL
      FROM numbered n
     WHERE n.sync_id > after AND n.sync_id <= after + span
       -- IN (SELECT unnest(...)), not = ANY (groups): inside this function `groups` is a
       -- parameter, and = ANY scans the whole array for every row (a third of a page's time for
       -- a reader of 100 groups); the subquery is hashed once per page.
       AND (groups IS NULL OR n.group_id IS NULL OR n.group_id IN (SELECT unnest(groups))
            OR n.model = '$membership')
     ORDER BY n.sync_id
$$;
