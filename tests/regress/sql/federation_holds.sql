-- Retention holds for peers: compaction keeps what a peer this node sends to has not
-- acknowledged; past the cap (release_lagging_peers) the peer stops holding, gets a
-- resync_required event and PS003 from peer_changes until it re-bootstraps and acks past it.
CREATE TABLE hold_t (id text PRIMARY KEY, v text);
SELECT pg_sync.register_table('hold_t', federation => 'both');
SELECT pg_sync.add_peer('h1', 'ws://127.0.0.1:1', 'a-secret-of-16-chars');
SELECT pg_sync.add_peer('h2', 'ws://127.0.0.1:2', 'a-secret-of-16-chars', direction => 'pull');
SELECT pg_sync.pin_peer('h1', 'h1'), pg_sync.pin_peer('h2', 'h2');
-- Ten source transactions, sequenced as the worker's sequencer does.
CREATE FUNCTION hold_seq() RETURNS void LANGUAGE sql AS $$
  INSERT INTO pg_sync.commit_order (xid, first_sync_id, action_count, commit_lsn, committed_at)
  SELECT xid, pg_sync.last_sync_id() + 1
              + coalesce(sum(count(*)) OVER (ORDER BY min(id) ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0),
         count(*), '0/0', now()
    FROM pg_sync.sync_actions WHERE xid NOT IN (SELECT xid FROM pg_sync.commit_order) GROUP BY xid $$;
SELECT hold_seq();  -- what earlier tests left unsequenced
CREATE TABLE hstart AS SELECT pg_sync.last_sync_id() AS s;
DO $$ BEGIN FOR i IN 1..10 LOOP INSERT INTO hold_t VALUES ('k' || i, 'v'); COMMIT; END LOOP; END $$;
SELECT hold_seq();
SELECT pg_sync.last_sync_id() - (SELECT s FROM hstart) AS logged;
-- No acknowledgement yet: nothing is held.
SELECT pg_sync.peer_retention_hold() AS hold;
-- h1 subscribes after 2 (relative), then acks 4: the hold is its ack.
SELECT pg_sync.peer_ack('h1', (SELECT s FROM hstart) + 2, at_subscribe => true) - (SELECT s FROM hstart) AS acked;
SELECT pg_sync.peer_ack('h1', (SELECT s FROM hstart) + 4) - (SELECT s FROM hstart) AS acked;
-- An older ack does not move it back; a subscribe does (the receiver's cursor is what it holds).
SELECT pg_sync.peer_ack('h1', (SELECT s FROM hstart) + 3) - (SELECT s FROM hstart) AS acked;
SELECT pg_sync.peer_retention_hold() - (SELECT s FROM hstart) AS hold;
SELECT regexp_replace(err($$SELECT pg_sync.peer_ack('h1', pg_sync.last_sync_id() + 1)$$), '\y\d+\y', 'N', 'g') AS err;
SELECT err($$SELECT pg_sync.peer_ack('nope', 1)$$);
-- A pull-only peer (this node does not send to it) holds nothing.
SELECT pg_sync.peer_ack('h2', (SELECT s FROM hstart)) - (SELECT s FROM hstart) AS h2_acked;
SELECT pg_sync.peer_retention_hold() - (SELECT s FROM hstart) AS hold;
-- Compaction asked to go to the end stops at the hold: h1 can still read after its ack.
SELECT pg_sync.compact(pg_sync.last_sync_id()) > 0 AS compacted;
SELECT pg_sync.retention_horizon() - (SELECT s FROM hstart) AS horizon;
SELECT count(*) AS h1_gets FROM pg_sync.peer_changes('h1', (SELECT s FROM hstart) + 4, 100);
SELECT pg_sync.compact_to_size(0) AS compacted, pg_sync.retention_horizon() - (SELECT s FROM hstart) AS horizon;
-- A disabled peer still holds (disabling is a pause).
SELECT pg_sync.set_peer('h1', enabled => false);
SELECT pg_sync.peer_retention_hold() - (SELECT s FROM hstart) AS hold;
SELECT pg_sync.set_peer('h1', enabled => true);
-- The cap: 6 behind the end, a cap of 6 keeps it, a cap of 5 releases it (once).
SELECT pg_sync.release_lagging_peers(6) AS released;
SELECT pg_sync.release_lagging_peers(5) AS released;
SELECT pg_sync.release_lagging_peers(5) AS released;
SELECT err($$SELECT pg_sync.release_lagging_peers(-1)$$);
SELECT peer, state, out_hold - (SELECT s FROM hstart) AS out_hold, resync_required FROM pg_sync.peer_status ORDER BY peer;
SELECT event, detail - 'acked' AS detail, (detail ->> 'acked')::bigint - (SELECT s FROM hstart) AS acked
  FROM pg_sync.peer_events WHERE peer = 'h1' AND event = 'resync_required';
-- Released, h1 no longer holds: compaction goes to the end, and h1 is told to resync even from
-- a cursor whose log would still be there.
SELECT pg_sync.peer_retention_hold() AS hold;
SELECT regexp_replace(err($$SELECT * FROM pg_sync.peer_changes('h1', pg_sync.last_sync_id() - 1, 10)$$), '\y\d+\y', 'N', 'g') AS err;
SELECT pg_sync.compact(pg_sync.last_sync_id()) AS compacted;
SELECT pg_sync.retention_horizon() = pg_sync.last_sync_id() AS at_end;
-- After a re-bootstrap h1 subscribes at the log's end (at or past where it was released): the
-- release ends, it holds again and reads on.
INSERT INTO hold_t VALUES ('k11', 'v');
SELECT hold_seq();
SELECT pg_sync.peer_ack('h1', pg_sync.last_sync_id() - 1, at_subscribe => true) = pg_sync.last_sync_id() - 1 AS resumed;
SELECT resync_required FROM pg_sync.peer_status WHERE peer = 'h1';
SELECT event, detail ->> 'direction' AS direction FROM pg_sync.peer_events WHERE peer = 'h1' AND event = 'hold_resumed';
SELECT count(*) AS h1_gets FROM pg_sync.peer_changes('h1', pg_sync.last_sync_id() - 1, 100);
SELECT pg_sync.peer_retention_hold() = pg_sync.last_sync_id() - 1 AS holds_again;
-- Removing a peer drops its hold.
SELECT pg_sync.remove_peer('h1'), pg_sync.remove_peer('h2');
SELECT count(*) AS holds FROM pg_sync.peer_holds;
SELECT pg_sync.unregister_table('hold_t');
DROP TABLE hold_t, hstart;
DROP FUNCTION hold_seq();
