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

-- 8. The horizon: a change of a row with no state and no table row, carrying a version at or
-- below the highest version GC dropped, may be a late write whose tombstone is gone (k1 and
-- k2 were collected above). Both paths refuse it (72000) and apply_peer_batch parks it; a new
-- key above the horizon applies, and so does a delete (it only records a tombstone again).
-- retry_quarantined refuses it again until the operator decides (gc_horizon_check off).
CREATE FUNCTION gc_ch(id text, action text, ver text, sid bigint) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_build_object('model', 'gc_t', 'model_id', id, 'action', action, 'version', ver,
                            'origin', 'g1', 'sync_id', sid)
         || CASE WHEN action = 'D' THEN '{}'::jsonb ELSE jsonb_build_object('data', jsonb_build_object('v', 'stale-' || id)) END $$;
CREATE FUNCTION gc_cur() RETURNS bigint LANGUAGE sql AS $$
  SELECT coalesce((SELECT last_sync_id FROM pg_sync.peer_cursors WHERE peer_node_id = 'g1'), 0) $$;
SELECT horizon > '0000000000010000@g1' AS horizon_above_stale FROM pg_sync.tombstone_gc;
SELECT * FROM gc_states() WHERE model_id IN ('k1', 'k2');
SELECT err($$SELECT pg_sync.apply_remote(gc_ch('k1', 'I', '0000000000010000@g1', 1))$$);
SELECT err($$SELECT pg_sync.apply_remote(gc_ch('k1', 'U', '0000000000010000@g1', 1))$$) LIKE '72000:%' AS update_refused;
-- The set path declines such a batch (nothing written) ...
SELECT pg_sync.apply_remote_set(jsonb_build_array(gc_ch('k1', 'I', '0000000000010000@g1', 1))) IS NULL AS set_declined;
-- ... also when a column's version is the stale one.
SELECT pg_sync.apply_remote_set(jsonb_build_array(gc_ch('k1', 'I', split_part(pg_sync.next_version(), '@', 1) || '@g1', 1)
         || '{"versions": {"v": "0000000000010000@g1"}}')) IS NULL AS set_declined_column;
-- Change by change (set_apply off): k1's stale insert parked, k7 (new, above the horizon) and a
-- stale delete of k9 (unknown) applied.
SET pg_sync.set_apply = off;
SELECT pg_sync.apply_peer_batch('g1', 'e1', gc_cur(), gc_cur() + 3, jsonb_build_array(
         gc_ch('k1', 'I', '0000000000010000@g1', gc_cur() + 1),
         gc_ch('k7', 'I', split_part(pg_sync.next_version(), '@', 1) || '@g1', gc_cur() + 2),
         gc_ch('k9', 'D', '0000000000010000@g1', gc_cur() + 3))) - 'cursor' AS per_change;
RESET pg_sync.set_apply;
-- Set-based (the default): k2's stale insert parked, k8 applied.
SELECT pg_sync.apply_peer_batch('g1', 'e1', gc_cur(), gc_cur() + 2, jsonb_build_array(
         gc_ch('k2', 'I', '0000000000010000@g1', gc_cur() + 1),
         gc_ch('k8', 'I', split_part(pg_sync.next_version(), '@', 1) || '@g1', gc_cur() + 2))) - 'cursor' AS set_based;
SELECT * FROM gc_t WHERE id IN ('k1', 'k2', 'k7', 'k8', 'k9') ORDER BY id;
SELECT * FROM gc_states() WHERE model_id IN ('k1', 'k2', 'k7', 'k8', 'k9');
SELECT change ->> 'model_id' AS model_id, sqlstate, message FROM pg_sync.peer_quarantine
 WHERE peer_node_id = 'g1' ORDER BY sync_id;
-- Retried without a decision: refused again.
SELECT pg_sync.retry_quarantined('g1') AS still_parked;
SELECT change ->> 'model_id' AS model_id, attempts FROM pg_sync.peer_quarantine WHERE peer_node_id = 'g1' ORDER BY sync_id;
-- The operator decides the rows should come back.
SET pg_sync.gc_horizon_check = off;
SELECT pg_sync.retry_quarantined('g1') AS left_parked;
RESET pg_sync.gc_horizon_check;
SELECT * FROM gc_t WHERE id IN ('k1', 'k2') ORDER BY id;
SELECT event, detail FROM pg_sync.peer_events WHERE peer = 'g1' AND event IN ('quarantined', 'unquarantined') ORDER BY id;
-- A snapshot join applies the peer's states, not late changes: not checked (k10 is unknown
-- here, its version below the horizon). The check is on again after the page.
SELECT pg_sync.begin_peer_join('g1', 'e2', 9) ->> 'resumed' AS resumed;
SELECT pg_sync.apply_peer_snapshot('g1', 9, '', '', jsonb_build_array(jsonb_build_object(
         'model', 'gc_t', 'model_id', 'k10', 'changes', jsonb_build_array(gc_ch('k10', 'I', '0000000000010000@g1', 0) - 'sync_id'))))
       - 'after_model' - 'after_model_id' AS page;
SHOW pg_sync.gc_horizon_check;
SELECT pg_sync.finish_peer_join('g1', 9) >= 0 AS finished;
SELECT * FROM gc_t WHERE id = 'k10';
SELECT count(*) AS parked FROM pg_sync.peer_quarantine WHERE peer_node_id = 'g1';
SELECT pg_sync.remove_peer('g1');
