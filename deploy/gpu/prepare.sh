#!/usr/bin/env bash
# Builds the GPU check's kit, here (a machine with the Rust toolchain, no GPU needed): the `gpu`
# bench binary built with `--features cuda` against CUDA 13 and stripped, the parity fixtures,
# the peer script and the wheels of diffusers and its dependencies for the GPU machine's Python.
# Then carry the kit to the GPU machine and run deploy/gpu/check.sh there (deploy/gpu/README.md).
#
#   deploy/gpu/prepare.sh                 # kit in target/gpu-kit
#   PYTHON_VERSION=3.11 CUDA_COMPUTE_CAP=90 deploy/gpu/prepare.sh
#
# CUDA_HOME: a CUDA 13 toolkit; by default deploy/gpu/cuda-toolkit.sh assembles one from PyPI.
# CUDA_COMPUTE_CAP (default 80) is the oldest GPU the kernels are compiled for: candle's kernels
# are PTX, which the driver compiles for newer GPUs when they load (80 runs on A100, H100, H200).
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=${KIT:-target/gpu-kit}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PIP=${PIP:-python3 -m pip}
export PIP
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
# A target directory of its own: the CUDA build must not replace the CPU build's artifacts.
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda13}
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(deploy/gpu/cuda-toolkit.sh)
fi
export CUDA_HOME CUDA_PATH=$CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
# Before the system's library directories, where an older CUDA's libcublas.so may be.
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CUDA_HOME/lib64"

echo "prepare: building the gpu bench with --features cuda ($(nvcc --version | tail -1), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
binary=$(cargo bench -p longtake-worker --features cuda --bench gpu --no-run --message-format=json |
  python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "gpu" and msg.get("executable"):
        print(msg["executable"])')
[ -n "$binary" ] || { echo "prepare: cargo built no gpu bench executable" >&2; exit 1; }

rm -rf "$KIT"
mkdir -p "$KIT/bin" "$KIT/fixtures" "$KIT/wheels"
# Stripped, it is some 57 MB (candle's kernels: PTX text and sm_80 code); xz makes it 7.
strip -o "$KIT/bin/gpu" "$binary"
readelf -d "$KIT/bin/gpu" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' >"$KIT/bin/gpu.needs"
xz -9 -T2 "$KIT/bin/gpu"
# The Wan2.1 text-to-video fixtures (the families this build runs; the others are refused).
for fixture in wan-tiny wan-wide; do
  cp -r "../shared/reference/$fixture" "$KIT/fixtures/"
done
cp worker/benches/peer.py "$KIT/"
echo "prepare: diffusers' wheels for Python $PYTHON_VERSION"
$PIP download -q "diffusers==0.42.1" --dest "$KIT/wheels" --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
# numpy comes with PyTorch; its wheel alone would be a quarter of what can be carried.
rm -f "$KIT"/wheels/numpy-*.whl
echo "prepare: the binary needs (the GPU machine's driver and PyTorch provide them):" $(cat "$KIT/bin/gpu.needs")
du -sh "$KIT"/*
du -sh "$KIT"
echo "prepare: kit ready in $KIT (the device tool carries at most 64 MiB)"
