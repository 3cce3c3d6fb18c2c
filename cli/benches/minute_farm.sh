#!/bin/bash
# A long toy clip on a farm of separate processes with a real etcd: for each RUN (SECONDSxGROUPS,
# e.g. 60x2) it starts etcd, `serve coordinator` and one `serve worker --model toy` per group
# (each worker on one core: RAYON_NUM_THREADS=1, pinned with taskset), renders the clip, and
# prints the job's time split, what ffprobe reads and the peak RSS (VmHWM) of every process.
# The README's "Long clips" table comes from `cli/benches/minute_farm.sh 10x1 10x2 60x1 60x2 90x2`.
# CHECKPOINT_EVERY (default 1) is the coordinator's --checkpoint-every; MODEL=NAME=DIR serves a
# checkpoint directory instead of the built-in toy model (e.g.
# MODEL=toy-wrap33=worker/toy/runs/wrap33-step4500).
# Needs: a release build (cargo build --release -p longtake-cli), etcd, ffprobe, taskset; ports
# 23791/23801 (etcd) and 50071 (coordinator) free.
set -u
B=${LONGTAKE:-$(dirname "$0")/../../target/release/longtake}
PROMPT=${PROMPT:-"a red circle bouncing on a blue background"}
MODEL=${MODEL:-toy}
[ $# -gt 0 ] || { echo "usage: $0 SECONDSxGROUPS..." >&2; exit 2; }
hwm() { awk '/VmHWM/ {printf "%.1f MB", $2 / 1024}' /proc/$1/status; }
for run in "$@"; do
  secs=${run%x*}; groups=${run#*x}
  D=$(mktemp -d)
  etcd --data-dir $D/etcd --listen-client-urls http://127.0.0.1:23791 \
    --advertise-client-urls http://127.0.0.1:23791 --listen-peer-urls http://127.0.0.1:23801 > $D/etcd.log 2>&1 &
  E=$!; sleep 2
  $B serve coordinator --etcd http://127.0.0.1:23791 --listen 127.0.0.1:50071 --artifacts $D/art \
    --checkpoint-every ${CHECKPOINT_EVERY:-1} > $D/coordinator.log 2>&1 &
  C=$!
  W=()
  for g in $(seq 1 $groups); do
    RAYON_NUM_THREADS=1 taskset -c $(( (g - 1) % $(nproc) )) $B serve worker --etcd http://127.0.0.1:23791 \
      --listen 127.0.0.1:0 --id w$g --model "$MODEL" > $D/w$g.log 2>&1 &
    W+=($!)
  done
  sleep 3
  echo "== ${secs} s, ${groups} group(s)"
  $B render --coordinator http://127.0.0.1:50071 --model "${MODEL%%=*}" --prompt "$PROMPT" --seconds $secs --groups $groups \
    --out $D/clip.mp4 > $D/render.log 2>&1 || cat $D/render.log
  grep -E "^time:|^done:|^seams:|^exchanged" $D/render.log
  echo "ffprobe: $(ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames \
    -show_entries format=duration -of csv=p=0 $D/clip.mp4 | tr '\n' ' ')"
  echo "coordinator peak RSS $(hwm $C)"
  for i in "${!W[@]}"; do echo "worker w$((i + 1)) peak RSS $(hwm ${W[$i]})"; done
  kill "${W[@]}" $C; sleep 1; kill $E; wait 2>/dev/null
  rm -rf $D
done
