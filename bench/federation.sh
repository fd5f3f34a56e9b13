#!/usr/bin/env bash
# Federation against its baselines, side by side in one run (issue 10, "Measured"): two private
# clusters A and B on loopback, each database pair replicated three ways:
#   fed   pg_sync + a sync_worker per node, peered both ways (B's `fed2` is a third node `c`
#         that pulls from A, for the 2-peer cost);
#   pgl   pglogical 2.4, subscriptions both ways (forward_origins '{}'; B's `pgl2` subscribes
#         to A too);
#   nat   native one-way logical replication, A → B (B's `nat2` subscribes too).
# Measured, FED_RUNS times each, the systems interleaved within a run:
#   catch-up  a FED_ROWS backlog on A (transactions of 1000 rows) written while B's receiver is
#             stopped; time from starting it until the backlog's last row is in B's table;
#   delay     pgbench writes probe rows at FED_RATES writes/s for FED_PROBE_SECONDS on A; an
#             ALWAYS trigger on B's probe table stamps each applied row (one machine, one clock);
#             p50/p99 of applied - written;
#   cost      unthrottled pgbench inserts on A for FED_COST_SECONDS with 0, 1, 2 receivers
#             attached: tps and WAL bytes per row.
#   client    (pg_sync only) write-to-client delay across regions: pgbench
#             writes rows carrying the writer's clock (ts, unix ms) on A at each of FED_RATES for
#             FED_PROBE_SECONDS; one WebSocket client (bench's fanout_load) subscribed to B's
#             worker measures receive time - ts (one machine, one clock), until 30 s after the
#             writes end: p50/p99.
# FED_PHASES (default "catchup delay client cost") picks the measurements. FED_WORKER runs another
# sync_worker binary (default target/release/sync_worker). FED_APPLY_COMPARE=1 adds
# `fedold` to the catch-up: pg_sync with B's apply change by change (pg_sync.set_apply = off on
# B's database: main's per-change apply path, in the same build), alternated with `fed` (the
# set-based apply) within each run, first one then the other.
# pglogical comes from the Debian package postgresql-15-pglogical: installed when root and the
# package is missing (as scripts/deps.sh does), and copied into $PG_CONFIG's Postgres when that
# is another (relocated) copy; without root the .deb is fetched with `apt-get download`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/cluster.sh"
worker=${FED_WORKER:-$here/target/release/sync_worker}
rows=${FED_ROWS:-200000}
runs=${FED_RUNS:-3}
rates=${FED_RATES:-"500 2000"}
probe_s=${FED_PROBE_SECONDS:-15}
cost_s=${FED_COST_SECONDS:-10}
systems=${FED_SYSTEMS:-"fed pgl nat"}
phases=${FED_PHASES:-"catchup delay client cost"}

# --- pglogical ------------------------------------------------------------------------------
ensure_pglogical() {
  local lib share src
  lib=$("$PG_CONFIG" --pkglibdir)
  share=$("$PG_CONFIG" --sharedir)/extension
  [ -f "$lib/pglogical.so" ] && [ -f "$share/pglogical.control" ] && return 0
  src=/
  if ! dpkg -s postgresql-15-pglogical >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && [ "$lib" = /usr/lib/postgresql/15/lib ]; then
      echo "federation: installing postgresql-15-pglogical"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15-pglogical >/dev/null
    else
      # A relocated Postgres (or no root): unpack the package beside the bench instead.
      src=${XDG_CACHE_HOME:-$HOME/.cache}/pg_sync_bench/pglogical
      if [ ! -f "$src/usr/lib/postgresql/15/lib/pglogical.so" ]; then
        mkdir -p "$src"
        (cd "$src" && apt-get download postgresql-15-pglogical >/dev/null 2>&1 &&
          dpkg-deb -x postgresql-15-pglogical_*.deb .)
      fi
    fi
  fi
  [ "$lib" = /usr/lib/postgresql/15/lib ] && [ "$src" = / ] && return 0
  cp "$src"/usr/lib/postgresql/15/lib/pglogical*.so "$lib/"
  cp "$src"/usr/share/postgresql/15/extension/pglogical* "$share/"
}

# --- clusters and workers -------------------------------------------------------------------
work=$(mktemp -d /tmp/pg_sync_federation.XXXXXX)
chmod 755 "$work"
pa=$(free_port) pb=$(free_port)
declare -A wport wpid
for n in a b c; do wport[$n]=$(free_port); done
load_pid=

