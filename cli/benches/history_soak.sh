#!/bin/bash
# A job history of N ended jobs on a coordinator over a real etcd, and what it costs: submits N
# tiny jobs (no worker: each is cancelled right after its submission, so it ends with a record),
# then prints the coordinator's RSS, restarts it over the same history and prints how long it
# took to be ready and its RSS, then restarts it with --retain-finished and prints the same
# once the history is pruned; last, N more jobs on a coordinator that prunes after 5 s from the
# start (its RSS stays that of a short history). The closing note of issue 11 quotes
# `history_soak.sh 10000`.
# Needs: a build of the CLI (LONGTAKE, default target/release/longtake), etcd; ports 23792/23802
# (etcd) and 50072 (coordinator) free.
set -u
B=${LONGTAKE:-$(dirname "$0")/../../target/release/longtake}
N=${1:-10000}
PARALLEL=${PARALLEL:-4}
D=$(mktemp -d)
URL=http://127.0.0.1:50072
count() { $B list --json "$@" | grep -o '"id":' | wc -l; }
rss() { awk '/VmRSS/ {printf "%.1f MB", $2 / 1024}' /proc/$1/status; }
coordinator() {
  $B serve coordinator --etcd http://127.0.0.1:23792 --listen 127.0.0.1:50072 --artifacts $D/art "$@" \
    > $D/coordinator.out 2>> $D/coordinator.err &
  C=$!
  local start=$(date +%s.%N)
  until grep -q "coordinator listening" $D/coordinator.out 2>/dev/null; do
    kill -0 $C 2>/dev/null || { echo "the coordinator exited:"; cat $D/coordinator.err; exit 1; }
    sleep 0.02
  done
  READY=$(echo "$(date +%s.%N) - $start" | bc)
}
etcd --data-dir $D/etcd --listen-client-urls http://127.0.0.1:23792 --quota-backend-bytes 8589934592 \
  --advertise-client-urls http://127.0.0.1:23792 --listen-peer-urls http://127.0.0.1:23802 > $D/etcd.log 2>&1 &
E=$!; sleep 2
coordinator
echo "fresh coordinator: ready in ${READY} s, RSS $(rss $C)"
export LONGTAKE_COORDINATOR=$URL
one() {
  id=$($B submit --model tiny --prompt "a wolf howling at the moon, take $1" --frames 9 --size 64x64 \
    --steps 2 --name "take $1") && $B cancel "$id" --reason soak > /dev/null
}
export -f one; export B
start=$(date +%s)
seq 1 $N | xargs -P $PARALLEL -I{} bash -c 'one {}' || echo "some submissions failed"
echo "submitted and cancelled $N jobs in $(( $(date +%s) - start )) s"
echo "after $N ended jobs: RSS $(rss $C), $(count --state cancelled) listed"
kill $C; wait $C 2>/dev/null
coordinator
echo "restarted over $N jobs: ready in ${READY} s, RSS $(rss $C), $(count) listed"
kill $C; wait $C 2>/dev/null
coordinator --retain-finished 1s
echo "restarted with --retain-finished 1s: ready in ${READY} s"
start=$(date +%s)
until [ "$(count)" = 0 ]; do sleep 1; done
echo "history pruned in about $(( $(date +%s) - start )) s after ready: RSS $(rss $C)"
kill $C; wait $C 2>/dev/null
coordinator
echo "restarted after pruning: ready in ${READY} s, RSS $(rss $C), $(count) listed"
kill $C; wait $C 2>/dev/null
coordinator --retain-finished 5s
start=$(date +%s)
seq 1 $N | xargs -P $PARALLEL -I{} bash -c 'one {}' || echo "some submissions failed"
echo "with --retain-finished 5s from the start, $N more jobs in $(( $(date +%s) - start )) s: RSS $(rss $C), peak $(awk '/VmHWM/ {printf "%.1f MB", $2 / 1024}' /proc/$C/status), $(count) listed"
kill $C $E; wait 2>/dev/null
rm -rf $D
