#!/usr/bin/env bash
# The GPU check, on a machine with one NVIDIA GPU, a CUDA driver and PyTorch (no Rust toolchain):
# longtake's parity fixtures in f32 and bf16 on the GPU, then case by case longtake and
# diffusers side by side: a 480p 81-frame Wan2.1 VAE decode and one denoising step of 1.3B- and
# 14B-size transformers at 480p and 720p (bf16, random weights), with peak device memory.
# Built here by deploy/gpu/prepare.sh; deploy/gpu/README.md says how to run it and what to expect.
#
#   deploy/gpu/check.sh [KIT]       # KIT: what prepare.sh made (default target/gpu-kit)
#
# Results go to $OUT (default ./gpu-check-out): log.txt, longtake.jsonl, diffusers.jsonl,
# memory.csv (nvidia-smi every 200 ms) and table.txt. BUDGET (default 540 s) bounds the whole
# run: cases that would start after it are skipped and said so, each case is cut at CASE_LIMIT
# (default 240 s). DRY_RUN=1 tries the kit on any machine, GPU or not: the same steps on the
# CPU with the smoke cases (one fixture in bf16, a two-layer transformer, a small VAE);
# CUDA_LIBS names where the CUDA 13 libraries are when no PyTorch here has them.
set -uo pipefail
KIT=$(cd "${1:-target/gpu-kit}" && pwd) || { echo "check: no kit (run deploy/gpu/prepare.sh)" >&2; exit 2; }
OUT=${OUT:-$PWD/gpu-check-out}
BUDGET=${BUDGET:-540}
CASE_LIMIT=${CASE_LIMIT:-240}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
: > "$OUT/longtake.jsonl"
: > "$OUT/diffusers.jsonl"
log() { echo "check: $*" | tee -a "$OUT/log.txt"; }
start=$(date +%s)

if [ "${DRY_RUN:-0}" = 1 ]; then
  log "dry run on the CPU: smoke cases only"
  device=cpu
  steps=(smoke)
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/log.txt" ||
    { log "nvidia-smi failed: no NVIDIA GPU or driver here"; exit 2; }
  device=cuda
  steps=(1.3b-480p 14b-480p 1.3b-720p 14b-720p)
fi

# The binary is linked against CUDA 13's libraries (libcublas.so.13, libcudart.so.13, ...,
# libnccl.so.2): PyTorch's CUDA 13 wheels bring them, or a system toolkit does. Add the
# directories that hold them to the library path, and say which are missing. CUDA_LIBS: more
# directories to look in first (a dry run here: target/cuda13-toolkit/root/lib64).
LD_LIBRARY_PATH="${CUDA_LIBS:+$CUDA_LIBS${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
gpu=$scratch/gpu
if command -v xz >/dev/null; then
  xz -dc "$KIT/bin/gpu.xz" >"$gpu"
else
  $PYTHON -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$KIT/bin/gpu.xz" "$gpu"
fi
chmod +x "$gpu"
torch_site=$($PYTHON -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)
for soname in $(ldd "$gpu" | awk '$3 == "not" { print $1 }'); do
  found=$( { [ -n "$torch_site" ] && find "$torch_site/nvidia" -name "$soname" 2>/dev/null
             find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib -maxdepth 1 -name "$soname" 2>/dev/null; } | head -1)
  [ -n "$found" ] && LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
missing=$(ldd "$gpu" | grep 'not found')
if [ -n "$missing" ]; then
  log "the binary's libraries are missing (a PyTorch built for CUDA 13, or a CUDA 13 toolkit, has them):"
  echo "$missing" | tee -a "$OUT/log.txt"
  exit 2
fi

# diffusers for the peer side: installed already, or from the kit's wheels into a scratch dir.
if ! $PYTHON -c 'import diffusers' 2>/dev/null; then
  pydeps=$scratch/pydeps
  if $PYTHON -m pip install -q --no-index --find-links "$KIT/wheels" --target "$pydeps" diffusers \
      >>"$OUT/log.txt" 2>&1; then
    export PYTHONPATH="$pydeps${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "diffusers could not be installed from $KIT/wheels (see log.txt): the peer side is skipped"
  fi
fi
peer_ok=$($PYTHON -c "import diffusers, torch; print(torch.cuda.is_available() or '$device' == 'cpu')" 2>/dev/null)
log "peer: diffusers importable and the device visible to torch: ${peer_ok:-no}"

: >"$OUT/memory.csv"
sampler=
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 \
    >"$OUT/memory.csv" 2>/dev/null &
  sampler=$!
  trap 'kill $sampler 2>/dev/null; rm -rf "$scratch"' EXIT
fi

# Runs one case under what is left of the budget (and at most CASE_LIMIT seconds).
run_case() {
  local name=$1
  shift
  local left=$((BUDGET - ($(date +%s) - start)))
  if [ "$left" -lt 30 ]; then
    log "$name: skipped, ${left}s of the budget left"
    return
  fi
  local limit=$((left < CASE_LIMIT ? left : CASE_LIMIT))
  log "$name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) ;;
    124) log "$name: cut at ${limit}s" ;;
    *) log "$name: exit status $rc" ;;
  esac
}

fixtures=()
for dir in "$KIT"/fixtures/*/; do fixtures+=(--fixtures "$dir"); done
ours=("$gpu" --device "$device" --json "$OUT/longtake.jsonl")
[ "$device" = cuda ] && ours+=(--bench)
theirs=("$PYTHON" "$KIT/peer.py" gpu --device "$device" --json "$OUT/diffusers.jsonl")

run_case "longtake parity" "${ours[@]}" --only parity "${fixtures[@]}"
run_case "longtake vae" "${ours[@]}" --only vae
[ "$peer_ok" = True ] && [ "$device" = cuda ] && run_case "diffusers vae" "${theirs[@]}" vae
for case in "${steps[@]}"; do
  run_case "longtake step $case" "${ours[@]}" --only step --cases "$case"
  [ "$peer_ok" = True ] && run_case "diffusers step $case" "${theirs[@]}" "$case"
done

[ -n "$sampler" ] && kill "$sampler" 2>/dev/null
$PYTHON "$KIT/peer.py" gpu-table "$OUT/longtake.jsonl" "$OUT/diffusers.jsonl" | tee "$OUT/table.txt"
peak=$(cut -d, -f2 "$OUT/memory.csv" | sort -n | tail -1)
if [ "$device" = cuda ]; then
  log "device memory in use at most (nvidia-smi, whole run): ${peak:-?} MiB"
fi
failed=$(grep -c '"passed": *false' "$OUT/longtake.jsonl")
log "parity cases failed: $failed; $(($(date +%s) - start)) s in all"
[ "$failed" = 0 ]