cleanup() {
  local rc=$?
  trap '' INT TERM # a second signal must not cut the clean-up short
  set +e           # nor a worker that already exited
  if [ "$rc" != 0 ]; then # say why
    for f in "$work"/a/postgres.log "$work"/b/postgres.log "$work"/worker_*.log; do
      [ -f "$f" ] && { echo "== $f"; grep -E "ERROR|FATAL|PANIC|error" "$f" | tail -5; }
    done >&2
  fi
  for n in a b c; do [ -n "${wpid[$n]:-}" ] && kill "${wpid[$n]}" 2>/dev/null; done
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null
  cluster_stop "$work/a" immediate
  cluster_stop "$work/b" immediate
  [ -n "${FED_KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
# A signal (e.g. `timeout`) exits through the EXIT trap too, so no worker or cluster outlives us.
trap "exit 143" INT TERM

ensure_pglogical
fanout=${FED_FANOUT:-$here/target/release/fanout_load}
if [[ " $phases " == *" client "* ]]; then
  [ -x "$fanout" ] || cargo build --release -q -p pg_sync_bench
fi
conf=("fsync = off" "shared_preload_libraries = 'pg_sync,pglogical'" "max_replication_slots = 20"
  "max_wal_senders = 20" "max_worker_processes = 40" "track_commit_timestamp = on"
  "output_plugin_libraries = 'pgoutput, test_decoding, pglogical_output'")
cluster_init "$work/a" "$pa" "${conf[@]}"
cluster_init "$work/b" "$pb" "${conf[@]}"
cluster_start "$work/a"
cluster_start "$work/b"

psql_at() { # psql_at PORT DB [psql args...]
  local p=$1 d=$2; shift 2
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$p" -U postgres -d "$d" "$@"
}
qa() { psql_at "$pa" "$@"; }
qb() { psql_at "$pb" "$@"; }
val() { local p=$1 d=$2; shift 2; psql_at "$p" "$d" -At -c "$*"; }
dsn() { echo "host=127.0.0.1 port=$1 dbname=$2 user=postgres"; }
now() { date +%s.%N; }

# wait_for SECONDS WHAT CMD...: until CMD prints t.
wait_for() {
  local limit=$1 what=$2 t0
  shift 2
  t0=$(now)
  until [ "$("$@" 2>/dev/null)" = t ]; do
    if (($(echo "$(now) - $t0 > $limit" | bc))); then
      echo "federation: timed out after ${limit}s waiting for $what" >&2
      exit 1
    fi
    sleep 0.05
  done
}

schema="CREATE TABLE items (id text PRIMARY KEY, a text, b int, grp text);
CREATE TABLE probe (id text PRIMARY KEY, written_at timestamptz NOT NULL, grp text);"
# Receivers stamp each probe row as it is applied, into a table nothing replicates. ALWAYS:
# pglogical and native apply workers run with session_replication_role = replica (and an
# empty search_path).
stamp="CREATE TABLE probe_applied (id text PRIMARY KEY, written_at timestamptz, applied_at timestamptz);
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql SET search_path = public AS \$\$
BEGIN INSERT INTO probe_applied VALUES (NEW.id, NEW.written_at, clock_timestamp()); RETURN NULL; END \$\$;
CREATE TRIGGER stamp AFTER INSERT ON probe FOR EACH ROW EXECUTE FUNCTION stamp();
ALTER TABLE probe ENABLE ALWAYS TRIGGER stamp;"

for db in fed pgl nat; do qa postgres -c "CREATE DATABASE $db"; done
for db in fed fed2 pgl pgl2 nat nat2; do qb postgres -c "CREATE DATABASE $db"; done
qa postgres -c "ALTER DATABASE fed SET pg_sync.node_id = 'a'"
qb postgres -c "ALTER DATABASE fed SET pg_sync.node_id = 'b'" -c "ALTER DATABASE fed2 SET pg_sync.node_id = 'c'"
secret=federation-bench-secret
reg="SELECT pg_sync.register_table('items', group_column => 'grp');
     SELECT pg_sync.register_table('probe', group_column => 'grp');
     CREATE TABLE events (id text PRIMARY KEY DEFAULT gen_random_uuid()::text, grp text, ts double precision);
     SELECT pg_sync.register_table('events', group_column => 'grp');
     INSERT INTO pg_sync.group_memberships (user_id, group_id) VALUES ('u0', 'g0');"
qa fed -c "CREATE EXTENSION pg_sync" -c "$schema" -c "$reg" >/dev/null
for db in fed fed2; do qb "$db" -c "CREATE EXTENSION pg_sync" -c "$schema" -c "$reg" -c "$stamp" >/dev/null; done
qa fed -c "SELECT pg_sync.add_peer('b', 'ws://127.0.0.1:${wport[b]}', '$secret')" \
  -c "SELECT pg_sync.add_peer('c', 'ws://127.0.0.1:1', '$secret', direction => 'push')" >/dev/null
qb fed -c "SELECT pg_sync.add_peer('a', 'ws://127.0.0.1:${wport[a]}', '$secret')" >/dev/null
qb fed2 -c "SELECT pg_sync.add_peer('a', 'ws://127.0.0.1:${wport[a]}', '$secret', direction => 'pull')" >/dev/null

start_worker() { # start_worker NODE PORT DB
  env DATABASE_URL="$(dsn "$2" "$3")" SYNC_LISTEN="127.0.0.1:${wport[$1]}" SYNC_JWT_SECRET=bench SYNC_SLOT="pg_sync_$1" \
    RUST_LOG=warn "$worker" >>"$work/worker_$1.log" 2>&1 &
  wpid[$1]=$!
  until curl -fsS "http://127.0.0.1:${wport[$1]}/healthz" >/dev/null 2>&1; do sleep 0.05; done
}
stop_worker() {
  kill "${wpid[$1]}" 2>/dev/null || true
  wait "${wpid[$1]}" 2>/dev/null || true
  wpid[$1]=
}
fed_port() { case $1 in a) echo "$pa" ;; *) echo "$pb" ;; esac; }
fed_db() { case $1 in c) echo fed2 ;; *) echo fed ;; esac; }
cursor_exists() { val "$(fed_port "$1")" "$(fed_db "$1")" "SELECT count(*) = 1 FROM pg_sync.peer_cursors WHERE peer_node_id = '$2'"; }
start_worker a "$pa" fed
start_worker b "$pb" fed
start_worker c "$pb" fed2
wait_for 60 "b joined a" cursor_exists b a
wait_for 60 "a joined b" cursor_exists a b
wait_for 60 "c joined a" cursor_exists c a
stop_worker c

