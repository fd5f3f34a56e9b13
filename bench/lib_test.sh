#!/usr/bin/env bash
# Checks bench/lib.sh's cleanup (no Postgres needed: cluster_stop is stubbed): under `set -e`,
# with helpers that already exited (a load generator waited for, a dead worker, a
# pg_recvlogical that failed), every exit path still stops the cluster and removes the work
# directory. Usage: bash bench/lib_test.sh (exit 0 when it holds).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
marker=$(mktemp /tmp/pg_sync_lib_test.XXXXXX)
fails=0
for how in "exit 0" "false" "kill -TERM \$\$"; do
  rm -f "$marker"
  work=$(mktemp -d /tmp/pg_sync_lib_test_work.XXXXXX)
  HERE=$here WORK=$work MARKER=$marker HOW=$how bash -c '
    set -euo pipefail
    here=$HERE
    source "$here/bench/lib.sh"
    cluster_stop() { echo stopped >"$MARKER"; }
    work=$WORK
    trap bench_cleanup EXIT
    sleep 0.01 & load_pid=$!; wait "$load_pid"
    sleep 0.01 & recv_pid=$!; wait "$recv_pid" || true
    sleep 0.01 & echo $! >"$work/worker.pid"; wait
    eval "$HOW"
  ' || true
  if [ -s "$marker" ] && [ ! -d "$work" ]; then
    echo "ok: cleanup ran on '$how'"
  else
    echo "FAILED: cleanup did not finish on '$how' (cluster stopped: $([ -s "$marker" ] && echo yes || echo no))"
    fails=1
    rm -rf "$work"
  fi
done
rm -f "$marker"
exit $fails
