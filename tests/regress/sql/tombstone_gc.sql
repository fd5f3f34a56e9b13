-- Tombstone GC (pg_sync.gc_tombstones): a dead row's state (tombstone, pending values) goes only
-- when every peer this node sends to has acknowledged the row's changes, every receiving link
-- has stayed up and caught up since the previous pass, no join is in progress, and the state
-- is older than min_age. Live rows' states never go. A re-insert after GC is a plain insert.
-- Peers of earlier tests would hold (or block) it: this file starts from none. Earlier tests'
-- tables may hold rows that predate their registration: announced, so add_peer accepts.
SELECT count(pg_sync.remove_peer(name)) >= 0 AS cleared FROM pg_sync.peers;
SELECT count(pg_sync.announce(model)) >= 0 AS announced FROM pg_sync.registry WHERE enabled;
CREATE TABLE gc_t (id text PRIMARY KEY, v text);
SELECT pg_sync.register_table('gc_t', federation => 'both');
-- Sequence the log as the worker's sequencer does (as in federation_holds).
CREATE FUNCTION gc_seq() RETURNS void LANGUAGE sql AS $$
  INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
  SELECT xid, pg_sync.last_sync_id() + 1
              + coalesce(sum(count(*)) OVER (ORDER BY min(id) ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0),
         count(*), '0/0', now()
    FROM pg_sync.sync_actions WHERE xid NOT IN (SELECT xid FROM pg_sync.commit_order) GROUP BY xid $$;
-- This test's rows' states: live, dead (tombstone), pending (values waiting for an insert).
CREATE FUNCTION gc_states() RETURNS TABLE (model_id text, live boolean, tombstone boolean, pending jsonb)
  LANGUAGE sql AS $$
    SELECT s.model_id, s.created IS NOT NULL AND (s.deleted IS NULL OR s.created > s.deleted),
           s.deleted IS NOT NULL, s.pending
      FROM pg_sync.row_state s WHERE s.model = 'gc_t' ORDER BY 1 $$;
-- A pass with no settle time (tests run passes back to back): how many of this test's states
-- it dropped (earlier tests' tombstones may go too), and what held it.
CREATE FUNCTION gc(min_age interval DEFAULT '0') RETURNS TABLE (dropped bigint, held_by text[])
  LANGUAGE plpgsql AS $$
    DECLARE
      before bigint := (SELECT count(*) FROM pg_sync.row_state WHERE model = 'gc_t');
      n bigint := pg_sync.gc_tombstones(min_age, settle => '0');
    BEGIN
      RETURN QUERY SELECT before - (SELECT count(*) FROM pg_sync.row_state WHERE model = 'gc_t'), g.held_by
                     FROM pg_sync.tombstone_gc g;
    END $$;
SELECT gc_seq();
SELECT pg_sync.add_peer('g1', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
SELECT pg_sync.pin_peer('g1', 'g1');
-- g1's receiving link is up and caught up (the worker reports this), and g1 subscribed here.
INSERT INTO pg_sync.peer_links (peer, direction, state, connected_since)
VALUES ('g1', 'in', 'streaming', now() - interval '1 hour');
SELECT pg_sync.peer_ack('g1', pg_sync.last_sync_id(), at_subscribe => true) = pg_sync.last_sync_id() AS subscribed;
-- But no worker runs the links (none holds the federation lock): the row is what a worker
-- that is gone (killed, say) left, so the link counts as down.
SELECT pg_sleep(0.01);
SELECT * FROM gc();
SELECT * FROM gc();
-- From here on this session plays the worker that runs the links.
SELECT pg_sync.try_federation_lock() AS leading;

-- 1. Two rows deleted, one with values pending above its tombstone (a peer's update that came
-- after the delete), one live row updated, one live row untouched.
INSERT INTO gc_t VALUES ('k1', 'a'), ('k2', 'b'), ('k3', 'c'), ('k4', 'd');
UPDATE gc_t SET v = 'dd' WHERE id = 'k4';
DELETE FROM gc_t WHERE id IN ('k1', 'k2');
SELECT pg_sync.apply_remote(jsonb_build_object('model', 'gc_t', 'model_id', 'k2', 'action', 'U',
         'version', split_part(pg_sync.next_version(), '@', 1) || '@g1', 'origin', 'g1', 'data', '{"v": "late"}'::jsonb));
SELECT gc_seq();
SELECT * FROM gc_states();
SELECT pg_sleep(0.01);
-- The first pass only marks; g1 has not acknowledged the deletes: both stay.
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();
-- g1 acknowledges everything. The pass after the ack marks it; the next may collect, but not
-- what is younger than min_age.
SELECT pg_sync.peer_ack('g1', pg_sync.last_sync_id()) = pg_sync.last_sync_id() AS acked;
SELECT * FROM gc();
SELECT * FROM gc('1 hour');
SELECT * FROM gc_states();
-- Old enough: the tombstone and the pending row go; live states stay (k3 never updated, k4 updated).
SELECT * FROM gc();
SELECT * FROM gc_states();
SELECT collected >= 2 AS collected, horizon > '' AS horizon_recorded, last_collected >= 2 AS last_pass FROM pg_sync.tombstone_gc;

-- 2. A delete not yet sequenced (the worker has not given it a sync id) is not acknowledged by
-- anyone: it stays.
DELETE FROM gc_t WHERE id = 'k3';
SELECT pg_sleep(0.01);
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();

-- 3. Acknowledged, but g1's receiving link is down: a write g1 logged before it applied the
-- delete may still be on its way, so the tombstone stays until the link has been up since a pass.
SELECT gc_seq();
SELECT pg_sync.peer_ack('g1', pg_sync.last_sync_id()) = pg_sync.last_sync_id() AS acked;
UPDATE pg_sync.peer_links SET state = 'connecting', connected_since = NULL WHERE peer = 'g1';
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();
-- Reconnected: the pass right after only marks (the link came up after the last mark) ...
UPDATE pg_sync.peer_links SET state = 'streaming', connected_since = now() WHERE peer = 'g1';
SELECT pg_sleep(0.01);
SELECT * FROM gc();
SELECT * FROM gc_states();
-- ... and the next one, the link up since that mark, collects.
SELECT * FROM gc();
SELECT * FROM gc_states();

-- 4. A re-insert after GC is an ordinary insert: live again, logged as an insert.
INSERT INTO gc_t VALUES ('k1', 'again');
SELECT * FROM gc_states();
SELECT action, data FROM pg_sync.sync_actions WHERE model = 'gc_t' AND model_id = 'k1' ORDER BY id DESC LIMIT 1;
SELECT pg_sync.row_version_state('gc_t', 'k1') ->> 'live' AS live;

-- 5. A snapshot join of g1 in progress reads pages later: nothing goes until it ends.
DELETE FROM gc_t WHERE id = 'k1';
SELECT gc_seq();
SELECT pg_sync.peer_join_start('g1') ->> 'resumed' AS resumed;
SELECT pg_sleep(0.01);
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();
-- Its join ends (the next ack): collected.
SELECT pg_sync.peer_ack('g1', pg_sync.last_sync_id()) = pg_sync.last_sync_id() AS acked;
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();

-- 6. A peer released for lagging past the cap (it must resync by snapshot) no longer holds:
-- k4 goes two passes later. A new peer that acknowledged nothing past 0 holds k5; removed, it
-- holds nothing.
DELETE FROM gc_t WHERE id = 'k4';
SELECT gc_seq();
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();
SELECT pg_sync.release_lagging_peers(0) AS released;
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();
INSERT INTO gc_t VALUES ('k5', 'e');
DELETE FROM gc_t WHERE id = 'k5';
SELECT gc_seq();
SELECT pg_sync.add_peer('g2', 'ws://127.0.0.1:2', 'a-secret-of-16-chars');
SELECT pg_sync.pin_peer('g2', 'g2');
SELECT pg_sync.peer_ack('g2', 0, at_subscribe => true);
INSERT INTO pg_sync.peer_links (peer, direction, state, connected_since)
VALUES ('g2', 'in', 'streaming', now() - interval '1 hour');
SELECT pg_sleep(0.01);
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();
SELECT pg_sync.remove_peer('g2');
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();

-- 6b. A disabled peer holds every tombstone (disabling is a pause), also once it has
-- acknowledged everything: a write it logged before it applied the delete may still be on its
-- way. The worker stops a disabled peer's link without reporting it, so the link's row still
-- says streaming, connected since before the mark.
INSERT INTO gc_t VALUES ('k6', 'f');
DELETE FROM gc_t WHERE id = 'k6';
SELECT gc_seq();
SELECT pg_sync.peer_ack('g1', pg_sync.last_sync_id()) = pg_sync.last_sync_id() AS acked;
SELECT pg_sync.set_peer('g1', enabled => false);
SELECT pg_sleep(0.01);
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();
-- Enabled again, its link reconnects: the pass after only marks, the next one collects.
SELECT pg_sync.set_peer('g1', enabled => true);
UPDATE pg_sync.peer_links SET state = 'streaming', connected_since = now() WHERE peer = 'g1';
SELECT pg_sleep(0.01);
SELECT * FROM gc();
SELECT * FROM gc();
SELECT * FROM gc_states();

-- 7. Arguments, and who may call it.
SELECT err($$SELECT pg_sync.gc_tombstones('-1 day')$$);
SELECT has_function_privilege('public', 'pg_sync.gc_tombstones(interval, interval)', 'execute') AS public_may;
SELECT pg_sync.remove_peer('g1');