# pglogical: A ⇄ B, B's pgl2 ← A.
plnode="CREATE EXTENSION pglogical;"
qa pgl -c "$schema" -c "$plnode" -c "SELECT pglogical.create_node('a', '$(dsn "$pa" pgl)')" \
  -c "SELECT pglogical.replication_set_add_table('default', t) FROM unnest(ARRAY['items', 'probe']::regclass[]) t" >/dev/null
qb pgl -c "$schema" -c "$stamp" -c "$plnode" -c "SELECT pglogical.create_node('b', '$(dsn "$pb" pgl)')" \
  -c "SELECT pglogical.replication_set_add_table('default', t) FROM unnest(ARRAY['items', 'probe']::regclass[]) t" >/dev/null
qb pgl2 -c "$schema" -c "$stamp" -c "$plnode" -c "SELECT pglogical.create_node('b2', '$(dsn "$pb" pgl2)')" >/dev/null
plsub() { # plsub PORT DB NAME PROVIDER_DSN
  psql_at "$1" "$2" -c "SELECT pglogical.create_subscription('$3', '$4', synchronize_structure := false,
    synchronize_data := false, forward_origins := '{}')" >/dev/null
}
plsub "$pb" pgl sub_b "$(dsn "$pa" pgl)"
plsub "$pa" pgl sub_a "$(dsn "$pb" pgl)"
plsub "$pb" pgl2 sub_b2 "$(dsn "$pa" pgl)"
plready() { val "$1" "$2" "SELECT status = 'replicating' FROM pglogical.show_subscription_status('$3')"; }
wait_for 60 "pglogical sub_b" plready "$pb" pgl sub_b
wait_for 60 "pglogical sub_a" plready "$pa" pgl sub_a
wait_for 60 "pglogical sub_b2" plready "$pb" pgl2 sub_b2

# Native: A → B, A → B's nat2.
qa nat -c "$schema" -c "CREATE PUBLICATION pub FOR TABLE items, probe" >/dev/null
for db in nat nat2; do
  qb "$db" -c "$schema" -c "$stamp" \
    -c "CREATE SUBSCRIPTION sub_$db CONNECTION '$(dsn "$pa" nat)' PUBLICATION pub WITH (copy_data = false)" >/dev/null 2>&1
done
natready() { val "$pb" "$1" "SELECT count(*) = 1 FROM pg_stat_subscription WHERE subname = 'sub_$1' AND pid IS NOT NULL"; }
wait_for 60 "native sub_nat" natready nat
wait_for 60 "native sub_nat2" natready nat2

# Receivers attached to A (the one in B's database `db` of each system, and the second one).
attach() { # attach SYSTEM WHICH(1|2) on|off
  case "$1:$2:$3" in
    fed:1:on) [ -n "${wpid[b]:-}" ] || start_worker b "$pb" fed ;;
    fed:1:off) stop_worker b ;;
    fed:2:on) [ -n "${wpid[c]:-}" ] || start_worker c "$pb" fed2 ;;
    fed:2:off) stop_worker c ;;
    pgl:1:*) val "$pb" pgl "SELECT pglogical.alter_subscription_$([ "$3" = on ] && echo enable || echo disable)('sub_b', true)" >/dev/null ;;
    pgl:2:*) val "$pb" pgl2 "SELECT pglogical.alter_subscription_$([ "$3" = on ] && echo enable || echo disable)('sub_b2', true)" >/dev/null ;;
    nat:1:*) val "$pb" nat "ALTER SUBSCRIPTION sub_nat $([ "$3" = on ] && echo ENABLE || echo DISABLE)" >/dev/null ;;
    nat:2:*) val "$pb" nat2 "ALTER SUBSCRIPTION sub_nat2 $([ "$3" = on ] && echo ENABLE || echo DISABLE)" >/dev/null ;;
  esac
  att[$1:$2]=$3
  if [ "$3" = off ]; then # until A has no sender for it (a disabled subscription's walsender lingers briefly)
    case "$1:$2" in
      pgl:*) wait_for 30 "pglogical $2 detached" val "$pa" postgres \
        "SELECT count(*) = 0 FROM pg_stat_replication WHERE application_name = '$([ "$2" = 1 ] && echo sub_b || echo sub_b2)'" ;;
      nat:*) wait_for 30 "native $2 detached" val "$pa" postgres \
        "SELECT count(*) = 0 FROM pg_stat_replication WHERE application_name = '$([ "$2" = 1 ] && echo sub_nat || echo sub_nat2)'" ;;
    esac
  fi
}
has_row() { val "$pb" "$1" "SELECT EXISTS (SELECT 1 FROM items WHERE id = '$2')"; }
# settle SYSTEM: a marker row written on A now is in every attached receiver's table.
declare -A att=([fed:1]=on [fed:2]=off [pgl:1]=on [pgl:2]=on [nat:1]=on [nat:2]=on)
marks=0
settle() {
  local key="mark-$((++marks))" db2
  val "$pa" "$1" "INSERT INTO items VALUES ('$key', 'm', 0, 'g0')" >/dev/null
  [ "$1" = fed ] && db2=fed2 || db2=${1}2
  [ "${att[$1:1]}" = on ] && wait_for 1800 "$1 settled" has_row "$1" "$key"
  [ "${att[$1:2]}" = on ] && wait_for 1800 "$1 settled" has_row "$db2" "$key"
  return 0
}
# A's sequencer has assigned sync ids to everything committed so far.
sequenced() { val "$pa" fed "SELECT pg_sync.last_sync_id() >= $1"; }

results="$work/results"
: >"$results"
rec() { echo "$*" >>"$results"; }

catchup() { # catchup SYSTEM RUN
  local sys=$1 r=$2 db=$1 before t0 t1 last
  [ "$sys" = fedold ] && db=fed
  settle "$db"
  attach "$db" 1 off
  # B's worker starts below with new connections: the apply path they use.
  [ "$db" = fed ] && val "$pb" postgres "ALTER DATABASE fed $([ "$sys" = fedold ] &&
    echo "SET pg_sync.set_apply = off" || echo "RESET pg_sync.set_apply")" >/dev/null
  [ "$db" = fed ] && before=$(val "$pa" fed "SELECT pg_sync.last_sync_id()")
  last="r$r-$sys-k$rows"
  for ((t = 0; t < rows / 1000; t++)); do
    echo "INSERT INTO items SELECT 'r$r-$sys-k' || g, md5(g::text), g, 'g' || (g % 50) FROM generate_series($((t * 1000 + 1)), $((t * 1000 + 1000))) g;"
  done | qa "$db" >/dev/null
  [ "$db" = fed ] && wait_for 600 "a sequenced the backlog" sequenced $((before + rows))
  t0=$(now)
  attach "$db" 1 on
  wait_for 1800 "$sys catch-up" has_row "$db" "$last"
  t1=$(now)
  if [ "$sys" = fedold ]; then # back to the set-based apply for what follows
    val "$pb" postgres "ALTER DATABASE fed RESET pg_sync.set_apply" >/dev/null
    attach fed 1 off
    attach fed 1 on
  fi
  rec catchup "$sys" "$r" "$(echo "$rows / ($t1 - $t0)" | bc -l)"
  printf 'run %d %-4s catch-up %d rows: %.2f s (%.0f rows/s)\n' "$r" "$sys" "$rows" \
    "$(echo "$t1 - $t0" | bc)" "$(echo "$rows / ($t1 - $t0)" | bc -l)"
}

probe_script="$work/probe.sql"
echo "INSERT INTO probe VALUES (gen_random_uuid()::text, clock_timestamp(), 'p');" >"$probe_script"
chmod 644 "$probe_script"
drained() { val "$pb" "$1" "SELECT count(*) >= $2 FROM probe_applied"; }

# B's apply of A's link so far, from B's /metrics: "seconds applying, batches applied".
apply_stats() {
  curl -fsS "http://127.0.0.1:${wport[b]}/metrics" |
    awk '/^pg_sync_peer_apply_seconds_sum\{direction="in",peer="a"\}/ {s = $2}
         /^pg_sync_peer_apply_seconds_count\{direction="in",peer="a"\}/ {c = $2}
         END {print s + 0, c + 0}'
}

delay() { # delay SYSTEM RUN RATE
  local sys=$1 r=$2 rate=$3 before after n out s0 c0 s1 c1 t_start t_end
  settle "$sys"
  [ "$sys" = fed ] && read -r s0 c0 < <(apply_stats)
  t_start=$(now)
  val "$pb" "$sys" "TRUNCATE probe_applied" >/dev/null
  before=$(val "$pa" "$sys" "SELECT count(*) FROM probe")
  out=$("$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$pa" -U postgres -c 4 -j 2 -R "$rate" -T "$probe_s" \
    -f "$probe_script" "$sys" 2>&1)
  after=$(val "$pa" "$sys" "SELECT count(*) FROM probe")
  n=$((after - before))
  # A receiver that cannot keep up is reported with what arrived (and how much did not).
  local t0 missing
  t0=$(now)
  until [ "$(drained "$sys" "$n")" = t ] || (($(echo "$(now) - $t0 > 120" | bc))); do sleep 0.1; done
  t_end=$(now)
  missing=$((n - $(val "$pb" "$sys" "SELECT count(*) FROM probe_applied")))
  [ "$missing" -gt 0 ] && echo "run $r $sys: $missing of $n probes not applied 120 s after the writes ended" >&2
  read -r p50 p99 < <(val "$pb" "$sys" "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY d)::numeric, 2),
    round(percentile_cont(0.99) WITHIN GROUP (ORDER BY d)::numeric, 2)
    FROM (SELECT extract(epoch FROM applied_at - written_at) * 1000 AS d FROM probe_applied) x" | tr '|' ' ')
  rec delay "$sys" "$r" "$rate" "$p50" "$p99" "$(echo "$n / $probe_s" | bc -l)"
  printf 'run %d %-4s delay at %d/s (achieved %.0f/s): p50 %s ms, p99 %s ms\n' "$r" "$sys" "$rate" \
    "$(echo "$n / $probe_s" | bc -l)" "$p50" "$p99"
  if [ "$sys" = fed ]; then
    # Where the delay goes on B: batches applied over the writes and the drain, their mean
    # apply time, and the share of that time B's receiver spent applying (near 100%: the
    # receiver is the bottleneck and the delay is queueing in front of it).
    read -r s1 c1 < <(apply_stats)
    awk -v s="$(echo "$s1 - $s0" | bc -l)" -v c="$(echo "$c1 - $c0" | bc -l)" -v n="$n" \
      -v w="$(echo "$t_end - $t_start" | bc -l)" -v r="$r" -v rate="$rate" \
      'BEGIN {if (c > 0) printf "run %d fed  apply at %d/s: %d batches, %.1f probes and %.2f ms each, receiver busy applying %.0f%% of %.1f s\n", r, rate, c, n / c, s * 1000 / c, s * 100 / w, w}'
  fi
}

cost_script="$work/cost.sql"
echo "INSERT INTO items VALUES (gen_random_uuid()::text, 'x', 1, 'g1');" >"$cost_script"
chmod 644 "$cost_script"
cost() { # cost SYSTEM RUN PEERS
  local sys=$1 r=$2 k=$3 l0 l1 n0 n1 tps walrow
  case $k in
    0) attach "$sys" 1 off; attach "$sys" 2 off ;;
    1) attach "$sys" 1 on; attach "$sys" 2 off ;;
    2) attach "$sys" 1 on; attach "$sys" 2 on ;;
  esac
  settle "$sys"
  n0=$(val "$pa" "$sys" "SELECT count(*) FROM items")
  l0=$(val "$pa" "$sys" "SELECT pg_current_wal_lsn()")
  tps=$("$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$pa" -U postgres -c 2 -j 2 -T "$cost_s" \
    -f "$cost_script" "$sys" 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  l1=$(val "$pa" "$sys" "SELECT pg_current_wal_lsn()")
  n1=$(val "$pa" "$sys" "SELECT count(*) FROM items")
  walrow=$(val "$pa" "$sys" "SELECT round(pg_wal_lsn_diff('$l1', '$l0') / greatest($n1 - $n0, 1))")
  rec cost "$sys" "$r" "$k" "$tps" "$walrow"
  printf 'run %d %-4s cost with %d peer(s): %.0f tps, %s WAL bytes/row\n' "$r" "$sys" "$k" "$tps" "$walrow"
}

events_script="$work/events.sql"
echo "INSERT INTO events (grp, ts) VALUES ('g0', extract(epoch FROM clock_timestamp()) * 1000);" >"$events_script"
chmod 644 "$events_script"
client() { # client RUN RATE: write on A, one WebSocket client on B's worker (pg_sync only)
  local r=$1 rate=$2 after out n
  settle fed
  after=$(val "$pb" fed "SELECT pg_sync.last_sync_id()")
  rm -f "$work/go"; mkfifo "$work/go"
  # The client keeps measuring 30 s past the writes: a lagging receiver's tail is counted.
  "$fanout" "${wport[b]}" bench 1 "$((probe_s + 30))" "$after" <"$work/go" >"$work/client.out" &
  load_pid=$!
  exec 3>"$work/go"
  until grep -q READY "$work/client.out"; do sleep 0.1; done
  echo go >&3
  out=$("$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$pa" -U postgres -c 4 -j 2 -R "$rate" -T "$probe_s" \
    -f "$events_script" fed 2>&1)
  n=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
  wait "$load_pid" || true
  load_pid=
  exec 3>&-
  read -r p50 p99 got < <(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print("%.1f %.1f %d" % (j["p50_ms"], j["p99_ms"], j["deliveries"]))' \
    "$(grep '^{' "$work/client.out")")
  rec client fed "$r" "$rate" "$p50" "$p99" "$(echo "${n:-0} / $probe_s" | bc -l)"
  printf 'run %d fed  write-to-client A->B at %d/s (achieved %.0f/s, %d of %d delivered): p50 %s ms, p99 %s ms\n' \
    "$r" "$rate" "$(echo "${n:-0} / $probe_s" | bc -l)" "$got" "${n:-0}" "$p50" "$p99"
}

has_phase() { [[ " $phases " == *" $1 "* ]]; }
for ((r = 1; r <= runs; r++)); do
  if has_phase catchup; then
    catch=$systems
    if [ -n "${FED_APPLY_COMPARE:-}" ]; then # fed and fedold alternate which goes first
      if ((r % 2)); then catch=${catch/fed/fedold fed}; else catch=${catch/fed/fed fedold}; fi
    fi
    for sys in $catch; do catchup "$sys" "$r"; done
  fi
  if has_phase delay; then
    for rate in $rates; do
      for sys in $systems; do delay "$sys" "$r" "$rate"; done
    done
  fi
  if has_phase client; then
    for rate in $rates; do client "$r" "$rate"; done
  fi
  if has_phase cost; then
    for k in 0 1 2; do
      for sys in $systems; do cost "$sys" "$r" "$k"; done
    done
  fi
  for sys in $systems; do attach "$sys" 1 on; attach "$sys" 2 off; done
done

# Summary: min / median / max over the runs, and ratios of medians against pglogical.
echo
python3 - "$results" <<'PY'
import statistics, sys
from collections import defaultdict
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
d = defaultdict(list)
for r in rows:
    if r[0] == "catchup": d[("catchup", r[1])].append(float(r[3]))
    if r[0] == "delay":
        d[("p50", r[1], r[3])].append(float(r[4])); d[("p99", r[1], r[3])].append(float(r[5]))
        d[("achieved", r[1], r[3])].append(float(r[6]))
    if r[0] == "cost":
        d[("tps", r[1], r[3])].append(float(r[4])); d[("wal", r[1], r[3])].append(float(r[5]))
    if r[0] == "client":
        d[("c50", r[3])].append(float(r[4])); d[("c99", r[3])].append(float(r[5]))
        d[("cach", r[3])].append(float(r[6]))
def mmm(k):
    v = sorted(d.get(k, []))
    return (v[0], statistics.median(v), v[-1]) if v else None
def fmt(k, f="%.0f"):
    m = mmm(k)
    return "n/a" if m is None else " / ".join(f % x for x in m)
def ratio(a, b):
    x, y = mmm(a), mmm(b)
    return "n/a" if not x or not y or y[1] == 0 else "%.2fx" % (x[1] / y[1])
systems = [s for s in ("fedold", "fed", "pgl", "nat") if ("catchup", s) in d or ("tps", s, "0") in d
           or any(k[0] == "p99" and k[1] == s for k in d)]
name = {"fedold": "pg_sync change by change", "fed": "pg_sync", "pgl": "pglogical", "nat": "native"}
print("| catch-up (rows/s, min / median / max) | " + " | ".join(name[s] for s in systems) + " | pg_sync / pglogical |"
      + (" pg_sync / change by change |" if "fedold" in systems else ""))
print("|---" * (len(systems) + 2 + ("fedold" in systems)) + "|")
print("| rows/s | " + " | ".join(fmt(("catchup", s)) for s in systems) + " | " + ratio(("catchup", "fed"), ("catchup", "pgl")) + " |"
      + (" " + ratio(("catchup", "fed"), ("catchup", "fedold")) + " |" if "fedold" in systems else ""))
systems = [s for s in systems if s != "fedold"]
rates = sorted({k[2] for k in d if k[0] == "p99"}, key=int)
print()
print("| write-to-apply delay (ms, min / median / max) | " + " | ".join(name[s] for s in systems) + " | pg_sync / pglogical (median) |")
print("|---" * (len(systems) + 2) + "|")
for rate in rates:
    for p in ("p50", "p99"):
        print(f"| {p} at {rate}/s | " + " | ".join(fmt((p, s, rate), "%.1f") for s in systems) + " | " + ratio((p, "fed", rate), (p, "pgl", rate)) + " |")
    print(f"| achieved writes/s at {rate}/s | " + " | ".join(fmt(("achieved", s, rate)) for s in systems) + " | |")
print()
print("| cost on A (min / median / max) | " + " | ".join(name[s] for s in systems) + " |")
print("|---" * (len(systems) + 1) + "|")
for k in ("0", "1", "2"):
    print(f"| tps, {k} peer(s) | " + " | ".join(fmt(("tps", s, k)) for s in systems) + " |")
for k in ("1", "2"):
    print(f"| tps ratio {k} / 0 peers (medians) | " + " | ".join(ratio(("tps", s, k), ("tps", s, "0")) for s in systems) + " |")
for k in ("0", "1", "2"):
    print(f"| WAL bytes/row, {k} peer(s) | " + " | ".join(fmt(("wal", s, k)) for s in systems) + " |")
crates = sorted({k[1] for k in d if k[0] == "c99"}, key=int)
if crates:
    print()
    print("| write-to-client, write on A, WebSocket client on B (min / median / max) | p50 ms | p99 ms | achieved writes/s |")
    print("|---|---|---|---|")
    for rate in crates:
        print(f"| {rate} writes/s | " + fmt(("c50", rate), "%.1f") + " | " + fmt(("c99", rate), "%.1f") + " | " + fmt(("cach", rate)) + " |")
PY
